"""webdataset shards: where they are (paths and URLs), their samples, and their names.

A shard is a tar whose members are named ``<key>.<field>`` (``000123.jpg``, ``000123.txt``,
``000123.json``); consecutive members with the same key form one sample, exactly as webdataset
groups them (its ``base_plus_ext``: the key is everything before the first dot of the file name,
the field is the rest, lower-cased; ``__*__`` metadata members are ignored; a field repeated
within a sample is an error). The readers yield ``{"__key__", "__shard__", field: bytes, ...}``.

Where shards are (``expand_shards``; docs/data.md): local paths, directories (their ``*.tar``),
globs, ``file:`` URLs, and every URL that webdataset's ``gopen`` opens (``pipe:CMD``,
``http(s)://``, ``gs://``, ...); webdataset's brace expansion (``{00000..00099}``, ``{a,b}``),
``::``-joined lists, and text files of URLs (``*.txt``, ``*.urls``, ``*.list``: one spec per line).

How they are read (``walk_samples``, the one tar walk behind every reader):

- local files: random access with ``tarfile``; a member whose payload is not wanted is seeked
  past (headers only), so counting a shard or reading a quarter of its images costs a fraction
  of reading it (bench/data_throughput.py --read: 0.7x / 0.75x of a full read of a page-cached
  82 MB shard, where webdataset's streaming iterator needs 1.3x / 1.17x);
- URLs: webdataset's ``tar_file_iterator`` over ``llm2clip.data.remote.open_stream`` (gopen with
  retries, backoff and bounded waits), its member selection deciding which payloads are kept.

A shard that can't be opened or read, was cut short or is malformed raises ``ShardError`` naming
it; the callers decide whether to stop or to skip.

Names: the cache keys a sample by (shard name, ``__key__``), the shard name being the file name
of its path or URL (``shard_name``): moving shards from a disk to a bucket keeps their cache. Two
different shards with one name in a run are refused (``check_unique_names``).
"""

from __future__ import annotations

import collections
import glob
import importlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from webdataset.handlers import reraise_exception
from webdataset.tariterators import tar_file_iterator

from llm2clip.cache.index import shard_name
from llm2clip.data.remote import ReadPolicy, ShardError, is_local, local_path, open_stream

_wds_gopen = importlib.import_module("webdataset.gopen")
_wds_shardlists = importlib.import_module("webdataset.shardlists")

__all__ = [
    "ReadPolicy",
    "ShardError",
    "check_unique_names",
    "count_samples",
    "expand_shards",
    "is_local",
    "iter_samples",
    "shard_name",
    "walk_samples",
    "write_shard",
]

LIST_SUFFIXES = (".txt", ".urls", ".list")
"""A local file with one of these suffixes is a list of shard specs, one per line."""


# ------------------------------------------------------------------------------------------------
# Names


def check_unique_names(urls: Sequence[str]) -> None:
    """ValueError naming both shards when two entries of `urls` have the same shard_name."""
    seen: dict[str, str] = {}
    for u in urls:
        name = shard_name(u)
        if name in seen:
            what = "is listed twice" if seen[name] == u else f"and {u} are both named {name!r}"
            raise ValueError(
                f"shard names must be unique in a run (the cache keys samples by shard name): {seen[name]} "
                f"{what}"
            )
        seen[name] = u


# ------------------------------------------------------------------------------------------------
# Where shards are


def _is_url(spec: str) -> bool:
    return not is_local(spec)


def _check_scheme(url: str) -> None:
    scheme = url.split(":", 1)[0]
    if scheme not in _wds_gopen.gopen_schemes:
        known = sorted(k for k in _wds_gopen.gopen_schemes if not k.startswith("__"))
        hint = f"; read it through a command, e.g. 'pipe:aws s3 cp {url} -'" if scheme == "s3" else ""
        raise ValueError(f"no reader for {url!r}: webdataset's gopen opens {known}, pipe: and file:{hint}")
    if any(c in url for c in "*?[") and not url.startswith("pipe:") and "?" not in url.split("/")[-1]:
        raise ValueError(f"{url!r}: globs are not expanded for URLs; use brace ranges ({{00000..00099}})")


def _expand_one(spec: str, base: str | None, depth: int) -> list[str]:
    if _is_url(spec):
        _check_scheme(spec)
        return [spec]
    path = local_path(spec)
    if base is not None and not os.path.isabs(path):
        path = os.path.normpath(os.path.join(base, path))
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif any(c in path for c in "*?["):
        found = sorted(glob.glob(path))
    elif os.path.isfile(path) and path.endswith(LIST_SUFFIXES):
        return _read_list(path, depth)
    else:
        found = [path] if os.path.exists(path) else []
    if not found:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return found


def _read_list(path: str, depth: int) -> list[str]:
    if depth > 4:
        raise ValueError(f"shard list {path} nests lists more than 4 deep")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out += _expand(line, os.path.dirname(os.path.abspath(path)), depth + 1)
    if not out:
        raise FileNotFoundError(f"the shard list {path} names no shard")
    return out


def _expand(spec: str, base: str | None, depth: int) -> list[str]:
    try:
        parts = _wds_shardlists.expand_urls(spec)  # '::' lists, ${WDS_VAR}, brace expansion
    except AssertionError as e:  # webdataset asserts that a ${VAR} is set
        raise ValueError(f"{spec!r}: {e}") from e
    return [p for part in parts for p in _expand_one(part, base, depth)]


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths and URLs from a spec (module docstring), in order; sorted within a glob or
    directory. Raises FileNotFoundError naming a local spec that matches nothing, ValueError for a
    URL no reader opens or two shards with one name (check_unique_names)."""
    if isinstance(spec, (list, tuple)):
        out = [p for s in spec for p in expand_shards(s)]
    else:
        out = _expand(os.fspath(spec), None, 0)
    check_unique_names(out)
    return out


# ------------------------------------------------------------------------------------------------
# The tar walk


_META = re.compile(r"__[^/]*__($|/)")
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""webdataset's base_plus_ext pattern, compiled (tests check that both agree)."""


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, field) of a member name as webdataset's base_plus_ext splits it; (None, None) when
    the name has no field."""
    m = _KEY_FIELD.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _meta(name: str) -> bool:
    """webdataset's tar_file_iterator ignores these members (``__*__`` metadata)."""
    return name.startswith("__") and (("/" not in name and name.endswith("__")) or bool(_META.match(name)))


def walk_samples(
    url: str, read: Callable[[int, str], bool] | None = None, policy: ReadPolicy | None = None
) -> Iterator[tuple[int, str, dict]]:
    """(index, key, {field: bytes}) for every sample of one shard, in tar order: the one tar walk
    behind every reader. A member's payload is kept only when ``read(index, field)`` is true (all
    of them without `read`); a local file seeks past the others (headers only). `policy`: retries
    and timeouts of a URL (default ``ReadPolicy.from_env()``). Raises ShardError naming the shard
    when it can't be opened, is unreadable, was cut short or repeats a field within a sample."""
    if is_local(url):
        return _walk_local(url, local_path(url), read)
    return _walk_stream(url, read, policy)


def _walk_local(url: str, path: str, read) -> Iterator[tuple[int, str, dict]]:
    try:
        tar = tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"cannot open shard {url}: {e}") from e
    index, key, members = -1, None, {}
    try:
        with tar:
            for member in tar:
                if not member.isfile() or _meta(member.name):
                    continue
                k, field = split_name(member.name)
                if k is None:
                    continue
                field = field.lower()
                if k != key:
                    if key is not None:
                        yield index, key, members
                    index, key, members, seen = index + 1, k, {}, set()
                if field in seen:
                    raise ShardError(
                        f"shard {url}: member {member.name!r} repeats field {field!r} of sample {k!r}"
                    )
                seen.add(field)
                if read is None or read(index, field):
                    f = tar.extractfile(member)
                    members[field] = f.read() if f is not None else b""
            _check_end_of_archive(path, tar)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard {url} is unreadable or truncated: {e}") from e
    if key is not None:
        yield index, key, members


class _Grouper:
    """webdataset's member selection hook, which also numbers the samples as it sees their keys
    (members of a sample whose payloads are all dropped never reach the iterator's output)."""

    def __init__(self, url: str, read) -> None:
        self.url, self.read = url, read
        self.index, self.key, self.seen = -1, None, set()
        self.started: collections.deque = collections.deque()  # (index, key) not yet yielded

    def select(self, name: str) -> bool:
        k, field = split_name(name)
        if k is None:
            return False
        field = field.lower()
        if k != self.key:
            self.index, self.key, self.seen = self.index + 1, k, set()
            self.started.append((self.index, k))
        if field in self.seen:
            raise ValueError(f"member {name!r} repeats field {field!r} of sample {k!r}")
        self.seen.add(field)
        return self.read is None or self.read(self.index, field)


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _walk_stream(url: str, read, policy: ReadPolicy | None) -> Iterator[tuple[int, str, dict]]:
    group = _Grouper(url, read)
    stream = None
    kept: dict[int, dict] = {}
    try:
        stream = open_stream(url, policy)
        for item in tar_file_iterator(stream, handler=reraise_exception, select_files=group.select):
            field = split_name(item["fname"])[1]
            while group.started[0][0] < group.index:  # samples before this one are complete
                i, key = group.started.popleft()
                yield i, key, kept.pop(i, {})
            kept.setdefault(group.index, {})[field.lower()] = item["data"]
        raw = stream.raw
        if not raw.head.startswith(_COMPRESSED) and raw.drain(1 << 20):
            # tarfile reads a stream cut at a member boundary as a clean end; a real tar ends with
            # two zero blocks (and zero padding), which a stream that ended must show.
            if len(raw.tail) < 1024 or raw.tail[-1024:].count(0) != 1024:
                raise ShardError(f"shard {url} ends without an end-of-archive marker (cut short?)")
    except ShardError as e:
        raise ShardError(str(e.args[0]).split(" @ <")[0]) from e
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        msg = str(e.args[0]).split(" @ <")[0] if e.args else repr(e)
        raise ShardError(f"shard {url} is unreadable or truncated: {msg}") from e
    finally:
        if stream is not None:
            stream.close()
    while group.started:
        i, key = group.started.popleft()
        yield i, key, kept.pop(i, {})


def iter_samples(url: str, policy: ReadPolicy | None = None) -> Iterator[dict]:
    """Samples of one shard, in tar order: ``{"__key__", "__shard__", field: bytes, ...}``."""
    name = shard_name(url)
    for _, key, members in walk_samples(url, policy=policy):
        yield {"__key__": key, "__shard__": name, **members}


def count_samples(shards: Sequence[str], threads: int = 8, policy: ReadPolicy | None = None) -> list[int]:
    """Number of samples of each shard: local files from the tar headers only (no payload is
    read); URLs are streamed through (no payload kept)."""
    shards = list(shards)
    if not shards:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        return list(pool.map(lambda s: sum(1 for _ in walk_samples(s, lambda i, f: False, policy)), shards))


def _check_end_of_archive(path: str, tar: tarfile.TarFile) -> None:
    """tarfile treats a file cut at a member boundary as a clean end; a real tar ends with two
    zero blocks. (Compressed shards are checked by their own stream's end marker.)"""
    if not isinstance(tar.fileobj, io.BufferedReader):  # compressed: offsets are not file offsets
        return
    with open(path, "rb") as f:
        f.seek(tar.offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"no end-of-archive marker after offset {tar.offset} (file cut short?)")


def write_shard(path: str, samples: list[dict]) -> None:
    """Write samples ({"__key__": ..., field: bytes | str}) as a webdataset tar (tests, the demo)."""
    tmp = f"{path}.tmp"
    with tarfile.open(tmp, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for field, value in sample.items():
                if field.startswith("__"):
                    continue
                data = value.encode() if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
