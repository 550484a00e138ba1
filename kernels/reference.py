"""Naive full-logits references for the contrastive losses (tests and benchmarks only).

These materialise the b x B logits, so they are the readable definition of what the fused
kernels compute, not something to train with. Run them in float64 on upcast copies of the
inputs to get the "true" value that tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(b: int, B: int, positive_index, positive_offset: int, device) -> torch.Tensor:
    if positive_index is not None:
        return positive_index.to(device=device, dtype=torch.long)
    return torch.arange(b, device=device) + positive_offset


def _false_negative_mask(pos: torch.Tensor, B: int, group_ids) -> torch.Tensor | None:
    """True where (i, j) is excluded: same group as row i's positive, but not the positive."""
    if group_ids is None:
        return None
    g = group_ids.to(pos.device)
    same = g[pos][:, None] == g[None, :]
    is_pos = torch.zeros_like(same)
    is_pos[torch.arange(len(pos), device=pos.device), pos] = True
    return same & ~is_pos


def reference_logits(image, text, logit_scale, logit_bias=None):
    """S = s * I T^T (+ beta), in the inputs' dtype."""
    logits = logit_scale * (image @ text.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def reference_infonce_loss(
    image, text, logit_scale, logit_bias=None, *, positive_index=None, positive_offset=0, group_ids=None
):
    """Symmetric InfoNCE, (mean_i [lse_j S_ij - S_ip(i)] + mean_i [lse_i' S_i'p(i) - S_ip(i)]) / 2.

    The text-to-image term of image i uses the column of its positive text, with the log-sum-exp
    taken over all b images. False negatives (same group id, not the positive) are removed from
    both softmaxes.
    """
    b, B = image.shape[0], text.shape[0]
    pos = _positives(b, B, positive_index, positive_offset, image.device)
    logits = reference_logits(image, text, logit_scale, logit_bias)
    mask = _false_negative_mask(pos, B, group_ids)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    rows = torch.arange(b, device=image.device)
    i2t = torch.logsumexp(logits, dim=1) - logits[rows, pos]
    t2i = torch.logsumexp(logits, dim=0)[pos] - logits[rows, pos]
    return (i2t.mean() + t2i.mean()) / 2


def reference_sigmoid_loss(
    image, text, logit_scale, logit_bias=None, *, positive_index=None, positive_offset=0, group_ids=None
):
    """SigLIP: -(1/b) sum_ij log sigmoid(z_ij S_ij), z = +1 on positives, -1 elsewhere."""
    b, B = image.shape[0], text.shape[0]
    pos = _positives(b, B, positive_index, positive_offset, image.device)
    logits = reference_logits(image, text, logit_scale, logit_bias)
    z = -torch.ones_like(logits)
    z[torch.arange(b, device=image.device), pos] = 1
    terms = -F.logsigmoid(z * logits)
    mask = _false_negative_mask(pos, B, group_ids)
    if mask is not None:
        terms = terms.masked_fill(mask, 0.0)
    return terms.sum() / b
