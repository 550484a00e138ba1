"""EmbeddingCache: open a merged cache read-only, validate and verify it, look keys up, gather rows.

    cache = EmbeddingCache.open(path, expect=spec)          # StaleCacheError / CorruptCacheError
    row_ids = cache.lookup(shard_names, keys, "short")      # int64 numpy, -1 where missing
    emb = cache.gather(torch.from_numpy(row_ids))           # (n, dim) bfloat16, rows verified first

Opening always checks the manifest against itself and against the file headers and exact file
sizes (validate.py; a truncated file is refused without reading it). verify="lazy" (the default),
"full" or "off" chooses what is read and checked besides (verifier.py, docs/cache.md).

rows.bin is memory-mapped read-only (np.memmap mode "r") and exposed as a uint8 tensor without a
copy. The pages are PROT_READ: writing into rows_tensor() kills the process (SIGSEGV), so torch's
"non-writable array" warning is silenced here on purpose and the tensor must be treated as
read-only. Whoever gathers from rows_tensor() directly calls check_rows(ids) first (DeviceRows
does). DataLoader workers share the mapping (and the page cache); pickling an EmbeddingCache
reopens it by path instead of copying the arrays.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .format import (
    HEADER_BYTES,
    INDEX_FILE,
    PROBE_FILE,
    ROWS_FILE,
    SCALES_FILE,
    TEXT_HASH_DTYPE,
    TEXTHASH_FILE,
    CorruptCacheError,
    StaleCacheError,
    memmap,
    storage_of,
)
from .gather import gather_rows
from .index import _broadcast, key_hashes, sorted_lookup
from .integrity import VERIFY_MODES, Progress, manifest_digest
from .manifest import CacheSpec
from .validate import check_digest, load_manifest, no_block_checksums, validate
from .verifier import CacheVerifier


def _readonly_tensor(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _row_ids(row_ids) -> np.ndarray:
    """(n,) int64 numpy row ids from a tensor (a CUDA one is copied to the host), array or list."""
    if isinstance(row_ids, torch.Tensor):
        row_ids = row_ids.detach().cpu().numpy()
    ids = np.asarray(row_ids)
    if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
        raise TypeError(f"row ids must be a 1-D integer array, got {ids.dtype} of shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _verify_mode(verify: str, verify_checksums: bool | None) -> str:
    if verify_checksums:  # the older spelling of verify="full"
        return "full"
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    return verify


class EmbeddingCache:
    """A merged caption-embedding cache, opened read-only. Use EmbeddingCache.open(path)."""

    def __init__(self, path: Path, manifest: dict, expect: CacheSpec | None, verify: str = "off") -> None:
        self.path = path
        self.manifest = manifest
        self._expect = expect
        self.verify = verify
        self.spec = CacheSpec.from_dict(manifest["spec"])
        self.storage = storage_of(manifest["storage_code"])
        self.storage_code = self.storage.code
        self.dim: int = manifest["dim"]
        self.stride: int = manifest["row_stride"]
        self.num_rows: int = manifest["rows"]
        self.num_entries: int = manifest["index_entries"]
        n, m = self.num_rows, self.num_entries
        self._rows = memmap(path / ROWS_FILE, np.uint8, HEADER_BYTES, (n, self.stride))
        self._scales = (
            memmap(path / SCALES_FILE, "<f4", HEADER_BYTES, (n,)) if self.storage.quantized else None
        )
        self._index_keys = memmap(path / INDEX_FILE, "<u8", HEADER_BYTES, (m,))
        self._index_rows = memmap(path / INDEX_FILE, "<i8", HEADER_BYTES + 8 * m, (m,))
        self._rows_t: torch.Tensor | None = None
        self._scales_t: torch.Tensor | None = None
        self._verifier: CacheVerifier | None = None
        self._digest: str | None = None  # manifest_digest(manifest), computed when first needed

    # ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expect: CacheSpec | None = None,
        verify: str = "lazy",
        *,
        verify_checksums: bool | None = None,
        sha256: bool = False,
        progress: Progress | None = None,
        _trusted: tuple[str, frozenset[str]] | None = None,
    ) -> EmbeddingCache:
        """Open the cache at `path` read-only.

        expect: the configuration the caller will use; any differing field raises StaleCacheError.
        verify: "lazy" (default): the index and probe are verified now, every rows.bin / scales.bin
        block the first time a row in it is gathered or checked (check_rows), texthash.bin on
        text_hashes(); "full": every byte now (block crc32s) and the key index's order, nothing
        later; "off": the structural checks only. verify_checksums=True is the older spelling of "full".
        sha256: with "full", also recompute each file's sha256 against the manifest (slower: one
        core; the block crc32s already cover every byte).
        progress: (file, done bytes, total bytes) callback during full scans.
        Raises CorruptCacheError on a missing, truncated, inconsistent or corrupt file (naming the
        file, block and byte range), StaleCacheError on another configuration or a format-1 cache
        opened "lazy"; never returns garbage.
        """
        verify = _verify_mode(verify, verify_checksums)
        path = Path(path)
        manifest = load_manifest(path)
        layouts = validate(path, manifest, expect)
        cache = cls(path, manifest, expect, verify)
        if verify == "off":
            return cache
        if manifest["format_version"] < 2 and verify == "lazy":
            raise no_block_checksums(path)
        cache._digest = manifest_digest(manifest)
        if manifest["format_version"] >= 2:
            check_digest(path, manifest, cache._digest)
        trusted = _trusted[1] if _trusted is not None and _trusted[0] == cache._digest else frozenset()
        cache._verifier = CacheVerifier(path, manifest, layouts, verify, sha256)
        cache._verifier.verify_open(trusted, progress)
        if verify == "full" and INDEX_FILE not in trusted:
            cache._verify_index()
        return cache

    def __reduce__(self):
        # A DataLoader worker reopens the cache by path (no arrays are pickled) with the same
        # verification mode; the files this process verified whole are trusted there if the
        # manifest is the same, and its record of verified row blocks starts empty.
        whole = frozenset(self._verifier.whole) if self._verifier is not None else frozenset()
        if self._digest is None:
            self._digest = manifest_digest(self.manifest)
        trusted = (self._digest, whole)
        return (_reopen, (str(self.path), self._expect, self.verify, trusted))

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache({str(self.path)!r}, rows={self.num_rows}, entries={self.num_entries}, "
            f"dim={self.dim}, storage={self.storage.name}, model={self.spec.model_id!r}, "
            f"verify={self.verify!r})"
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
        """(n, dim) out_dtype embeddings of row ids (n,) int64 (on the device the output goes to).

        The rows are checked first (check_rows): out-of-range ids raise IndexError, and with
        verify="lazy" their blocks are verified on first touch.
        """
        self.check_rows(row_ids)
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

    def check_rows(self, row_ids: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Check row ids before their rows are used: raise IndexError for one outside [0, N), and
        with verify="lazy" verify the rows.bin / scales.bin blocks holding them (crc32), each block
        once per process: CorruptCacheError names the file, block, byte range, rows and shard.

        row_ids: (n,) integer ids (tensor, array or list); a CUDA tensor is copied to the host
        (a synchronisation: pass the CPU ids). Costs nothing measurable once the blocks are verified.
        Safe in DataLoader workers (each process keeps its own record) and from several threads.
        """
        ids = _row_ids(row_ids)
        if ids.size == 0:
            return
        bad = (ids < 0) | (ids >= self.num_rows)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise IndexError(
                f"row id {int(ids[pos])} (position {pos} of the index) is out of range "
                f"for a table of {self.num_rows} rows"
            )
        if self._verifier is not None:
            self._verifier.check_rows(ids)

    def text_hashes(self) -> np.ndarray:
        """(N,) S16 text hashes of the stored rows (memory-mapped; verified whole on the first call
        with verify="lazy")."""
        if self._verifier is not None and TEXTHASH_FILE not in self._verifier.whole:
            self._verifier.verify_file(TEXTHASH_FILE)
        return memmap(self.path / TEXTHASH_FILE, TEXT_HASH_DTYPE, 0, (self.num_rows,))

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


def _reopen(path: str, expect: CacheSpec | None, verify: str, trusted) -> EmbeddingCache:
    return EmbeddingCache.open(path, expect, verify, _trusted=trusted)
