"""Retrieval and zero-shot metrics: pure functions of L2-normalised features, on any device.

    r = retrieval_metrics(image_feats, text_feats, text_to_image)   # i2t_R@k, t2i_R@k, chance
    z = zeroshot_accuracy(image_feats, classifier, labels)          # top1, top5, chance
    b = benchmark_retrieval(image_feats, text_feats, text_to_image) # CLIP_benchmark's definitions
    c = benchmark_classification(image_feats, classifier, labels)   # acc1, acc5, mean_per_class_recall

Two protocols. ``llm2clip`` (retrieval_metrics, zeroshot_accuracy):

- image -> text: an image is a hit at k when ANY of its captions is in the top k (CLIP_benchmark's
  definition); text -> image: the caption's own image in the top k. Each beside its chance level
  under a random ranking (exact, given each image's caption count).
- Ties count against the model: the rank of a query is the number of WRONG items scoring greater
  than or equal to its best correct item, and it is a hit at k when that rank is < k. A degenerate
  model (every score equal) scores 0, never 1; with continuous features ties do not occur and this
  is the usual rank.

``clip_benchmark`` (benchmark_retrieval, benchmark_classification): LAION-AI/CLIP_benchmark's
``metrics/zeroshot_retrieval.py`` and ``metrics/zeroshot_classification.py`` reproduced: the top k
come from ``torch.topk`` (ties broken as it breaks them), text retrieval averages over ALL images
(one without captions is a miss), recalls are float32 means as theirs are, classification scores
are ``(100 * image) @ classifier``, acc5 is None (their NaN) below 5 classes, and
mean_per_class_recall is sklearn's balanced accuracy of the argmax. Where they crash (k larger than
the number of items), k is clipped to it. On features without ties, and with a caption for every
image, both protocols count the same hits.

Memory: the N x M similarity matrix is never materialised; it is computed in row blocks of at most
``SIM_CHUNK_ELEMENTS`` scores (50k x 50k needs 64 MiB at a time, not 10 GB).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFINITIONS",
    "SIM_CHUNK_ELEMENTS",
    "benchmark_classification",
    "benchmark_retrieval",
    "chance_of",
    "retrieval_metrics",
    "zeroshot_accuracy",
]

SIM_CHUNK_ELEMENTS = 1 << 24
"""Most similarity scores held at once (64 MiB of fp32): large enough that each block is a big
matmul, small enough for any GPU or CPU next to a training run."""


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


def _retrieval_inputs(image_feats: Tensor, text_feats: Tensor, text_to_image: Tensor):
    """Checked (N, D) fp32 images, (M, D) fp32 texts and (M,) long caption->image ids, all on the
    images' device."""
    _check_features("image_feats", image_feats)
    _check_features("text_feats", text_feats)
    n, m = image_feats.shape[0], text_feats.shape[0]
    if text_feats.shape[1] != image_feats.shape[1]:
        raise ValueError(
            f"image features are {image_feats.shape[1]}-d, text features {text_feats.shape[1]}-d"
        )
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape ({m},), got {tuple(text_to_image.shape)}")
    dev = image_feats.device
    t2i = text_to_image.to(dev, torch.long)
    if int(t2i.min()) < 0 or int(t2i.max()) >= n:
        raise ValueError(f"text_to_image holds image ids outside [0, {n})")
    return image_feats.float(), text_feats.to(dev, torch.float32), t2i


def _classification_inputs(image_feats: Tensor, classifier: Tensor, labels: Tensor):
    """Checked (N, D) fp32 images, (C, D) fp32 class weights and (N,) long labels, all on the
    images' device."""
    _check_features("image_feats", image_feats)
    _check_features("classifier", classifier)
    n, c = image_feats.shape[0], classifier.shape[0]
    if classifier.shape[1] != image_feats.shape[1]:
        raise ValueError(f"image features are {image_feats.shape[1]}-d, classifier {classifier.shape[1]}-d")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    dev = image_feats.device
    labels = labels.to(dev, torch.long)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels outside [0, {c})")
    return image_feats.float(), classifier.to(dev, torch.float32), labels


def _i2t_chance(counts: Sequence[int], m: int, k: int) -> float:
    """Mean over images of P(at least one of its c captions in the top k of a random ranking of m):
    1 - C(m - c, k) / C(m, k) = 1 - prod_{t<k} (m - c - t) / (m - t)."""
    total = 0.0
    for c, images in Counter(counts).items():  # few distinct caption counts, however many images
        if c == 0:
            p = 0.0
        elif c + k > m:
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
    ks = _check_ks(ks)
    img, txt, t2i = _retrieval_inputs(image_feats, text_feats, text_to_image)
    n, m, dev = img.shape[0], txt.shape[0], img.device

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
    ks = _check_ks(ks)
    img, cls, labels = _classification_inputs(image_feats, classifier, labels)
    n, c, dev = img.shape[0], cls.shape[0], img.device
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
# CLIP_benchmark's definitions

DEFINITIONS = {
    "i2t_R@k": "image->text: share of the images with a caption that have one of their captions among the "
    "top k of all captions; a tie with a wrong caption counts as a miss",
    "t2i_R@k": "text->image: share of the captions whose image is among the top k of all images; ties count "
    "as misses",
    "top{k}": "zero-shot: share of the images whose class is among the top k class scores (CLIP prompt "
    "ensembling); ties count as misses",
    "text_retrieval_recall@k": "image->text (clip_benchmark): share of ALL images with at least one of "
    "their captions among the top k captions by torch.topk (an image without captions is a miss)",
    "image_retrieval_recall@k": "text->image (clip_benchmark): share of the captions whose image is among "
    "the top k images by torch.topk",
    "acc1": "clip_benchmark top-1 accuracy: the image's class first by torch.topk over "
    "(100 x image) @ classifier",
    "acc5": "clip_benchmark top-5 accuracy (None below 5 classes, where clip_benchmark reports NaN)",
    "mean_per_class_recall": "clip_benchmark balanced accuracy: recall of the argmax prediction per class, "
    "averaged over the classes that occur among the labels",
    "chance": "the expected value under a uniformly random ranking (retrieval: given each image's caption "
    "count; classification: 1/C per class)",
}
"""What each metric means (k generic), for result files and printed tables."""


def chance_of(result: dict, metric: str) -> float | None:
    """The chance level stored beside `metric` in a metrics dict (None when there is none)."""
    for direction in ("i2t", "t2i"):
        if metric.startswith(f"{direction}_R@"):
            return result.get(f"{direction}_chance_R@{metric.split('@')[1]}")
    return result.get(f"chance_{metric}")


def _topk_hits(sim: Tensor, k: int, correct) -> Tensor:
    """(rows,) bool: torch.topk's k best columns of `sim` hold a correct one (correct(idx) -> bool)."""
    idx = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return correct(idx).any(1)


def benchmark_retrieval(
    image_feats: Tensor,
    text_feats: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_elems: int = SIM_CHUNK_ELEMENTS,
) -> dict:
    """CLIP_benchmark's zero-shot retrieval recalls (module docstring) of the same inputs as
    ``retrieval_metrics``.

    Returns floats ``image_retrieval_recall@k`` (text -> image), ``text_retrieval_recall@k``
    (image -> text, over all N images) and ``chance_<metric>``; ints ``N``, ``M``."""
    ks = _check_ks(ks)
    img, txt, t2i = _retrieval_inputs(image_feats, text_feats, text_to_image)
    n, m, dev = img.shape[0], txt.shape[0], img.device
    t2i_hits = {k: torch.empty(m, dtype=torch.bool, device=dev) for k in ks}
    rows = _block_rows(n, chunk_elems)
    for a in range(0, m, rows):  # clip_benchmark: scores = texts @ images.T, top k per text
        b = min(m, a + rows)
        sim = txt[a:b] @ img.T
        for k in ks:
            t2i_hits[k][a:b] = _topk_hits(sim, k, lambda idx, a=a, b=b: idx == t2i[a:b, None])
    i2t_hits = {k: torch.empty(n, dtype=torch.bool, device=dev) for k in ks}
    rows = _block_rows(m, chunk_elems)
    for a in range(0, n, rows):  # scores.T: top k captions per image, a hit when one is its own
        b = min(n, a + rows)
        sim = img[a:b] @ txt.T
        own = torch.arange(a, b, device=dev)[:, None]
        for k in ks:
            i2t_hits[k][a:b] = _topk_hits(sim, k, lambda idx, own=own: t2i[idx] == own)
    counts = torch.bincount(t2i, minlength=n).tolist()
    out: dict = {"N": n, "M": m}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = t2i_hits[k].float().mean().item()  # float32, as theirs
        out[f"text_retrieval_recall@{k}"] = i2t_hits[k].float().mean().item()
    for k in ks:
        out[f"chance_image_retrieval_recall@{k}"] = min(k, n) / n
        out[f"chance_text_retrieval_recall@{k}"] = _i2t_chance(counts, m, k)
    return out


def benchmark_classification(
    image_feats: Tensor,
    classifier: Tensor,
    labels: Tensor,
    *,
    chunk_elems: int = SIM_CHUNK_ELEMENTS,
) -> dict:
    """CLIP_benchmark's zero-shot classification metrics (module docstring): image_feats (N, D),
    classifier (C, D) (class weights as rows), labels (N,).

    Returns ``acc1``, ``acc5`` (None when C < 5), ``mean_per_class_recall``, ``chance_<metric>``,
    ints ``N``, ``C``."""
    img, cls, labels = _classification_inputs(image_feats, classifier, labels)
    n, c, dev = img.shape[0], cls.shape[0], img.device
    ks = (1, 5) if c >= 5 else (1,)
    hits = {k: 0 for k in ks}
    pred = torch.empty(n, dtype=torch.long, device=dev)
    rows = _block_rows(c, chunk_elems)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        logits = (100.0 * img[a:b]) @ cls.T  # clip_benchmark: 100. * image_features @ classifier
        top = logits.topk(max(ks), 1, True, True).indices  # one topk, prefixes for each k (theirs)
        correct = top == labels[a:b, None]
        for k in ks:
            hits[k] += int(correct[:, :k].sum())
        pred[a:b] = logits.argmax(1)
    y, p = labels.cpu().numpy(), pred.cpu().numpy()
    present = np.unique(y)  # sklearn's balanced_accuracy_score: classes without labels drop out
    recall = np.array([np.mean(p[y == k] == k) for k in present], dtype=np.float64)
    out: dict = {"N": n, "C": c, "acc1": hits[1] / n, "acc5": hits[5] / n if c >= 5 else None,
                 "mean_per_class_recall": float(np.mean(recall))}  # fmt: skip
    out.update(chance_acc1=1 / c, chance_acc5=5 / c if c >= 5 else None, chance_mean_per_class_recall=1 / c)
    return out
