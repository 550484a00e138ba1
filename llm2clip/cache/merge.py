"""Merge the per-shard parts of a cache directory into the final files, manifest last.

Passes (shards in merge order: the given list, or the shard names sorted):

1. dedup across writers: read each part's text hashes (16 B/row); a row whose text hash an
   earlier part already stored is dropped (ranks cannot dedup against each other while writing).
2. stream rows / scales / text hashes into rows.bin, scales.bin, texthash.bin (temp names), in
   chunks of CHUNK_BYTES, computing sha256 on the way: memory stays bounded.
3. key index: resolve every entry's text hash to its final row (argsort + searchsorted over the
   final text hashes), sort the key hashes, fail on a 64-bit collision, write index.bin. This pass
   holds the index in memory: about 16 B per unique row plus 40 B per entry (LAION-400M with two
   captions per sample: ~35 GB), the one step that does not stream.
4. probe.bin; fsync; rename the temp files into place; the manifest (atomic); remove parts/.
A merge killed before the manifest leaves no cache (the loader refuses the directory); run it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_json, fsync_dir, read_json
from .format import (
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
    TEXTHASH_FILE,
    CorruptCacheError,
    IncompleteCacheError,
    KeyCollisionError,
    index_header,
    row_stride,
    rows_header,
    scales_header,
    storage_of,
)
from .index import (
    KEY_HASH_NAME,
    TEXT_HASH_DTYPE,
    TEXT_HASH_NAME,
    TEXT_NORMALIZATION,
    HashSet128,
    first_unseen,
    sorted_lookup,
)
from .manifest import PROBE_CAPTIONS, PROBE_MIN_COSINE, CacheSpec
from .writer import CONFIG_FILE, ENTRY_DTYPE, _part, part_id

CHUNK_BYTES = 64 << 20  # rows copied per read/write; bounds the merge's memory for rows


class _HashingFile:
    """A file opened for writing that keeps the sha256 and size of what it was given."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb", buffering=1 << 20)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.f.write(mv)
        self.sha.update(mv)
        self.size += len(mv)

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def _check_part_size(path: Path, expected: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptCacheError(f"part file {path} is missing") from None
    if size != expected:
        raise CorruptCacheError(f"part file {path} has {size} bytes, its done marker implies {expected}")


def merge_parts(
    path: str | os.PathLike, probe_embeddings: torch.Tensor, shards: Sequence[str] | None = None
) -> dict:
    """Merge parts/ of the cache at `path` into the final cache; returns the manifest.

    probe_embeddings: (len(PROBE_CAPTIONS), dim) float embeddings of PROBE_CAPTIONS, computed
    exactly as the cached captions were (stored fp32 in probe.bin).
    shards: the shards the cache must hold, in merge order; each needs its done marker. Without
    it, every shard present in parts/ is merged (sorted by name) and any unfinished one refuses.
    """
    path = Path(path)
    parts = path / PARTS_DIR
    if (path / MANIFEST_FILE).exists():
        raise FileExistsError(f"{path} is already merged ({MANIFEST_FILE} exists)")
    if not (parts / CONFIG_FILE).is_file():
        raise IncompleteCacheError(f"{path} has no {PARTS_DIR}/{CONFIG_FILE}: nothing was written there")
    config = read_json(parts / CONFIG_FILE)
    spec = CacheSpec.from_dict(config["spec"])
    st = storage_of(config["storage_code"])
    dim = spec.dim
    stride = row_stride(dim, st)

    # ---- which shards, all done?
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
    metas = [done[name] for name in order]
    for m in metas:
        if (m["storage_code"], m["dim"], m["row_stride"]) != (st.code, dim, stride):
            raise CorruptCacheError(
                f"shard {m['name']!r} was written with another storage/dim than {CONFIG_FILE}"
            )
        _check_part_size(_part(parts, m["id"], "rows"), m["rows"] * stride)
        _check_part_size(_part(parts, m["id"], "texthash"), m["rows"] * TEXT_HASH_BYTES)
        _check_part_size(_part(parts, m["id"], "entries"), m["captions"] * ENTRY_DTYPE.itemsize)
        if st.quantized:
            _check_part_size(_part(parts, m["id"], "scales"), m["rows"] * 4)

    probe = torch.as_tensor(probe_embeddings).detach().to("cpu", torch.float32).contiguous()
    if probe.shape != (len(PROBE_CAPTIONS), dim):
        raise ValueError(f"probe_embeddings must be ({len(PROBE_CAPTIONS)}, {dim}), got {tuple(probe.shape)}")
    if not bool(torch.isfinite(probe).all()):
        raise ValueError("probe_embeddings have non-finite values")

    # ---- pass 1: dedup across writers
    seen = HashSet128()
    keep: list[np.ndarray] = []
    for m in metas:
        th = np.fromfile(_part(parts, m["id"], "texthash"), dtype=TEXT_HASH_DTYPE)
        k = first_unseen(th, seen)
        seen.add(th[k])
        keep.append(k)
    del seen
    n_rows = int(sum(int(k.sum()) for k in keep))
    n_entries = int(sum(m["captions"] for m in metas))

    # ---- pass 2: rows, scales, text hashes
    tmp = {
        name: path / (name + ".tmp")
        for name in (ROWS_FILE, SCALES_FILE, TEXTHASH_FILE, INDEX_FILE, PROBE_FILE)
    }
    rows_f = _HashingFile(tmp[ROWS_FILE])
    rows_f.write(rows_header(st, dim, n_rows).pack())
    scales_f = None
    if st.quantized:
        scales_f = _HashingFile(tmp[SCALES_FILE])
        scales_f.write(scales_header(st, n_rows).pack())
    th_f = _HashingFile(tmp[TEXTHASH_FILE])
    chunk = max(1, CHUNK_BYTES // stride)
    for m, k in zip(metas, keep):
        with open(_part(parts, m["id"], "rows"), "rb") as f:
            for lo in range(0, m["rows"], chunk):
                hi = min(lo + chunk, m["rows"])
                block = np.frombuffer(f.read((hi - lo) * stride), dtype=np.uint8).reshape(hi - lo, stride)
                rows_f.write(np.ascontiguousarray(block[k[lo:hi]]))
        if scales_f is not None:
            scales_f.write(np.fromfile(_part(parts, m["id"], "scales"), dtype="<f4")[k])
        th_f.write(np.fromfile(_part(parts, m["id"], "texthash"), dtype=TEXT_HASH_DTYPE)[k])
    files = {ROWS_FILE: rows_f.close()}
    if scales_f is not None:
        files[SCALES_FILE] = scales_f.close()
    files[TEXTHASH_FILE] = th_f.close()

    # ---- pass 3: key index
    final_th = np.fromfile(tmp[TEXTHASH_FILE], dtype=TEXT_HASH_DTYPE)
    th_order = np.argsort(final_th, kind="stable")
    th_sorted = final_th[th_order]
    del final_th
    keys_parts, rows_parts = [], []
    for m in metas:
        e = np.fromfile(_part(parts, m["id"], "entries"), dtype=ENTRY_DTYPE)
        r = sorted_lookup(th_sorted, th_order, e["text"])
        if (r < 0).any():
            raise CorruptCacheError(
                f"shard {m['name']!r}: an entry's caption has no stored row (corrupt parts)"
            )
        keys_parts.append(e["key"].astype(np.uint64))
        rows_parts.append(r)
    del th_sorted, th_order
    keys = np.concatenate(keys_parts)
    rows = np.concatenate(rows_parts)
    del keys_parts, rows_parts
    order = np.argsort(keys, kind="stable")
    keys_sorted = keys[order]
    del keys
    dup = np.flatnonzero(keys_sorted[1:] == keys_sorted[:-1])
    if dup.size:
        raise KeyCollisionError(_collision_report(parts, metas, order, dup))
    idx_f = _HashingFile(tmp[INDEX_FILE])
    idx_f.write(index_header(n_entries).pack())
    idx_f.write(keys_sorted.astype("<u8", copy=False))
    del keys_sorted
    idx_f.write(rows[order].astype("<i8", copy=False))
    del rows, order
    files[INDEX_FILE] = idx_f.close()

    probe_f = _HashingFile(tmp[PROBE_FILE])
    probe_f.write(probe.numpy().astype("<f4", copy=False))
    files[PROBE_FILE] = probe_f.close()

    # ---- into place, manifest last
    for name in files:
        os.replace(tmp[name], path / name)
    fsync_dir(path)
    shard_list = [
        {
            "name": m["name"],
            "samples": m["samples"],
            "captions": m["captions"],
            "rows_written": m["rows"],
            "rows_added": int(k.sum()),
            "rank": m["rank"],
        }
        for m, k in zip(metas, keep)
    ]
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
        "dim": dim,
        "row_stride": stride,
        "header_bytes": HEADER_BYTES,
        "rows": n_rows,
        "index_entries": n_entries,
        "files": files,
        "shards": shard_list,
        "key_index": {"hash": KEY_HASH_NAME, "entries": n_entries, "sha256": files[INDEX_FILE]["sha256"]},
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
            "dim": dim,
            "dtype": "float32",
            "min_cosine": PROBE_MIN_COSINE,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "numpy": np.__version__},
    }
    atomic_write_json(path / MANIFEST_FILE, manifest)
    shutil.rmtree(parts)
    fsync_dir(path)
    return manifest


def _collision_report(parts: Path, metas: list[dict], order: np.ndarray, dup: np.ndarray) -> str:
    """Name the (shard, key, field) triples behind the first few equal key hashes."""
    starts = np.cumsum([0] + [m["captions"] for m in metas])
    lines_cache: dict[int, list[str]] = {}

    def triple(entry: int) -> tuple[str, str, str]:
        s = int(np.searchsorted(starts, entry, side="right") - 1)
        if s not in lines_cache:
            lines_cache[s] = _part(parts, metas[s]["id"], "keys").read_bytes().decode().split("\n")
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
