"""Evaluate a ClipModel on loaded evaluation sets (no collective: one rank or all).

results = evaluate(model, retrieval_set, zeroshot_set, device="cuda", autocast=autocast)
print(format_table(results))
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.data.images import normalize_images
from llm2clip.evaluation.metrics import retrieval_metrics, zeroshot_accuracy
from llm2clip.evaluation.sets import RetrievalSet, ZeroShotSet
from llm2clip.models.vit import CLIP_MEAN, CLIP_STD

__all__ = [
    "encode_images",
    "encode_texts",
    "evaluate",
    "format_table",
    "image_norm",
    "zeroshot_classifier",
]


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
    prepare = lambda x: normalize_images(x.to(device, non_blocking=True), mean, std, dtype=dtype)  # noqa: E731
    return _batched(m.encode_image, prepare, images, batch_size, autocast)


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
    prepare = lambda x: x.to(device, dtype, non_blocking=True)  # noqa: E731
    return _batched(m.encode_text_embedding, prepare, embeddings, batch_size, autocast)


def _batched(encode, prepare, inputs: Tensor, batch_size: int, autocast) -> Tensor:
    """encode(prepare(batch)) over batches of `inputs`, as one fp32 tensor."""
    out = []
    for a in range(0, inputs.shape[0], batch_size):
        x = prepare(inputs[a : a + batch_size])
        with autocast if autocast is not None else contextlib.nullcontext():
            out.append(encode(x).float())
    return torch.cat(out)


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
