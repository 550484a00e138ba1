"""Stage-2 image data: decoding, CLIP transforms and a deterministic, resumable sharded dataset.

ShardImageDataset turns webdataset-format shards (llm2clip.data.shards) plus a caption-embedding
cache (llm2clip.cache.EmbeddingCache) into batches of uint8 images and cache row ids. The trainer
normalises the images on the GPU (normalize_images) and gathers the caption embeddings there.

Rank streams (infinite, deterministic)
    For data epoch e = 0, 1, 2, ... the shards are permuted by random.Random(f"{seed}/{e}") (kept
    in order when shuffle=False) and rank r takes perm[r::world_size]. A rank left without a shard
    (more ranks than shards) takes perm[r % len(perm)] instead, so no rank ever runs dry: webdataset
    pipelines hang DDP when one rank runs short of shards; here every rank's stream is infinite
    and the trainer runs exactly batches_per_epoch() steps per epoch on every rank. A wrapped rank
    reads the same samples as rank r % len(perm) with the same crops and captions (duplicates in the
    global batch), so use at least world_size shards; the constructor warns otherwise.
    Rank r's stream is the concatenation over e of its shards' samples: in tar order, or with
    shuffle permuted within each shard by random.Random(f"{seed}/{e}/{shard_name}"). Shuffling
    within a shard keeps a worker's memory bounded by about one shard (no cross-shard buffer).

Batches
    Batch j of rank r is stream samples [j * batch_size, (j + 1) * batch_size), whatever the number
    of DataLoader workers. With K workers, worker k produces batches start_batch + k + m * K; the
    DataLoader (batch_size=None, in_order=True, the default) asks its workers round-robin and
    returns their outputs in that order, i.e. j = start_batch, start_batch + 1, ... . A worker
    skips whole shards whose samples belong to other workers without opening them (the shard
    sizes say where every stream position lies; they are counted once by count_samples when not
    given), and within a shard it reads the tar headers of every member but the payloads of its
    own samples' images only. So resuming at start_batch costs arithmetic, not decoding.

Per-sample randomness
    The caption field and the augmentation crop of a sample come from
    random.Random(f"{seed}/{epoch}/{shard_name}/{key}"): they depend on neither workers nor ranks.
    The field is drawn uniformly among the `fields` that have a cache row for (shard, key) (LLM2CLIP
    draws 50/50 between short and dense captions); the draw is the first use of that generator,
    the crop parameters come after it.

Skipped samples
    A sample without an image member (IMAGE_FIELDS), without a cache row in any field, or whose
    image does not decode is dropped from its batch and counted (SkipCounts, per reason and per
    shard); it is not replaced, so a batch may hold fewer than batch_size samples (even 0) and the
    positions of all later batches stay fixed.

Errors
    An unreadable or truncated shard raises ShardError naming it (never skipped: silently losing a
    shard would shift nothing but quietly change the data). A shard whose sample count differs from
    the given shard_sizes raises ShardError too, since every later batch position would be wrong.
"""

from __future__ import annotations

import io
import logging
import math
import random
import struct
import tarfile
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from llm2clip.cache import EmbeddingCache
from llm2clip.data.shards import ShardError, _check_end_of_archive, _split, shard_name

__all__ = [
    "IMAGE_FIELDS",
    "ShardImageDataset",
    "SkipCounts",
    "count_samples",
    "decode_image",
    "eval_transform",
    "normalize_images",
    "train_transform",
]

log = logging.getLogger(__name__)

IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Member suffixes that hold a sample's image, tried in this order."""

# PIL raises any of these on malformed input (UnidentifiedImageError is an OSError; struct.error and
# EOFError come from plugins reading short headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


# ------------------------------------------------------------------------------------------------
# Decoding and transforms


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (pixels loaded).

    Transparent images (RGBA, LA, PA, palette or L/RGB with a transparency key) are composited on
    white, as a viewer shows them. Raises ValueError on undecodable or truncated bytes; the caller
    adds the shard and key to the message.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # Image.open is lazy: truncation only shows when the pixels are read
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba).convert("RGB")
        elif img.mode != "RGB":
            img = img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ValueError(f"undecodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    return img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


class _EvalTransform:
    """A class rather than a closure so that DataLoader workers started by spawn can pickle it."""

    def __init__(self, image_size: int) -> None:
        _check_size(image_size)
        self.size = image_size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = self.size
        w, h = img.size
        # Shorter side -> s, longer side scaled and truncated (as torchvision's Resize(int) does).
        if w <= h:
            nw, nh = s, max(s, int(s * h / w))
        else:
            nw, nh = max(s, int(s * w / h)), s
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        return _to_tensor(img.crop((left, top, left + s, top + s)))


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """CLIP evaluation preprocessing: resize the shorter side to image_size (bicubic), center crop.

    Returns img -> (3, image_size, image_size) uint8 tensor.
    """
    return _EvalTransform(image_size)


class _TrainTransform:
    def __init__(self, image_size: int, scale: tuple[float, float]) -> None:
        _check_size(image_size)
        lo, hi = (float(x) for x in scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        self.size = image_size
        self.scale = (lo, hi)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) of a random-resized crop.

        Draw an area fraction uniformly in `scale` and a log-uniform aspect ratio in [3/4, 4/3];
        up to 10 tries for a box that fits, then fall back to the largest centred box whose aspect
        is clamped into the ratio range (the RandomResizedCrop algorithm).
        """
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= width and 0 < ch <= height:
                return rng.randint(0, width - cw), rng.randint(0, height - ch), cw, ch
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            cw, ch = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            cw, ch = int(round(height * self.ratio[1])), height
        else:
            cw, ch = width, height
        return (width - cw) // 2, (height - ch) // 2, cw, ch

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        left, top, cw, ch = self.crop_box(img.width, img.height, rng)
        s = self.size
        # resize(box=...) crops and resamples in one pass (no intermediate crop image).
        out = img.resize((s, s), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
        return _to_tensor(out)


def train_transform(
    image_size: int, scale: tuple[float, float] = (0.9, 1.0)
) -> Callable[[Image.Image, random.Random], torch.Tensor]:
    """open_clip's training preprocessing: a random-resized crop (area fraction in `scale`, aspect
    ratio in [3/4, 4/3]) resized to image_size x image_size (bicubic); no flips.

    Returns (img, rng) -> (3, image_size, image_size) uint8 tensor; every random draw comes from
    rng, so the crop is a function of the generator's state only.
    """
    return _TrainTransform(image_size, scale)


def normalize_images(
    images_u8: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n, 3, H, W) uint8 images (any device) -> (x / 255 - mean) / std, computed in float32 on that
    device and returned in `dtype`. mean and std have 3 entries (the tower config's image_mean /
    image_std)."""
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images must be (n, 3, H, W) uint8, got {tuple(images_u8.shape)} {images_u8.dtype}")
    dev = images_u8.device
    m = torch.as_tensor(mean, dtype=torch.float32, device=dev).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32, device=dev).reshape(-1)
    if m.numel() != 3 or s.numel() != 3:
        raise ValueError(f"mean and std need 3 values each, got {m.numel()} and {s.numel()}")
    x = images_u8.to(torch.float32).div_(255.0)
    x.sub_(m.view(1, 3, 1, 1)).div_(s.view(1, 3, 1, 1))
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Shard walking


def _walk_shard(path: str, want: Container[int] = ()) -> tuple[int, dict[int, tuple[str, dict[str, bytes]]]]:
    """Walk one shard's tar headers; read the image payloads of the samples whose index is in
    `want` only (tarfile seeks past the payloads it is not asked for).

    Samples are grouped exactly as iter_samples groups them (consecutive members with one key;
    non-files and names without a field ignored). Returns (number of samples,
    {index: (key, {image field: bytes})}) for the wanted indices. Raises ShardError naming the shard.
    """
    try:
        tar = tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"cannot open shard {path}: {e}") from e
    out: dict[int, tuple[str, dict[str, bytes]]] = {}
    n = 0
    key: str | None = None
    images: dict[str, bytes] | None = None
    try:
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, fld = _split(member.name)
                if not fld:
                    continue
                if k != key:
                    key = k
                    images = None
                    if n in want:
                        images = {}
                        out[n] = (k, images)
                    n += 1
                if images is not None and fld.lower() in IMAGE_FIELDS:
                    f = tar.extractfile(member)
                    images[fld.lower()] = f.read() if f is not None else b""
            _check_end_of_archive(path, tar)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"shard {path} is unreadable or truncated: {e}") from e
    return n, out


def count_samples(shards: Sequence[str], threads: int = 8) -> list[int]:
    """Number of samples (runs of consecutive members with one key) of each shard, from the tar
    headers only (no payload is read). Raises ShardError naming an unreadable shard."""
    shards = list(shards)
    if not shards:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        return [n for n, _ in pool.map(_walk_shard, shards)]


# ------------------------------------------------------------------------------------------------
# Dataset


@dataclass
class SkipCounts:
    """Samples dropped from batches, by reason and by shard."""

    corrupt_image: int = 0
    """Image member present but not decodable (or truncated)."""
    missing_image: int = 0
    """No member with a suffix in IMAGE_FIELDS."""
    missing_row: int = 0
    """No cache row for (shard, key) in any of the requested caption fields."""
    by_shard: dict[str, int] = field(default_factory=dict)
    """Shard name -> number of samples dropped from it (all reasons)."""

    @property
    def total(self) -> int:
        """All dropped samples."""
        return self.corrupt_image + self.missing_image + self.missing_row

    def add(self, other: SkipCounts) -> SkipCounts:
        """Add `other` into self (in place); returns self."""
        self.corrupt_image += other.corrupt_image
        self.missing_image += other.missing_image
        self.missing_row += other.missing_row
        for name, n in other.by_shard.items():
            self.by_shard[name] = self.by_shard.get(name, 0) + n
        return self

    def to_dict(self) -> dict:
        """Plain dict (for logs and JSON), with the total."""
        return {
            "corrupt_image": self.corrupt_image,
            "missing_image": self.missing_image,
            "missing_row": self.missing_row,
            "total": self.total,
            "by_shard": dict(self.by_shard),
        }

    def _skip(self, reason: str, shard: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.by_shard[shard] = self.by_shard.get(shard, 0) + 1


# A sample on its way into a batch: (data epoch, shard name, key, {image field: bytes}).
_Sample = tuple[int, str, str, dict[str, bytes]]


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

    Use with DataLoader(dataset, batch_size=None, num_workers=K) (keep in_order=True). Each item is
    {"images": (n, 3, S, S) uint8, "rows": (n,) int64 cache row ids, "index": batch index j,
    "epoch": data epoch of stream sample j * batch_size, "skipped": SkipCounts of this batch,
    "shards": [shard name] * n, "keys": [key] * n, "fields": [chosen field] * n}, n <= batch_size
    (parallel lists of str: DataLoader workers would turn tuples into lists).
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
    ) -> None:
        super().__init__()
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards given")
        self.names = [shard_name(s) for s in self.shards]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(
                f"shard names must be unique (the cache keys samples by shard name): {dup[:5]} repeat"
            )
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
        sizes = count_samples(self.shards) if shard_sizes is None else [int(n) for n in shard_sizes]
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
                count, got = _walk_shard(self.shards[s], want)
                if count != size:
                    raise ShardError(
                        f"shard {self.shards[s]} has {count} samples, shard_sizes says {size} "
                        "(the shard changed since it was counted; recount with count_samples)"
                    )
                name = self.names[s]
                for j, a, z in spans:
                    if a == j * b:
                        pending, batch_epoch = [], epoch
                    for p in range(a, z):
                        key, images = got.pop(order[p - lo])
                        pending.append((epoch, name, key, images))
                    if z == (j + 1) * b:
                        yield self._make_batch(j, batch_epoch, pending)
                        pending = []
            epoch += 1

    def _make_batch(self, index: int, epoch: int, samples: list[_Sample]) -> dict:
        names = [s[1] for s in samples]
        keys = [s[2] for s in samples]
        # (n, F) row ids, -1 where a field has no row; one vectorised lookup per field.
        rows = np.stack([self.cache.lookup(names, keys, f) for f in self.fields], axis=1) if samples else None
        skipped = SkipCounts()
        images, out_rows, out_shards, out_keys, out_fields = [], [], [], [], []
        for i, (ep, name, key, members) in enumerate(samples):
            data = next((members[f] for f in IMAGE_FIELDS if f in members), None)
            if data is None:
                skipped._skip("missing_image", name)
                continue
            have = np.flatnonzero(rows[i] >= 0)
            if have.size == 0:
                skipped._skip("missing_row", name)
                continue
            rng = random.Random(f"{self.seed}/{ep}/{name}/{key}")
            f = int(have[int(rng.random() * have.size)])
            try:
                img = decode_image(data)
            except ValueError as e:
                log.debug("skipping sample %r of shard %s: %s", key, name, e)
                skipped._skip("corrupt_image", name)
                continue
            images.append(self._train_tf(img, rng) if self.augment else self._eval_tf(img))
            out_rows.append(int(rows[i, f]))
            out_shards.append(name)
            out_keys.append(key)
            out_fields.append(self.fields[f])
        s = self.image_size
        return {
            "images": torch.stack(images) if images else torch.empty((0, 3, s, s), dtype=torch.uint8),
            "rows": torch.tensor(out_rows, dtype=torch.int64),
            "index": index,
            "epoch": epoch,
            "skipped": skipped,
            "shards": out_shards,
            "keys": out_keys,
            "fields": out_fields,
        }
