"""One attention entry point for every attention call in llm2clip, with a backend selector.

Order when nothing is forced: flash-attn (FA2/FA3) if installed and the tensors are on CUDA in
fp16/bf16 -> xformers if installed (CUDA) -> torch SDPA (which itself picks flash / cuDNN /
memory-efficient kernels) -> math (explicit softmax in fp32, the readable reference). Override with
``backend=`` (a model config field) or the environment variable LLM2CLIP_ATTN_BACKEND; the choice is
logged once per (backend, reason).

Layouts (flash-attn's): padded q, k, v are (batch, seq, heads, head_dim), with an optional
``key_padding_mask`` (batch, seq) bool, True = a real token. Packed (variable-length) sequences
are (total_tokens, heads, head_dim) with ``cu_seqlens`` (n + 1,) int32 cumulative lengths and
``max_seqlen``; tokens only attend within their own sequence. Packing avoids computing on pad
tokens: flash-attn's (or xformers') varlen kernel where present; otherwise the sequences are
re-padded to the longest one with a key padding mask (pass max_seqlen to avoid reading it back).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("flash_attn", "xformers", "sdpa", "math")
ENV = "LLM2CLIP_ATTN_BACKEND"
log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run tensors of this device and dtype here, in preference order."""
    device = torch.device(device)
    names = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and _installed("flash_attn"):
        names.append("flash_attn")
    if device.type == "cuda" and _installed("xformers"):
        names.append("xformers")
    return names + ["sdpa", "math"]


def select_backend(backend: str | None, device, dtype) -> str:
    """backend argument > LLM2CLIP_ATTN_BACKEND > the first available; 'auto' means no preference."""
    choice, reason = backend, "argument"
    if choice in (None, "auto"):
        choice, reason = os.environ.get(ENV) or "auto", f"${ENV}"
    available = available_backends(device, dtype)
    if choice == "auto":
        choice, reason = available[0], "first available"
    elif choice not in BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r} (from {reason}); choose from {BACKENDS}")
    elif choice not in available:
        raise RuntimeError(
            f"attention backend {choice!r} (from {reason}) cannot run {torch.device(device).type} {dtype} "
            f"tensors here; available: {available}"
        )
    if (choice, reason) not in _logged and not torch.compiler.is_compiling():
        _logged.add((choice, reason))
        log.info("attention backend: %s (%s)", choice, reason)
    return choice


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """softmax(q k^T * scale [+ masks]) v, through the selected backend.

    Args:
        q, k, v: (batch, seq, heads, head_dim) padded, or (total, heads, head_dim) with cu_seqlens.
            k and v may have fewer heads than q (grouped-query attention).
        causal: mask future keys (decoder LLMs); False for vision towers and bidirectional LLMs.
        key_padding_mask: optional (batch, seq) bool, True for real tokens (padded layout only).
        cu_seqlens: (n + 1,) int32 cumulative sequence lengths of the packed layout.
        max_seqlen: the longest packed sequence (flash-attn needs it; computed if None).
        scale: softmax scale, default 1/sqrt(head_dim).
    Returns:
        the output in q's layout and dtype.
    """
    packed = cu_seqlens is not None
    if packed and key_padding_mask is not None:
        raise ValueError("packed sequences (cu_seqlens) take no key_padding_mask: they have no padding")
    if q.dim() != (3 if packed else 4):
        want = "(total, heads, head_dim) with cu_seqlens" if packed else "(batch, seq, heads, head_dim)"
        raise ValueError(f"q must be {want}, got shape {tuple(q.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = select_backend(backend, q.device, q.dtype)
    if packed:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if name == "flash_attn":
        return _flash(q, k, v, causal, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p)
    if name == "xformers":
        return _xformers(q, k, v, causal, key_padding_mask, cu_seqlens, scale, dropout_p)
    if packed:
        # No varlen kernel here: re-pad to (n, max_seqlen) with a key padding mask. Cost grows with
        # n * max_seqlen^2, not total^2 as a block-diagonal mask over all tokens would.
        index, keep = repad_index(cu_seqlens, q.shape[0], max_seqlen)
        qp, kp, vp = (pad_packed(x, index, keep.shape) for x in (q, k, v))
        out = _padded(name, qp, kp, vp, causal, keep[:, None, None, :], scale, dropout_p)
        return unpad_packed(out, index)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :].to(torch.bool)
    return _padded(name, q, k, v, causal, mask, scale, dropout_p)


def pad_packed(x: Tensor, index: Tensor, shape: tuple[int, int]) -> Tensor:
    """(total, ...) packed tokens -> (n, max_seqlen, ...) zero-padded, with index from repad_index."""
    n, max_seqlen = shape
    padded = x.new_zeros(n * max_seqlen, *x.shape[1:]).index_copy(0, index, x)
    return padded.view(n, max_seqlen, *x.shape[1:])


def unpad_packed(x: Tensor, index: Tensor) -> Tensor:
    """(n, max_seqlen, ...) -> the (total, ...) packed tokens: the inverse of pad_packed."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[index]


def _repeat_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    if k.shape[-2] == heads:
        return k, v
    rep = heads // k.shape[-2]
    return k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)


def repad_index(cu_seqlens: Tensor, total: int, max_seqlen: int) -> tuple[Tensor, Tensor]:
    """Packed token -> its row in an (n * max_seqlen) padded layout; that layout's (n, max_seqlen) mask."""
    n = cu_seqlens.numel() - 1
    tok = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True)
    index = seq * max_seqlen + (tok - cu_seqlens.long()[seq])
    mask = torch.zeros(n * max_seqlen, dtype=torch.bool, device=cu_seqlens.device)
    mask[index] = True
    return index, mask.view(n, max_seqlen)


def _padded(name, q, k, v, causal, mask, scale, dropout_p):
    """SDPA or math on (batch, seq, heads, head_dim); mask broadcastable to (batch, heads, Lq, Lk)."""
    k, v = _repeat_kv(k, v, q.shape[-2])
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if name == "sdpa":
        if causal and mask is not None:
            lq, lk = q.shape[1], k.shape[1]
            mask = mask & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            causal = False
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
        return out.transpose(1, 2)
    return _math(qt, kt, vt, causal, mask, scale, dropout_p).transpose(1, 2)


def _math(q, k, v, causal, mask, scale, dropout_p):
    """The reference: explicit scores and softmax in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    lq, lk = scores.shape[-2:]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril(lk - lq)
    if mask is not None:
        allowed = allowed & mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked rows (padding queries) -> 0
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return (probs @ v.to(acc)).to(q.dtype)


def _flash(q, k, v, causal, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p):  # pragma: no cover
    import flash_attn

    if cu_seqlens is not None:
        return flash_attn.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p=dropout_p, softmax_scale=scale, causal=causal,
        )  # fmt: skip
    if key_padding_mask is None:
        return flash_attn.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
    # Padded with a mask: unpad into the varlen layout, run, and pad back.
    b, s = key_padding_mask.shape
    keep = key_padding_mask.reshape(-1).nonzero().squeeze(1)
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn.flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:])[keep], k.reshape(b * s, *k.shape[2:])[keep],
        v.reshape(b * s, *v.shape[2:])[keep], cu, cu, int(lengths.max()), int(lengths.max()),
        dropout_p=dropout_p, softmax_scale=scale, causal=causal,
    )  # fmt: skip
    full = q.new_zeros(b * s, *q.shape[2:])
    full[keep] = out
    return full.reshape(q.shape)


def _xformers(q, k, v, causal, key_padding_mask, cu_seqlens, scale, dropout_p):  # pragma: no cover
    from xformers.ops import fmha

    k, v = _repeat_kv(k, v, q.shape[-2])
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        bias = fmha.BlockDiagonalMask.from_seqlens(lengths)
        if causal:
            bias = bias.make_causal()
        return fmha.memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=bias, p=dropout_p, scale=scale
        )[0]
    bias = None
    if key_padding_mask is not None:
        b, s = key_padding_mask.shape
        additive = torch.zeros(b, q.shape[2], q.shape[1], s, dtype=q.dtype, device=q.device)
        additive.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        if causal:
            additive.masked_fill_(
                ~torch.ones(q.shape[1], s, dtype=torch.bool, device=q.device).tril(), float("-inf")
            )
        bias = additive
    elif causal:
        bias = fmha.LowerTriangularMask()
    return fmha.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p, scale=scale)
