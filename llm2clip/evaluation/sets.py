"""Evaluation sets: held-out images with their captions' frozen LLM embeddings, loaded once.

    rs = load_retrieval_set(shards, ["txt", "dense=json:dense"], 224, cache=eval_cache)
    zs = load_zeroshot_set(shards, 224, classnames, templates, embedder)

Images are decoded and centre-cropped once (uint8, CPU); caption embeddings come from a cache of
the same LLM (looked up by shard, key and field) or from an embedder (see
``llm2clip.models.text_recipe.embedder_like``: the exact LLM of the training cache, probe-checked;
or a bundle's), at the recipe's max_length or `max_length` (``counts["truncated"]``: distinct
captions cut). ``llm2clip.evaluation.evaluate`` then only runs the vision tower and the text adapter.

Every set names its ``dataset`` and ``split`` and the ``protocol`` its metrics follow
(``llm2clip.evaluation.metrics``: "llm2clip" or "clip_benchmark"). Other layouts:
``llm2clip.evaluation.benchmark`` (CLIP_benchmark's wds eval sets), ``long_captions`` (JSON of
{image, caption}, Urban-1k), ``multilingual`` (XM3600).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.bundle.text import embed_captions
from llm2clip.cache import EmbeddingCache
from llm2clip.data.fields import FieldSpec
from llm2clip.data.images import IMAGE_FIELDS, decode_image, eval_transform
from llm2clip.data.shards import ShardError, expand_shards, iter_samples, shard_name

__all__ = [
    "PROTOCOLS",
    "ImageCollector",
    "RetrievalSet",
    "ZeroShotSet",
    "build_prompts",
    "fill_template",
    "load_retrieval_set",
    "load_zeroshot_set",
    "read_names",
]

_LOAD_BLOCK = 1024  # samples read ahead per cache lookup (one vectorised lookup per block)
PROTOCOLS = ("llm2clip", "clip_benchmark")


def _check_meta(obj) -> None:
    if obj.protocol not in PROTOCOLS:
        raise ValueError(f"protocol {obj.protocol!r} not in {PROTOCOLS}")


@dataclass
class RetrievalSet:
    """Held-out image-caption pairs, ready for ``evaluate`` (CPU tensors)."""

    images: Tensor
    """(N, 3, S, S) uint8, resized (shorter side) and center-cropped to S."""
    text_embeddings: Tensor
    """(M, d_llm) float32 frozen LLM embeddings of the captions."""
    text_to_image: Tensor
    """(M,) long: the image of each caption."""
    captions: list[str]
    """The M caption texts."""
    image_keys: list[tuple[str, str]] = field(default_factory=list)
    """(shard name, sample key) of each image."""
    caption_fields: list[str] = field(default_factory=list)
    """The field name each caption was read from."""
    counts: dict = field(default_factory=dict)
    """What was read and what was skipped: samples (read; with max_images possibly a block beyond
    the last image used), no_image, no_caption, corrupt_images, captions_not_in_cache,
    images_without_cached_caption, images, captions; truncated and max_length when embedded here."""
    dataset: str = ""
    """What the set is (shards spec, CLIP_benchmark dataset folder, JSON file, ...)."""
    split: str = ""
    """Its split ('' when the layout has none)."""
    protocol: str = "llm2clip"
    """Metric definitions: 'llm2clip' or 'clip_benchmark' (llm2clip.evaluation.metrics)."""

    def __post_init__(self) -> None:
        _check_meta(self)
        n, m = self.images.shape[0], self.text_embeddings.shape[0]
        if self.images.ndim != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be (N, 3, S, S) uint8, got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.text_to_image.shape != (m,) or len(self.captions) != m:
            raise ValueError("text_embeddings, text_to_image and captions must have one entry per caption")
        if m and (int(self.text_to_image.min()) < 0 or int(self.text_to_image.max()) >= n):
            raise ValueError(f"text_to_image holds image ids outside [0, {n})")


@dataclass
class ZeroShotSet:
    """Labelled images and the embedded class prompts, ready for ``evaluate`` (CPU tensors)."""

    images: Tensor
    """(N, 3, S, S) uint8."""
    labels: Tensor
    """(N,) long class indices into classnames."""
    prompt_embeddings: Tensor
    """(C, T, d_llm) float32 frozen LLM embeddings of every class x template prompt."""
    classnames: list[str]
    """The C class names."""
    templates: list[str]
    """The T prompt templates ('a photo of a {}.' or '{c}')."""
    image_keys: list[tuple[str, str]] = field(default_factory=list)
    """(shard name, sample key) of each image."""
    counts: dict = field(default_factory=dict)
    """What was read and what was skipped."""
    dataset: str = ""
    split: str = ""
    protocol: str = "llm2clip"

    def __post_init__(self) -> None:
        _check_meta(self)
        c, t = len(self.classnames), len(self.templates)
        if self.prompt_embeddings.shape[:2] != (c, t):
            raise ValueError(
                f"prompt_embeddings {tuple(self.prompt_embeddings.shape)} do not match "
                f"{c} classes x {t} templates"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("one label per image")


def _image_bytes(sample: dict, fields: Sequence[str] = IMAGE_FIELDS) -> bytes | None:
    for f in fields:
        if f in sample:
            return sample[f]
    return None


def _read_captions(sample: dict, specs: Sequence[FieldSpec], path: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        try:
            text = spec.read(sample)
        except (ValueError, UnicodeDecodeError) as e:  # bad JSON is a data error: name it, like extract
            raise ShardError(f"shard {path}, key {sample['__key__']!r}, field {spec.name!r}: {e}") from e
        if text is not None:
            out.append((spec.name, text))
    return out


def _blocks(paths: Sequence[str], block: int) -> Iterator[tuple[str, list[dict]]]:
    """(shard path, up to `block` consecutive samples of it)."""
    for path in paths:
        buf: list[dict] = []
        for sample in iter_samples(path):
            buf.append(sample)
            if len(buf) >= block:
                yield path, buf
                buf = []
        if buf:
            yield path, buf


def _samples(paths: Sequence[str], stop) -> Iterator[tuple[str, dict]]:
    """(shard path, sample) of every shard in order, until stop() is true."""
    for path in paths:
        for sample in iter_samples(path):
            if stop():
                return
            yield path, sample


def _decode(data: bytes, transform) -> Tensor | None:
    try:
        return transform(decode_image(data))
    except ValueError:
        return None


def _check_max(max_images: int | None) -> None:
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")


def load_retrieval_set(
    shards: str | Sequence[str],
    fields: Sequence[str | FieldSpec],
    image_size: int,
    *,
    cache: EmbeddingCache | None = None,
    embedder=None,
    max_images: int | None = None,
    max_length: int | None = None,
) -> RetrievalSet:
    """Every sample of the shards with a decodable image and at least one caption among `fields`.

    shards:     shard specs (llm2clip.data.shards.expand_shards).
    fields:     caption fields (llm2clip.data.fields: 'txt', 'json:dense_caption', 'dense=json:...').
    image_size: side S of the center-cropped images.
    cache:      look caption embeddings up by (shard name, key, field name); a caption missing
                from the cache is dropped (counted), and so is an image left without captions.
    embedder:   otherwise embed the captions with it (an LLMTextEmbedder: ``encode(list[str])``).
    max_images: stop after this many images (in shard order).
    max_length: tokens per caption when embedding with `embedder` (default: its recipe's).

    Corrupt images are skipped and counted (``counts["corrupt_images"]``). Raises ValueError when
    no sample is usable, ShardError for an unreadable shard or an invalid caption field.
    """
    if cache is None and embedder is None:
        raise ValueError("load_retrieval_set needs cache= (precomputed caption embeddings) or embedder=")
    _check_max(max_images)
    specs = [f if isinstance(f, FieldSpec) else FieldSpec.parse(f) for f in fields]
    if not specs:
        raise ValueError("no caption fields given")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"two caption fields share a name: {[s.name for s in specs]}")
    paths = expand_shards(list(shards) if not isinstance(shards, str) else shards)
    reader = _RetrievalReader(specs, eval_transform(image_size), cache, max_images, len(paths))
    block = _LOAD_BLOCK if max_images is None else min(_LOAD_BLOCK, max_images)
    for path, samples in _blocks(paths, block):
        if reader.full():
            break
        reader.add_block(path, samples)
    if not reader.images:
        raise ValueError(
            f"no usable sample in the retrieval shards {shards}"
            f" (an image in {IMAGE_FIELDS} and a caption in {[s.name for s in specs]} are needed"
            f"{', present in the cache' if cache is not None else ''}): {reader.counts}"
        )
    if cache is not None:
        emb = cache.gather(torch.tensor(reader.cache_rows, dtype=torch.long), out_dtype=torch.float32)
    else:
        emb = _embed(embedder, reader.captions, max_length, reader.counts)
    reader.counts.update(images=len(reader.images), captions=len(reader.captions))
    return RetrievalSet(
        images=torch.stack(reader.images),
        text_embeddings=emb.to("cpu", torch.float32),
        text_to_image=torch.tensor(reader.t2i, dtype=torch.long),
        captions=reader.captions,
        image_keys=reader.keys,
        caption_fields=reader.cap_fields,
        counts=reader.counts,
        dataset=shards if isinstance(shards, str) else " ".join(map(str, shards)),
    )


class _RetrievalReader:
    """The images and captions load_retrieval_set keeps, a block of samples at a time."""

    def __init__(self, specs, transform, cache: EmbeddingCache | None, max_images: int | None, shards: int):
        self.specs, self.transform, self.cache = specs, transform, cache
        self.room = max_images if max_images is not None else math.inf
        self.counts = {
            "shards": shards, "samples": 0, "no_image": 0, "no_caption": 0, "corrupt_images": 0,
            "captions_not_in_cache": 0, "images_without_cached_caption": 0,
        }  # fmt: skip
        self.images: list[Tensor] = []
        self.keys: list[tuple[str, str]] = []
        self.captions: list[str] = []
        self.cap_fields: list[str] = []
        self.t2i: list[int] = []
        self.cache_rows: list[int] = []

    def full(self) -> bool:
        return len(self.images) >= self.room

    def _candidates(self, path: str, samples: list[dict]) -> list[tuple[dict, bytes, list]]:
        """(sample, image bytes, [(field, caption)]) of the samples with an image and a caption."""
        out = []
        for sample in samples:
            data = _image_bytes(sample)
            if data is None:
                self.counts["no_image"] += 1
                continue
            caps = _read_captions(sample, self.specs, path)
            if not caps:
                self.counts["no_caption"] += 1
                continue
            out.append((sample, data, caps))
        return out

    def _rows(self, name: str, todo: list) -> list[list[int]]:
        """Each candidate's cache row per caption (-1: not in the cache; all -1 without a cache)."""
        if self.cache is None:
            return [[-1] * len(caps) for _, _, caps in todo]
        flat = [(sample["__key__"], f) for sample, _, caps in todo for f, _ in caps]
        ids = self.cache.lookup(name, [k for k, _ in flat], [f for _, f in flat]).tolist() if flat else []
        out, pos = [], 0
        for _, _, caps in todo:
            out.append(ids[pos : pos + len(caps)])
            pos += len(caps)
        return out

    def add_block(self, path: str, samples: list[dict]) -> None:
        name = shard_name(path)
        self.counts["samples"] += len(samples)
        todo = self._candidates(path, samples)
        for (sample, data, caps), rows in zip(todo, self._rows(name, todo), strict=True):
            kept = list(zip(caps, rows, strict=True))
            if self.cache is not None:
                self.counts["captions_not_in_cache"] += sum(r < 0 for r in rows)
                kept = [(c, r) for c, r in kept if r >= 0]
                if not kept:
                    self.counts["images_without_cached_caption"] += 1
                    continue
            if self.full():
                return
            img = _decode(data, self.transform)
            if img is None:
                self.counts["corrupt_images"] += 1
                continue
            for (f, text), r in kept:
                self.captions.append(text)
                self.cap_fields.append(f)
                self.t2i.append(len(self.images))
                self.cache_rows.append(r)
            self.keys.append((name, sample["__key__"]))
            self.images.append(img)


def _embed(embedder, texts: Sequence[str], max_length: int | None, counts: dict) -> Tensor:
    """embed_captions, its truncation count and length recorded in `counts`."""
    emb, truncated = embed_captions(embedder, texts, max_length)
    config = getattr(embedder, "config", None)
    counts["truncated"] = truncated
    counts["max_length"] = max_length or getattr(config, "max_length", None)
    return emb


class ImageCollector:
    """Images of an evaluation set decoded and center-cropped one by one (uint8, CPU), up to
    max_images, with the skips counted: ``add(key, data) -> index or None``."""

    def __init__(self, image_size: int, max_images: int | None, counts: dict):
        _check_max(max_images)
        self.transform = eval_transform(image_size)
        self.room = max_images if max_images is not None else math.inf
        self.counts = counts
        for name in ("no_image", "corrupt_images"):
            counts.setdefault(name, 0)
        self.images: list[Tensor] = []
        self.keys: list = []

    def full(self) -> bool:
        return len(self.images) >= self.room

    def add(self, key, data: bytes | None) -> int | None:
        """The new image's index, or None when it is missing or undecodable (counted)."""
        if data is None:
            self.counts["no_image"] += 1
            return None
        img = _decode(data, self.transform)
        if img is None:
            self.counts["corrupt_images"] += 1
            return None
        self.images.append(img)
        self.keys.append(key)
        return len(self.images) - 1

    def stacked(self, where: str) -> Tensor:
        if not self.images:
            raise ValueError(f"no usable image in {where}: {self.counts}")
        return torch.stack(self.images)


def fill_template(template: str, classname: str) -> str:
    """'a photo of a {}.' or 'a photo of a {c}.' with the class name substituted (no other braces
    are interpreted, unlike str.format)."""
    if "{}" not in template and "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder")
    return template.replace("{c}", classname).replace("{}", classname)


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """C x T prompts, class-major (prompt c * T + t is template t for class c)."""
    return [fill_template(t, c) for c in classnames for t in templates]


def load_zeroshot_set(
    shards: str | Sequence[str],
    image_size: int,
    classnames: Sequence[str],
    templates: Sequence[str],
    embedder,
    label_field: str = "cls",
    max_images: int | None = None,
    *,
    image_fields: Sequence[str] = IMAGE_FIELDS,
    max_length: int | None = None,
) -> ZeroShotSet:
    """Labelled images (a decodable image and a ``<key>.<label_field>`` member holding an ASCII
    integer class index) and the (C, T, d) embeddings of every class x template prompt.

    A label outside [0, len(classnames)) or not an integer raises ValueError naming shard and key.
    Corrupt images are skipped and counted. max_images: the first images in shard order (which
    may not cover every class; shuffle the shards' contents beforehand if that matters).
    image_fields: image members tried in this order. max_length: tokens per prompt (default: the
    embedder's).
    """
    if embedder is None:
        raise ValueError("load_zeroshot_set needs an embedder for the prompts (see embedder_like)")
    classnames, templates = list(classnames), list(templates)
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    prompts = build_prompts(classnames, templates)  # validates the templates before any image is read
    paths = expand_shards(list(shards) if not isinstance(shards, str) else shards)
    counts = {"shards": len(paths), "samples": 0, "no_image": 0, "no_label": 0, "corrupt_images": 0}
    images = ImageCollector(image_size, max_images, counts)
    labels: list[int] = []
    for path, sample in _samples(paths, images.full):
        counts["samples"] += 1
        data, raw = _image_bytes(sample, image_fields), sample.get(label_field)
        if data is not None and raw is None:
            counts["no_label"] += 1
            continue
        label = _label(raw, len(classnames), f"shard {path}, key {sample['__key__']!r}") if data else None
        if images.add((shard_name(path), sample["__key__"]), data) is not None:
            labels.append(label)
    if not images.images:
        raise ValueError(
            f"no usable sample in the zero-shot shards {shards} (an image in {tuple(image_fields)} and a "
            f"'{label_field}' label are needed): {counts}"
        )
    emb = _embed(embedder, prompts, max_length, counts)
    counts.update(images=len(images.images), prompts=len(prompts))
    return ZeroShotSet(
        images=images.stacked(str(shards)),
        labels=torch.tensor(labels, dtype=torch.long),
        prompt_embeddings=emb.reshape(len(classnames), len(templates), -1),
        classnames=classnames,
        templates=templates,
        image_keys=images.keys,
        counts=counts,
        dataset=shards if isinstance(shards, str) else " ".join(map(str, shards)),
    )


def _label(raw: bytes, classes: int, where: str) -> int:
    """A class index from an ASCII integer member (webdataset's .cls); ValueError naming `where`."""
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}: label {raw[:20]!r} is not an ASCII integer") from None
    if not 0 <= label < classes:
        raise ValueError(
            f"{where}: label {label} out of range for {classes} class names "
            "(labels are 0-based indices into the class names)"
        )
    return label


def read_names(path: str | Path) -> list[str]:
    """Class names or templates: a JSON list of strings, or a text file with one entry per line
    (blank lines ignored, surrounding whitespace kept inside the entry only)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no entries")
    return names
