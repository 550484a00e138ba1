"""EmbeddingCache: open a merged cache read-only, validate it, look keys up, gather rows.

    cache = EmbeddingCache.open(path, expect=spec)          # StaleCacheError / CorruptCacheError
    row_ids = cache.lookup(shard_names, keys, "short")      # int64 numpy, -1 where missing
    emb = cache.gather(torch.from_numpy(row_ids))           # (n, dim) bfloat16

Opening always checks the manifest against itself and against the file headers and exact file
sizes (cheap: a truncated file is refused without reading it); verify_checksums=True also reads
every byte (sha256) and checks that the key index is sorted and its row ids in range.

rows.bin is memory-mapped read-only (np.memmap mode "r") and exposed as a uint8 tensor without a
copy. The pages are PROT_READ: writing into rows_tensor() kills the process (SIGSEGV), so torch's
"non-writable array" warning is silenced here on purpose and the tensor must be treated as
read-only. DataLoader workers share the mapping (and the page cache); pickling an EmbeddingCache
reopens it by path instead of copying the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..files import read_json
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
    Header,
    StaleCacheError,
    index_header,
    read_header,
    row_stride,
    rows_header,
    scales_header,
    storage_of,
)
from .gather import gather_rows
from .index import TEXT_HASH_DTYPE, _broadcast, key_hashes, sorted_lookup
from .manifest import CacheSpec, check_spec


def _readonly_tensor(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _memmap(path: Path, dtype, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


class EmbeddingCache:
    """A merged caption-embedding cache, opened read-only. Use EmbeddingCache.open(path)."""

    def __init__(self, path: Path, manifest: dict, expect: CacheSpec | None) -> None:
        self.path = path
        self.manifest = manifest
        self._expect = expect
        self.spec = CacheSpec.from_dict(manifest["spec"])
        self.storage = storage_of(manifest["storage_code"])
        self.storage_code = self.storage.code
        self.dim: int = manifest["dim"]
        self.stride: int = manifest["row_stride"]
        self.num_rows: int = manifest["rows"]
        self.num_entries: int = manifest["index_entries"]
        n, m = self.num_rows, self.num_entries
        self._rows = _memmap(path / ROWS_FILE, np.uint8, HEADER_BYTES, (n, self.stride))
        self._scales = (
            _memmap(path / SCALES_FILE, "<f4", HEADER_BYTES, (n,)) if self.storage.quantized else None
        )
        self._index_keys = _memmap(path / INDEX_FILE, "<u8", HEADER_BYTES, (m,))
        self._index_rows = _memmap(path / INDEX_FILE, "<i8", HEADER_BYTES + 8 * m, (m,))
        self._rows_t: torch.Tensor | None = None
        self._scales_t: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: str | os.PathLike, expect: CacheSpec | None = None, verify_checksums: bool = False
    ) -> EmbeddingCache:
        """Open the cache at `path` read-only.

        expect: the configuration the caller will use; any differing field raises StaleCacheError.
        verify_checksums: also sha256 every file against the manifest (reads everything).
        Raises CorruptCacheError on a missing, truncated or inconsistent file, never returns garbage.
        """
        path = Path(path)
        manifest = _load_manifest(path)
        _validate(path, manifest, expect)
        if verify_checksums:
            _verify_checksums(path, manifest)
        cache = cls(path, manifest, expect)
        if verify_checksums:
            cache._verify_index()
        return cache

    def __reduce__(self):
        return (EmbeddingCache.open, (str(self.path), self._expect, False))

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({str(self.path)!r}, rows={self.num_rows}, entries={self.num_entries}, "
            f"dim={self.dim}, storage={self.storage.name}, model={self.spec.model_id!r})"
        )

    # ---------------------------------------------------------------------------------------
    def lookup(
        self,
        shards: str | Sequence[str],
        keys: Sequence[str],
        field: str | Sequence[str],
        strict: bool = False,
    ) -> np.ndarray:
        """Row ids of (shard, key, field) triples: (n,) int64, -1 where missing.

        shards and field may be one str for all keys. strict=True raises KeyError naming a few
        missing triples instead of returning -1.
        """
        q = key_hashes(shards, keys, field)
        rows = sorted_lookup(self._index_keys, self._index_rows, q)
        if strict:
            missing = np.flatnonzero(rows < 0)
            if missing.size:
                n = len(keys)
                sh, fl = _broadcast(shards, n, "shards"), _broadcast(field, n, "fields")
                some = ", ".join(f"({sh[i]!r}, {keys[i]!r}, {fl[i]!r})" for i in missing[:5])
                raise KeyError(
                    f"{missing.size} of {n} (shard, key, field) not in the cache {self.path}: {some}"
                )
        return rows

    def rows_tensor(self) -> torch.Tensor:
        """(N, stride) uint8, the memory-mapped rows (read-only memory: never write into it)."""
        if self._rows_t is None:
            self._rows_t = _readonly_tensor(self._rows)
        return self._rows_t

    def scales_tensor(self) -> torch.Tensor | None:
        """(N,) float32 per-row scales (storage int8 / fp8_e4m3), else None."""
        if self._scales is None:
            return None
        if self._scales_t is None:
            self._scales_t = _readonly_tensor(self._scales)
        return self._scales_t

    def gather(
        self,
        row_ids: torch.Tensor | np.ndarray,
        out_dtype: torch.dtype = torch.bfloat16,
        *,
        backend: str = "auto",
    ) -> torch.Tensor:
        """(n, dim) out_dtype embeddings of row ids (n,) int64 (on the device the output goes to)."""
        if isinstance(row_ids, np.ndarray):
            row_ids = torch.from_numpy(np.ascontiguousarray(row_ids, dtype=np.int64))
        return gather_rows(
            self.rows_tensor(),
            self.scales_tensor(),
            row_ids,
            self.dim,
            self.storage_code,
            out_dtype,
            backend=backend,
        )

    def text_hashes(self) -> np.ndarray:
        """(N,) S16 text hashes of the stored rows (memory-mapped)."""
        return _memmap(self.path / TEXTHASH_FILE, TEXT_HASH_DTYPE, 0, (self.num_rows,))

    # ---------------------------------------------------------------------------------------
    def probe_embeddings(self) -> torch.Tensor:
        """(P, dim) float32 embeddings of the manifest's probe captions."""
        p = self.manifest["probe"]
        arr = np.fromfile(self.path / PROBE_FILE, dtype="<f4").reshape(p["count"], p["dim"])
        return torch.from_numpy(arr.astype(np.float32))

    def verify_probe(
        self, embed_fn: Callable[[list[str]], torch.Tensor], min_cosine: float | None = None
    ) -> torch.Tensor:
        """Re-embed the probe captions with embed_fn (list[str] -> (P, dim)) and require cosine
        similarity >= min_cosine (default: the manifest's, 0.999) to the stored probe embeddings.

        Returns the (P,) cosines; raises StaleCacheError naming the worst probes otherwise.
        """
        p = self.manifest["probe"]
        min_cosine = p["min_cosine"] if min_cosine is None else min_cosine
        captions = list(p["captions"])
        new = torch.as_tensor(embed_fn(captions)).detach().to("cpu", torch.float32)
        ref = self.probe_embeddings()
        if new.shape != ref.shape:
            raise StaleCacheError(
                f"probe embeddings have shape {tuple(new.shape)}, "
                f"the cache {self.path} stored {tuple(ref.shape)}"
            )
        cos = torch.nn.functional.cosine_similarity(new.double(), ref.double(), dim=1).float()
        bad = torch.nonzero(cos < min_cosine).flatten().tolist()
        if bad:
            worst = sorted(bad, key=lambda i: float(cos[i]))[:5]
            detail = ", ".join(f"{captions[i]!r}: {float(cos[i]):.5f}" for i in worst)
            raise StaleCacheError(
                f"probe check failed for {self.path}: {len(bad)} of {len(captions)} probe captions "
                "embed with "
                f"cosine < {min_cosine} to the cached ones ({detail}). The model, adapter, template, pooling "
                "or numerics differ from the extraction; re-run `python -m llm2clip.extract ...` into a new "
                "directory."
            )
        return cos

    def _verify_index(self) -> None:
        k, r = self._index_keys, self._index_rows
        if len(k) > 1 and not bool(np.all(k[1:] > k[:-1])):
            raise CorruptCacheError(f"{self.path / INDEX_FILE}: key hashes are not strictly increasing")
        if len(r) and (int(r.min()) < 0 or int(r.max()) >= self.num_rows):
            raise CorruptCacheError(f"{self.path / INDEX_FILE}: row ids outside [0, {self.num_rows})")


# -------------------------------------------------------------------------------------------
# Validation


def _load_manifest(path: Path) -> dict:
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        if (path / PARTS_DIR).is_dir():
            raise CorruptCacheError(
                f"{path} is not a finished cache: {PARTS_DIR}/ exists but no {MANIFEST_FILE} "
                "(extraction unfinished or merge not run / interrupted)"
            )
        raise CorruptCacheError(f"{path} is not a cache: no {MANIFEST_FILE}")
    try:
        manifest = read_json(mpath)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCacheError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CorruptCacheError(f"{mpath}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StaleCacheError(
            f"{path}: format_version: expected {FORMAT_VERSION}, found {manifest.get('format_version')!r}. "
            "Rebuild it: re-run `python -m llm2clip.extract ...` into a new directory."
        )
    return manifest


def _expected_sizes(m: dict, quantized: bool) -> dict[str, int]:
    n, e, dim, stride = m["rows"], m["index_entries"], m["dim"], m["row_stride"]
    sizes = {ROWS_FILE: HEADER_BYTES + n * stride}
    if quantized:
        sizes[SCALES_FILE] = HEADER_BYTES + 4 * n
    sizes[INDEX_FILE] = HEADER_BYTES + 16 * e
    sizes[TEXTHASH_FILE] = TEXT_HASH_BYTES * n
    sizes[PROBE_FILE] = 4 * m["probe"]["count"] * dim
    return sizes


def _validate(path: Path, m: dict, expect: CacheSpec | None) -> None:
    mpath = path / MANIFEST_FILE
    try:
        spec = CacheSpec.from_dict(m["spec"])
        st = storage_of(m["storage_code"])
        for name in ("dim", "row_stride", "rows", "index_entries"):
            v = m[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} = {v!r}")
        files = m["files"]
        probe = m["probe"]
        int(probe["count"])
        key_index_sha = m["key_index"]["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    if expect is not None:
        check_spec(expect, spec, path)
    # The manifest must agree with itself.
    problems = []
    if m.get("storage") != st.name:
        problems.append(f"storage {m.get('storage')!r} vs storage_code {st.code} ({st.name})")
    if m["dim"] != spec.dim:
        problems.append(f"dim {m['dim']} vs spec.dim {spec.dim}")
    if m["row_stride"] != row_stride(m["dim"], st):
        problems.append(
            f"row_stride {m['row_stride']} vs {row_stride(m['dim'], st)} for dim {m['dim']} {st.name}"
        )
    if probe.get("dim") != m["dim"]:
        problems.append(f"probe dim {probe.get('dim')} vs dim {m['dim']}")
    if isinstance(files.get(INDEX_FILE), dict) and key_index_sha != files[INDEX_FILE].get("sha256"):
        problems.append(f"key_index.sha256 differs from files[{INDEX_FILE!r}].sha256")
    if problems:
        raise CorruptCacheError(f"{mpath}: inconsistent manifest: " + "; ".join(problems))
    sizes = _expected_sizes(m, st.quantized)
    if set(files) != set(sizes):
        raise CorruptCacheError(f"{mpath}: lists files {sorted(files)}, expected {sorted(sizes)}")
    for name, size in sizes.items():
        listed = files[name].get("size") if isinstance(files[name], dict) else None
        if listed != size:
            raise CorruptCacheError(
                f"{mpath}: {name} listed with {listed} bytes, but rows/dim/entries imply {size} "
                "(edited manifest?)"
            )
        fpath = path / name
        try:
            actual = fpath.stat().st_size
        except FileNotFoundError:
            raise CorruptCacheError(f"{fpath}: missing") from None
        if actual < size:
            raise CorruptCacheError(f"{fpath}: truncated ({actual} bytes, the manifest says {size})")
        if actual > size:
            raise CorruptCacheError(f"{fpath}: {actual - size} bytes longer than the manifest says ({size})")
    # Headers vs manifest.
    expected_headers: dict[str, Header] = {
        ROWS_FILE: rows_header(st, m["dim"], m["rows"]),
        INDEX_FILE: index_header(m["index_entries"]),
    }
    if st.quantized:
        expected_headers[SCALES_FILE] = scales_header(st, m["rows"])
    for name, want in expected_headers.items():
        got = read_header(path / name)
        if got != want:
            diffs = ", ".join(
                f"{f}: header {getattr(got, f)!r}, manifest {getattr(want, f)!r}"
                for f in ("magic", "version", "code", "dim", "stride", "count")
                if getattr(got, f) != getattr(want, f)
            )
            raise CorruptCacheError(f"{path / name}: header does not match the manifest ({diffs})")


def _verify_checksums(path: Path, m: dict) -> None:
    for name, entry in m["files"].items():
        digest = _sha256(path / name)
        if digest != entry.get("sha256"):
            raise CorruptCacheError(
                f"{path / name}: sha256 {digest} does not match the manifest's "
                f"{entry.get('sha256')} (corrupt file)"
            )
