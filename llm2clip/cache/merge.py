"""Merge the per-shard parts of a cache directory into the final files, manifest last.

Passes (shards in merge order: the given list, or the shard names sorted; docs/cache.md):

1. select and check: every listed shard has its done marker and part files of the right sizes.
2. dedup across writers: read each part's text hashes (16 B/row); a row whose text hash an
   earlier part already stored is dropped (ranks cannot dedup against each other while writing).
3. rows: stream rows / scales / text hashes into rows.bin, scales.bin, texthash.bin (temp names),
   in chunks of CHUNK_BYTES, computing sha256 and the block crc32s on the way: memory stays bounded.
4. key index: resolve every entry's text hash to its final row (argsort + searchsorted over the
   final text hashes), sort the key hashes, fail on a 64-bit collision, write index.bin. This pass
   holds the index in memory: about 16 B per unique row plus 40 B per entry (LAION-400M with two
   captions per sample: ~35 GB), the one step that does not stream.
5. probe.bin, then checksums.bin (every file's block crc32s); fsync; rename the temp files into
   place; the manifest (atomic, sealed by its digest); remove parts/.
A merge killed before the manifest leaves no cache (the loader refuses the directory); run it again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_json, fsync_dir, read_json
from .format import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    ENTRY_DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_BYTES,
    INDEX_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    PROBE_FILE,
    ROWS_FILE,
    SCALES_FILE,
    TEXT_HASH_BYTES,
    TEXT_HASH_DTYPE,
    TEXTHASH_FILE,
    CorruptCacheError,
    IncompleteCacheError,
    KeyCollisionError,
    Storage,
    checksums_header,
    index_header,
    part_id,
    part_path,
    record_bytes,
    row_stride,
    rows_header,
    scales_header,
    storage_of,
)
from .index import KEY_HASH_NAME, TEXT_HASH_NAME, TEXT_NORMALIZATION, HashSet128, first_unseen, sorted_lookup
from .integrity import (
    BLOCK_BYTES,
    DIGEST_KEY,
    BlockLayout,
    ChecksummedFile,
    block_bytes_for,
    check_target,
    integrity_section,
    manifest_digest,
)
from .manifest import PROBE_CAPTIONS, PROBE_MIN_COSINE, CacheSpec

CHUNK_BYTES = 64 << 20  # rows copied per read/write; bounds the merge's memory for rows


def merge_parts(
    path: str | os.PathLike,
    probe_embeddings: torch.Tensor,
    shards: Sequence[str] | None = None,
    *,
    block_bytes: int | None = None,
) -> dict:
    """Merge parts/ of the cache at `path` into the final cache; returns the manifest.

    probe_embeddings: (len(PROBE_CAPTIONS), dim) float embeddings of PROBE_CAPTIONS, computed
    exactly as the cached captions were (stored fp32 in probe.bin).
    shards: the shards the cache must hold, in merge order; each needs its done marker. Without
    it, every shard present in parts/ is merged (sorted by name) and any unfinished one refuses.
    block_bytes: target size of the checksummed blocks (default integrity.BLOCK_BYTES, 16 KiB;
    a multiple of 16); rows.bin blocks hold a whole number of rows.
    """
    path = Path(path)
    parts = path / PARTS_DIR
    if (path / MANIFEST_FILE).exists():
        raise FileExistsError(f"{path} is already merged ({MANIFEST_FILE} exists)")
    target = check_target(BLOCK_BYTES if block_bytes is None else block_bytes)
    spec, st = _read_config(path, parts)
    out = _Outputs(path, target, spec.dim, row_stride(spec.dim, st))
    metas = _select_shards(path, parts, shards)
    _check_parts(parts, metas, st, spec.dim)
    probe = _checked_probe(probe_embeddings, spec.dim)
    keep = _dedup_across_writers(parts, metas)
    _write_rows(out, parts, metas, keep, st, spec.dim)
    _write_index(out, parts, metas)
    _write_probe(out, probe)
    _write_checksums(out)
    manifest = _manifest(spec, st, metas, keep, out)
    for name in out.files:
        os.replace(out.tmp(name), path / name)
    fsync_dir(path)
    atomic_write_json(path / MANIFEST_FILE, manifest)
    shutil.rmtree(parts)
    fsync_dir(path)
    return manifest


class _Outputs:
    """The final files being written under temp names: their manifest entries and block layouts."""

    def __init__(self, path: Path, target: int, dim: int, stride: int) -> None:
        self.path, self.target, self.dim, self.stride = path, target, dim, stride
        self.files: dict[str, dict] = {}
        self.layouts: list[BlockLayout] = []
        self.crcs: list[np.ndarray] = []

    def tmp(self, name: str) -> Path:
        return self.path / (name + ".tmp")

    def open(self, name: str, offset: int) -> ChecksummedFile:
        """Start writing `name`: `offset` header bytes, then its records (format.record_bytes)."""
        unit = record_bytes(name, self.dim, self.stride)
        return ChecksummedFile(self.tmp(name), offset, block_bytes_for(unit, self.target))

    def close(self, name: str, f: ChecksummedFile) -> None:
        entry, crcs = f.close()
        self.files[name] = entry
        first = sum(layout.count for layout in self.layouts)
        layout = BlockLayout(name, f.offset, entry["size"] - f.offset, f.sums.block_bytes, first)
        self.layouts.append(layout)
        self.crcs.append(crcs)


# ---------------------------------------------------------------------------------------------
# Pass 1: select and check


def _read_config(path: Path, parts: Path) -> tuple[CacheSpec, Storage]:
    if not (parts / CONFIG_FILE).is_file():
        raise IncompleteCacheError(f"{path} has no {PARTS_DIR}/{CONFIG_FILE}: nothing was written there")
    config = read_json(parts / CONFIG_FILE)
    return CacheSpec.from_dict(config["spec"]), storage_of(config["storage_code"])


def _select_shards(path: Path, parts: Path, shards: Sequence[str] | None) -> list[dict]:
    """The done markers of the shards to merge, in merge order; refuses unfinished or stray shards."""
    done = {}
    for p in parts.glob("*.done"):
        meta = read_json(p)
        done[meta["name"]] = meta
    if shards is None:
        done_ids = {m["id"] for m in done.values()}
        present = {part_id(p.name) for p in parts.iterdir()} - {None}
        unfinished = sorted(present - done_ids)
        if unfinished:
            raise IncompleteCacheError(
                f"refusing to merge {path}: {len(unfinished)} shard(s) were started but have no done marker "
                f"(ids {unfinished[:10]}); finish them (re-run the writers) first"
            )
        order = sorted(done)
    else:
        order = list(shards)
        if len(set(order)) != len(order):
            raise ValueError("the shard list names a shard twice")
        missing = [s for s in order if s not in done]
        if missing:
            raise IncompleteCacheError(
                f"refusing to merge {path}: {len(missing)} of {len(order)} listed shards have no "
                "done marker, "
                f"e.g. {missing[:10]}; finish them (re-run the writers) first"
            )
        extra = sorted(set(done) - set(order))
        if extra:
            raise ValueError(f"{parts} holds done shards that are not in the list: {extra[:10]}")
    if not order:
        raise IncompleteCacheError(f"refusing to merge {path}: no shards")
    return [done[name] for name in order]


def _check_parts(parts: Path, metas: list[dict], st: Storage, dim: int) -> None:
    stride = row_stride(dim, st)
    for m in metas:
        if (m["storage_code"], m["dim"], m["row_stride"]) != (st.code, dim, stride):
            raise CorruptCacheError(
                f"shard {m['name']!r} was written with another storage/dim than {CONFIG_FILE}"
            )
        sizes = {"rows": m["rows"] * stride, "texthash": m["rows"] * TEXT_HASH_BYTES}
        sizes["entries"] = m["captions"] * ENTRY_DTYPE.itemsize
        if st.quantized:
            sizes["scales"] = m["rows"] * 4
        for suffix, expected in sizes.items():
            _check_part_size(part_path(parts, m["id"], suffix), expected)


def _check_part_size(path: Path, expected: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptCacheError(f"part file {path} is missing") from None
    if size != expected:
        raise CorruptCacheError(f"part file {path} has {size} bytes, its done marker implies {expected}")


def _checked_probe(probe_embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    probe = torch.as_tensor(probe_embeddings).detach().to("cpu", torch.float32).contiguous()
    if probe.shape != (len(PROBE_CAPTIONS), dim):
        raise ValueError(f"probe_embeddings must be ({len(PROBE_CAPTIONS)}, {dim}), got {tuple(probe.shape)}")
    if not bool(torch.isfinite(probe).all()):
        raise ValueError("probe_embeddings have non-finite values")
    return probe


# ---------------------------------------------------------------------------------------------
# Pass 2: dedup across writers


def _dedup_across_writers(parts: Path, metas: list[dict]) -> list[np.ndarray]:
    """Per shard, the mask of its stored rows that no earlier shard (in merge order) stored."""
    seen = HashSet128()
    keep: list[np.ndarray] = []
    for m in metas:
        th = np.fromfile(part_path(parts, m["id"], "texthash"), dtype=TEXT_HASH_DTYPE)
        k = first_unseen(th, seen)
        seen.add(th[k])
        keep.append(k)
    return keep


# ---------------------------------------------------------------------------------------------
# Passes 3-5: the final files


def _write_rows(out: _Outputs, parts: Path, metas: list[dict], keep: list[np.ndarray], st, dim: int) -> None:
    """rows.bin, scales.bin (quantised storages) and texthash.bin: the kept rows, streamed."""
    n_rows = int(sum(int(k.sum()) for k in keep))
    stride = row_stride(dim, st)
    rows_f = out.open(ROWS_FILE, HEADER_BYTES)
    rows_f.write(rows_header(st, dim, n_rows).pack())
    scales_f = None
    if st.quantized:
        scales_f = out.open(SCALES_FILE, HEADER_BYTES)
        scales_f.write(scales_header(st, n_rows).pack())
    th_f = out.open(TEXTHASH_FILE, 0)
    chunk = max(1, CHUNK_BYTES // stride)
    for m, k in zip(metas, keep):
        with open(part_path(parts, m["id"], "rows"), "rb") as f:
            for lo in range(0, m["rows"], chunk):
                hi = min(lo + chunk, m["rows"])
                block = np.frombuffer(f.read((hi - lo) * stride), dtype=np.uint8).reshape(hi - lo, stride)
                rows_f.write(np.ascontiguousarray(block[k[lo:hi]]))
        if scales_f is not None:
            scales_f.write(np.fromfile(part_path(parts, m["id"], "scales"), dtype="<f4")[k])
        th_f.write(np.fromfile(part_path(parts, m["id"], "texthash"), dtype=TEXT_HASH_DTYPE)[k])
    out.close(ROWS_FILE, rows_f)
    if scales_f is not None:
        out.close(SCALES_FILE, scales_f)
    out.close(TEXTHASH_FILE, th_f)


def _write_index(out: _Outputs, parts: Path, metas: list[dict]) -> None:
    """index.bin: every entry's key hash, sorted, with the final row of its caption."""
    keys, rows = _resolve_entries(out.tmp(TEXTHASH_FILE), parts, metas)
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    del keys
    dup = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1])
    if dup.size:
        raise KeyCollisionError(_collision_report(parts, metas, order, dup))
    idx_f = out.open(INDEX_FILE, HEADER_BYTES)
    idx_f.write(index_header(len(keys_sorted)).pack())
    idx_f.write(keys_sorted.astype("<u8", copy=False))
    del keys_sorted
    idx_f.write(rows[order].astype("<i8", copy=False))
    out.close(INDEX_FILE, idx_f)


def _resolve_entries(texthash_path: Path, parts: Path, metas: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(key hashes, final row ids) of every entry of every shard, in merge order."""
    final_th = np.fromfile(texthash_path, dtype=TEXT_HASH_DTYPE)
    th_order = np.argsort(final_th, kind="stable")
    th_sorted = final_th[th_order]
    del final_th
    keys_parts, rows_parts = [], []
    for m in metas:
        e = np.fromfile(part_path(parts, m["id"], "entries"), dtype=ENTRY_DTYPE)
        r = sorted_lookup(th_sorted, th_order, e["text"])
        if (r < 0).any():
            raise CorruptCacheError(
                f"shard {m['name']!r}: an entry's caption has no stored row (corrupt parts)"
            )
        keys_parts.append(e["key"].astype(np.uint64))
        rows_parts.append(r)
    return np.concatenate(keys_parts), np.concatenate(rows_parts)


def _write_probe(out: _Outputs, probe: torch.Tensor) -> None:
    probe_f = out.open(PROBE_FILE, 0)
    probe_f.write(probe.numpy().astype("<f4", copy=False))
    out.close(PROBE_FILE, probe_f)


def _write_checksums(out: _Outputs) -> None:
    """checksums.bin: the block crc32s of every file written so far, in the order of out.layouts."""
    crcs = np.concatenate(out.crcs) if out.crcs else np.empty(0, dtype="<u4")
    f = ChecksummedFile(out.tmp(CHECKSUMS_FILE))
    f.write(checksums_header(len(crcs)).pack())
    f.write(crcs.astype("<u4", copy=False))
    out.files[CHECKSUMS_FILE] = f.close()[0]


def _manifest(spec: CacheSpec, st: Storage, metas: list[dict], keep: list[np.ndarray], out: _Outputs) -> dict:
    n_rows = int(sum(int(k.sum()) for k in keep))
    n_entries = int(sum(m["captions"] for m in metas))
    rows_written = int(sum(m["rows"] for m in metas))
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "storage": st.name,
        "storage_code": st.code,
        "dtype": str(st.dtype).removeprefix("torch."),
        "quantization": (
            {
                "scheme": "symmetric per-row absmax",
                "qmax": st.qmax,
                "scale_dtype": "float32",
                "scales": SCALES_FILE,
            }
            if st.quantized
            else None
        ),
        "dim": spec.dim,
        "row_stride": row_stride(spec.dim, st),
        "header_bytes": HEADER_BYTES,
        "rows": n_rows,
        "index_entries": n_entries,
        "files": out.files,
        "integrity": integrity_section(out.layouts, out.target, CHECKSUMS_FILE),
        "shards": [
            {
                "name": m["name"],
                "samples": m["samples"],
                "captions": m["captions"],
                "rows_written": m["rows"],
                "rows_added": int(k.sum()),
                "rank": m["rank"],
            }
            for m, k in zip(metas, keep)
        ],
        "key_index": {"hash": KEY_HASH_NAME, "entries": n_entries, "sha256": out.files[INDEX_FILE]["sha256"]},
        "dedup": {
            "text_hash": TEXT_HASH_NAME,
            "normalization": TEXT_NORMALIZATION,
            "captions": n_entries,
            "unique_rows": n_rows,
            "ratio": n_entries / n_rows if n_rows else None,  # captions per stored row
            "rows_written_by_writers": rows_written,
            "cross_writer_duplicates": rows_written - n_rows,  # dropped by this merge
            "writers": sorted({m["rank"] for m in metas}),
        },
        "probe": {
            "file": PROBE_FILE,
            "captions": list(PROBE_CAPTIONS),
            "count": len(PROBE_CAPTIONS),
            "dim": spec.dim,
            "dtype": "float32",
            "min_cosine": PROBE_MIN_COSINE,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "numpy": np.__version__},
    }
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    return manifest


def _collision_report(parts: Path, metas: list[dict], order: np.ndarray, dup: np.ndarray) -> str:
    """Name the (shard, key, field) triples behind the first few equal key hashes."""
    starts = np.cumsum([0] + [m["captions"] for m in metas])
    lines_cache: dict[int, list[str]] = {}

    def triple(entry: int) -> tuple[str, str, str]:
        s = int(np.searchsorted(starts, entry, side="right") - 1)
        if s not in lines_cache:
            lines_cache[s] = part_path(parts, metas[s]["id"], "keys").read_bytes().decode().split("\n")
        key, field = lines_cache[s][entry - starts[s]].split("\x1f")
        return metas[s]["name"], key, field

    examples = []
    for d in dup[:5]:
        a, b = triple(int(order[d])), triple(int(order[d + 1]))
        if a == b:
            raise CorruptCacheError(f"(shard, key, field) {a} occurs twice in the parts")
        examples.append(f"  {a} and {b}")
    return (
        f"{dup.size} 64-bit key hash collision(s) between different (shard, key, field) triples:\n"
        + "\n".join(examples)
        + "\nThe cache cannot index these keys apart; rename the colliding keys or shards and re-extract."
    )
