"""JPEG draft decoding (llm2clip.data.images, decode="draft"): the same crops as the full decode,
pixels within a documented bound, and the full-decode path bit for bit where no reduction applies.

Images: tests/photo_fixtures.py (a photograph re-encoded at the sizes img2dataset writes).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip.data.images import decode_image, eval_transform, train_transform
from tests.photo_fixtures import photo_jpegs, pixel_diff

MAE_BOUND = 3.5  # of 255, per image
PSNR_BOUND = 27.0  # dB, per image


@pytest.mark.parametrize("side", [512, 600])
def test_draft_keeps_the_crop_and_bounds_the_pixels(side):
    tf, ev = train_transform(224), eval_transform(224)
    reduced = 0
    for i, data in enumerate(photo_jpegs(side, 12)):
        full_rng, draft_rng = random.Random(i), random.Random(i)
        full = tf(decode_image(data), full_rng)
        draft = tf.from_bytes(data, draft_rng, draft=True)
        assert full_rng.getstate() == draft_rng.getstate()  # the same draws: the same crop box
        assert torch.equal(tf.from_bytes(data, random.Random(i), draft=False), full)
        for a, b in ((full, draft), (ev(decode_image(data)), ev.from_bytes(data, draft=True))):
            mae, psnr = pixel_diff(a, b)
            reduced += mae > 0
            assert mae <= MAE_BOUND and psnr >= PSNR_BOUND, (i, mae, psnr)
    assert reduced >= 12  # most crops of these sizes are decoded reduced


def test_no_reduction_is_the_full_decode_bit_for_bit():
    tf, ev = train_transform(224), eval_transform(224)
    for i, data in enumerate(photo_jpegs(300, 4)):  # crops < 448 px: no 1/2 decode possible
        assert torch.equal(tf.from_bytes(data, random.Random(i)), tf(decode_image(data), random.Random(i)))
        assert torch.equal(ev.from_bytes(data), ev(decode_image(data)))
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)).save(png, "PNG")
    png = png.getvalue()  # not a JPEG: no draft
    assert torch.equal(tf.from_bytes(png, random.Random(1)), tf(decode_image(png), random.Random(1)))
    with pytest.raises(ValueError, match="undecodable image"):
        tf.from_bytes(png[: len(png) // 2], random.Random(1))
