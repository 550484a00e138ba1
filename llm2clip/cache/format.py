"""On-disk format of the caption-embedding cache: file names, headers, storage codes, row stride,
quantisation, and the layout of the writers' parts/ folder. docs/cache.md describes it in full.

A cache is a directory::

    rows.bin       4096-byte header, then N rows at a fixed stride (bytes):
                   stride = round_up(dim * itemsize, 128); the padding is zero
    scales.bin     (int8 / fp8 only) 4096-byte header, then N float32 per-row scales
    index.bin      4096-byte header, then M sorted uint64 key hashes, then M int64 row ids
    texthash.bin   N x 16 bytes: blake2b-128 of the normalised caption text of each row
    probe.bin      len(PROBE_CAPTIONS) x dim float32 probe embeddings (no header)
    checksums.bin  4096-byte header, then one uint32 crc32 per block of every file (integrity.py)
    manifest.json  written last and atomically; the cache does not exist without it

Header (little-endian, the rest of the 4096 bytes zero)::

    offset 0   8s   magic         b"L2CROWS\\0" / b"L2CSCAL\\0" / b"L2CINDX\\0" / b"L2CSUMS\\0"
    offset 8   u32  version       FILE_VERSION (the file's layout; FORMAT_VERSION is the cache's)
    offset 12  u32  storage code  (index.bin, checksums.bin: 0)
    offset 16  u64  dim           (scales.bin: 1; index.bin, checksums.bin: 0)
    offset 24  u64  stride        bytes per row / element (scales.bin, checksums.bin: 4; index.bin: 8)
    offset 32  u64  count         rows, index entries (index.bin) or block checksums (checksums.bin)

Data start at byte 4096 so a memory map of the file is page- and 16-byte aligned, and a 128-byte
row stride keeps every row on its own cache lines for the GPU gather.

Storage codes are shared with the C++/CUDA gather extension (csrc/): keep them exactly.

    code  name      element            dequantised value
    0     fp32      float32            x
    1     bf16      bfloat16           x
    2     fp16      float16            x
    3     int8      int8 + f32 scale   q * scale, scale = absmax / 127, q = round(x / scale) clamped
    4     fp8_e4m3  e4m3fn + f32 scale q * scale, scale = absmax / 448, q = (x / scale) -> e4m3fn

Quantisation is symmetric per-row absmax; a row of zeros gets scale 0 (and dequantises to zeros).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

if sys.byteorder != "little":  # rows are stored in native byte order and viewed in place
    raise ImportError("llm2clip.cache supports little-endian machines only")

FORMAT_NAME = "llm2clip-caption-embedding-cache"
# The cache's version (manifest.json). 2 added checksums.bin (per-block crc32) and the manifest's
# digest; version-1 caches open with verify="full" or "off", and `python -m llm2clip.cache upgrade`
# turns one into version 2 without touching its data files.
FORMAT_VERSION = 2
FORMAT_VERSIONS_READ = (1, 2)
FILE_VERSION = 1  # the layout of rows.bin, scales.bin, index.bin, checksums.bin (their headers)
HEADER_BYTES = 4096
ROW_ALIGN = 128

MAGIC_ROWS = b"L2CROWS\0"
MAGIC_SCALES = b"L2CSCAL\0"
MAGIC_INDEX = b"L2CINDX\0"
MAGIC_SUMS = b"L2CSUMS\0"

_HEADER = struct.Struct("<8sIIQQQ")

ROWS_FILE = "rows.bin"
SCALES_FILE = "scales.bin"
INDEX_FILE = "index.bin"
TEXTHASH_FILE = "texthash.bin"
PROBE_FILE = "probe.bin"
CHECKSUMS_FILE = "checksums.bin"
MANIFEST_FILE = "manifest.json"

TEXT_HASH_BYTES = 16
TEXT_HASH_DTYPE = np.dtype(f"S{TEXT_HASH_BYTES}")  # compares and sorts as raw bytes


class CacheError(Exception):
    """Base class of the cache's errors."""


class CorruptCacheError(CacheError):
    """A cache file is missing, truncated, has a bad header, or fails its checksum."""


class StaleCacheError(CacheError):
    """The cache was built with a different configuration than the one asked for."""


class IncompleteCacheError(CacheError):
    """A merge was asked for while some shard has no done marker (or none were written)."""


class KeyCollisionError(CacheError):
    """Two different (shard, key, field) triples have the same 64-bit key hash."""


@dataclass(frozen=True)
class Storage:
    """One storage code: its element dtype and whether rows carry a per-row fp32 scale."""

    code: int
    name: str
    dtype: torch.dtype
    quantized: bool
    qmax: float  # largest |q| of the quantised grid (0 for the float codes)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


STORAGES: tuple[Storage, ...] = (
    Storage(0, "fp32", torch.float32, False, 0.0),
    Storage(1, "bf16", torch.bfloat16, False, 0.0),
    Storage(2, "fp16", torch.float16, False, 0.0),
    Storage(3, "int8", torch.int8, True, 127.0),
    Storage(4, "fp8_e4m3", torch.float8_e4m3fn, True, 448.0),
)
_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp8": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
}


def storage_of(storage: str | int | Storage) -> Storage:
    """Look up a storage by name ("bf16", "int8", "fp8_e4m3", ...) or code (0..4)."""
    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, bool):
        raise TypeError("storage must be a name or a code, not a bool")
    if isinstance(storage, (int, np.integer)):
        if 0 <= int(storage) < len(STORAGES):
            return STORAGES[int(storage)]
        raise ValueError(f"unknown storage code {storage}; known: 0..{len(STORAGES) - 1}")
    if isinstance(storage, str):
        name = _ALIASES.get(storage.lower(), storage.lower())
        for s in STORAGES:
            if s.name == name:
                return s
    raise ValueError(f"unknown storage {storage!r}; known: {[s.name for s in STORAGES]}")


def row_stride(dim: int, storage: str | int | Storage) -> int:
    """Bytes per row: dim * itemsize rounded up to a multiple of ROW_ALIGN (128)."""
    nbytes = int(dim) * storage_of(storage).itemsize
    return -(-nbytes // ROW_ALIGN) * ROW_ALIGN


# --------------------------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class Header:
    magic: bytes
    version: int
    code: int
    dim: int
    stride: int
    count: int

    def pack(self) -> bytes:
        head = _HEADER.pack(self.magic, self.version, self.code, self.dim, self.stride, self.count)
        return head + bytes(HEADER_BYTES - len(head))

    @classmethod
    def unpack(cls, raw: bytes, file: str = "?") -> Header:
        if len(raw) < HEADER_BYTES:
            raise CorruptCacheError(f"{file}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
        fields = _HEADER.unpack_from(raw)
        if any(raw[_HEADER.size : HEADER_BYTES]):
            raise CorruptCacheError(f"{file}: header padding (bytes {_HEADER.size}..{HEADER_BYTES}) not zero")
        return cls(*fields)


def record_bytes(name: str, dim: int, stride: int) -> int:
    """Bytes of one record of a cache file: a row, a scale, an index word, a text hash, a probe."""
    units = {ROWS_FILE: stride, SCALES_FILE: 4, INDEX_FILE: 8, TEXTHASH_FILE: TEXT_HASH_BYTES}
    return units.get(name, 4 * dim)  # probe.bin: one float32 row per probe caption


def memmap(path: str | os.PathLike, dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of part of a file (an empty array for an empty shape)."""
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_header(path: str | os.PathLike) -> Header:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    return Header.unpack(raw, os.fspath(path))


def rows_header(storage: Storage, dim: int, rows: int) -> Header:
    return Header(MAGIC_ROWS, FILE_VERSION, storage.code, dim, row_stride(dim, storage), rows)


def scales_header(storage: Storage, rows: int) -> Header:
    return Header(MAGIC_SCALES, FILE_VERSION, storage.code, 1, 4, rows)


def index_header(entries: int) -> Header:
    return Header(MAGIC_INDEX, FILE_VERSION, 0, 0, 8, entries)


def checksums_header(blocks: int) -> Header:
    return Header(MAGIC_SUMS, FILE_VERSION, 0, 0, 4, blocks)


# --------------------------------------------------------------------------------------------
# Encoding (quantisation); decoding lives in gather.py (gather_rows) so it has one implementation.


def encode_rows(
    emb: torch.Tensor | np.ndarray, storage: str | int | Storage
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode float embeddings into padded row bytes.

    emb: (n, dim) floating tensor or array (any float dtype; computed in float32).
    Returns (payload (n, stride) uint8 with zero padding, scales (n,) float32 or None).
    Raises ValueError on non-finite values, or values that overflow the storage dtype (fp16).
    """
    st = storage_of(storage)
    x = torch.as_tensor(emb)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {x.dtype}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    n, dim = x.shape
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
        raise ValueError(f"embedding row {bad} of the batch has non-finite values")
    scales = None
    if st.quantized:
        absmax = x.abs().amax(dim=1) if dim else torch.zeros(n)
        scale = absmax / st.qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        y = x / safe
        if st.code == 3:
            q = torch.round(y).clamp_(-st.qmax, st.qmax).to(torch.int8)
        else:
            q = y.clamp_(-st.qmax, st.qmax).to(torch.float8_e4m3fn)
        scales = scale.numpy().astype("<f4")
    else:
        q = x.to(st.dtype)
        if not bool(torch.isfinite(q).all()):
            raise ValueError(f"embeddings overflow {st.name} (|x| too large)")
    stride = row_stride(dim, st)
    payload = np.zeros((n, stride), dtype=np.uint8)
    payload[:, : dim * st.itemsize] = q.view(torch.uint8).reshape(n, dim * st.itemsize).numpy()
    return payload, scales


# --------------------------------------------------------------------------------------------
# The writers' staging folder: parts/<shard id>.{rows,scales,texthash,entries,keys}[.tmp], a done
# marker parts/<shard id>.done per finished shard, and parts/config.json (writer.py writes them,
# merge.py reads them).

PARTS_DIR = "parts"
PARTS_VERSION = 1  # parts/config.json "format_version": the layout of parts/ (any cache format merges it)
CONFIG_FILE = "config.json"
PART_SUFFIXES = ("rows", "scales", "texthash", "entries", "keys")
# One index entry in a part: the key hash and the text hash of its caption (merge resolves the
# text hash to the final row, across shards and ranks).
ENTRY_DTYPE = np.dtype([("key", "<u8"), ("text", TEXT_HASH_DTYPE)])

_PART_NAME = re.compile(r"^(.*-[0-9a-f]{12})\.(rows|scales|texthash|entries|keys|done)(\..*)?$")


def shard_id(name: str) -> str:
    """File-name-safe id of a shard name: a readable prefix plus 48 bits of its hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-64:].lstrip(".") or "shard"
    return f"{safe}-{hashlib.blake2b(name.encode(), digest_size=6).hexdigest()}"


def part_id(filename: str) -> str | None:
    """The shard id of a file in parts/ (None for other files, e.g. config.json)."""
    m = _PART_NAME.match(filename)
    return m.group(1) if m else None


def part_path(parts: os.PathLike, sid: str, suffix: str) -> Path:
    """parts/<sid>.<suffix>: one file of a shard's parts."""
    return Path(parts) / f"{sid}.{suffix}"
