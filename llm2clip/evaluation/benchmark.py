"""CLIP_benchmark's webdataset evaluation sets, read from a local copy.

    s = load_benchmark_set("data/wds_mscoco_captions", "test", 224, embedder)  # RetrievalSet
    s = load_benchmark_set("data/wds_imagenet1k", "test", 224, embedder)       # ZeroShotSet

The layout (LAION-AI/CLIP_benchmark ``datasets/builder.py: build_wds_dataset``; the sets on the
Hugging Face hub as ``clip-benchmark/wds_*``)::

    ROOT/
      {split}/nshards.txt            number of shards n (required)
      {split}/0.tar .. {n-1}.tar     samples: an image (.webp, .png, .jpg or .jpeg, tried in that
                                     order) and .cls (classification: an ASCII class index) or .txt
                                     (retrieval: one caption per line, several per image)
      dataset_type.txt               "retrieval"; missing or anything else: classification
      classnames.txt                 one class name per line (classification)
      zeroshot_classification_templates.txt   one prompt per line with {c} (classification)

The sets carry ``protocol="clip_benchmark"``: ``evaluate`` scores them with CLIP_benchmark's
metric definitions (``llm2clip.evaluation.metrics``). Captions are read as theirs are
(``str.splitlines`` of the .txt); blank lines are dropped and counted (an LLM cannot embed an empty
caption), and an image whose .txt holds no caption stays in the set as a miss, as it is for them.
Where CLIP_benchmark stops (a sample without an image or a label, an undecodable image), the sample
is skipped and counted instead. Multi-label sets (dataset_type "multilabel") are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llm2clip.data.shards import shard_name
from llm2clip.evaluation.sets import (
    ImageCollector,
    RetrievalSet,
    ZeroShotSet,
    _embed,
    _image_bytes,
    _samples,
    load_zeroshot_set,
)

__all__ = ["BENCHMARK_IMAGE_FIELDS", "benchmark_layout", "load_benchmark_set"]

BENCHMARK_IMAGE_FIELDS = ("webp", "png", "jpg", "jpeg")
"""Image members in CLIP_benchmark's order (its ``to_tuple(["webp", "png", "jpg", "jpeg"], ...)``)."""


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def benchmark_layout(root: str | os.PathLike, split: str = "test") -> dict:
    """{"task": "retrieval" | "classification", "shards": [...], "classnames", "templates"} of a
    local CLIP_benchmark wds set; ValueError naming the missing file or the unsupported type."""
    root = Path(root)
    nshards = root / split / "nshards.txt"
    if not nshards.is_file():
        raise ValueError(
            f"{root} is not a CLIP_benchmark wds eval set with a {split!r} split: no {nshards} "
            "(expected ROOT/SPLIT/nshards.txt and ROOT/SPLIT/0.tar ...)"
        )
    try:
        n = int(nshards.read_text().strip())
    except ValueError:
        raise ValueError(f"{nshards}: not an integer") from None
    shards = [str(root / split / f"{i}.tar") for i in range(n)]
    missing = [p for p in shards if not Path(p).is_file()]
    if n < 1 or missing:
        raise ValueError(f"{nshards} says {n} shards; missing: {missing[:3] or 'all'}")
    kind = root / "dataset_type.txt"
    task = kind.read_text().strip().lower() if kind.is_file() else "classification"
    if task == "multilabel":
        raise ValueError(f"{root}: multi-label sets (dataset_type.txt 'multilabel') are not supported")
    out = {"task": "retrieval" if task == "retrieval" else "classification", "shards": shards}
    if out["task"] == "classification":
        for key, name in (
            ("classnames", "classnames.txt"),
            ("templates", "zeroshot_classification_templates.txt"),
        ):
            if not (root / name).is_file():
                raise ValueError(f"{root}: a classification set needs {name}")
            out[key] = _read_lines(root / name)  # blank class names keep their index, as theirs
        blank = [i + 1 for i, t in enumerate(out["templates"]) if not t]
        if blank:
            raise ValueError(f"{root / 'zeroshot_classification_templates.txt'}: blank lines {blank[:5]}")
    return out


def load_benchmark_set(
    root: str | os.PathLike,
    split: str,
    image_size: int,
    embedder,
    *,
    max_images: int | None = None,
    max_length: int | None = None,
) -> RetrievalSet | ZeroShotSet:
    """The set at `root` (module docstring), images center-cropped to `image_size`, captions or
    class prompts embedded by `embedder` (an LLMTextEmbedder: the exact LLM of the training cache
    or a bundle's) at `max_length` (default: the recipe's). ``dataset`` is the folder's name."""
    layout = benchmark_layout(root, split)
    name = Path(root).resolve().name
    if layout["task"] == "classification":
        s = load_zeroshot_set(
            layout["shards"], image_size, layout["classnames"], layout["templates"], embedder,
            max_images=max_images, image_fields=BENCHMARK_IMAGE_FIELDS, max_length=max_length,
        )  # fmt: skip
        s.dataset, s.split, s.protocol = name, split, "clip_benchmark"
        return s
    return _load_retrieval(layout["shards"], name, split, image_size, embedder, max_images, max_length)


def _load_retrieval(shards, name, split, image_size, embedder, max_images, max_length) -> RetrievalSet:
    counts = {"shards": len(shards), "samples": 0, "no_caption": 0, "blank_captions": 0,
              "images_without_captions": 0}  # fmt: skip
    images = ImageCollector(image_size, max_images, counts)
    captions: list[str] = []
    t2i: list[int] = []
    for path, sample in _samples(shards, images.full):
        counts["samples"] += 1
        raw = sample.get("txt")
        if raw is None:
            counts["no_caption"] += 1
            continue
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"shard {path}, key {sample['__key__']!r}: .txt is not UTF-8 ({e})") from None
        kept = [c for c in lines if c.strip()]
        counts["blank_captions"] += len(lines) - len(kept)
        index = images.add(
            (shard_name(path), sample["__key__"]), _image_bytes(sample, BENCHMARK_IMAGE_FIELDS)
        )
        if index is None:
            continue
        counts["images_without_captions"] += not kept
        captions += kept
        t2i += [index] * len(kept)
    stacked = images.stacked(f"the CLIP_benchmark set {name} ({split})")
    if not captions:
        raise ValueError(f"the CLIP_benchmark set {name} ({split}) holds no caption: {counts}")
    emb = _embed(embedder, captions, max_length, counts)
    counts.update(images=len(images.images), captions=len(captions))
    return RetrievalSet(
        images=stacked, text_embeddings=emb, text_to_image=torch.tensor(t2i, dtype=torch.long),
        captions=captions, image_keys=images.keys, caption_fields=["txt"] * len(captions), counts=counts,
        dataset=name, split=split, protocol="clip_benchmark",
    )  # fmt: skip
