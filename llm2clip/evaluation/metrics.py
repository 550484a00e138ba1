"""Retrieval and zero-shot metrics: pure functions of L2-normalised features, on any device.

    r = retrieval_metrics(image_feats, text_feats, text_to_image)   # i2t_R@k, t2i_R@k, chance
    z = zeroshot_accuracy(image_feats, classifier, labels)          # top1, top5, chance

- image -> text: an image is a hit at k when ANY of its captions is in the top k (CLIP_benchmark's
  definition); text -> image: the caption's own image in the top k. Each beside its chance level
  under a random ranking (exact, given each image's caption count).
- Ties count against the model: the rank of a query is the number of WRONG items scoring greater
  than or equal to its best correct item, and it is a hit at k when that rank is < k. A degenerate
  model (every score equal) scores 0, never 1; with continuous features ties do not occur and this
  is the usual rank.
- Memory: the N x M similarity matrix is never materialised; it is computed in row blocks of at
  most ``SIM_CHUNK_ELEMENTS`` scores (50k x 50k needs 64 MiB at a time, not 10 GB).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SIM_CHUNK_ELEMENTS", "retrieval_metrics", "zeroshot_accuracy"]

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
