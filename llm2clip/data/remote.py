"""Reading shards that are not local files: webdataset's gopen plus retries, backoff and timeouts.

    stream = open_stream("https://host/cc3m/00042.tar", ReadPolicy(retries=3, timeout_s=60))
    data = stream.read(1 << 16)      # sequential reads; a failed read is retried transparently

A URL is opened with ``webdataset.gopen.gopen``: ``pipe:CMD`` (CMD's standard output, e.g.
``pipe:aws s3 cp s3://bucket/00042.tar -``), ``http(s)://`` (curl), ``gs://`` (gsutil), ``ais://``,
``hf://`` and whatever else its ``gopen_schemes`` table holds. On top of it:

- **Bounded waiting.** A read that makes less than ``min_bytes_per_s`` progress over ``timeout_s``
  seconds fails (a stalled or trickling server, a hung command); so does a command that does not
  exit within ``timeout_s`` after its output ended. Subprocess sources are read with ``select``, so
  the wait is bounded even when no byte ever arrives.
- **Exit status.** A command (or curl) that ends with a failing status fails the read: curl's
  ``-f`` turns an HTTP 404 into exit 22, a connection cut mid-transfer into exit 18.
- **Retries.** A failed read reopens the URL after a backoff (``backoff_s``, doubled each time,
  capped at 30 s) and skips the bytes already delivered, up to ``retries`` times; then
  ``ShardError`` names the URL, the byte position and every attempt's error. The caller decides
  whether that stops the run or skips the shard (``ShardImageDataset(on_shard_error=...)``).

Defaults come from the environment so that every entry point honours them:
``LLM2CLIP_SHARD_RETRIES`` (3), ``LLM2CLIP_SHARD_TIMEOUT_S`` (60), ``LLM2CLIP_SHARD_BACKOFF_S`` (1),
``LLM2CLIP_SHARD_MIN_BYTES_PER_S`` (1024). The trainer's ``--shard-retries`` / ``--shard-timeout-s``
override them.
"""

from __future__ import annotations

import importlib
import io
import os
import select
import subprocess
import time
from dataclasses import dataclass

_wds_gopen = importlib.import_module("webdataset.gopen")  # the package's `gopen` is the function

__all__ = ["ReadPolicy", "RemoteStream", "ShardError", "is_local", "local_path", "open_stream"]


class ShardError(RuntimeError):
    """An unreadable or malformed shard; the message names it."""


# curl's exit codes that say what went wrong (webdataset opens http(s) with curl -f -s -L).
_CURL_EXITS = {
    6: "could not resolve host",
    7: "could not connect (refused)",
    18: "transfer cut short",
    22: "HTTP error >= 400 (e.g. 404 not found)",
    28: "operation timed out",
    52: "empty reply from server",
    56: "failure receiving data (connection reset)",
}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} is not a number") from e


@dataclass(frozen=True)
class ReadPolicy:
    """How hard to try a remote shard (module docstring). Picklable: DataLoader workers get a copy."""

    retries: int = 3
    """Reopen attempts after a failed read (0: fail at the first error)."""
    timeout_s: float = 60.0
    """Window over which a read must make progress (and the wait for a command's exit)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further one (at most 30 s)."""
    min_bytes_per_s: float = 1024.0
    """Slowest accepted transfer rate over a timeout_s window (0: only a full stall fails)."""

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"shard retries must be an int >= 0, got {self.retries!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"shard timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.backoff_s < 0 or self.min_bytes_per_s < 0:
            raise ValueError("shard backoff and minimum rate must be >= 0")

    @classmethod
    def from_env(cls, **overrides) -> ReadPolicy:
        """The defaults, as set by the LLM2CLIP_SHARD_* variables, then `overrides` (None: keep)."""
        kw = dict(
            retries=int(_env_float("LLM2CLIP_SHARD_RETRIES", cls.retries)),
            timeout_s=_env_float("LLM2CLIP_SHARD_TIMEOUT_S", cls.timeout_s),
            backoff_s=_env_float("LLM2CLIP_SHARD_BACKOFF_S", cls.backoff_s),
            min_bytes_per_s=_env_float("LLM2CLIP_SHARD_MIN_BYTES_PER_S", cls.min_bytes_per_s),
        )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def is_local(url: str) -> bool:
    """Whether `url` names a local file: a plain path or a file: URL (not pipe:, http:, s3:, ...)."""
    if url.startswith("file:"):
        return True
    scheme, sep, _ = url.partition(":")
    # "C:\\x" style drive letters do not occur on the platforms we run on; a scheme is >= 2 chars.
    return not (sep and len(scheme) >= 2 and scheme.replace("+", "").replace("-", "").isalnum())


def local_path(url: str) -> str:
    """The file path of a local `url` (file:///a/b.tar -> /a/b.tar)."""
    if url.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(url).path)
    return url


class _Source:
    """One attempt: the object gopen returned, read with a bounded wait when it is a subprocess."""

    def __init__(self, url: str, policy: ReadPolicy):
        self.url, self.policy = url, policy
        self.obj = _wds_gopen.gopen(url, "rb")
        self.pipe = self.obj if isinstance(self.obj, _wds_gopen.Pipe) else None
        self.fd = self.pipe.stream.fileno() if self.pipe is not None else None
        self.eof = False

    def read(self, n: int, deadline: float) -> bytes:
        if self.pipe is None:
            data = self.obj.read(n)
        else:
            wait = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.fd], [], [], wait)
            if not ready:
                raise TimeoutError(f"no data for {self.policy.timeout_s:g} s")
            data = os.read(self.fd, n)  # the pipe's own buffer is never used, so select is exact
        if not data:
            self.eof = True
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        if self.pipe is None:
            return
        proc = self.pipe.proc
        try:
            status = proc.wait(timeout=self.policy.timeout_s)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(
                f"the command did not exit within {self.policy.timeout_s:g} s of its output's end"
            ) from e
        self.pipe.status = status
        if status not in self.pipe.ignore_status:
            cmd = self.pipe.args[0][0]
            curl = isinstance(cmd, list) and cmd and cmd[0] == "curl"
            why = f" ({_CURL_EXITS[status]})" if curl and status in _CURL_EXITS else ""
            raise OSError(f"{'curl' if curl else 'command'} exited with status {status}{why}")

    def close(self) -> None:
        if self.pipe is not None:
            proc = self.pipe.proc
            if proc.poll() is None:
                proc.kill()
            try:
                self.pipe.stream.close()
            except OSError:
                pass
            proc.wait()
            self.pipe.status = proc.returncode  # Pipe.__del__ then has nothing left to wait for
        else:
            try:
                self.obj.close()
            except OSError:
                pass


class RemoteStream(io.RawIOBase):
    """A read-only sequential stream over a URL that retries failed reads (module docstring).

    ``head`` keeps the first bytes (compression detection), ``tail`` the last 64 KiB delivered
    (the end-of-archive check of an uncompressed tar)."""

    TAIL = 1 << 16

    def __init__(self, url: str, policy: ReadPolicy | None = None):
        super().__init__()
        self.url = url
        self.policy = policy or ReadPolicy.from_env()
        self.pos = 0
        self.head = b""
        self.tail = bytearray()
        self.errors: list[str] = []
        self._src: _Source | None = None
        self._window = (time.monotonic(), 0)  # (start, pos at start) of the rate window
        self._attempt(self._open, opening=True)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        src = _Source(self.url, self.policy)
        try:  # skip what the previous attempts delivered
            skip = self.pos
            deadline = time.monotonic() + self.policy.timeout_s
            while skip:
                data = src.read(min(skip, 1 << 20), deadline)
                if not data:
                    raise OSError(
                        f"the source ended after {self.pos - skip} bytes, {self.pos} were read before"
                    )
                skip -= len(data)
                deadline = time.monotonic() + self.policy.timeout_s
        except BaseException:
            src.close()
            raise
        self._src = src
        self._window = (time.monotonic(), self.pos)

    def _attempt(self, fn, opening: bool = False):
        """fn() with the retry policy: reopen (skipping the bytes already read) after a failure."""
        p = self.policy
        for attempt in range(p.retries + 1):
            try:
                if self._src is None and not opening:
                    self._open()
                return fn()
            except (OSError, TimeoutError, ValueError, subprocess.SubprocessError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                if self._src is not None:
                    self._src.close()
                    self._src = None
                if attempt == p.retries:
                    break
                time.sleep(min(30.0, p.backoff_s * 2**attempt))
        tried = "; ".join(f"[{i + 1}] {m}" for i, m in enumerate(self.errors))
        raise ShardError(
            f"shard {self.url} is unreadable at byte {self.pos} after {p.retries + 1} attempt(s): {tried}"
        )

    def _read_once(self, n: int) -> bytes:
        p = self.policy
        start, start_pos = self._window
        now = time.monotonic()
        if now - start >= p.timeout_s:
            if self.pos - start_pos < p.min_bytes_per_s * (now - start):
                rate = (self.pos - start_pos) / (now - start)
                raise TimeoutError(f"too slow: {rate:.0f} B/s over {now - start:.1f} s")
            self._window = start, start_pos = now, self.pos
        return self._src.read(n, start + p.timeout_s)

    def readinto(self, buffer) -> int:
        if self._src is not None and self._src.eof:
            return 0
        n = len(buffer)
        data = self._attempt(lambda: self._read_once(n))
        k = len(data)
        buffer[:k] = data
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        self.tail += data
        if len(self.tail) > 2 * self.TAIL:
            del self.tail[: len(self.tail) - self.TAIL]
        self.pos += k
        return k

    def drain(self, limit: int) -> bool:
        """Read and drop up to `limit` bytes; True when the stream ended within them."""
        left = limit
        while left > 0:
            data = self.read(min(left, 1 << 16))
            if not data:
                return True
            left -= len(data)
        return False

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None
        super().close()


def open_stream(url: str, policy: ReadPolicy | None = None) -> io.BufferedReader:
    """A buffered sequential reader over `url` (retries, timeouts: module docstring)."""
    return io.BufferedReader(RemoteStream(url, policy), buffer_size=1 << 16)
