"""Photographs for decode tests: matplotlib's grace_hopper.jpg (matplotlib is in the test extra),
re-encoded at the shorter sides img2dataset commonly writes, and a pixel-difference measure."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image


def photo_jpegs(side: int, n: int) -> list[bytes]:
    """n JPEGs (quality 90) of random crops of the photograph, shorter side `side`, aspect ratios
    1, 4:3, 3:2 and 3:4; skips the test without matplotlib."""
    matplotlib = pytest.importorskip("matplotlib", reason="grace_hopper.jpg comes with matplotlib")
    import os

    src = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert(
        "RGB"
    )
    rng = random.Random(side)
    out = []
    for _ in range(n):
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        aspect = rng.choice([1.0, 4 / 3, 3 / 2, 3 / 4])
        size = (round(side * max(aspect, 1)), round(side * max(1 / aspect, 1)))
        buf = io.BytesIO()
        src.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)).save(
            buf, "JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


def pixel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean absolute difference, PSNR in dB) of two uint8 images."""
    d = a.double() - b.double()
    mse = float((d**2).mean())
    return float(d.abs().mean()), (10 * np.log10(255**2 / mse) if mse else float("inf"))
