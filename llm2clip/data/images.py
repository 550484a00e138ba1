"""Images for CLIP: decoding, the train / eval transforms, and normalisation on the device.

    img = decode_image(data)                            # RGB PIL image; ValueError if undecodable
    x = train_transform(224)(img, rng)                  # (3, 224, 224) uint8, random-resized crop
    x = eval_transform(224)(img)                        # shorter side -> 224, centre crop
    x = train_transform(224).from_bytes(data, rng, draft=True)   # the same crop, decoded faster
    x = normalize_images(batch_u8.cuda(), mean, std)    # float, on the GPU

Transforms produce uint8 tensors so DataLoader workers ship 1 byte per pixel; the trainer
normalises on the device. Every random draw of a transform comes from the generator it is given.

Decode paths (``DECODE_MODES``; docs/data.md): ``pil`` decodes the whole image, then crops and
resamples. ``draft`` (``auto`` on the CPU) draws the same crop box from the image's header size,
then lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling, PIL's
``Image.draft``) as long as the crop stays at least the output size, and resamples the scaled
box: about 2-3x the samples/s of ``pil`` at 224 px from ~500 px JPEGs (bench/data_throughput.py).
The crop geometry and its statistics are identical; pixels differ slightly because libjpeg's
scaled IDCT replaces part of the bicubic filter's downscaling (tests/test_decode.py bounds the
difference per image: mean absolute error <= 3.5 of 255 and PSNR >= 27 dB; measured worst 2.65 /
33 dB on a photograph at 512 px, 2.98 / 28.5 dB with cartoon cut-outs). Other formats and images
too small to reduce take the ``pil`` path bit for bit. ``device`` leaves JPEGs to the main process,
which decodes them on the GPU (llm2clip.data.device_decode); ``auto`` picks it on a GPU when
that is measured faster than the data workers.
"""

from __future__ import annotations

import io
import logging
import math
import random
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DECODE_MODES",
    "IMAGE_FIELDS",
    "ResamplePlan",
    "decode_image",
    "eval_transform",
    "normalize_images",
    "train_transform",
]

log = logging.getLogger(__name__)

IMAGE_FIELDS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Member suffixes that hold a sample's image, tried in this order."""

DECODE_MODES: tuple[str, ...] = ("auto", "pil", "draft", "device")
"""auto: on a GPU that a JPEG decoder runs on, the faster of device and the workers' draft
(measured: llm2clip.data.device_decode.resolve_decode), else draft (the fastest CPU path);
device: JPEGs decoded on the training device (llm2clip.data.device_decode)."""

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
    return _load_rgb(_open(data), data)


def _open(data: bytes) -> Image.Image:
    """The image's header (size, format); pixels not decoded yet. ValueError if unreadable."""
    try:
        return Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as e:
        raise ValueError(f"undecodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e


def _load_rgb(img: Image.Image, data: bytes) -> Image.Image:
    try:
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


def _draft(img: Image.Image, box: tuple[float, float, float, float], size: int) -> tuple:
    """Let libjpeg decode `img` (lazy) at 1/2, 1/4 or 1/8 scale while the crop `box` (left, top,
    right, bottom in full-size pixels) keeps >= `size` pixels per side; returns the box in the
    decoded image's pixels. Not a JPEG, or no reduction possible: nothing changes."""
    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    if img.format != "JPEG" or bw < 2 * size or bh < 2 * size:
        return box
    img.draft(img.mode, (math.ceil(w * size / bw), math.ceil(h * size / bh)))
    sx, sy = img.size[0] / w, img.size[1] / h
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


class ResamplePlan(NamedTuple):
    """How a (width x height) image becomes the S x S output, decided from its header alone: crop
    `box` (left, top, right, bottom, full-size pixels), resample the crop to `size` (width, height;
    bicubic), then cut the S x S window at `offset` (left, top). The ``device`` decode path
    (llm2clip.data.device_decode) carries it from the data workers to the main process."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    offset: tuple[int, int]


def _eval_geometry(w: int, h: int, s: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the eval transform: shorter side -> s, the
    longer side scaled and truncated (as torchvision's Resize(int) does), centre crop."""
    nw, nh = (s, max(s, int(s * h / w))) if w <= h else (max(s, int(s * w / h)), s)
    return nw, nh, int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))


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
        nw, nh, left, top = _eval_geometry(w, h, s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        return _to_tensor(img.crop((left, top, left + s, top + s)))

    def from_bytes(self, data: bytes, draft: bool = True) -> torch.Tensor:
        """decode_image then this transform; with `draft`, a JPEG is decoded reduced (module
        docstring) and the same region (in full-size pixels) resampled from it."""
        img = _open(data)
        if draft:
            s = self.size
            w, h = img.size
            nw, nh, left, top = _eval_geometry(w, h, s)
            full = (left * w / nw, top * h / nh, (left + s) * w / nw, (top + s) * h / nh)
            box = _draft(img, full, s)
            if box is not full:
                img = _load_rgb(img, data)
                return _to_tensor(img.resize((s, s), Image.Resampling.BICUBIC, box=box))
        return self(_load_rgb(img, data))

    def plan(self, width: int, height: int, rng: random.Random | None = None) -> ResamplePlan:
        """This transform as a ResamplePlan (no random draw; `rng` is accepted for symmetry)."""
        nw, nh, left, top = _eval_geometry(width, height, self.size)
        return ResamplePlan((0, 0, width, height), (nw, nh), (left, top))


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

    def plan(self, width: int, height: int, rng: random.Random) -> ResamplePlan:
        """This transform as a ResamplePlan, with the same draws from rng as __call__."""
        left, top, cw, ch = self.crop_box(width, height, rng)
        return ResamplePlan((left, top, left + cw, top + ch), (self.size, self.size), (0, 0))

    def from_bytes(self, data: bytes, rng: random.Random, draft: bool = True) -> torch.Tensor:
        """decode_image then this transform, with the same draws from rng; with `draft`, a JPEG
        is decoded reduced (module docstring): the crop box is drawn from the full size first."""
        img = _open(data)
        left, top, cw, ch = self.crop_box(img.width, img.height, rng)
        box = (left, top, left + cw, top + ch)
        if draft:
            box = _draft(img, box, self.size)
        img = _load_rgb(img, data)
        s = self.size
        return _to_tensor(img.resize((s, s), Image.Resampling.BICUBIC, box=box))


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
