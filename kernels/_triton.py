"""Triton kernels for the fused contrastive losses (the algorithm of ``_chunked.py``, tile by tile).

Forward (2bBD FLOPs): a (row block, column split) grid. Each program computes its tiles of
S = s * I T^T + beta with fp32 accumulation and keeps, per row, a running max and sum over the
row's negatives in registers; per column it writes the tile's [max, sum] over the negatives of its
BM rows. A tile therefore needs one element-wise mask (not the positive, not a same-group text)
and one exp per element for each direction. Each row's positive logit comes from a second small
kernel (a row-wise dot product, bD work, in fp64) and is merged on the host: rows by log-add-exp,
columns by :func:`_with_positives` (fixed-point sums, so several images sharing a text stay
deterministic). Rows are processed in chunks of ROW_BLOCKS_PER_CHUNK row blocks, so the column
partials are a (2, ROW_BLOCKS_PER_CHUNK, B) buffer: O(B), never O(b*B). Partials are merged in a
fixed order (deterministic, no atomics) by ``_chunked.reduce_stats``.

Backward (6bBD): superblocks of at most BWD_ROWS x BWD_COLS. A kernel recomputes the tiles and
writes s * dS into a fixed-size workspace (bf16 for bf16 inputs, never fp16: dS ~ p/B underflows
it; fp32 otherwise) plus per-tile partial sums for the scale and bias gradients; two GEMMs then
add workspace @ T into dI and workspace^T @ I into dT, in fp32 accumulators that exist only when a
dimension spans several superblocks (a GEMM that continues a sum starts its dot from the loaded
accumulator). The workspace size does not grow with b or B. dS at each row's positive is formed
on the host (``contrastive_loss.infonce_from_stats``), so the kernel selects it per row.

Every autotune config compiles for sm_90a without register spills (bench/kernel_resources.py,
tests/test_kernel_resources.py). Where it stops being fast: D < ~128 (exp work rivals the GEMMs;
bench/roofline.py), b, B below a few thousand (too few tiles to fill the GPU), and D or strides
not multiples of 16 bytes (no vectorised, pipelined loads). Under TRITON_INTERPRET=1, bf16
``tl.dot`` gives garbage (seen with triton 3.6 and 3.8), so the operands are upcast to fp32 there
(DOT_FP32): exact for bf16 products.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _chunked
from ._chunked import Stats

# Forward: rows per launch = BM * ROW_BLOCKS_PER_CHUNK; the column partials hold that many rows.
ROW_BLOCKS_PER_CHUNK = 64
# Backward workspace: 8192 x 8192 bf16 = 128 MiB. The GEMMs' K is a workspace side, so it must be
# large enough that the fp32 accumulator traffic is hidden (K/4 FLOP per byte >> 266 on H100).
BWD_ROWS = 8192
BWD_COLS = 8192
# Column splits are rounded to this so every autotuned BN divides them.
SPLIT_ALIGN = 256
FWD_BM = 128
# The positive-logit kernel: BM rows by BK features per step (a row-wise dot product, bD work).
POS_BM, POS_BK = 32, 64
# Column sums of the positives' exps, in 32.32 fixed point (see _with_positives).
_FIXED_ONE = 2.0**32

# The forward's row block under the interpreter (small tiles: the tests' odd shapes then span
# several tiles; the other kernels' interpreter tiles are in KERNELS).
_INTERP_FWD_BM = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _dot_mode(dtype_a: torch.dtype, dtype_b: torch.dtype) -> tuple[bool, str]:
    """(upcast operands to fp32?, fp32 dot precision)."""
    sixteen = (torch.bfloat16, torch.float16)
    native = dtype_a == dtype_b and dtype_a in sixteen
    upcast = not native or (_interpreting() and dtype_a == torch.bfloat16)
    # fp32 inputs follow PyTorch's matmul setting (full fp32 by default). 16-bit data upcast to
    # fp32 (the fp16 path's GEMMs: an fp32 workspace times fp16 features) only needs tf32: fp16
    # converts exactly, and the workspace keeps an 11-bit significand like fp16, without fp16's
    # underflow.
    tf32 = dtype_a in sixteen or dtype_b in sixteen or torch.backends.cuda.matmul.allow_tf32
    return upcast, ("tf32" if tf32 and not _interpreting() else "ieee")


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _logits_tile(
    I, T,
    rows, cols, row_ok, col_ok,
    D, stride_i0, stride_i1, stride_t0, stride_t1,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """G = I[rows] @ T[cols]^T for one BM x BN tile, fp32 accumulation over D in steps of BK."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    row_off = rows.to(tl.int64)[:, None] * stride_i0
    col_off = cols.to(tl.int64)[None, :] * stride_t0
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < D
        a = tl.load(I + row_off + ks[None, :] * stride_i1, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(T + col_off + ks[:, None] * stride_t1, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _log1p(x):
    # Kahan's log1p: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of u; a few ulps.
    u = 1.0 + x
    same = u == 1.0
    return tl.where(same, x, tl.log(u) * x / tl.where(same, 1.0, u - 1.0))


@triton.jit
def _softplus(t):
    return tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))


@triton.jit
def _sigmoid(t):
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ----------------------------------------------------------------------------- forward


@triton.jit
def _forward_kernel(
    I, T, scale_ptr, bias_ptr, pos_ptr, row_grp_ptr, col_grp_ptr,
    row_out,  # (2, n_splits, b) fp32: InfoNCE [max, sum] over each row's negatives | sigmoid [_, loss sum]
    col_out,  # (2, row blocks per chunk, B) fp32: per row block [max, sum] over each column's negatives
    b, B, D, row_start, split_len, col_plane,
    stride_i0, stride_i1, stride_t0, stride_t1,
    HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, SIGMOID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Statistics over the negatives only: the positives (one per row) come from
    ``_positive_logits_kernel`` and are merged by the launcher, so a tile needs a single
    element-wise mask and one exp per element for each direction."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = row_start + pid_m * BM + tl.arange(0, BM)
    row_ok = rows < b
    # Positions in this call's columns fit int32 (B < 2**31); tile-relative compares stay 32-bit.
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    grp_row = pos
    if HAS_GROUPS:
        grp_row = tl.load(row_grp_ptr + rows, mask=row_ok, other=0)
    s = tl.load(scale_ptr).to(tl.float32)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(bias_ptr).to(tl.float32)

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    c_lo = pid_c * split_len
    c_hi = tl.minimum(c_lo + split_len, B)
    offs_n = tl.arange(0, BN)
    for n0 in range(c_lo, c_hi, BN):
        cols = n0 + offs_n
        col_ok = offs_n < c_hi - n0
        acc = _logits_tile(
            I, T, rows, cols, row_ok, col_ok, D, stride_i0, stride_i1, stride_t0, stride_t1,
            BM, BN, BK, DOT_FP32, PRECISION,
        )  # fmt: skip
        # Negatives: in range, not the row's positive and (with groups) not in its group; a
        # positive shares its own group, so the group test drops it too.
        neg = row_ok[:, None] & col_ok[None, :]
        if HAS_GROUPS:
            grp_col = tl.load(col_grp_ptr + cols, mask=col_ok, other=0)
            neg = neg & (grp_col[None, :] != grp_row[:, None])
        else:
            neg = neg & (offs_n[None, :] != (pos - n0)[:, None])
        xn = tl.where(neg, acc * s + beta, float("-inf"))
        if SIGMOID:
            l_i += tl.sum(_softplus(xn), axis=1)  # softplus(-inf) = 0
        else:
            # Rows: online log-sum-exp; the -inf guard keeps an all-masked tile from making NaN.
            m_new = tl.maximum(m_i, tl.max(xn, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(xn - m_safe[:, None]), axis=1)
            m_i = m_new
            # Columns: this tile's statistics with their own max (a shared max would underflow).
            c_max = tl.max(xn, axis=0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            c_sum = tl.sum(tl.exp(xn - c_safe[None, :]), axis=0)
            # The buffer's plane stride, not this launch's grid: the last row chunk may be shorter.
            col_ptr = col_out + pid_m * B + cols
            tl.store(col_ptr, c_max, mask=col_ok)
            tl.store(col_ptr + col_plane, c_sum, mask=col_ok)

    row_ptr = row_out + pid_c * b + rows
    tl.store(row_ptr, m_i, mask=row_ok)
    tl.store(row_ptr + n_splits * b, l_i, mask=row_ok)


@triton.jit
def _positive_logits_kernel(
    I, T, scale_ptr, bias_ptr, pos_ptr,
    out,  # (b,) fp32: s * <I_i, T_pos(i)> + beta where 0 <= pos(i) < B, else 0
    b, B, D,
    stride_i0, stride_i1, stride_t0, stride_t1,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Each row's positive logit, a row-wise dot product: bD work next to the sweep's 2bBD, so it
    is done in fp64 (exact products of 16- and 32-bit inputs) and rounded once."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    pos = tl.load(pos_ptr + rows, mask=rows < b, other=-1)
    ok = (rows < b) & (pos >= 0) & (pos < B)
    i_row = rows.to(tl.int64)[:, None] * stride_i0
    t_row = tl.where(ok, pos, 0).to(tl.int64)[:, None] * stride_t0
    acc = tl.zeros((BM,), tl.float64)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        mask = ok[:, None] & (ks < D)[None, :]
        a = tl.load(I + i_row + ks[None, :] * stride_i1, mask=mask, other=0.0).to(tl.float64)
        t = tl.load(T + t_row + ks[None, :] * stride_t1, mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(a * t, axis=1)
    x = acc * tl.load(scale_ptr).to(tl.float64)
    if HAS_BIAS:
        x += tl.load(bias_ptr).to(tl.float64)
    tl.store(out + rows, tl.where(ok, x, 0.0).to(tl.float32), mask=rows < b)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_logits_kernel(
    I, T, scale_ptr, bias_ptr, grad_ptr, pos_ptr, row_grp_ptr, col_grp_ptr,
    row_vecs,  # (4, b) fp32: lse, dLoss/dS at the positive, row coefficient, -
    col_vecs,  # (4, B) fp32: lse, -, column coefficient, -
    WS,  # (>= r1 - r0, >= c1 - c0) workspace: s * dS
    partials,  # (n_tiles, 2) fp64: sum(dS * G), sum(dS) of each tile
    b, B, D, r0, r1, c0, c1,
    stride_i0, stride_i1, stride_t0, stride_t1, stride_w0, stride_w1,
    HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, SIGMOID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = r0 + pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    n0 = c0 + pid_n * BN
    cols = n0 + offs_n
    row_ok = rows < r1
    col_ok = offs_n < c1 - n0
    s = tl.load(scale_ptr).to(tl.float32)
    g = tl.load(grad_ptr).to(tl.float32)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(bias_ptr).to(tl.float32)
    acc = _logits_tile(
        I, T, rows, cols, row_ok, col_ok, D, stride_i0, stride_i1, stride_t0, stride_t1,
        BM, BN, BK, DOT_FP32, PRECISION,
    )  # fmt: skip
    x = acc * s + beta
    # Tile-relative column of each row's positive (32-bit compares), -1 when it is not one of
    # this tile's columns. Entries outside the superblock or masked by the groups get logit -inf
    # (so dS = 0 there with no mask applied afterwards).
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int32) - n0
    is_pos = offs_n[None, :] == tl.where(pos < c1 - n0, pos, -1)[:, None]
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_GROUPS:
        grp_row = tl.load(row_grp_ptr + rows, mask=row_ok, other=0)
        grp_col = tl.load(col_grp_ptr + cols, mask=col_ok, other=0)
        valid = valid & ((grp_col[None, :] != grp_row[:, None]) | is_pos)
    x = tl.where(valid, x, float("-inf"))
    coef_r = tl.load(row_vecs + 2 * b + rows, mask=row_ok, other=0.0)
    if SIGMOID:
        z = tl.where(is_pos, 1.0, -1.0)
        ds = coef_r[:, None] * (-z) * _sigmoid(-z * x)  # sigmoid(-inf) = 0 off the positive
    else:
        # Off the positive: the two softmaxes; on it, the value formed on the host from 1 - P
        # (the negatives' sums, exact when P -> 1): contrastive_loss.infonce_from_stats.
        lse_r = tl.load(row_vecs + rows, mask=row_ok, other=float("inf"))
        on_r = tl.load(row_vecs + b + rows, mask=row_ok, other=0.0)
        lse_c = tl.load(col_vecs + cols, mask=col_ok, other=float("inf"))
        # A column whose every entry is masked out has lse -inf; +inf keeps its exps 0, not NaN.
        lse_c = tl.where(lse_c == float("-inf"), float("inf"), lse_c)
        coef_c = tl.load(col_vecs + 2 * B + cols, mask=col_ok, other=0.0)
        off = coef_r[:, None] * tl.exp(x - lse_r[:, None]) + coef_c[None, :] * tl.exp(x - lse_c[None, :])
        ds = tl.where(is_pos, on_r[:, None], off)
    ds = ds * g
    w_ptr = WS + (rows - r0).to(tl.int64)[:, None] * stride_w0 + (cols - c0)[None, :] * stride_w1
    tl.store(w_ptr, (ds * s).to(WS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    # The scale and bias gradients are sums of terms of both signs that cancel; fp64 partials keep
    # the rounding below PyTorch's (one add per element, next to D multiply-adds on the tensor cores).
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(partials + 2 * tile, tl.sum(tl.sum((ds * acc).to(tl.float64), axis=1), axis=0))
    tl.store(partials + 2 * tile + 1, tl.sum(tl.sum(ds.to(tl.float64), axis=1), axis=0))


@triton.jit
def _gemm_kernel(
    A, Bm, OUT, ACC,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_cm, stride_cn,
    LOAD_ACC: tl.constexpr, STORE_OUT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """OUT (or the fp32 ACC) = A @ B (+ ACC): one step of a K-chunked accumulation."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    # Grouped launch order so consecutive programs share A rows in L2.
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    # The running fp32 sum is the dot's initial value: one tile live across the loop, not two.
    if LOAD_ACC:
        acc = tl.load(
            ACC + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn, mask=mask, other=0.0
        )
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    a_row = rm.to(tl.int64)[:, None] * stride_am
    b_col = rn.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        a = tl.load(
            A + a_row + rk.to(tl.int64)[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        bb = tl.load(
            Bm + rk.to(tl.int64)[:, None] * stride_bk + b_col, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        )
        if DOT_FP32:
            a = a.to(tl.float32)
            bb = bb.to(tl.float32)
        acc = tl.dot(a, bb, acc, input_precision=PRECISION)
    if STORE_OUT:
        o_ptr = OUT + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(ACC + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn, acc, mask=mask)


# ----------------------------------------------------------------------------- autotuning (Hopper)

# Candidate tiles for H100/H200; the tuner picks per problem. Every config here compiles for sm_90a
# without register spills on the bf16 / fp16 main paths (bench/kernel_resources.py reports
# registers, spills, shared memory and occupancy; tests/test_kernel_resources.py fails on a spill).
# Pruned by that report: 128 x 128 forward tiles, 4-stage 128 x 64 forward tiles and 4-warp
# forward tiles spill in some variant (the fp16 sigmoid loss with groups is the tightest).
# BM of the forward is fixed because the column partials depend on it.
_FWD_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(128, 64, 8, 3), (128, 32, 8, 4), (64, 128, 8, 3), (64, 64, 8, 4)]
]
# dS tiles with a bf16 workspace (bf16 inputs).
_GRAD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 8, 3),
        (64, 128, 64, 8, 3),
    ]
]
# dS tiles with an fp32 workspace (fp16 and fp32 inputs): storing fp32 takes more registers, and
# 128 x 128 tiles spill with groups, so the tiles are half as wide.
_GRAD32_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 64, 64, 8, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 64, 8, 3),
    ]
]
_GEMM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (256, 128, 64, 8, 3),
    ]
]
# With LOAD_ACC the fp32 accumulator tile is loaded (and converted to the MMA layout) before the
# K loop: 128 x 256 tiles and 128 x 128 on four warps spill there, so they are left out.
_GEMM_ACC_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ]
]
# GEMMs with fp32 operands: the fp16 path's (an fp32 workspace times fp16 features, in tf32) and
# fp32 inputs'. Twice the bytes per operand tile of the bf16 GEMMs: half the K step.
_GEMM32_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
    ]
]
_POS_CONFIGS = [triton.Config({"BM": POS_BM, "BK": POS_BK}, num_warps=4, num_stages=2)]
_GRAD_MIN_TILE = (64, 64)  # smallest BM and BN of the dS configs: sizes the per-tile partials buffer

# name -> (kernel, autotune configs, autotune key, autotune options, the interpreter's tile sizes).
# Every launch goes through _launch, so bench/kernel_resources.py can record and compile them.
KERNELS = {
    "forward": (
        _forward_kernel, _FWD_CONFIGS, ["D", "SIGMOID", "HAS_GROUPS"], {}, dict(BN=64, BK=32),
    ),
    "positive": (_positive_logits_kernel, _POS_CONFIGS, [], {}, dict(BM=32, BK=32)),
    "grad": (
        _grad_logits_kernel, _GRAD_CONFIGS, ["D", "SIGMOID", "HAS_GROUPS"], dict(reset_to_zero=["partials"]),
        dict(BM=64, BN=64, BK=32),
    ),
    "grad32": (
        _grad_logits_kernel, _GRAD32_CONFIGS, ["D", "SIGMOID", "HAS_GROUPS"],
        dict(reset_to_zero=["partials"]), dict(BM=64, BN=64, BK=32),
    ),
    "gemm": (
        _gemm_kernel, _GEMM_CONFIGS, ["N", "STORE_OUT"], dict(restore_value=["ACC"]),
        dict(BM=64, BN=64, BK=32, GROUP_M=4),
    ),
    "gemm_acc": (
        _gemm_kernel, _GEMM_ACC_CONFIGS, ["N", "STORE_OUT"], dict(restore_value=["ACC"]),
        dict(BM=64, BN=64, BK=32, GROUP_M=4),
    ),
    "gemm32": (
        _gemm_kernel, _GEMM32_CONFIGS, ["N", "LOAD_ACC", "STORE_OUT"], dict(restore_value=["ACC"]),
        dict(BM=64, BN=64, BK=32, GROUP_M=4),
    ),
}  # fmt: skip


@functools.cache
def _tuned(name: str):
    kernel, configs, key, options, _ = KERNELS[name]
    return triton.autotune(configs, key=key, **options)(kernel)


def _launch(name: str, grid, *args, **flags) -> None:
    """Run kernel `name` on grid (a tuple, or a function of the launch's meta-parameters): the
    interpreter's small tiles under TRITON_INTERPRET=1, else its one config or the autotuner."""
    kernel, configs, _, _, interp_meta = KERNELS[name]
    if _interpreting() or len(configs) == 1:
        meta = interp_meta if _interpreting() else configs[0].kwargs
        opts = (
            {} if _interpreting() else dict(num_warps=configs[0].num_warps, num_stages=configs[0].num_stages)
        )
        kernel[grid(dict(flags, **meta)) if callable(grid) else grid](*args, **flags, **meta, **opts)
    else:
        _tuned(name)[grid](*args, **flags)


# ----------------------------------------------------------------------------- host launchers


def _dense_groups(row_groups, col_groups):
    """The group ids as dense int32 ranks, rows and columns ranked together (equal ids, equal
    ranks): 32-bit compares in the kernels, whatever the ids' range. A sort, so no host sync."""
    if row_groups is None:
        return None, None
    ids, order = torch.sort(torch.cat([row_groups, col_groups]))
    step = torch.zeros_like(ids, dtype=torch.int32)
    step[1:] = ids[1:] != ids[:-1]
    ranks = torch.empty_like(step).scatter_(0, order, torch.cumsum(step, 0, dtype=torch.int32))
    return ranks[: len(row_groups)], ranks[len(row_groups) :]


def _positive_logits(image, text, scale, bias, pos) -> torch.Tensor:
    """(b,) fp32: s * <I_i, T_pos(i)> + beta where the positive is among these texts, else 0."""
    b, D = image.shape
    out = torch.empty(b, dtype=torch.float32, device=image.device)
    args = (
        image, text, scale, bias if bias is not None else scale, pos, out, b, text.shape[0], D,
        image.stride(0), image.stride(1), text.stride(0), text.stride(1),
    )  # fmt: skip
    _launch("positive", lambda m: (triton.cdiv(b, m["BM"]),), *args, HAS_BIAS=bias is not None)
    return out


def _with_positives(neg: torch.Tensor, x_pos, has_pos, pos) -> torch.Tensor:
    """Column statistics [max, sum, sum over negatives] (3, B) from the negatives' [max, sum]
    (2, B) and the positive logits x_pos (b,) of the rows with has_pos, at columns pos.

    No host synchronisation and no float atomics: the positives' exps (each in (0, 1] against the
    column max) are summed as 32.32 fixed-point integers, exact and order-independent, so a text
    that is the positive of several images gets a deterministic sum (error <= count * 2**-33
    against a sum >= 1).
    """
    idx = torch.where(has_pos, pos, torch.zeros_like(pos))
    src = torch.where(has_pos, x_pos, torch.full_like(x_pos, float("-inf")))
    m = neg[0].scatter_reduce(0, idx, src, reduce="amax")
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s_neg = neg[1] * torch.exp(neg[0] - m_safe)
    fixed = torch.round(torch.exp(src - m_safe[idx]).double() * _FIXED_ONE).long()
    s_pos = torch.zeros_like(neg[0], dtype=torch.int64).index_add_(0, idx, fixed).double() / _FIXED_ONE
    return torch.stack([m, s_neg + s_pos.to(s_neg.dtype), s_neg])


def forward_stats(image, text, scale, bias, pos, row_groups, col_groups, sigmoid: bool) -> Stats:
    """Row statistics (3, b) and combined column statistics (3, B); see ``_chunked.Stats``.

    The sweep kernel keeps statistics over the negatives only; each row's positive logit comes
    from ``_positive_logits_kernel`` and is merged here (rows: log-add-exp; columns:
    :func:`_with_positives`), which gives the same statistics as a sweep over all entries.
    """
    b, D = image.shape
    B = text.shape[0]
    dev = image.device
    interp = _interpreting()
    BM = _INTERP_FWD_BM if interp else FWD_BM
    chunk_rows = BM * ROW_BLOCKS_PER_CHUNK
    n_rb = triton.cdiv(min(b, chunk_rows), BM)
    n_splits = max(1, min(triton.cdiv(_target_programs(dev), n_rb), triton.cdiv(B, SPLIT_ALIGN)))
    split_len = triton.cdiv(triton.cdiv(B, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    n_splits = triton.cdiv(B, split_len)
    dot_fp32, precision = _dot_mode(image.dtype, text.dtype)

    row_part = torch.empty(2, n_splits, b, dtype=torch.float32, device=dev)
    cols = torch.zeros(2, B, dtype=torch.float32, device=dev)
    cols[0] = float("-inf")
    col_part = torch.empty(2, n_rb, B, dtype=torch.float32, device=dev) if not sigmoid else cols
    bias_arg = bias if bias is not None else scale
    row_grp, col_grp = _dense_groups(row_groups, col_groups) if row_groups is not None else (pos, pos)
    for r0 in range(0, b, chunk_rows):
        grid = (triton.cdiv(min(chunk_rows, b - r0), BM), n_splits)
        args = (
            image, text, scale, bias_arg, pos, row_grp, col_grp, row_part, col_part,
            b, B, D, r0, split_len, n_rb * B,
            image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        )  # fmt: skip
        flags = dict(HAS_BIAS=bias is not None, HAS_GROUPS=row_groups is not None, SIGMOID=sigmoid)
        flags.update(DOT_FP32=dot_fp32, PRECISION=precision, BM=BM)
        _launch("forward", grid, *args, **flags)
        if not sigmoid:
            cols = _chunked.combine_stats(cols, _chunked.reduce_stats(col_part[:, : grid[0]]))
    x_pos = _positive_logits(image, text, scale, bias, pos)
    has_pos = (pos >= 0) & (pos < B)
    if sigmoid:
        rows = torch.zeros(3, b, dtype=torch.float32, device=dev)
        rows[0] = row_part[1].sum(0) + torch.where(has_pos, F.softplus(-x_pos), 0.0)
        return Stats(rows, torch.zeros(3, B, dtype=torch.float32, device=dev))
    row_neg = _chunked.reduce_stats(row_part)
    lse_neg = row_neg[0] + torch.log(row_neg[1])
    lse = torch.where(has_pos, torch.logaddexp(lse_neg, x_pos), lse_neg)
    return Stats(torch.stack([lse, lse_neg, x_pos]), _with_positives(cols, x_pos, has_pos, pos))


def _gemm(a, bmat, out, acc, load_acc: bool, store_out: bool):
    """out (or acc) = a @ bmat (+ acc), all 2-D strided views."""
    M, K = a.shape
    N = bmat.shape[1]
    dot_fp32, precision = _dot_mode(a.dtype, bmat.dtype)
    acc_arg = acc if acc is not None else out
    args = (
        a, bmat, out, acc_arg, M, N, K,
        a.stride(0), a.stride(1), bmat.stride(0), bmat.stride(1),
        out.stride(0), out.stride(1), acc_arg.stride(0), acc_arg.stride(1),
    )  # fmt: skip
    flags = dict(LOAD_ACC=load_acc, STORE_OUT=store_out, DOT_FP32=dot_fp32, PRECISION=precision)
    grid = lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)
    native = a.dtype == bmat.dtype and a.dtype in (torch.bfloat16, torch.float16)
    _launch(("gemm_acc" if load_acc else "gemm") if native else "gemm32", grid, *args, **flags)


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
    """(dI, dT, dscale, dbias) by superblocks of a fixed-size workspace.

    dI and dT come back in grad_dtype (default: the inputs' dtype); dscale and dbias in float64.
    """
    b, D = image.shape
    B = text.shape[0]
    dev = image.device
    interp = _interpreting()
    rows_per, cols_per = min(b, BWD_ROWS), min(B, BWD_COLS)
    n_r, n_c = triton.cdiv(b, rows_per), triton.cdiv(B, cols_per)
    ws_dtype = torch.bfloat16 if image.dtype == torch.bfloat16 else torch.float32
    ws = torch.empty(rows_per, cols_per, dtype=ws_dtype, device=dev)
    dI = torch.empty(image.shape, dtype=grad_dtype or image.dtype, device=dev)
    dT = torch.empty(text.shape, dtype=grad_dtype or text.dtype, device=dev)
    # fp32 accumulators only where a dimension spans several superblocks, and only when the
    # gradient itself is not fp32 (then it accumulates in place).
    in_place_i, in_place_t = dI.dtype == torch.float32, dT.dtype == torch.float32
    dI_acc = torch.empty(rows_per, D, dtype=torch.float32, device=dev) if n_c > 1 and not in_place_i else None
    dT_acc = torch.empty(B, D, dtype=torch.float32, device=dev) if n_r > 1 and not in_place_t else None
    interp_meta = KERNELS["grad"][4]  # the same for "grad32"
    min_bm, min_bn = (interp_meta["BM"], interp_meta["BN"]) if interp else _GRAD_MIN_TILE
    tiles = triton.cdiv(rows_per, min_bm) * triton.cdiv(cols_per, min_bn)
    partials = torch.zeros(n_r, n_c, tiles, 2, dtype=torch.float64, device=dev)
    dot_fp32, precision = _dot_mode(image.dtype, text.dtype)
    flags = dict(HAS_BIAS=bias is not None, HAS_GROUPS=row_groups is not None, SIGMOID=sigmoid)
    flags.update(DOT_FP32=dot_fp32, PRECISION=precision)
    bias_arg = bias if bias is not None else scale
    row_grp, col_grp = _dense_groups(row_groups, col_groups) if row_groups is not None else (pos, pos)
    grad = grad.reshape(()).float()
    row_vecs = row_vecs.float().contiguous()
    col_vecs = col_vecs.float().contiguous()
    for ri in range(n_r):
        r0, r1 = ri * rows_per, min((ri + 1) * rows_per, b)
        for ci in range(n_c):
            c0, c1 = ci * cols_per, min((ci + 1) * cols_per, B)
            args = (
                image, text, scale, bias_arg, grad, pos, row_grp, col_grp,
                row_vecs, col_vecs, ws, partials[ri, ci],
                b, B, D, r0, r1, c0, c1,
                image.stride(0), image.stride(1), text.stride(0), text.stride(1), ws.stride(0), ws.stride(1),
            )  # fmt: skip
            grid = lambda m, r=r1 - r0, c=c1 - c0: (triton.cdiv(r, m["BM"]), triton.cdiv(c, m["BN"]))
            _launch("grad" if ws_dtype == torch.bfloat16 else "grad32", grid, *args, **flags)
            w = ws[: r1 - r0, : c1 - c0]
            acc_i = dI[r0:r1] if in_place_i else (dI_acc[: r1 - r0] if dI_acc is not None else None)
            _gemm(w, text[c0:c1], dI[r0:r1], acc_i, load_acc=ci > 0, store_out=ci == n_c - 1)
            acc_t = dT[c0:c1] if in_place_t else (dT_acc[c0:c1] if dT_acc is not None else None)
            _gemm(w.T, image[r0:r1], dT[c0:c1], acc_t, load_acc=ri > 0, store_out=ri == n_r - 1)
    sums = partials.reshape(-1, 2).sum(0)
    return dI, dT, sums[0], sums[1]
