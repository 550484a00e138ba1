"""Evaluate a ClipModel on loaded evaluation sets (no collective: one rank or all).

results = evaluate(model, retrieval_set, zeroshot_set, device="cuda", autocast=autocast)
results = evaluate(model, sets={"wds_flickr30k/test": rs, "urban1k": ls, "xm3600": ms})
print(format_table(results))

Each set's result names its dataset, split and protocol, holds the metrics of that protocol
(``llm2clip.evaluation.metrics``) beside their chance levels, N (images), M (captions) or C
(classes), the truncation count when its captions were embedded here, and ``definitions``: what
each metric means. A MultilingualSet gives one such row per language and a language x metric
``table``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.data.images import normalize_images
from llm2clip.evaluation.metrics import (
    DEFINITIONS,
    benchmark_classification,
    benchmark_retrieval,
    chance_of,
    retrieval_metrics,
    zeroshot_accuracy,
)
from llm2clip.evaluation.multilingual import MultilingualSet
from llm2clip.evaluation.sets import RetrievalSet, ZeroShotSet
from llm2clip.models.vit import CLIP_MEAN, CLIP_STD

__all__ = [
    "definitions_for",
    "encode_images",
    "encode_texts",
    "evaluate",
    "evaluate_multilingual",
    "evaluate_set",
    "format_language_table",
    "format_table",
    "image_norm",
    "metric_names",
    "zeroshot_classifier",
]

EvalSet = RetrievalSet | ZeroShotSet | MultilingualSet


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
    sets: Mapping[str, EvalSet] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    autocast=None,
    retrieval_ks: Sequence[int] = (1, 5, 10),
    zeroshot_ks: Sequence[int] = (1, 5),
) -> dict:
    """Metrics of a ClipModel (or a DDP/compiled wrapper of one) on the sets given.

    The model must already be on `device`. Runs in eval mode under torch.no_grad and restores the
    previous train/eval mode. Images are moved to `device` batch by batch and normalised there with
    the tower's mean/std. `autocast` is a context manager entered around each forward (None or
    ``contextlib.nullcontext()``: none; e.g. ``torch.autocast("cuda", torch.bfloat16)``; it must be
    re-enterable). No collective is run: call it on one rank or on all.

    Returns {"retrieval": ..., "zeroshot": ..., name: ... for each of `sets`}: ``evaluate_set``'s
    result for each set given, each also holding "seconds".
    """
    named = {k: v for k, v in (("retrieval", retrieval), ("zeroshot", zeroshot)) if v is not None}
    for name, s in (sets or {}).items():
        if name in named:
            raise ValueError(f"two evaluation sets are named {name!r}")
        named[name] = s
    if not named:
        raise ValueError("evaluate needs at least one evaluation set")
    m = _inner(model)
    was_training = m.training
    m.eval()
    kw = dict(device=device, batch_size=batch_size, autocast=autocast, retrieval_ks=retrieval_ks,
              zeroshot_ks=zeroshot_ks)  # fmt: skip
    try:
        with torch.no_grad():
            return {name: evaluate_set(m, s, **kw) for name, s in named.items()}
    finally:
        m.train(was_training)


def evaluate_set(
    model: nn.Module,
    s: EvalSet,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    autocast=None,
    retrieval_ks: Sequence[int] = (1, 5, 10),
    zeroshot_ks: Sequence[int] = (1, 5),
) -> dict:
    """One set's result (module docstring), the model used as it is (``evaluate`` sets eval mode)."""
    t0 = time.perf_counter()
    enc = dict(device=device, batch_size=batch_size, autocast=autocast)
    if isinstance(s, MultilingualSet):
        out = evaluate_multilingual(model, s, ks=retrieval_ks, **enc)
    elif isinstance(s, RetrievalSet):
        img = encode_images(model, s.images, **enc)
        txt = encode_texts(model, s.text_embeddings, **enc)
        out = _retrieval(img, txt, s.text_to_image, s.protocol, retrieval_ks)
    elif isinstance(s, ZeroShotSet):
        classifier = zeroshot_classifier(model, s.prompt_embeddings, **enc)
        img = encode_images(model, s.images, **enc)
        if s.protocol == "clip_benchmark":
            out = benchmark_classification(img, classifier, s.labels)
        else:
            out = zeroshot_accuracy(img, classifier, s.labels, zeroshot_ks)
    else:
        raise TypeError(f"not an evaluation set: {type(s).__name__}")
    out = {"dataset": s.dataset, "split": s.split, "protocol": s.protocol, **out}
    for key in ("truncated", "max_length"):
        if s.counts.get(key) is not None:
            out[key] = s.counts[key]
    out["definitions"] = definitions_for(out)
    out["seconds"] = time.perf_counter() - t0
    return out


def _retrieval(img: Tensor, txt: Tensor, text_to_image: Tensor, protocol: str, ks: Sequence[int]) -> dict:
    if protocol == "clip_benchmark":
        return benchmark_retrieval(img, txt, text_to_image, ks)
    return retrieval_metrics(img, txt, text_to_image, ks)


def evaluate_multilingual(
    model: nn.Module,
    s: MultilingualSet,
    *,
    ks: Sequence[int] = (1, 5, 10),
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    autocast=None,
) -> dict:
    """Per language: retrieval over the images with a caption in it, by the set's protocol.

    Returns {"N": images, "languages": {lang: metrics (N, M, chance, truncated)}, "table":
    {"languages", "metrics", "values", "chance"} (language x metric lists, for plots)}."""
    enc = dict(device=device, batch_size=batch_size, autocast=autocast)
    img = encode_images(model, s.images, **enc)
    per_lang = {}
    for lang, c in s.languages.items():
        used, t2i = torch.unique(c.text_to_image, return_inverse=True)  # images captioned in `lang`
        txt = encode_texts(model, c.text_embeddings, **enc)
        r = _retrieval(img[used.to(img.device)], txt, t2i, s.protocol, ks)
        r.update({k: c.counts[k] for k in ("truncated", "max_length") if c.counts.get(k) is not None})
        per_lang[lang] = r
    metrics = metric_names(next(iter(per_lang.values())))
    table = {
        "languages": list(per_lang), "metrics": metrics,
        "values": [[per_lang[lang][k] for k in metrics] for lang in per_lang],
        "chance": [[chance_of(per_lang[lang], k) for k in metrics] for lang in per_lang],
    }  # fmt: skip
    return {"N": s.images.shape[0], "languages": per_lang, "table": table}


# ---------------------------------------------------------------------------------------------
# Reporting

_GENERIC = tuple(
    (prefix, prefix + "k")
    for prefix in ("i2t_R@", "t2i_R@", "text_retrieval_recall@", "image_retrieval_recall@")
)


def _generic(metric: str) -> str | None:
    for prefix, name in _GENERIC:
        if metric.startswith(prefix):
            return name
    if metric.startswith("top") and metric[3:].isdigit():
        return "top{k}"
    return metric if metric in DEFINITIONS else None


def metric_names(result: dict) -> list[str]:
    """The metrics of a result (chance levels and counts left out), in their order."""
    return [
        k for k in result if _generic(k) and chance_of(result, k) is not None or k == "acc5" and k in result
    ]


def definitions_for(result: dict) -> dict:
    """{metric family: definition} of the metrics in a result, N/M/C and chance included."""
    out = {}
    for k in result:
        g = _generic(k)
        if g and g not in out and g != "chance":
            out[g] = DEFINITIONS[g]
    out["N, M, C"] = "images, captions, classes of the set"
    out["chance"] = DEFINITIONS["chance"]
    return out


def _pct(value) -> str:
    return f"{100 * value:>9.2f}%" if value is not None else f"{'n/a':>10}"


def _header(name: str, r: dict) -> str:
    size = (
        f"{r['N']} images"
        + (f", {r['M']} captions" if "M" in r else "")
        + (f", {r['C']} classes" if "C" in r else "")
    )
    cut = (
        f", {r['truncated']} texts truncated at {r['max_length']} tokens"
        if r.get("truncated") is not None
        else ""
    )
    split = f" [{r['split']}]" if r.get("split") else ""
    return f"{name}: {r.get('dataset') or '-'}{split}, {size}, {r.get('protocol', 'llm2clip')} protocol{cut}"


def _label(metric: str) -> str:
    if metric.startswith(("i2t_R@", "t2i_R@")):
        return metric.replace("_R@", " R@")
    return f"zero-shot {metric}" if metric.startswith("top") else metric


def format_language_table(result: dict) -> str:
    """An evaluate_multilingual result as a language x metric table (percent), chance per language."""
    table = result["table"]
    metrics = table["metrics"]
    width = max(12, *(len(_label(k)) + 2 for k in metrics))
    lines = [
        f"{'language':<10}{'images':>8}{'captions':>10}" + "".join(f"{_label(k):>{width}}" for k in metrics)
    ]
    chance_rows = {tuple(row) for row in table["chance"]}
    for lang, values, chance in zip(table["languages"], table["values"], table["chance"], strict=True):
        r = result["languages"][lang]
        lines.append(f"{lang:<10}{r['N']:>8}{r['M']:>10}" + "".join(f"{_pct(v):>{width}}" for v in values))
        if len(chance_rows) > 1:
            lines.append(f"{'  chance':<28}" + "".join(f"{_pct(v):>{width}}" for v in chance))
    if len(chance_rows) == 1:
        lines.append(f"{'chance':<28}" + "".join(f"{_pct(v):>{width}}" for v in table["chance"][0]))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """A plain-text report of evaluate()'s results: per set a header (dataset, split, images,
    captions or classes, protocol, truncation), metric / value / chance rows (percent), and the
    definitions of every metric shown."""
    lines: list[str] = []
    definitions: dict = {}
    for name, r in results.items():
        if not isinstance(r, dict) or "N" not in r:
            continue
        lines.append(_header(name, r))
        if "languages" in r:
            lines.append(format_language_table(r))
        else:
            lines.append(f"  {'metric':<30}{'value':>10}{'chance':>10}")
            lines += [f"  {_label(k):<30}{_pct(r[k])}{_pct(chance_of(r, k))}" for k in metric_names(r)]
        definitions.update(r.get("definitions") or {})
    lines.append("definitions:")
    lines += [f"  {k}: {v}" for k, v in definitions.items()]
    return "\n".join(lines)
