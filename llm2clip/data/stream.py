"""The stage-2 data stream: deterministic, resumable batches of one rank from shards + a cache.

    ds = ShardImageDataset(shards, cache, ["short", "dense"], batch_size, 224, rank=r, world_size=w)
    loader = DataLoader(ds, batch_size=None, num_workers=K)     # keep in_order=True
    batch = next(iter(loader))      # {"images": (n, 3, S, S) uint8, "rows": (n,) int64, "index": j, ...}

Contract (the algorithm is in docs/training.md, "The data stream"):

- batch j of rank r is the same whatever the number of workers, and every rank's stream is
  infinite (no rank runs short of shards, so no DDP hang); an epoch is batches_per_epoch() steps;
- the caption field and the crop of a sample depend only on (seed, data epoch, shard, key);
- starting at ``start_batch`` costs arithmetic, not decoding (exact resume);
- a sample without an image, without a cache row or with an undecodable image is dropped from its
  batch and counted (``SkipCounts``: corrupt_image, missing_image, missing_row, by shard); later
  batch positions do not move;
- an unreadable shard (after ``policy``'s retries for a URL) raises ShardError, or with
  ``on_shard_error="skip"`` its samples are dropped and counted as unreadable_shard;
- a shard whose sample count differs from ``shard_sizes`` raises ShardError; with
  ``exact_sizes=False`` (sizes from ``--train-num-samples``: nominal) positions past the shard's
  end are counted as short_shard and samples past its nominal size are not used.

Shards may be local paths or URLs (``llm2clip.data.shards``); images are decoded by the ``decode``
path (``llm2clip.data.images``: ``auto`` = draft; ``device``: llm2clip.data.device_decode).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from llm2clip.cache import EmbeddingCache
from llm2clip.data.device_decode import DEVICE_JPEG_MODES, DeferredImages
from llm2clip.data.images import DECODE_MODES, IMAGE_FIELDS, _EvalTransform, _open, _TrainTransform
from llm2clip.data.shards import (
    ReadPolicy,
    ShardError,
    check_unique_names,
    count_samples,
    shard_name,
    walk_samples,
)
from llm2clip.data.skips import SkipCounts

__all__ = ["SKIP_REASONS", "ShardImageDataset"]

log = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_image", "missing_image", "missing_row", "unreadable_shard", "short_shard")
"""Why a sample is dropped: undecodable image, no image member, no cache row in any field, its
shard could not be read (on_shard_error="skip"), its position lies past its shard's end (nominal
sizes)."""

ON_SHARD_ERROR = ("raise", "skip")


def _read_images(
    path: str, want: set[int], policy: ReadPolicy | None = None
) -> tuple[int, dict[int, tuple[str, dict[str, bytes]]]]:
    """(samples in the shard, {index: (key, {image field: bytes})} for the indices in `want`)."""
    got, count = {}, 0
    wanted = lambda i, f: i in want and f in IMAGE_FIELDS  # noqa: E731
    for i, key, members in walk_samples(path, read=wanted, policy=policy):
        count = i + 1
        if i in want:
            got[i] = (key, members)
    return count, got


# A sample on its way into a batch: (data epoch, shard name, key, {image field: bytes}, reason it
# is dropped or None).
_Sample = tuple[int, str, str, dict[str, bytes], str | None]


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


class ShardImageDataset(torch.utils.data.IterableDataset):
    """Infinite stream of (image, caption row) batches for one rank; see the module docstring.

    shards: shard paths (names, i.e. last path components, must be unique: the cache keys by them).
    cache: the caption-embedding cache; rows are looked up by (shard name, key, field).
    fields: caption fields to draw from per sample, e.g. ["short", "dense"].
    batch_size: samples per batch per rank (before skipped samples are dropped).
    image_size: output side S of the square images.
    rank / world_size: this rank and the number of ranks.
    seed: seed of every permutation and per-sample draw.
    start_batch: index of the first batch to produce (resume).
    shard_sizes: samples per shard (as count_samples returns); counted here when None.
    augment: random-resized crop (train_transform) if True, else eval_transform.
    shuffle: permute shards per epoch and samples within each shard if True, else tar order.
    exact_sizes: shard_sizes are exact (a mismatch raises); False: nominal (module docstring).
    on_shard_error: "raise" (ShardError) or "skip" (count the shard's samples as unreadable_shard).
    decode: image decode path, one of DECODE_MODES ("auto": draft here; the trainer resolves it
        with llm2clip.data.device_decode.resolve_decode). "device": JPEGs are decoded by
        finish_batch in the main process, and the items carry them under "deferred".
    policy: retries and timeouts for URL shards (default: ReadPolicy.from_env()).

    Use with DataLoader(dataset, batch_size=None, num_workers=K) (keep in_order=True). Each item is
    {"images": (n, 3, S, S) uint8, "rows": (n,) int64 cache row ids, "index": batch index j,
    "epoch": data epoch of stream sample j * batch_size, "skipped": SkipCounts of this batch,
    "shards": [shard name] * n, "keys": [key] * n, "fields": [chosen field] * n}, n <= batch_size
    (parallel lists of str: DataLoader workers would turn tuples into lists). With decode="device"
    also "deferred" (the JPEGs left to the main process, by batch position), and "images" holds
    only the other samples' images: llm2clip.data.device_decode.finish_batch makes the item whole.
    """

    def __init__(
        self,
        shards: Sequence[str],
        cache: EmbeddingCache,
        fields: Sequence[str],
        batch_size: int,
        image_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        shard_sizes: Sequence[int] | None = None,
        augment: bool = True,
        shuffle: bool = True,
        train_scale: tuple[float, float] = (0.9, 1.0),
        exact_sizes: bool = True,
        on_shard_error: str = "raise",
        decode: str = "auto",
        policy: ReadPolicy | None = None,
    ) -> None:
        super().__init__()
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards given")
        self.names = [shard_name(s) for s in self.shards]
        check_unique_names(self.shards)
        if on_shard_error not in ON_SHARD_ERROR:
            raise ValueError(f"on_shard_error must be one of {ON_SHARD_ERROR}, got {on_shard_error!r}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.exact_sizes = exact_sizes
        self.on_shard_error = on_shard_error
        self.decode = decode
        self.draft = decode != "pil"  # "device" decodes its non-JPEG images as "draft" does
        self.policy = policy or ReadPolicy.from_env()
        self.fields = list(fields)
        if not self.fields or not all(isinstance(f, str) and f for f in self.fields):
            raise ValueError(f"fields must be a non-empty list of field names, got {fields!r}")
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("start_batch", start_batch, 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.cache = cache
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        self.augment = augment
        self.shuffle = shuffle
        self._train_tf = _TrainTransform(image_size, train_scale)
        self._eval_tf = _EvalTransform(image_size)
        sizes = (
            count_samples(self.shards, policy=self.policy)
            if shard_sizes is None
            else [int(n) for n in shard_sizes]
        )
        if len(sizes) != len(self.shards) or any(n < 0 for n in sizes):
            raise ValueError(
                f"shard_sizes must hold one non-negative count per shard ({len(self.shards)} shards), "
                f"got {len(sizes)} values"
            )
        self.shard_sizes = sizes
        if world_size > len(self.shards):
            log.warning(
                "%d shards for %d ranks: ranks >= %d re-read a shard of the epoch (duplicate samples in "
                "the global batch); split the data into at least %d shards",
                len(self.shards),
                world_size,
                len(self.shards),
                world_size,
            )
        if sum(sizes) == 0:
            raise ValueError(f"the {len(sizes)} shards hold no samples (first: {self.shards[0]})")
        if not shuffle and sum(sizes[i] for i in self.rank_shards(0)) == 0:
            # Without shuffle the assignment never changes: this rank's stream would be empty forever.
            raise ValueError(
                f"rank {rank} of {world_size} is assigned only empty shards "
                f"({[self.names[i] for i in self.rank_shards(0)]}) and shuffle=False"
            )

    # ------------------------------------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        """floor(samples over all shards / (batch_size * world_size)): the steps of one epoch."""
        total = sum(self.shard_sizes)
        n = total // (self.batch_size * self.world_size)
        if n == 0:
            raise ValueError(
                f"{total} samples in {len(self.shards)} shards do not fill one global batch of "
                f"{self.batch_size} x {self.world_size} ranks = {self.batch_size * self.world_size}"
            )
        return n

    def rank_shards(self, epoch: int) -> list[int]:
        """Indices (into shards) of this rank's shards in data epoch `epoch`, in stream order."""
        perm = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(perm)
        mine = perm[self.rank :: self.world_size]
        return mine or [perm[self.rank % len(perm)]]

    def sample_order(self, epoch: int, shard: int) -> list[int]:
        """Tar-order indices of shard `shard`'s samples in stream order for epoch `epoch`."""
        order = list(range(self.shard_sizes[shard]))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/{self.names[shard]}").shuffle(order)
        return order

    # ------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        b = self.batch_size
        start = self.start_batch
        pending: list[_Sample] = []  # samples of the batch being built
        batch_epoch = 0
        offset = 0  # stream position of the current shard's first sample
        epoch = 0
        while True:
            for s in self.rank_shards(epoch):
                size = self.shard_sizes[s]
                lo, hi = offset, offset + size
                offset = hi
                # This worker's positions in [lo, hi): its batches j = start + worker + m * workers.
                first_j = max(start, lo // b)
                first_j += (worker - (first_j - start)) % workers
                spans = []
                for j in range(first_j, (hi - 1) // b + 1 if size else first_j, workers):
                    spans.append((j, max(lo, j * b), min(hi, (j + 1) * b)))
                if not spans:
                    continue
                order = self.sample_order(epoch, s)
                want = {order[p - lo] for _, a, z in spans for p in range(a, z)}
                lost = "short_shard"
                try:
                    count, got = _read_images(self.shards[s], want, self.policy)
                except ShardError as e:
                    if self.on_shard_error == "raise":
                        raise
                    log.warning(
                        "skipping shard %s (its samples count as unreadable_shard): %s", self.shards[s], e
                    )
                    count, got, lost = size, {}, "unreadable_shard"
                if count != size and self.exact_sizes:
                    raise ShardError(
                        f"shard {self.shards[s]} has {count} samples, shard_sizes says {size} "
                        "(the shard changed since it was counted; recount with count_samples)"
                    )
                name = self.names[s]
                for j, a, z in spans:
                    if a == j * b:
                        pending, batch_epoch = [], epoch
                    for p in range(a, z):
                        t = order[p - lo]
                        if t in got:
                            key, images = got.pop(t)
                            pending.append((epoch, name, key, images, None))
                        else:  # an unreadable shard, or a position past a nominal size's end
                            pending.append((epoch, name, f"#{t}", {}, lost))
                    if z == (j + 1) * b:
                        yield self._make_batch(j, batch_epoch, pending)
                        pending = []
            epoch += 1

    def _make_batch(self, index: int, epoch: int, samples: list[_Sample]) -> dict:
        skipped = SkipCounts.of(SKIP_REASONS)
        for _, name, _, _, reason in samples:
            if reason is not None:
                skipped.add(reason, name)
        samples = [x for x in samples if x[4] is None]
        names = [s[1] for s in samples]
        keys = [s[2] for s in samples]
        # (n, F) row ids, -1 where a field has no row; one vectorised lookup per field.
        rows = np.stack([self.cache.lookup(names, keys, f) for f in self.fields], axis=1) if samples else None
        images, out_rows, out_shards, out_keys, out_fields = [], [], [], [], []
        deferred = DeferredImages() if self.decode == "device" else None
        for i, (ep, name, key, members, _) in enumerate(samples):
            data = next((members[f] for f in IMAGE_FIELDS if f in members), None)
            if data is None:
                skipped.add("missing_image", name)
                continue
            have = np.flatnonzero(rows[i] >= 0)
            if have.size == 0:
                skipped.add("missing_row", name)
                continue
            rng = random.Random(f"{self.seed}/{ep}/{name}/{key}")
            f = int(have[int(rng.random() * have.size)])
            try:
                image = self._image(data, rng, len(images), deferred)
            except ValueError as e:
                log.debug("skipping sample %r of shard %s: %s", key, name, e)
                skipped.add("corrupt_image", name)
                continue
            images.append(image)
            out_rows.append(int(rows[i, f]))
            out_shards.append(name)
            out_keys.append(key)
            out_fields.append(self.fields[f])
        s = self.image_size
        # The rows' cache blocks are verified here, in the worker, the first time they are used
        # (cache integrity at no cost to the main process; docs/cache.md, "Integrity").
        self.cache.check_rows(out_rows)
        # None: a JPEG left to the main process (decode="device"); "images" holds the others.
        decoded = [x for x in images if x is not None]
        batch = {
            "images": torch.stack(decoded) if decoded else torch.empty((0, 3, s, s), dtype=torch.uint8),
            "rows": torch.tensor(out_rows, dtype=torch.int64),
            "index": index,
            "epoch": epoch,
            "skipped": skipped,
            "shards": out_shards,
            "keys": out_keys,
            "fields": out_fields,
        }
        if deferred is not None:
            batch["deferred"] = deferred.pack()
        return batch

    def _image(self, data: bytes, rng: random.Random, position: int, deferred) -> torch.Tensor | None:
        """The sample's (3, S, S) uint8 image; None when its JPEG is left to the main process
        (decode="device": `deferred` gets the bytes and the crop plan, drawn from rng as the CPU
        paths draw it). ValueError if the image cannot be decoded."""
        tf = self._train_tf if self.augment else self._eval_tf
        if deferred is not None:
            header = _open(data)
            if header.format == "JPEG" and header.mode in DEVICE_JPEG_MODES:
                deferred.add(position, data, tf.plan(*header.size, rng))
                return None
        if self.augment:
            return self._train_tf.from_bytes(data, rng, draft=self.draft)
        return self._eval_tf.from_bytes(data, draft=self.draft)
