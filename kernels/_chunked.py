"""Pure-PyTorch chunked contrastive losses: the CPU path and the readable form of the algorithm.

The Triton kernels (``_triton.py``) compute exactly this, tile by tile. Neither ever holds the
b x B logits: the forward walks (row chunk, column chunk) blocks of S = s * I T^T + beta once and
keeps, per row, a running max m, sum l = sum_j exp(S_ij - m) and the same sum over negatives only
(l_neg), plus the positive logit; per column it keeps the same three statistics, which combine
across row chunks (and, in the distributed loss, across ranks) with :func:`combine_stats`.
The backward recomputes each block, forms dS from the saved log-sum-exps, and accumulates
dI += s dS T and dT += s dS^T I.

Why the "negatives only" sums: late in training the softmax is peaked, P_ii = 1 - eps with eps
far below fp32's resolution around 1. Writing 1 - P_ii = l_neg / l keeps eps exact, so the
diagonal of dS, the loss (softplus(lse_neg - S_ii) instead of lse - S_ii) and the logit-scale
gradient (which cancels between the diagonal and the rest) keep full relative precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Chunk sizes for the CPU path: 1024 x 1024 fp32 blocks are 4 MiB each, and a block step holds
# about five of them. Big enough that the GEMMs dominate, small enough that memory stays flat.
ROW_CHUNK = 1024
COL_CHUNK = 1024


class Stats(NamedTuple):
    """Per-row and per-column statistics of one forward sweep.

    Both in the compute dtype (float32; float64 for float64 inputs).
    rows: (3, b) -- InfoNCE: [lse, lse over negatives, positive logit]; sigmoid: [sum of terms, 0, 0].
    cols: (3, B) same dtype -- InfoNCE: [max, sum exp(S - max), same over negatives], combinable with
          :func:`combine_stats`; sigmoid: zeros.
    """

    rows: torch.Tensor
    cols: torch.Tensor


def combine_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two (1 + k, N) [max, sums...] partial statistics (here [max, sum, sum_neg], or
    [max, sum] in the Triton forward); -inf maxima are handled exactly."""
    m = torch.maximum(a[0], b[0])
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa = torch.exp(a[0] - m_safe)
    wb = torch.exp(b[0] - m_safe)
    return torch.cat([m[None], a[1:] * wa + b[1:] * wb])


def reduce_stats(partials: torch.Tensor) -> torch.Tensor:
    """Merge (1 + k, K, N) [max, sums...] partial statistics over K in a fixed order (deterministic)."""
    m = partials[0].amax(dim=0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(partials[0] - m_safe)
    return torch.cat([m[None], (partials[1:] * w).sum(1)])


def stats_to_lse(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, N) [max, sum, sum_neg] -> (lse, lse over negatives); log(0) = -inf where empty."""
    return stats[0] + torch.log(stats[1]), stats[0] + torch.log(stats[2])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(image, text, scale, bias, pos, row_groups, col_groups, r0, r1, c0, c1, cdt):
    """Logits x, raw dots G, and the masks of one (rows r0:r1, cols c0:c1) block.

    pos holds each row's positive column in this call's column coordinates (a value outside
    [0, B) means the positive is elsewhere, e.g. on another rank). row_groups is the group of
    each row's positive, col_groups the group of each column; both None without masking.
    """
    G = image[r0:r1].to(cdt) @ text[c0:c1].to(cdt).T
    x = G * scale.to(cdt)
    if bias is not None:
        x = x + bias.to(cdt)
    cols = torch.arange(c0, c1, device=image.device)
    is_pos = cols[None, :] == pos[r0:r1, None]
    if row_groups is None:
        valid = torch.ones_like(is_pos)
    else:
        valid = (row_groups[r0:r1][:, None] != col_groups[c0:c1][None, :]) | is_pos
    return G, x, is_pos, valid


def _tile_stats(x, is_pos, valid, dim):
    """[max, sum exp, sum exp over negatives] of x along dim (masked entries excluded)."""
    xm = torch.where(valid, x, float("-inf"))
    m = xm.amax(dim=dim)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(xm - m_safe.unsqueeze(dim))
    return torch.stack([m, e.sum(dim), torch.where(is_pos, 0.0, e).sum(dim)])


def forward_stats(image, text, scale, bias, pos, row_groups, col_groups, sigmoid: bool):
    """One sweep over (row chunk, column chunk) blocks; returns :class:`Stats`."""
    b, B = image.shape[0], text.shape[0]
    row_chunk, col_chunk = ROW_CHUNK, COL_CHUNK
    cdt = compute_dtype(image.dtype)
    dev = image.device
    f = dict(dtype=cdt, device=dev)
    rows = torch.zeros(3, b, **f)
    cols = torch.zeros(3, B, **f)
    if not sigmoid:
        cols[0] = float("-inf")
    for r0 in range(0, b, row_chunk):
        r1 = min(r0 + row_chunk, b)
        row_acc = torch.zeros(4, r1 - r0, **f)
        row_acc[0] = float("-inf")
        for c0 in range(0, B, col_chunk):
            c1 = min(c0 + col_chunk, B)
            _, x, is_pos, valid = _block(
                image, text, scale, bias, pos, row_groups, col_groups, r0, r1, c0, c1, cdt
            )
            if sigmoid:
                z = torch.where(is_pos, 1.0, -1.0).to(cdt)
                terms = torch.where(valid, F.softplus(-z * x), 0.0)
                row_acc[1] += terms.sum(1)
                continue
            row_acc[:3] = combine_stats(row_acc[:3], _tile_stats(x, is_pos, valid, dim=1))
            row_acc[3] += torch.where(is_pos, x, 0.0).sum(1)
            cols[:, c0:c1] = combine_stats(cols[:, c0:c1], _tile_stats(x, is_pos, valid, dim=0))
        if sigmoid:
            rows[0, r0:r1] = row_acc[1]
        else:
            lse, lse_neg = stats_to_lse(row_acc[:3])
            rows[:, r0:r1] = torch.stack([lse, lse_neg, row_acc[3]])
    return Stats(rows, cols)


def block_grad_logits(x, is_pos, valid, row_vecs, col_vecs, sigmoid: bool):
    """dLoss/dS for one block, from the saved per-row / per-column vectors.

    row_vecs (4, r): [lse, on = dLoss/dS at the row's positive, row coefficient, -]
    col_vecs (4, c): [lse, -, column coefficient, -]
    InfoNCE, off the positive: row_coef * P_row + col_coef * P_col; on it, `on`, which
    ``contrastive_loss.infonce_from_stats`` forms from 1 - P_ii = exp(lse_neg - lse) (exact when
    P -> 1) and, for a text that several images pair with, P_col of the positive logit.
    Sigmoid: row_coef * (-z) * sigmoid(-z x).
    """
    if sigmoid:
        z = torch.where(is_pos, 1.0, -1.0).to(x.dtype)
        ds = row_vecs[2][:, None] * (-z) * torch.sigmoid(-z * x)
        return torch.where(valid, ds, 0.0)
    lse_r, on, coef_r = (v[:, None] for v in row_vecs[:3])
    lse_c, coef_c = col_vecs[0][None, :], col_vecs[2][None, :]
    off = coef_r * torch.exp(x - lse_r) + coef_c * torch.exp(x - lse_c)
    return torch.where(valid, torch.where(is_pos, on, off), 0.0)


def backward_grads(
    grad,
    image,
    text,
    scale,
    bias,
    pos,
    row_groups,
    col_groups,
    row_vecs,
    col_vecs,
    sigmoid: bool,
    grad_dtype=None,
):
    """Recompute each block and accumulate (dI, dT, dscale, dbias).

    dI and dT come back in grad_dtype (default: the inputs' dtype); dscale and dbias in float64.
    """
    b, B = image.shape[0], text.shape[0]
    row_chunk, col_chunk = ROW_CHUNK, COL_CHUNK
    cdt = compute_dtype(image.dtype)
    dI = torch.zeros(image.shape, dtype=cdt, device=image.device)
    dT = torch.zeros(text.shape, dtype=cdt, device=image.device)
    dscale = torch.zeros((), dtype=torch.float64, device=image.device)
    dbias = torch.zeros((), dtype=torch.float64, device=image.device)
    g = grad.to(cdt)
    s = scale.to(cdt)
    for r0 in range(0, b, row_chunk):
        r1 = min(r0 + row_chunk, b)
        for c0 in range(0, B, col_chunk):
            c1 = min(c0 + col_chunk, B)
            G, x, is_pos, valid = _block(
                image, text, scale, bias, pos, row_groups, col_groups, r0, r1, c0, c1, cdt
            )
            dS = g * block_grad_logits(
                x, is_pos, valid, row_vecs[:, r0:r1].to(cdt), col_vecs[:, c0:c1].to(cdt), sigmoid
            )
            # Cancelling sums: accumulate in fp64 (as the Triton kernels do).
            dscale += (dS * G).sum(dtype=torch.float64)
            dbias += dS.sum(dtype=torch.float64)
            dG = dS * s
            dI[r0:r1] += dG @ text[c0:c1].to(cdt)
            dT[c0:c1] += dG.T @ image[r0:r1].to(cdt)
    return dI.to(grad_dtype or image.dtype), dT.to(grad_dtype or text.dtype), dscale, dbias
