"""Multilingual retrieval: one image set, captions keyed by language, scored per language.

    s = load_xm3600("data/xm3600", 224, embedder, languages=["en", "de", "zh"])
    s = build_multilingual_set(images, {"en": [["a dog"], ...], "fr": [["un chien"], ...]}, embedder)
    r = evaluate_multilingual(model, s)          # llm2clip.evaluation.evaluate
    print(format_language_table(r))              # language x metric, beside chance

``captions[language][i]`` holds image i's captions in that language (a list, possibly empty).
Each language is scored on the images that have a caption in it (all of them in XM3600), with the
set's protocol (default CLIP_benchmark's definitions, as its ``crossmodal3600`` task). Any caller
with images and translated captions (a demo, Flickr-CN, XTD) builds a set with
``build_multilingual_set``.

XM3600 (Crossmodal-3600) layout, as CLIP_benchmark downloads it::

    ROOT/captions.jsonl   one line per image: {"image/key": "...", "<lang>": {"caption": [...], ...}, ...}
    ROOT/images/<key>.jpg

CLIP_benchmark uses the first caption of each language (``captions="first"``); ``"all"`` keeps
every caption (an image is a hit when any of them is). A missing image file is skipped and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.evaluation.sets import ImageCollector, _check_meta, _embed

__all__ = ["CAPTION_CHOICES", "LanguageCaptions", "MultilingualSet", "build_multilingual_set", "load_xm3600"]

CAPTION_CHOICES = ("first", "all")


@dataclass
class LanguageCaptions:
    """One language's captions of a MultilingualSet (CPU tensors)."""

    text_embeddings: Tensor
    """(M, d_llm) float32 frozen LLM embeddings."""
    text_to_image: Tensor
    """(M,) long: the image (index into the set's images) of each caption."""
    captions: list[str]
    counts: dict = field(default_factory=dict)
    """captions, truncated (distinct captions cut at max_length), max_length."""


@dataclass
class MultilingualSet:
    """Images and their captions in several languages, ready for ``evaluate``."""

    images: Tensor
    """(N, 3, S, S) uint8."""
    languages: dict[str, LanguageCaptions]
    image_keys: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    dataset: str = ""
    split: str = ""
    protocol: str = "clip_benchmark"

    def __post_init__(self) -> None:
        _check_meta(self)
        if not self.languages:
            raise ValueError("a multilingual set needs at least one language")
        n = self.images.shape[0]
        for lang, c in self.languages.items():
            if c.text_to_image.numel() and (
                int(c.text_to_image.min()) < 0 or int(c.text_to_image.max()) >= n
            ):
                raise ValueError(f"language {lang!r}: image ids outside [0, {n})")


def build_multilingual_set(
    images: Tensor,
    captions: Mapping[str, Sequence[Sequence[str]]],
    embedder,
    *,
    image_keys: Sequence | None = None,
    max_length: int | None = None,
    dataset: str = "",
    split: str = "",
    protocol: str = "clip_benchmark",
    counts: dict | None = None,
) -> MultilingualSet:
    """A MultilingualSet of uint8 images (N, 3, S, S) and ``captions[language][i]`` (image i's
    captions in that language), each language embedded by `embedder` at `max_length`."""
    n = images.shape[0]
    languages = {}
    for lang, per_image in captions.items():
        if len(per_image) != n:
            raise ValueError(f"language {lang!r} has captions for {len(per_image)} images, the set has {n}")
        texts = [c for caps in per_image for c in caps if c.strip()]
        t2i = [i for i, caps in enumerate(per_image) for c in caps if c.strip()]
        if not texts:
            raise ValueError(f"language {lang!r} has no caption")
        lang_counts: dict = {"captions": len(texts)}
        emb = _embed(embedder, texts, max_length, lang_counts)
        languages[lang] = LanguageCaptions(emb, torch.tensor(t2i, dtype=torch.long), texts, lang_counts)
    return MultilingualSet(
        images=images, languages=languages, image_keys=list(image_keys or range(n)),
        counts=dict(counts or {}), dataset=dataset, split=split, protocol=protocol,
    )  # fmt: skip


def _xm3600_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"not an XM3600 folder: no {path} (expected captions.jsonl and images/)")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i + 1}: invalid JSON ({e})") from None
    return out


def _languages_of(record: dict) -> list[str]:
    return sorted(k for k, v in record.items() if isinstance(v, dict) and isinstance(v.get("caption"), list))


def load_xm3600(
    root: str | os.PathLike,
    image_size: int,
    embedder,
    *,
    languages: Sequence[str] | None = None,
    captions: str = "first",
    max_images: int | None = None,
    max_length: int | None = None,
) -> MultilingualSet:
    """The Crossmodal-3600 set at `root` (module docstring); languages default to all of them."""
    if captions not in CAPTION_CHOICES:
        raise ValueError(f"captions must be one of {CAPTION_CHOICES}, got {captions!r}")
    root = Path(root)
    records = _xm3600_records(root / "captions.jsonl")
    found = sorted({lang for r in records for lang in _languages_of(r)})
    languages = list(languages) if languages else found
    unknown = [lang for lang in languages if lang not in found]
    if unknown:
        raise ValueError(f"{root}: no captions in {unknown}; the set has {found}")
    counts: dict = {"records": len(records), "missing_images": 0}
    images = ImageCollector(image_size, max_images, counts)
    per_lang: dict[str, list[list[str]]] = {lang: [] for lang in languages}
    for i, record in enumerate(records):
        if images.full():
            break
        key = record.get("image/key")
        if not isinstance(key, str):
            raise ValueError(f"{root / 'captions.jsonl'}, line {i + 1}: no 'image/key'")
        image = root / "images" / f"{key}.jpg"
        if not image.is_file():
            counts["missing_images"] += 1
            continue
        if images.add(key, image.read_bytes()) is None:
            continue
        for lang in languages:
            caps = list((record.get(lang) or {}).get("caption") or [])
            per_lang[lang].append(caps[:1] if captions == "first" else caps)
    stacked = images.stacked(f"the XM3600 set at {root}")
    counts.update(images=stacked.shape[0], captions_per_language=captions)
    return build_multilingual_set(
        stacked, per_lang, embedder, image_keys=images.keys, max_length=max_length,
        dataset=root.resolve().name, counts=counts,
    )  # fmt: skip
