"""File helpers: atomic, durable writes (a reader sees the old file or the new one, never a torn
write) and content fingerprints.

    atomic_write_json(out / "metrics.json", {"step": 10})
    atomic_save(out / "trainer_state.pt", state)       # torch.save
    atomic_write_bytes(path, data)
    files_sha256("/models/llama")                         # "sha256:..." of a file or a folder

Every writer goes through a temporary file in the target's directory, fsync, ``os.replace``, then
an fsync of the directory so the rename survives a power cut. Arguments are (path, content)
everywhere, like ``Path.write_bytes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "files_sha256",
    "fsync_dir",
    "read_json",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """An open binary file that becomes `path` when the block ends without an exception."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; caches and runs are read by other users' jobs
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(d)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` (its directory is created as needed)."""
    with _atomic_file(path) as f:
        f.write(data)


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if type(x).__module__ == "torch" and type(x).__name__ in ("device", "dtype"):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """JSON (dataclasses become dicts, paths and torch devices / dtypes strings), atomically."""
    text = json.dumps(obj, indent=indent, default=_jsonable) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to `path`, atomically."""
    import torch

    with _atomic_file(path) as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def files_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` over a file or a directory's files (relative names and contents, sorted;
    names starting with '.' and *.md are left out)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.suffix != ".md"
    )  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no files to hash under {root}")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()
