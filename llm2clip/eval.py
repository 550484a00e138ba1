"""Evaluation of a stage-2 model: image-text retrieval and zero-shot classification.

    python -m llm2clip.eval --checkpoint runs/stage2/final \\
        --retrieval-shards 'data/heldout/{00000..00004}.tar' --retrieval-fields txt \\
        --embed-like caches/cc3m-llama3-8b-cc \\
        --zeroshot-shards data/fashion-mnist-test --classnames classes.txt --templates templates.json \\
        --out results.json

The pieces are usable on their own, and the stage-2 trainer uses them for periodic evaluation:
load the evaluation sets once (``load_retrieval_set`` / ``load_zeroshot_set``: decoded uint8 images
and frozen LLM text embeddings, on the CPU), then call ``evaluate(model, retrieval, zeroshot)`` as
often as needed (it only runs the vision tower and the text adapter).

Same LLM, guaranteed. The text side of the model is an adapter over one particular frozen LLM, so
held-out captions and zero-shot prompts must be embedded exactly as the training captions were.
``embedder_like(cache_dir)`` rebuilds the embedder from the cache's ``extract_summary.json`` (the
full ExtractConfig: model, adapter, template, pooling, max length, dtype, ...) and re-embeds the
cache's probe captions: any difference raises StaleCacheError before a number is computed. A
precomputed cache of held-out captions (``--eval-cache``) is checked against that embedder too when
both are given.

Metrics (pure functions of L2-normalised features; any device):

- retrieval_metrics: image->text R@k (an image is a hit at k when ANY of its captions is in the
  top k) and text->image R@k, with the chance level of each under a random ranking.
- zeroshot_classifier: CLIP prompt ensembling (adapter on every prompt, normalise, mean over
  templates, renormalise); zeroshot_accuracy: top-k accuracy and chance.

Ties are counted against the model. The rank of a query is the number of WRONG items scoring
greater than or equal to its best correct item (item = caption, image or class), and a query is a
hit at k when that rank is < k. A degenerate model (e.g. constant features: every score equal)
therefore scores 0, never 1; with continuous features ties do not occur and this is the usual rank.

Memory: the N x M similarity matrix is never materialised; it is computed in row blocks of at
most ``SIM_CHUNK_ELEMENTS`` scores (the 50k x 50k case needs 64 MiB at a time, not 10 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.cache import EmbeddingCache, StaleCacheError
from llm2clip.data.images import IMAGE_FIELDS, decode_image, eval_transform, normalize_images
from llm2clip.data.shards import ShardError, expand_shards, iter_samples, shard_name
from llm2clip.extract import SUMMARY_FILE, ExtractConfig, FieldSpec, load_embedder
from llm2clip.files import atomic_write_json
from llm2clip.models.clip_model import CONFIG_NAME, ClipModel
from llm2clip.models.vit import CLIP_MEAN, CLIP_STD

__all__ = [
    "SIM_CHUNK_ELEMENTS",
    "RetrievalSet",
    "ZeroShotSet",
    "build_prompts",
    "embedder_like",
    "encode_images",
    "encode_texts",
    "evaluate",
    "fill_template",
    "format_table",
    "image_norm",
    "load_retrieval_set",
    "load_zeroshot_set",
    "main",
    "read_names",
    "retrieval_metrics",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]

SIM_CHUNK_ELEMENTS = 1 << 24
"""Most similarity scores held at once (64 MiB of fp32): large enough that each block is a big
matmul, small enough for any GPU or CPU next to a training run."""

_LOAD_BLOCK = 1024  # samples read ahead per cache lookup (one vectorised lookup per block)


# ---------------------------------------------------------------------------------------------
# Metrics


def _check_features(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-d (n, D), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        # NaN compares False with everything, which would rank a NaN query first: refuse it instead
        raise ValueError(f"{name} contains NaN or inf")


def _block_rows(cols: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(cols, 1))


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = []
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError("no k given")
    return out


def _i2t_chance(counts: Sequence[int], m: int, k: int) -> float:
    """Mean over images of P(at least one of its c captions in the top k of a random ranking of m):
    1 - C(m - c, k) / C(m, k) = 1 - prod_{t<k} (m - c - t) / (m - t)."""
    total = 0.0
    for c, images in Counter(counts).items():  # few distinct caption counts, however many images
        if c + k > m:
            p = 1.0
        else:
            miss = 1.0
            for t in range(k):
                miss *= (m - c - t) / (m - t)
            p = 1.0 - miss
        total += images * p
    return total / len(counts)


def retrieval_metrics(
    image_feats: Tensor,
    text_feats: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_elems: int = SIM_CHUNK_ELEMENTS,
) -> dict:
    """Image->text and text->image recall at k.

    image_feats:   (N, D) image features (L2-normalised for cosine retrieval; any float dtype).
    text_feats:    (M, D) caption features.
    text_to_image: (M,) long, the image of each caption (an image may have several captions).
    ks:            the cut-offs k (k > N or k > M is allowed: such a recall is 1).
    chunk_elems:   most similarity scores computed at once.

    Returns floats ``i2t_R@k``, ``t2i_R@k``, ``i2t_chance_R@k`` (expected under a random ranking
    given each image's caption count), ``t2i_chance_R@k`` (= min(k, N) / N), and ints ``N``, ``M``,
    ``i2t_queries`` (images with at least one caption: the i2t denominator). Ties count against the
    model (module docstring). Scores are computed in fp32 on image_feats' device.
    """
    _check_features("image_feats", image_feats)
    _check_features("text_feats", text_feats)
    ks = _check_ks(ks)
    n, d = image_feats.shape
    m = text_feats.shape[0]
    if text_feats.shape[1] != d:
        raise ValueError(f"image features are {d}-d, text features {text_feats.shape[1]}-d")
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape ({m},), got {tuple(text_to_image.shape)}")
    dev = image_feats.device
    img = image_feats.float()
    txt = text_feats.to(dev, torch.float32)
    t2i = text_to_image.to(dev, torch.long)
    if int(t2i.min()) < 0 or int(t2i.max()) >= n:
        raise ValueError(f"text_to_image holds image ids outside [0, {n})")

    # image -> text: texts sorted by image, so a block of images owns a contiguous run of texts
    per_image = torch.bincount(t2i, minlength=n)
    sorted_t2i, perm = torch.sort(t2i, stable=True)
    i2t_rank = torch.empty(n, dtype=torch.long, device=dev)
    rows = _block_rows(m, chunk_elems)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        sim = img[a:b] @ txt.T  # (b - a, M)
        lo, hi = torch.searchsorted(sorted_t2i, torch.tensor([a, b], device=dev)).tolist()
        cols, r = perm[lo:hi], sorted_t2i[lo:hi] - a
        best = torch.full((b - a,), -math.inf, device=dev)
        best.scatter_reduce_(0, r, sim[r, cols], reduce="amax")
        sim[r, cols] = -math.inf  # an image's own captions never count against it
        i2t_rank[a:b] = (sim >= best[:, None]).sum(1)
    has = per_image > 0

    # text -> image
    t2i_rank = torch.empty(m, dtype=torch.long, device=dev)
    rows = _block_rows(n, chunk_elems)
    for a in range(0, m, rows):
        b = min(m, a + rows)
        sim = txt[a:b] @ img.T  # (b - a, N)
        correct = sim.gather(1, t2i[a:b, None])
        t2i_rank[a:b] = (sim >= correct).sum(1) - 1  # minus the correct image itself

    out: dict = {"N": n, "M": m, "i2t_queries": int(has.sum())}
    counts = per_image[has].tolist()
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t_rank[has] < k).double().mean())
        out[f"t2i_R@{k}"] = float((t2i_rank < k).double().mean())
    for k in ks:
        out[f"i2t_chance_R@{k}"] = _i2t_chance(counts, m, k)
        out[f"t2i_chance_R@{k}"] = min(k, n) / n
    return out


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module,
    prompt_embeddings: Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    autocast=None,
) -> Tensor:
    """CLIP prompt ensembling: (C, T, d_llm) frozen LLM embeddings of C classes x T templates ->
    (C, D) fp32 class weights (on `device`, default the adapter's).

    Every prompt goes through the adapter (``encode_text_embedding``), is L2-normalised, the T
    templates of a class are averaged and the mean is renormalised. Runs in the model's current
    mode; ``evaluate`` puts it in eval mode first.
    """
    if prompt_embeddings.ndim != 3 or 0 in prompt_embeddings.shape:
        raise ValueError(f"prompt_embeddings must be (C, T, d_llm), got {tuple(prompt_embeddings.shape)}")
    c, t, d = prompt_embeddings.shape
    feats = encode_texts(
        model, prompt_embeddings.reshape(c * t, d), device=device, batch_size=batch_size, autocast=autocast
    )
    feats = F.normalize(feats, dim=-1).reshape(c, t, -1)
    return F.normalize(feats.mean(1), dim=-1)


def zeroshot_accuracy(
    image_feats: Tensor,
    classifier: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    *,
    chunk_elems: int = SIM_CHUNK_ELEMENTS,
) -> dict:
    """Top-k accuracy of image_feats (N, D) against class weights classifier (C, D); labels (N,).

    Returns floats ``top{k}`` and ``chance_top{k}`` (= min(k, C) / C), ints ``N`` and ``C``.
    A tie with a wrong class counts as a miss (module docstring).
    """
    _check_features("image_feats", image_feats)
    _check_features("classifier", classifier)
    ks = _check_ks(ks)
    n, c = image_feats.shape[0], classifier.shape[0]
    if classifier.shape[1] != image_feats.shape[1]:
        raise ValueError(f"image features are {image_feats.shape[1]}-d, classifier {classifier.shape[1]}-d")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    dev = image_feats.device
    img, cls = image_feats.float(), classifier.to(dev, torch.float32)
    labels = labels.to(dev, torch.long)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels outside [0, {c})")
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rows = _block_rows(c, chunk_elems)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        logits = img[a:b] @ cls.T
        correct = logits.gather(1, labels[a:b, None])
        rank[a:b] = (logits >= correct).sum(1) - 1
    out: dict = {"N": n, "C": c}
    for k in ks:
        out[f"top{k}"] = float((rank < k).double().mean())
    for k in ks:
        out[f"chance_top{k}"] = min(k, c) / c
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation sets


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
    images_without_cached_caption, images, captions."""

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        c, t = len(self.classnames), len(self.templates)
        if self.prompt_embeddings.shape[:2] != (c, t):
            raise ValueError(
                f"prompt_embeddings {tuple(self.prompt_embeddings.shape)} do not match "
                f"{c} classes x {t} templates"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("one label per image")


def _image_bytes(sample: dict) -> bytes | None:
    for f in IMAGE_FIELDS:
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
) -> RetrievalSet:
    """Every sample of the shards with a decodable image and at least one caption among `fields`.

    shards:     shard specs (llm2clip.data.shards.expand_shards).
    fields:     caption fields, as for extraction ('txt', 'json:dense_caption', 'dense=json:...').
    image_size: side S of the center-cropped images.
    cache:      look caption embeddings up by (shard name, key, field name); a caption missing
                from the cache is dropped (counted), and so is an image left without captions.
    embedder:   otherwise embed the captions with it (an LLMTextEmbedder: ``encode(list[str])``).
    max_images: stop after this many images (in shard order).

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
    transform = eval_transform(image_size)
    counts = {
        "shards": len(paths), "samples": 0, "no_image": 0, "no_caption": 0, "corrupt_images": 0,
        "captions_not_in_cache": 0, "images_without_cached_caption": 0,
    }  # fmt: skip
    images: list[Tensor] = []
    keys: list[tuple[str, str]] = []
    captions: list[str] = []
    cap_fields: list[str] = []
    t2i: list[int] = []
    cache_rows: list[int] = []
    room = max_images if max_images is not None else math.inf
    for path, block in _blocks(paths, _LOAD_BLOCK if max_images is None else min(_LOAD_BLOCK, max_images)):
        if len(images) >= room:
            break
        name = shard_name(path)
        counts["samples"] += len(block)
        todo = []  # (sample, [(field, caption)], [row id or -1])
        for sample in block:
            data = _image_bytes(sample)
            if data is None:
                counts["no_image"] += 1
                continue
            caps = _read_captions(sample, specs, path)
            if not caps:
                counts["no_caption"] += 1
                continue
            todo.append((sample, data, caps))
        if cache is not None and todo:
            flat = [(sample["__key__"], f) for sample, _, caps in todo for f, _ in caps]
            ids = cache.lookup(name, [k for k, _ in flat], [f for _, f in flat]).tolist()
        pos = 0
        for sample, data, caps in todo:
            rows = ids[pos : pos + len(caps)] if cache is not None else [-1] * len(caps)
            pos += len(caps)
            if cache is not None:
                counts["captions_not_in_cache"] += sum(r < 0 for r in rows)
                kept = [(c, r) for c, r in zip(caps, rows, strict=True) if r >= 0]
                if not kept:
                    counts["images_without_cached_caption"] += 1
                    continue
            else:
                kept = list(zip(caps, rows, strict=True))
            if len(images) >= room:
                break
            img = _decode(data, transform)
            if img is None:
                counts["corrupt_images"] += 1
                continue
            for (f, text), r in kept:
                captions.append(text)
                cap_fields.append(f)
                t2i.append(len(images))
                cache_rows.append(r)
            keys.append((name, sample["__key__"]))
            images.append(img)
    if not images:
        raise ValueError(
            f"no usable sample in the retrieval shards {shards}"
            f" (an image in {IMAGE_FIELDS} and a caption in {[s.name for s in specs]} are needed"
            f"{', present in the cache' if cache is not None else ''}): {counts}"
        )
    if cache is not None:
        emb = cache.gather(torch.tensor(cache_rows, dtype=torch.long), out_dtype=torch.float32)
    else:
        emb = _embed_unique(embedder, captions)
    counts.update(images=len(images), captions=len(captions))
    return RetrievalSet(
        images=torch.stack(images),
        text_embeddings=emb.to("cpu", torch.float32),
        text_to_image=torch.tensor(t2i, dtype=torch.long),
        captions=captions,
        image_keys=keys,
        caption_fields=cap_fields,
        counts=counts,
    )


def _embed_unique(embedder, texts: Sequence[str]) -> Tensor:
    """embedder.encode on the distinct texts only, scattered back: (len(texts), d) fp32 on the CPU."""
    first: dict[str, int] = {}
    index = [first.setdefault(t, len(first)) for t in texts]
    with torch.inference_mode():
        emb = torch.as_tensor(embedder.encode(list(first))).to("cpu", torch.float32)
    return emb[torch.tensor(index, dtype=torch.long)].clone()


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
) -> ZeroShotSet:
    """Labelled images (a decodable image and a ``<key>.<label_field>`` member holding an ASCII
    integer class index) and the (C, T, d) embeddings of every class x template prompt.

    A label outside [0, len(classnames)) or not an integer raises ValueError naming shard and key.
    Corrupt images are skipped and counted. max_images: the first images in shard order (which
    may not cover every class; shuffle the shards' contents beforehand if that matters).
    """
    _check_max(max_images)
    if embedder is None:
        raise ValueError("load_zeroshot_set needs an embedder for the prompts (see embedder_like)")
    classnames, templates = list(classnames), list(templates)
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    prompts = build_prompts(classnames, templates)  # validates the templates before any image is read
    paths = expand_shards(list(shards) if not isinstance(shards, str) else shards)
    transform = eval_transform(image_size)
    counts = {"shards": len(paths), "samples": 0, "no_image": 0, "no_label": 0, "corrupt_images": 0}
    images: list[Tensor] = []
    labels: list[int] = []
    keys: list[tuple[str, str]] = []
    for path in paths:
        if max_images is not None and len(images) >= max_images:
            break
        for sample in iter_samples(path):
            if max_images is not None and len(images) >= max_images:
                break
            counts["samples"] += 1
            data = _image_bytes(sample)
            raw = sample.get(label_field)
            if data is None:
                counts["no_image"] += 1
                continue
            if raw is None:
                counts["no_label"] += 1
                continue
            where = f"shard {path}, key {sample['__key__']!r}"
            try:
                label = int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise ValueError(f"{where}: label {raw[:20]!r} is not an ASCII integer") from None
            if not 0 <= label < len(classnames):
                raise ValueError(
                    f"{where}: label {label} out of range for {len(classnames)} class names "
                    "(labels are 0-based indices into --classnames)"
                )
            img = _decode(data, transform)
            if img is None:
                counts["corrupt_images"] += 1
                continue
            images.append(img)
            labels.append(label)
            keys.append((shard_name(path), sample["__key__"]))
    if not images:
        raise ValueError(
            f"no usable sample in the zero-shot shards {shards} (an image in {IMAGE_FIELDS} and a "
            f"'{label_field}' label are needed): {counts}"
        )
    with torch.inference_mode():
        emb = torch.as_tensor(embedder.encode(prompts)).to("cpu", torch.float32)
    counts.update(images=len(images), prompts=len(prompts))
    return ZeroShotSet(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.long),
        prompt_embeddings=emb.reshape(len(classnames), len(templates), -1),
        classnames=classnames,
        templates=templates,
        image_keys=keys,
        counts=counts,
    )


def embedder_like(
    cache_dir: str | Path, device: str | torch.device = "cpu", *, summary: str | Path | None = None
):
    """The LLMTextEmbedder that filled the cache at `cache_dir`, rebuilt from its extraction summary
    (``<cache_dir>/extract_summary.json``, or `summary`) and checked against the cache's probe
    embeddings: raises StaleCacheError if it does not reproduce them (different model files,
    adapter, template, pooling, ...), FileNotFoundError without a summary.
    """
    cache_dir = Path(cache_dir)
    path = Path(summary) if summary is not None else cache_dir / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: embedding like a cache needs the summary that `python -m llm2clip.extract` "
            "writes beside it (pass summary= if it was written elsewhere with --summary)"
        )
    raw = json.loads(path.read_text()).get("config")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} has no 'config' object (not an llm2clip.extract summary?)")
    known = set(ExtractConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:  # a field this version does not know could change the embeddings: refuse to guess
        raise ValueError(
            f"{path}: unknown extraction settings {unknown} (written by another llm2clip version?)"
        )
    cfg = ExtractConfig(**raw)
    cache = EmbeddingCache.open(cache_dir)  # before loading the LLM: a bad cache fails fast
    embedder = load_embedder(cfg, device)
    with torch.inference_mode():
        cache.verify_probe(embedder.encode)
    return embedder


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


# ---------------------------------------------------------------------------------------------
# Evaluation


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP: run the wrapped module, no collective involved


def image_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the pixel normalisation the vision tower was trained with (its config's
    image_mean / image_std; CLIP's OpenAI values when the tower has no such config)."""
    cfg = getattr(getattr(_inner(model), "visual", None), "config", None)
    mean = getattr(cfg, "image_mean", None) or CLIP_MEAN
    std = getattr(cfg, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def encode_images(
    model: nn.Module,
    images: Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    autocast=None,
) -> Tensor:
    """uint8 images (N, 3, S, S) -> (N, D) fp32 image features on `device` (normalised there)."""
    m = _inner(model)
    mean, std = image_norm(m)
    dtype = _param_dtype(m.visual)
    out = []
    for a in range(0, images.shape[0], batch_size):
        x = images[a : a + batch_size].to(device, non_blocking=True)
        x = normalize_images(x, mean, std, dtype=dtype)
        with autocast if autocast is not None else contextlib.nullcontext():
            out.append(m.encode_image(x).float())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    embeddings: Tensor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 1024,
    autocast=None,
) -> Tensor:
    """Frozen LLM embeddings (M, d_llm) -> (M, D) fp32 text features (device: the adapter's)."""
    m = _inner(model)
    if device is None:
        device = next(m.adapter.parameters()).device
    dtype = _param_dtype(m.adapter)
    out = []
    for a in range(0, embeddings.shape[0], batch_size):
        x = embeddings[a : a + batch_size].to(device, dtype, non_blocking=True)
        with autocast if autocast is not None else contextlib.nullcontext():
            out.append(m.encode_text_embedding(x).float())
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    retrieval: RetrievalSet | None = None,
    zeroshot: ZeroShotSet | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    autocast=None,
    retrieval_ks: Sequence[int] = (1, 5, 10),
    zeroshot_ks: Sequence[int] = (1, 5),
) -> dict:
    """Retrieval and/or zero-shot metrics of a ClipModel (or a DDP/compiled wrapper of one).

    The model must already be on `device`. Runs in eval mode under torch.no_grad and restores the
    previous train/eval mode. Images are moved to `device` batch by batch and normalised there with
    the tower's mean/std. `autocast` is a context manager entered around each forward (None or
    ``contextlib.nullcontext()``: none; e.g. ``torch.autocast("cuda", torch.bfloat16)``; it must be
    re-enterable). No collective is run: call it on one rank or on all.

    Returns {"retrieval": retrieval_metrics(...), "zeroshot": zeroshot_accuracy(...)} with the
    keys of the sets given, each also holding "seconds".
    """
    if retrieval is None and zeroshot is None:
        raise ValueError("evaluate needs a retrieval set, a zero-shot set or both")
    m = _inner(model)
    was_training = m.training
    m.eval()
    results: dict = {}
    try:
        with torch.no_grad():
            if retrieval is not None:
                t0 = time.perf_counter()
                img = encode_images(
                    m, retrieval.images, device=device, batch_size=batch_size, autocast=autocast
                )
                txt = encode_texts(
                    m, retrieval.text_embeddings, device=device, batch_size=batch_size, autocast=autocast
                )
                results["retrieval"] = retrieval_metrics(img, txt, retrieval.text_to_image, retrieval_ks)
                results["retrieval"]["seconds"] = time.perf_counter() - t0
            if zeroshot is not None:
                t0 = time.perf_counter()
                classifier = zeroshot_classifier(
                    m, zeroshot.prompt_embeddings, device=device, batch_size=batch_size, autocast=autocast
                )
                img = encode_images(
                    m, zeroshot.images, device=device, batch_size=batch_size, autocast=autocast
                )
                results["zeroshot"] = zeroshot_accuracy(img, classifier, zeroshot.labels, zeroshot_ks)
                results["zeroshot"]["seconds"] = time.perf_counter() - t0
    finally:
        m.train(was_training)
    return results


def format_table(results: dict) -> str:
    """A plain-text table of evaluate()'s results: metric, value, chance (recalls in percent)."""
    lines = [f"{'metric':<24}{'value':>10}{'chance':>10}"]
    ret = results.get("retrieval")
    if ret:
        lines.append(f"{'retrieval images':<24}{ret['N']:>10}")
        lines.append(f"{'retrieval captions':<24}{ret['M']:>10}")
        for key in ret:
            if key.startswith(("i2t_R@", "t2i_R@")):
                direction, k = key.split("_R@")
                chance = ret.get(f"{direction}_chance_R@{k}")
                lines.append(_row(f"{direction} R@{k}", ret[key], chance))
    zs = results.get("zeroshot")
    if zs:
        lines.append(f"{'zero-shot images':<24}{zs['N']:>10}")
        lines.append(f"{'zero-shot classes':<24}{zs['C']:>10}")
        for key in zs:
            if key.startswith("top"):
                lines.append(_row(f"zero-shot {key}", zs[key], zs.get(f"chance_{key}")))
    return "\n".join(lines)


def _row(name: str, value: float, chance: float | None) -> str:
    ch = f"{100 * chance:>9.2f}%" if chance is not None else f"{'':>10}"
    return f"{name:<24}{100 * value:>9.2f}%{ch}"


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.eval",
        description="Evaluate a stage-2 checkpoint: image-text retrieval on held-out captioned shards "
        "and/or zero-shot classification on labelled shards.",
    )
    add = p.add_argument
    add("--checkpoint", required=True, help="a ClipModel.save() directory (config.json + weights)")
    add(
        "--retrieval-shards",
        nargs="+",
        default=None,
        help="held-out image-caption shards (paths, directories, globs, brace ranges)",
    )
    add(
        "--retrieval-fields",
        nargs="+",
        default=["txt"],
        help="caption fields as for llm2clip.extract ('txt', 'json:key', 'NAME=SOURCE'); default: txt",
    )
    add(
        "--eval-cache",
        default=None,
        help="embedding cache of the held-out captions (llm2clip.extract run on the retrieval shards)",
    )
    add(
        "--embed-like",
        default=None,
        help="a training cache directory: embed captions and prompts on the fly with exactly the LLM "
        "that filled it (probe-checked); needed for zero-shot",
    )
    add(
        "--zeroshot-shards",
        nargs="+",
        default=None,
        help="labelled image shards: an image and a <key>.cls member (0-based class index)",
    )
    add("--classnames", default=None, help="class names: JSON list or one per line")
    add(
        "--templates",
        default=None,
        help="prompt templates with '{}' or '{c}' for the class name: JSON list or one per line",
    )
    add("--label-field", default="cls", help="tar member holding the label (default: cls)")
    add(
        "--image-size",
        type=int,
        default=None,
        help="image side (default: the vision tower config's image_size)",
    )
    add("--batch-size", type=int, default=256, help="images (and captions) per forward")
    add(
        "--max-images",
        type=int,
        default=None,
        help="use at most this many images of each evaluation set (the first in shard order)",
    )
    add(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when available, else cpu",
    )
    add(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast dtype of the model's forward (fp32: no autocast)",
    )
    add("--out", default=None, help="write the results, arguments, counts and timing as JSON here")
    return p


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"llm2clip.eval: {msg}")


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the dict written to --out."""
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    if not args.retrieval_shards and not args.zeroshot_shards:
        raise _fail("no evaluation data: give --retrieval-shards and/or --zeroshot-shards")
    if args.retrieval_shards and not (args.eval_cache or args.embed_like):
        raise _fail(
            "--retrieval-shards needs --eval-cache (precomputed) and/or --embed-like (embed on the fly)"
        )
    if args.zeroshot_shards and not (args.classnames and args.templates):
        raise _fail("--zeroshot-shards needs --classnames and --templates")
    if args.zeroshot_shards and not args.embed_like:
        raise _fail("zero-shot prompts are embedded on the fly: give --embed-like CACHE_DIR")
    for flag in ("batch_size", "image_size", "max_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise _fail(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    ckpt = Path(args.checkpoint)
    if not (ckpt / CONFIG_NAME).is_file():
        raise _fail(
            f"{ckpt} is not a checkpoint directory: no {CONFIG_NAME} (expected ClipModel.save() output)"
        )
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    autocast = None
    if args.precision != "fp32":
        dt = torch.bfloat16 if args.precision == "bf16" else torch.float16
        autocast = torch.autocast(device.type, dtype=dt)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = ClipModel.load(ckpt, map_location=device)
    seconds["load_model"] = time.perf_counter() - t0
    tower = model.visual
    image_size = args.image_size or getattr(getattr(tower, "config", None), "image_size", None)
    if image_size is None:
        raise _fail("the vision tower has no config.image_size: give --image-size")

    embedder = eval_cache = None
    t0 = time.perf_counter()
    try:
        if args.embed_like:
            embedder = embedder_like(args.embed_like, device)
        if args.eval_cache:
            eval_cache = EmbeddingCache.open(args.eval_cache)
            if embedder is not None:  # the held-out captions must come from the training LLM
                with torch.inference_mode():
                    eval_cache.verify_probe(embedder.encode)
    except (StaleCacheError, FileNotFoundError) as e:
        raise _fail(str(e)) from e
    seconds["load_embedder"] = time.perf_counter() - t0

    retrieval = zeroshot = None
    counts: dict = {}
    if args.retrieval_shards:
        t0 = time.perf_counter()
        try:
            retrieval = load_retrieval_set(
                args.retrieval_shards, args.retrieval_fields, image_size,
                cache=eval_cache, embedder=embedder, max_images=args.max_images,
            )  # fmt: skip
        except ValueError as e:
            raise _fail(str(e)) from e
        counts["retrieval"] = retrieval.counts
        seconds["load_retrieval"] = time.perf_counter() - t0
    if args.zeroshot_shards:
        t0 = time.perf_counter()
        try:
            classnames, templates = read_names(args.classnames), read_names(args.templates)
            zeroshot = load_zeroshot_set(
                args.zeroshot_shards, image_size, classnames, templates, embedder,
                label_field=args.label_field, max_images=args.max_images,
            )  # fmt: skip
        except ValueError as e:
            raise _fail(str(e)) from e
        counts["zeroshot"] = zeroshot.counts
        seconds["load_zeroshot"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = evaluate(
        model, retrieval, zeroshot, device=device, batch_size=args.batch_size, autocast=autocast
    )
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    print(format_table(results), flush=True)
    out = {
        "args": vars(args),
        "device": str(device),
        "image_size": image_size,
        "results": results,
        "counts": counts,
        "seconds": seconds,
    }
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
