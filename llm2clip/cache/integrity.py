"""Block checksums: each data file of a cache is cut into blocks whose crc32 the merge records in
checksums.bin; a reader verifies a block the first time it is touched ("lazy") or every block at
open ("full"). docs/cache.md ("Integrity") gives the design, the costs and the failure messages.

    BlockLayout     where one file's blocks lie (manifest["integrity"]["blocks"])
    ChecksummedFile a file being written: sha256 of all of it, crc32 of each block of its data
    scan_file       read a file once: its sha256 and block crc32s, stopping at the first bad block
    LazyBlocks      one file's blocks, each verified the first time it is touched in this process
    manifest_digest the sha256 that seals manifest.json (over its canonical JSON)
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .format import CorruptCacheError

CHECKSUM_NAME = "crc32 (zlib: IEEE 802.3 polynomial, initial value 0) of each block's bytes"
BLOCK_BYTES = 16 << 10  # target block size: rows.bin blocks hold max(1, BLOCK_BYTES // stride) rows
SCAN_BYTES = 16 << 20  # bytes read per step of a full scan
SCAN_THREADS = max(1, min(8, os.cpu_count() or 1))  # crc32 threads of a full scan
VERIFY_MODES = ("lazy", "full", "off")
DIGEST_KEY = "manifest_sha256"

# (file, done bytes, total bytes) after each step of a full scan
Progress = Callable[[str, int, int], None]
# a block -> the words that follow "block b (bytes x..y)" in an error: rows, shards, entries
Describe = Callable[[int], str]


class CorruptBlockError(CorruptCacheError):
    """A block of a cache file does not match its recorded crc32. .path, .block and the byte range
    [.start, .end) name it; the message gives the range inclusive, and the rows, entries or probe
    captions in it. Constructible from the message alone, so a DataLoader re-raises it as itself."""

    def __init__(self, message: str, path: Path | None = None, block: int = -1, start: int = 0, end: int = 0):
        super().__init__(message)
        self.path, self.block, self.start, self.end = path, block, start, end

    @classmethod
    def of(cls, path: Path, block: int, span: tuple[int, int], found: int, want: int, what: str):
        start, end = span
        return cls(
            f"{path}: block {block} (bytes {start}..{end - 1}{what}) fails its crc32 check "
            f"(0x{found:08x}, checksums.bin says 0x{want:08x}): the cache is corrupt; restore the file "
            "from a good copy or rebuild the cache into a new directory (python -m llm2clip.extract)",
            path,
            block,
            start,
            end,
        )


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of one file: bytes [offset, offset + size) cut every block_bytes (the last one short);
    their crc32s are entries [first, first + count) of checksums.bin. The bytes before offset (a
    header) are compared exactly at open instead."""

    file: str
    offset: int
    size: int
    block_bytes: int
    first: int

    @property
    def count(self) -> int:
        return -(-self.size // self.block_bytes)

    def span(self, block: int) -> tuple[int, int]:
        """Absolute byte range [start, end) of a block in the file."""
        start = self.offset + block * self.block_bytes
        return start, min(start + self.block_bytes, self.offset + self.size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BlockLayout:
        layout = cls(**{k: d[k] for k in ("file", "offset", "size", "block_bytes", "first")})
        for k in ("offset", "size", "block_bytes", "first"):
            v = getattr(layout, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{layout.file} {k} = {v!r}")
        if layout.block_bytes == 0:
            raise ValueError(f"{layout.file} block_bytes = 0")
        return layout


def block_bytes_for(unit: int, target: int) -> int:
    """Block size of a file of `unit`-byte records: a whole number of records, about `target` bytes."""
    return max(1, target // unit) * unit


def check_target(block_bytes: int) -> int:
    ok = isinstance(block_bytes, int) and not isinstance(block_bytes, bool)
    if not ok or block_bytes < 16 or block_bytes % 16:
        raise ValueError(f"block_bytes must be a positive multiple of 16, got {block_bytes!r}")
    return block_bytes


# --------------------------------------------------------------------------------------------
# Writing


class _BlockSums:
    """crc32 of consecutive block_bytes-sized pieces of a byte stream (the last one short)."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self.crcs = bytearray()
        self._crc = 0
        self._fill = 0

    def update(self, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            take = min(self.block_bytes - self._fill, len(mv) - pos)
            self._crc = zlib.crc32(mv[pos : pos + take], self._crc)
            self._fill += take
            pos += take
            if self._fill == self.block_bytes:
                self._close_block()

    def _close_block(self) -> None:
        self.crcs += self._crc.to_bytes(4, "little")
        self._crc = self._fill = 0

    def finish(self) -> np.ndarray:
        if self._fill:
            self._close_block()
        return np.frombuffer(bytes(self.crcs), dtype="<u4")


class ChecksummedFile:
    """A file opened for writing that keeps its size, its sha256 and, after the first `offset`
    bytes (a header), the crc32 of each block of block_bytes."""

    def __init__(self, path: Path, offset: int = 0, block_bytes: int = BLOCK_BYTES) -> None:
        self.path = path
        self.offset = offset
        self.f = open(path, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.sums = _BlockSums(block_bytes)
        self.size = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.sha.update(mv)
        head = max(0, min(len(mv), self.offset - self.size))
        self.sums.update(mv[head:])
        self.size += len(mv)

    def close(self) -> tuple[dict, np.ndarray]:
        """({"size", "sha256"} for the manifest, the block crc32s) once the file is durable."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}, self.sums.finish()


# --------------------------------------------------------------------------------------------
# Reading


def scan_file(
    path: Path,
    layout: BlockLayout | None = None,
    expected: np.ndarray | None = None,
    progress: Progress | None = None,
    describe: Describe | None = None,
    sha: bool = True,
) -> tuple[str | None, np.ndarray | None]:
    """Read a file once, front to back: (its sha256, or None without sha; the crc32 of each block
    of `layout`, or None without one).

    The crc32s run on SCAN_THREADS threads and the sha256 on one more (all release the GIL). With
    `expected` crc32s, raise CorruptBlockError at the first block that differs (the scan stops).
    """
    size = path.stat().st_size
    hasher = hashlib.sha256() if sha else None
    step = SCAN_BYTES if layout is None else block_bytes_for(layout.block_bytes, SCAN_BYTES)
    crcs = np.empty(layout.count if layout is not None else 0, dtype="<u4")
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(SCAN_THREADS + 1) as pool:
        head = f.read(layout.offset if layout is not None else 0)
        done, block, buf = len(head), 0, bytearray(step)
        if hasher is not None:
            hasher.update(head)
        while n := _read_full(f, buf):
            mv = memoryview(buf)[:n]
            hashing = pool.submit(hasher.update, mv) if hasher is not None else None
            if layout is not None:
                block = _crc_step(pool, mv, path, layout, crcs, block, expected, describe)
            if hashing is not None:
                hashing.result()  # before buf is read into again
            done += n
            if progress is not None:
                progress(path.name, done, size)
    if progress is not None and done == len(head):  # nothing after the header: report the end
        progress(path.name, done, size)
    return (hasher.hexdigest() if hasher is not None else None), (crcs if layout is not None else None)


def _read_full(f, buf: bytearray) -> int:
    """readinto until buf is full or the file ends (a raw read may return fewer bytes)."""
    view, n = memoryview(buf), 0
    while n < len(buf) and (k := f.readinto(view[n:])):
        n += k
    return n


def _crc_step(pool, mv, path: Path, layout: BlockLayout, crcs, block: int, expected, describe) -> int:
    """crc32s of the blocks in one scan step (from `block` on), split over the pool's threads;
    checked against `expected`. Returns the next block."""
    bb = layout.block_bytes
    k = -(-len(mv) // bb)
    if block + k > layout.count:
        raise CorruptCacheError(f"{path}: longer than its block layout ({layout.size} data bytes)")
    per = -(-k // SCAN_THREADS)

    def crc_range(first: int) -> list[int]:
        return [zlib.crc32(mv[o : o + bb]) for o in range(first * bb, min((first + per) * bb, len(mv)), bb)]

    crcs[block : block + k] = [c for part in pool.map(crc_range, range(0, k, per)) for c in part]
    if expected is not None:
        bad = np.flatnonzero(crcs[block : block + k] != expected[block : block + k])
        if bad.size:
            b = block + int(bad[0])
            what = describe(b) if describe else ""
            raise CorruptBlockError.of(path, b, layout.span(b), int(crcs[b]), int(expected[b]), what)
    return block + k


class LazyBlocks:
    """One file's blocks, each verified (crc32) the first time it is touched in this process.

    data: the file's bytes [offset, offset + size) as a flat uint8 array (a read-only memory map);
    crcs: the layout's entries of checksums.bin. The record of verified blocks is a bitmap owned
    by this object (1 bit per block): a forked worker inherits a copy, a pickled cache reopens with
    an empty one. Two threads touching one block may both verify it; none skips a block.
    """

    def __init__(self, path: Path, layout: BlockLayout, data: np.ndarray, crcs: np.ndarray) -> None:
        self.path, self.layout, self.crcs = path, layout, crcs
        self._data = memoryview(data) if data.size else memoryview(b"")  # slices cost less than numpy's
        self._seen = np.zeros((layout.count + 7) // 8, dtype=np.uint8)

    def _is_seen(self, blocks: np.ndarray) -> np.ndarray:
        return (self._seen[blocks >> 3] >> (blocks & 7).astype(np.uint8)) & 1 == 1

    def verified(self) -> int:
        """How many blocks this process has verified (or trusts)."""
        return int(np.unpackbits(self._seen, count=self.layout.count, bitorder="little").sum())

    def check(self, blocks: np.ndarray, describe: Describe | None = None) -> None:
        """Verify the blocks not verified yet (block ids, any order, repeats allowed)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        todo = np.unique(blocks[~self._is_seen(blocks)]) if blocks.size else blocks
        if not todo.size:
            return
        for b in todo.tolist():
            start, end = self.layout.span(b)
            lo = start - self.layout.offset
            crc = zlib.crc32(self._data[lo : lo + (end - start)])
            if crc != int(self.crcs[b]):
                what = describe(b) if describe else ""
                raise CorruptBlockError.of(self.path, b, (start, end), crc, int(self.crcs[b]), what)
        self._mark(todo)

    def _mark(self, blocks: np.ndarray) -> None:
        np.bitwise_or.at(self._seen, blocks >> 3, np.left_shift(1, blocks & 7).astype(np.uint8))

    def mark_all(self) -> None:
        """Record every block as verified (after a full scan, or trusted from the parent process)."""
        self._seen[:] = 0xFF


# --------------------------------------------------------------------------------------------
# Manifest


UNSEALED_KEYS = (DIGEST_KEY, "created")  # two merges of the same parts get the same digest


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without UNSEALED_KEYS."""
    body = {k: v for k, v in manifest.items() if k not in UNSEALED_KEYS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def integrity_section(layouts: list[BlockLayout], target: int, checksums_file: str) -> dict:
    return {
        "checksum": CHECKSUM_NAME,
        "file": checksums_file,
        "block_bytes": target,
        "blocks": [layout.to_dict() for layout in layouts],
    }
