"""CacheWriter: per-shard part files with done markers, resumable, several ranks per directory.

    writer = CacheWriter(out_dir, spec, storage="bf16", rank=rank)
    for name in shards_for_rank(all_shards, rank, world):
        if name in writer.done_shards():
            continue
        with writer.shard(name) as s:
            for batch in ...:
                s.add_batch(keys, "short", captions, embeddings)      # embeddings (n, dim)
    # once every rank is done (barrier), on rank 0 only:
    writer.merge(probe_embeddings, shards=all_shards)

Parts. A shard is written to parts/<id>.{rows,scales,texthash,entries,keys}.tmp, then fsynced,
renamed to the names without .tmp, and finished by parts/<id>.done (a JSON record of the shard,
written atomically). A writer killed mid-shard leaves no done marker; reopening the shard discards
its leftovers and writes it again. Without a done marker the shard is not finished: merge refuses.

Dedup. A caption whose normalised text hash was already stored by this writer (in this shard or
in a done shard of the same rank, reloaded on resume) stores no new row: its index entry points
at the existing row. Ranks cannot see each other's rows while writing, so a caption that occurs
on two ranks is embedded and written twice into parts/; merge keeps the first copy (in merge
order) and counts the dropped ones (manifest dedup.cross_writer_duplicates). The final cache is
therefore fully deduplicated; only extraction work and parts/ space are spent on the copies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_json, fsync_dir, read_json
from .format import (
    CONFIG_FILE,
    ENTRY_DTYPE,
    MANIFEST_FILE,
    PART_SUFFIXES,
    PARTS_DIR,
    PARTS_VERSION,
    TEXT_HASH_DTYPE,
    KeyCollisionError,
    StaleCacheError,
    Storage,
    encode_rows,
    part_path,
    row_stride,
    shard_id,
    storage_of,
)
from .index import HashSet128, _broadcast, check_name, first_unseen, key_hashes, text_hashes
from .manifest import CacheSpec, check_spec
from .merge import merge_parts

_BUF = 1 << 20


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank `rank` writes: shard i goes to rank i % world_size."""
    return list(shards)[rank::world_size]


class CacheWriter:
    """Writes caption embeddings into `path` (a new cache directory), one shard at a time.

    path: cache directory (created); must not hold a merged cache (manifest.json).
    spec: the configuration that produced the embeddings (stored in the manifest).
    storage: "fp32", "bf16", "fp16", "int8" or "fp8_e4m3" (or the codes 0..4).
    rank / world_size: this writer's rank; writers of one directory must agree on spec and storage.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        spec: CacheSpec,
        storage: str | int = "bf16",
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(spec, CacheSpec):
            raise TypeError(f"spec must be a CacheSpec, got {type(spec).__name__}")
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise ValueError(f"bad rank {rank!r} / world_size {world_size!r}")
        self.path = Path(path)
        self.spec = spec
        self.storage: Storage = storage_of(storage)
        self.rank = rank
        self.world_size = world_size
        self.dim = spec.dim
        self.stride = row_stride(spec.dim, self.storage)
        if (self.path / MANIFEST_FILE).exists():
            raise FileExistsError(
                f"{self.path} already holds a merged cache; write a new cache to a new directory"
            )
        self.parts = self.path / PARTS_DIR
        self.parts.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._open: set[str] = set()
        # Text hashes stored by this rank's done shards (reloaded on resume).
        self._seen = HashSet128()
        for meta in self._done_metas().values():
            if meta["rank"] == self.rank and meta["rows"]:
                texthash = part_path(self.parts, meta["id"], "texthash")
                self._seen.add(np.fromfile(texthash, dtype=TEXT_HASH_DTYPE))

    # ---------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "format_version": PARTS_VERSION,
            "spec": self.spec.to_dict(),
            "storage": self.storage.name,
            "storage_code": self.storage.code,
            "dim": self.dim,
            "row_stride": self.stride,
        }

    def _check_config(self) -> None:
        cfg_path = self.parts / CONFIG_FILE
        mine = self._config()
        if not cfg_path.exists():
            atomic_write_json(cfg_path, mine)  # ranks racing here write the same content
        found = read_json(cfg_path)
        check_spec(self.spec, CacheSpec.from_dict(found["spec"]), self.path)
        if found != mine:
            diff = {k: (mine.get(k), found.get(k)) for k in mine if mine.get(k) != found.get(k)}
            raise StaleCacheError(
                f"{self.path} is being written with another configuration "
                f"(this writer vs parts/{CONFIG_FILE}): "
                f"{diff}; use a new directory"
            )

    def _done_metas(self) -> dict[str, dict]:
        metas = {}
        for p in self.parts.glob("*.done"):
            meta = read_json(p)
            metas[meta["name"]] = meta
        return metas

    def done_shards(self) -> set[str]:
        """Names of the shards finished (done marker written) in this directory, by any rank."""
        return set(self._done_metas())

    @contextmanager
    def shard(self, name: str) -> Iterator[ShardWriter]:
        """Write one shard: `with writer.shard(name) as s: s.add_batch(...)`.

        On normal exit the shard's parts are made durable and its done marker written; on an
        exception they are deleted. A shard that is already done raises ValueError (check
        done_shards() first).
        """
        check_name("shard", name)
        if name in self._open:
            raise ValueError(f"shard {name!r} is already open")
        sid = shard_id(name)
        if part_path(self.parts, sid, "done").exists():
            raise ValueError(f"shard {name!r} is already done in {self.path}")
        self._discard(sid)  # leftovers of a writer killed mid-shard
        self._open.add(name)
        sw = ShardWriter(self, name, sid)
        try:
            yield sw
            sw._finish()
        except BaseException:
            sw._abort()
            raise
        finally:
            self._open.discard(name)

    def _discard(self, sid: str) -> None:
        for suffix in PART_SUFFIXES:
            for p in (part_path(self.parts, sid, suffix), part_path(self.parts, sid, suffix + ".tmp")):
                p.unlink(missing_ok=True)

    def merge(
        self,
        probe_embeddings: torch.Tensor,
        shards: Sequence[str] | None = None,
        *,
        block_bytes: int | None = None,
    ) -> dict:
        """Merge all parts into the final cache files (see merge.merge_parts); returns the manifest.

        Run once, on one rank, after every writer has finished. `shards` lists the shards the
        cache must hold, in order; without it, every shard found in parts/ (sorted by name).
        """
        return merge_parts(self.path, probe_embeddings, shards=shards, block_bytes=block_bytes)


class ShardWriter:
    """Appends one shard's captions; obtained from CacheWriter.shard()."""

    def __init__(self, writer: CacheWriter, name: str, sid: str) -> None:
        self.writer = writer
        self.name = name
        self.id = sid
        self.captions = 0
        self.rows = 0
        self._keys: set[str] = set()  # distinct sample keys (a shard holds thousands, not millions)
        self._names: list[str] = []  # "key\x1ffield" per entry, for the duplicate check
        self._key_hashes: list[np.ndarray] = []
        self._pending = HashSet128()  # text hashes stored by this shard
        suffixes = [s for s in PART_SUFFIXES if s != "scales" or writer.storage.quantized]
        self._files = {
            s: open(part_path(writer.parts, sid, s + ".tmp"), "wb", buffering=_BUF) for s in suffixes
        }

    def add(self, key: str, field: str, caption: str, embedding: torch.Tensor | np.ndarray) -> None:
        """Add one caption: embedding is (dim,)."""
        emb = torch.as_tensor(embedding)
        if emb.ndim != 1:
            raise ValueError(f"embedding must be (dim,), got shape {tuple(emb.shape)}")
        self.add_batch([key], field, [caption], emb.unsqueeze(0))

    def add_batch(
        self,
        keys: Sequence[str],
        fields: str | Sequence[str],
        captions: Sequence[str],
        embeddings: torch.Tensor | np.ndarray,
    ) -> None:
        """Add n captions: keys (n,) webdataset __key__s, fields one str or (n,), captions (n,) raw
        texts (hashed after normalisation), embeddings (n, dim) floating point."""
        n = len(keys)
        fields = _broadcast(fields, n, "fields")
        if len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} keys")
        emb = torch.as_tensor(embeddings).detach().cpu()
        if emb.ndim != 2 or emb.shape != (n, self.writer.dim):
            raise ValueError(f"embeddings must be ({n}, {self.writer.dim}), got {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {emb.dtype}")
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"shard {self.name!r}: embeddings with non-finite values")
        for k, f, c in zip(keys, fields, captions):
            check_name("key", k)
            check_name("field", f)
            if not isinstance(c, str):
                raise TypeError(f"caption of key {k!r} must be a str, got {type(c).__name__}")
        kh = key_hashes(self.name, keys, fields)
        th = text_hashes(captions)
        new = first_unseen(th, self.writer._seen, self._pending)
        if new.any():
            payload, scales = encode_rows(emb[torch.from_numpy(new)], self.writer.storage)
            self._files["rows"].write(payload.data)
            if scales is not None:
                self._files["scales"].write(scales.data)
            self._files["texthash"].write(th[new].tobytes())
            self._pending.add(th[new])
        entries = np.empty(n, dtype=ENTRY_DTYPE)
        entries["key"] = kh
        entries["text"] = th
        self._files["entries"].write(entries.tobytes())
        names = [f"{k}\x1f{f}" for k, f in zip(keys, fields)]
        self._files["keys"].write("".join(s + "\n" for s in names).encode())
        self._names.extend(names)
        self._key_hashes.append(kh)
        self._keys.update(keys)
        self.captions += n
        self.rows += int(new.sum())

    def _check_unique_keys(self) -> None:
        if not self._key_hashes:
            return
        kh = np.concatenate(self._key_hashes)
        order = np.argsort(kh, kind="stable")
        dup = np.flatnonzero(kh[order][1:] == kh[order][:-1])
        if dup.size == 0:
            return
        i, j = int(order[dup[0]]), int(order[dup[0] + 1])
        a, b = self._names[i].split("\x1f"), self._names[j].split("\x1f")
        if a == b:
            raise ValueError(f"shard {self.name!r}: (key, field) = ({a[0]!r}, {a[1]!r}) was added twice")
        raise KeyCollisionError(
            f"shard {self.name!r}: keys ({a[0]!r}, {a[1]!r}) and ({b[0]!r}, {b[1]!r}) "
            "have the same 64-bit key hash"
        )

    def _finish(self) -> None:
        self._check_unique_keys()
        parts = self.writer.parts
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for suffix in self._files:
            os.replace(part_path(parts, self.id, suffix + ".tmp"), part_path(parts, self.id, suffix))
        fsync_dir(parts)
        w = self.writer
        meta = {
            "name": self.name,
            "id": self.id,
            "rank": w.rank,
            "samples": len(self._keys),
            "captions": self.captions,
            "rows": self.rows,
            "storage_code": w.storage.code,
            "dim": w.dim,
            "row_stride": w.stride,
        }
        atomic_write_json(part_path(parts, self.id, "done"), meta)
        w._seen.update(self._pending)

    def _abort(self) -> None:
        for f in self._files.values():
            f.close()
        part_path(self.writer.parts, self.id, "done").unlink(missing_ok=True)  # done implies complete parts
        self.writer._discard(self.id)
