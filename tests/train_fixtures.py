"""Tiny stage-2 data for the trainer's tests: PNG shards plus a caption-embedding cache.

Each sample belongs to one of CLASSES classes: its image is a flat colour of the class (plus
noise) and its cached caption embeddings ("short", "dense") are the class direction plus noise,
so a few training steps already move the loss. An ``extract_summary.json`` beside the cache names
the fields, as llm2clip.extract writes it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llm2clip.cache import PROBE_CAPTIONS, CacheSpec, CacheWriter
from llm2clip.data.shards import write_shard

DIM = 24
CLASSES = 4
FIELDS = ("short", "dense")
# A ViT small enough for CPU tests (the preset's other settings are kept).
TINY_VIT = '{"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 16}'


def png(rng: np.random.Generator, cls: int, size: int = 20, fmt: str = "png") -> bytes:
    """A class-coloured noisy image, encoded as PNG ("png") or JPEG ("jpg")."""
    colour = np.array([(cls * 67) % 256, (cls * 131 + 40) % 256, (cls * 29 + 90) % 256])
    pixels = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return buf.getvalue()


def spec(model_id: str = "test/tiny-llm", dim: int = DIM) -> CacheSpec:
    return CacheSpec(
        model_id=model_id, model_revision="0" * 40, adapter_revision="", prompt_template="{caption}",
        pooling="mean", max_length=16, normalize=True, dim=dim,
    )  # fmt: skip


def make_data(
    root: Path,
    shards: int = 4,
    per_shard: int = 8,
    *,
    prefix: str = "train",
    corrupt: int = 0,
    missing_rows: int = 0,
    model_id: str = "test/tiny-llm",
    cache_dir: str = "cache",
    seed: int = 0,
    fmt: str = "png",
) -> tuple[list[str], Path]:
    """(shard paths, cache dir). The first `corrupt` samples of the first shard have truncated
    images, the next `missing_rows` have no cache row. fmt: "png" or "jpg" (the member's name too)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(CLASSES, DIM, generator=gen), dim=1)
    root.mkdir(parents=True, exist_ok=True)
    paths, rows = [], {}
    for s in range(shards):
        name = f"{prefix}-{s:04d}.tar"
        samples, entries = [], []
        for k in range(per_shard):
            cls = int(rng.integers(CLASSES))
            key = f"{k:05d}"
            image = png(rng, cls, fmt=fmt)
            j = s * per_shard + k
            if j < corrupt:
                image = image[: len(image) // 3]
            samples.append({"__key__": key, fmt: image, "txt": f"class {cls} item {j}", "cls": str(cls)})
            if not (corrupt <= j < corrupt + missing_rows):
                entries.append((key, cls))
        write_shard(str(root / name), samples)
        paths.append(str(root / name))
        rows[name] = entries
    cache = root / cache_dir
    writer = CacheWriter(cache, spec(model_id), "fp32")
    for name, entries in rows.items():
        with writer.shard(name) as w:
            for f, field in enumerate(FIELDS):
                if not entries:
                    continue
                keys = [k for k, _ in entries]
                noise = 0.3 * torch.randn(len(entries), DIM, generator=gen)
                emb = directions[[c for _, c in entries]] + noise
                texts = [f"{field} {name} {k} {f}" for k in keys]
                w.add_batch(keys, field, texts, torch.nn.functional.normalize(emb, dim=1))
    writer.merge(torch.nn.functional.normalize(torch.randn(len(PROBE_CAPTIONS), DIM, generator=gen), dim=1))
    summary = {"config": {"fields": ["short=txt", "dense=json:dense"]}}
    (cache / "extract_summary.json").write_text(json.dumps(summary))
    return paths, cache
