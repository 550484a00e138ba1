"""Images for CLIP: decoding, the train / eval transforms, and normalisation on the device.

    img = decode_image(data)                            # RGB PIL image; ValueError if undecodable
    x = train_transform(224)(img, rng)                  # (3, 224, 224) uint8, random-resized crop
    x = eval_transform(224)(img)                        # shorter side -> 224, centre crop
    x = normalize_images(batch_u8.cuda(), mean, std)    # float, on the GPU

Transforms produce uint8 tensors so DataLoader workers ship 1 byte per pixel; the trainer
normalises on the device. Every random draw of a transform comes from the generator it is given.
"""

from __future__ import annotations

import io
import logging
import math
import random
import struct
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_FIELDS",
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
