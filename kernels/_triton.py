"""Triton kernels for the fused contrastive losses (the algorithm of ``_chunked.py``, tile by tile).

Forward (2bBD FLOPs): a (row block, column split) grid. Each program computes its tiles of
S = s * I T^T + beta with fp32 accumulation and keeps, per row, a running max / sum / sum over
negatives / positive logit in registers; per column it writes the tile's [max, sum, sum_neg]
over its BM rows. Rows are processed in chunks of ROW_BLOCKS_PER_CHUNK row blocks, so the column
partials are a (3, ROW_BLOCKS_PER_CHUNK, B) buffer: O(B), never O(b*B). Partials are merged in a
fixed order (deterministic, no atomics) by ``_chunked.reduce_stats``.

Backward (6bBD): superblocks of at most BWD_ROWS x BWD_COLS. A kernel recomputes the tiles and
writes s * dS into a fixed-size workspace (bf16 for bf16 inputs, never fp16: dS ~ p/B underflows
it; fp32 otherwise) plus per-tile partial sums for the scale and bias gradients; two GEMMs then
add workspace @ T into dI and workspace^T @ I into dT, in fp32 accumulators that exist only when a
dimension spans several superblocks. The workspace size does not grow with b or B.

Where it stops being fast: D < ~128 (exp work rivals the GEMMs), and b, B below a few thousand
(too few tiles to fill the GPU). Under TRITON_INTERPRET=1, bf16 ``tl.dot`` gives garbage (seen
with triton 3.6 and 3.8), so the operands are upcast to fp32 there (DOT_FP32): exact for bf16
products.
"""

from __future__ import annotations

import functools
import os

import torch
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

# Small tiles under the interpreter: the tests' odd shapes then span several tiles.
_INTERP_FWD = dict(BM=64, BN=64, BK=32)
_INTERP_GEMM = dict(BM=64, BN=64, BK=32, GROUP_M=4)


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
    sixteen_bit = dtype_a in (torch.bfloat16, torch.float16) and dtype_b in (torch.bfloat16, torch.float16)
    upcast = (dtype_a != dtype_b) or (_interpreting() and torch.bfloat16 in (dtype_a, dtype_b))
    upcast = upcast or not sixteen_bit
    # fp32 inputs follow PyTorch's matmul setting (full fp32 by default); upcast 16-bit operands
    # only need tf32's 10-bit mantissa.
    tf32 = sixteen_bit or torch.backends.cuda.matmul.allow_tf32
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
def _tile_masks(rows, cols, row_ok, col_ok, pos, col_grp_ptr, grp_row, HAS_GROUPS: tl.constexpr):
    is_pos = cols[None, :] == pos[:, None]
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_GROUPS:
        grp_col = tl.load(col_grp_ptr + cols, mask=col_ok, other=0)
        valid = valid & ((grp_col[None, :] != grp_row[:, None]) | is_pos)
    return is_pos, valid


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
    row_out,  # (4, n_splits, b) fp32: max, sum, sum over negatives, positive logit | sigmoid: [_, loss sum]
    col_out,  # (3, row blocks per chunk, B) fp32: per row block [max, sum, sum_neg] of each column
    b, B, D, row_start, split_len, col_plane,
    stride_i0, stride_i1, stride_t0, stride_t1,
    HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, SIGMOID: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = row_start + pid_m * BM + tl.arange(0, BM)
    row_ok = rows < b
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    grp_row = pos
    if HAS_GROUPS:
        grp_row = tl.load(row_grp_ptr + rows, mask=row_ok, other=0)
    s = tl.load(scale_ptr).to(tl.float32)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(bias_ptr).to(tl.float32)

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    ln_i = tl.zeros((BM,), tl.float32)
    xp_i = tl.zeros((BM,), tl.float32)
    c_lo = pid_c * split_len
    c_hi = tl.minimum(c_lo + split_len, B)
    for n0 in range(c_lo, c_hi, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < c_hi
        acc = _logits_tile(
            I, T, rows, cols, row_ok, col_ok, D, stride_i0, stride_i1, stride_t0, stride_t1,
            BM, BN, BK, DOT_FP32, PRECISION,
        )  # fmt: skip
        x = acc * s + beta
        is_pos, valid = _tile_masks(rows, cols, row_ok, col_ok, pos, col_grp_ptr, grp_row, HAS_GROUPS)
        if SIGMOID:
            z = tl.where(is_pos, 1.0, -1.0)
            l_i += tl.sum(tl.where(valid, _softplus(-z * x), 0.0), axis=1)
        else:
            xm = tl.where(valid, x, float("-inf"))
            # Rows: online log-sum-exp; the -inf guard keeps an all-masked tile from making NaN.
            m_new = tl.maximum(m_i, tl.max(xm, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            e = tl.exp(xm - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(e, axis=1)
            ln_i = ln_i * alpha + tl.sum(tl.where(is_pos, 0.0, e), axis=1)
            m_i = m_new
            xp_i += tl.sum(tl.where(is_pos & valid, x, 0.0), axis=1)
            # Columns: this tile's statistics with their own max (a shared max would underflow).
            c_max = tl.max(xm, axis=0)
            c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
            ec = tl.exp(xm - c_safe[None, :])
            # The buffer's plane stride, not this launch's grid: the last row chunk may be shorter.
            col_ptr = col_out + pid_m * B + cols
            tl.store(col_ptr, c_max, mask=col_ok)
            tl.store(col_ptr + col_plane, tl.sum(ec, axis=0), mask=col_ok)
            tl.store(col_ptr + 2 * col_plane, tl.sum(tl.where(is_pos, 0.0, ec), axis=0), mask=col_ok)

    row_ptr = row_out + pid_c * b + rows
    plane = n_splits * b
    tl.store(row_ptr, m_i, mask=row_ok)
    tl.store(row_ptr + plane, l_i, mask=row_ok)
    tl.store(row_ptr + 2 * plane, ln_i, mask=row_ok)
    tl.store(row_ptr + 3 * plane, xp_i, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_logits_kernel(
    I, T, scale_ptr, bias_ptr, grad_ptr, pos_ptr, row_grp_ptr, col_grp_ptr,
    row_vecs,  # (4, b) fp32: lse, q = 1 - P_pos, row coefficient, t2i coefficient
    col_vecs,  # (4, B) fp32: lse, q, column coefficient, unique-positive flag
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
    cols = c0 + pid_n * BN + tl.arange(0, BN)
    row_ok = rows < r1
    col_ok = cols < c1
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    grp_row = pos
    if HAS_GROUPS:
        grp_row = tl.load(row_grp_ptr + rows, mask=row_ok, other=0)
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
    is_pos, valid = _tile_masks(rows, cols, row_ok, col_ok, pos, col_grp_ptr, grp_row, HAS_GROUPS)
    coef_r = tl.load(row_vecs + 2 * b + rows, mask=row_ok, other=0.0)
    if SIGMOID:
        z = tl.where(is_pos, 1.0, -1.0)
        ds = coef_r[:, None] * (-z) * _sigmoid(-z * x)
    else:
        lse_r = tl.load(row_vecs + rows, mask=row_ok, other=0.0)
        q_r = tl.load(row_vecs + b + rows, mask=row_ok, other=0.0)
        t2i_r = tl.load(row_vecs + 3 * b + rows, mask=row_ok, other=0.0)
        lse_c = tl.load(col_vecs + cols, mask=col_ok, other=0.0)
        q_c = tl.load(col_vecs + B + cols, mask=col_ok, other=0.0)
        coef_c = tl.load(col_vecs + 2 * B + cols, mask=col_ok, other=0.0)
        uniq_c = tl.load(col_vecs + 3 * B + cols, mask=col_ok, other=0.0)
        p_row = tl.exp(x - lse_r[:, None])
        p_col = tl.exp(x - lse_c[None, :])
        off = coef_r[:, None] * p_row + coef_c[None, :] * p_col
        # On the positive, 1 - P comes from the negatives' sum (exact when P -> 1).
        col_on = tl.where(
            uniq_c[None, :] > 0, -(coef_c * q_c)[None, :], coef_c[None, :] * p_col - t2i_r[:, None]
        )
        on = -(coef_r * q_r)[:, None] + col_on
        ds = tl.where(is_pos, on, off)
    ds = tl.where(valid, ds, 0.0) * g
    w_ptr = WS + (rows - r0).to(tl.int64)[:, None] * stride_w0 + (cols - c0)[None, :] * stride_w1
    tl.store(w_ptr, (ds * s).to(WS.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    # The scale and bias gradients are sums of terms of both signs that cancel; fp64 partials keep
    # the rounding below PyTorch's (one add per element, next to D multiply-adds on the tensor cores).
    tile = pid_m * tl.num_programs(1) + pid_n
    tl.store(partials + 2 * tile, tl.sum(tl.sum(ds.to(tl.float64) * acc.to(tl.float64), axis=1), axis=0))
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
    mask = m_ok[:, None] & n_ok[None, :]
    c_ptr = ACC + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    if LOAD_ACC:
        acc += tl.load(c_ptr, mask=mask, other=0.0)
    if STORE_OUT:
        o_ptr = OUT + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptr, acc, mask=mask)


# ----------------------------------------------------------------------------- autotuning (Hopper)

# Candidate tiles for H100/H200 (bf16 wgmma wants BM=128 and BK=64 with 3-4 stages); the tuner
# picks per D and dtype. BM of the forward is fixed because the column partials depend on it.
_FWD_CONFIGS = [
    triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
]
_GRAD_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
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
_GRAD_MIN_TILE = (64, 64)  # smallest (BM, BN) above: sizes the per-tile partials buffer


@functools.cache
def _tuned(name: str):
    if name == "forward":
        return triton.autotune(_FWD_CONFIGS, key=["D", "SIGMOID", "HAS_GROUPS"])(_forward_kernel)
    if name == "grad":
        return triton.autotune(_GRAD_CONFIGS, key=["D", "SIGMOID", "HAS_GROUPS"], reset_to_zero=["partials"])(
            _grad_logits_kernel
        )
    return triton.autotune(_GEMM_CONFIGS, key=["N", "LOAD_ACC", "STORE_OUT"], restore_value=["ACC"])(
        _gemm_kernel
    )


# ----------------------------------------------------------------------------- host launchers


def forward_stats(image, text, scale, bias, pos, row_groups, col_groups, sigmoid: bool) -> Stats:
    """Row statistics (3, b) and combined column statistics (3, B); see ``_chunked.Stats``."""
    b, D = image.shape
    B = text.shape[0]
    dev = image.device
    interp = _interpreting()
    BM = _INTERP_FWD["BM"] if interp else FWD_BM
    chunk_rows = BM * ROW_BLOCKS_PER_CHUNK
    n_rb = triton.cdiv(min(b, chunk_rows), BM)
    n_splits = max(1, min(triton.cdiv(_target_programs(dev), n_rb), triton.cdiv(B, SPLIT_ALIGN)))
    split_len = triton.cdiv(triton.cdiv(B, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    n_splits = triton.cdiv(B, split_len)
    dot_fp32, precision = _dot_mode(image.dtype, text.dtype)

    row_part = torch.empty(4, n_splits, b, dtype=torch.float32, device=dev)
    cols = torch.zeros(3, B, dtype=torch.float32, device=dev)
    cols[0] = float("-inf")
    col_part = torch.empty(3, n_rb, B, dtype=torch.float32, device=dev) if not sigmoid else cols
    bias_arg = bias if bias is not None else scale
    row_grp, col_grp = (row_groups, col_groups) if row_groups is not None else (pos, pos)
    for r0 in range(0, b, chunk_rows):
        grid = (triton.cdiv(min(chunk_rows, b - r0), BM), n_splits)
        args = (
            image, text, scale, bias_arg, pos, row_grp, col_grp, row_part, col_part,
            b, B, D, r0, split_len, n_rb * B,
            image.stride(0), image.stride(1), text.stride(0), text.stride(1),
        )  # fmt: skip
        flags = dict(HAS_BIAS=bias is not None, HAS_GROUPS=row_groups is not None, SIGMOID=sigmoid)
        flags.update(DOT_FP32=dot_fp32, PRECISION=precision, BM=BM)
        if interp:
            _forward_kernel[grid](*args, **flags, BN=_INTERP_FWD["BN"], BK=_INTERP_FWD["BK"])
        else:
            _tuned("forward")[grid](*args, **flags)
        if not sigmoid:
            cols = _chunked.combine_stats(cols, _chunked.reduce_stats(col_part[:, : grid[0]]))
    if sigmoid:
        rows = torch.zeros(3, b, dtype=torch.float32, device=dev)
        rows[0] = row_part[1].sum(0)
        return Stats(rows, torch.zeros_like(cols))
    row_stats = _chunked.reduce_stats(row_part[:3])
    lse, lse_neg = _chunked.stats_to_lse(row_stats)
    return Stats(torch.stack([lse, lse_neg, row_part[3].sum(0)]), cols)


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
    if _interpreting():
        meta = _INTERP_GEMM
        grid = (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
        _gemm_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)
        _tuned("gemm")[grid](*args, **flags)


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
    min_bm, min_bn = (_INTERP_FWD["BM"], _INTERP_FWD["BN"]) if interp else _GRAD_MIN_TILE
    tiles = triton.cdiv(rows_per, min_bm) * triton.cdiv(cols_per, min_bn)
    partials = torch.zeros(n_r, n_c, tiles, 2, dtype=torch.float64, device=dev)
    dot_fp32, precision = _dot_mode(image.dtype, text.dtype)
    flags = dict(HAS_BIAS=bias is not None, HAS_GROUPS=row_groups is not None, SIGMOID=sigmoid)
    flags.update(DOT_FP32=dot_fp32, PRECISION=precision)
    bias_arg = bias if bias is not None else scale
    row_grp, col_grp = (row_groups, col_groups) if row_groups is not None else (pos, pos)
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
            if interp:
                grid = (triton.cdiv(r1 - r0, _INTERP_FWD["BM"]), triton.cdiv(c1 - c0, _INTERP_FWD["BN"]))
                _grad_logits_kernel[grid](*args, **flags, **_INTERP_FWD)
            else:
                grid = lambda m, r=r1 - r0, c=c1 - c0: (triton.cdiv(r, m["BM"]), triton.cdiv(c, m["BN"]))
                _tuned("grad")[grid](*args, **flags)
            w = ws[: r1 - r0, : c1 - c0]
            acc_i = dI[r0:r1] if in_place_i else (dI_acc[: r1 - r0] if dI_acc is not None else None)
            _gemm(w, text[c0:c1], dI[r0:r1], acc_i, load_acc=ci > 0, store_out=ci == n_c - 1)
            acc_t = dT[c0:c1] if in_place_t else (dT_acc[c0:c1] if dT_acc is not None else None)
            _gemm(w.T, image[r0:r1], dT[c0:c1], acc_t, load_acc=ri > 0, store_out=ri == n_r - 1)
    sums = partials.reshape(-1, 2).sum(0)
    return dI, dT, sums[0], sums[1]
