"""webdataset-format shards (tar files) without the webdataset package.

A shard is a tar whose members are named ``<key>.<field>`` (``000123.jpg``, ``000123.txt``,
``000123.json``); consecutive members with the same key form one sample, as in webdataset. The
reader yields ``{"__key__", "__shard__", field: bytes, ...}`` dicts. ``__key__`` is only unique
within a shard, so caches index samples by (shard name, key) (llm2clip.cache.index.shard_name).

A shard that can't be opened or read raises ``ShardError`` naming it; the callers decide whether
to stop or skip.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from llm2clip.cache.index import shard_name

__all__ = [
    "ShardError",
    "count_samples",
    "expand_shards",
    "iter_samples",
    "shard_name",
    "walk_samples",
    "write_shard",
]


class ShardError(RuntimeError):
    """An unreadable or malformed shard; the message names it."""


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths from a list, a directory (its *.tar), a glob, or webdataset brace notation
    ("data/{00000..00099}.tar"); several specs may be joined with "::". Sorted within a glob or
    directory, in order otherwise. Raises FileNotFoundError naming a spec that matches nothing."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    spec = os.fspath(spec)
    if "::" in spec:
        return [p for s in spec.split("::") for p in expand_shards(s)]
    m = _BRACES.search(spec)
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo)
        return [
            p
            for i in range(int(lo), int(hi) + 1)
            for p in expand_shards(spec[: m.start()] + f"{i:0{width}d}" + spec[m.end() :])
        ]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
    else:
        found = [spec] if os.path.exists(spec) else []
    if not found:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return found


def _split(member_name: str) -> tuple[str, str]:
    """'dir/000123.txt' -> ('dir/000123', 'txt'); webdataset splits at the first dot of the basename."""
    head, _, base = member_name.rpartition("/")
    if "." not in base:
        return member_name, ""
    stem, field = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), field


def walk_samples(
    path: str, read: Callable[[int, str], bool] | None = None
) -> Iterator[tuple[int, str, dict]]:
    """(index, key, {field: bytes}) for every sample of one shard, in tar order: the one tar walk
    behind every reader. A member's payload is read only when ``read(index, field)`` is true (all
    of them without `read`); tarfile seeks past the others, reading their headers only. Raises
    ShardError naming the shard when it can't be opened, is unreadable or was cut short."""
    try:
        tar = tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"cannot open shard {path}: {e}") from e
    index, key, members = -1, None, {}
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, field = _split(member.name)
                if not field:
                    continue
                if k != key:
                    if key is not None:
                        yield index, key, members
                    index, key, members = index + 1, k, {}
                if read is None or read(index, field):
                    f = tar.extractfile(member)
                    members[field] = f.read() if f is not None else b""
            _check_end_of_archive(path, tar)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard {path} is unreadable or truncated: {e}") from e
    if key is not None:
        yield index, key, members


def iter_samples(path: str) -> Iterator[dict]:
    """Samples of one shard, in tar order: ``{"__key__", "__shard__", field: bytes, ...}``."""
    name = shard_name(path)
    for _, key, members in walk_samples(path):
        yield {"__key__": key, "__shard__": name, **members}


def _count(path: str) -> int:
    return sum(1 for _ in walk_samples(path, read=lambda i, f: False))


def count_samples(shards: Sequence[str], threads: int = 8) -> list[int]:
    """Number of samples of each shard from the tar headers only (no payload is read)."""
    shards = list(shards)
    if not shards:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        return list(pool.map(_count, shards))


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
