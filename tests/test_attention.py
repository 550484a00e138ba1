"""Every attention backend available here against the fp32 math reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from llm2clip.models.attention import BACKENDS, attention, available_backends, select_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _inputs(shape, kv_heads=None):
    *lead, heads, dim = shape
    kv_shape = (*lead, kv_heads or heads, dim)
    q = torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(kv_shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(kv_shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
    return q, k, v


def _run(backend, q, k, v, **kw):
    out = attention(q, k, v, backend=backend, **kw)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return [out, *grads]


def _close(a, b):
    tol = dict(rtol=2e-2, atol=2e-2) if DTYPE != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.parametrize("backend", available_backends(DEVICE, DTYPE))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_padded_with_mask(backend, causal, kv_heads):
    q, k, v = _inputs((3, 13, 4, 16), kv_heads)
    mask = torch.ones(3, 13, dtype=torch.bool, device=DEVICE)
    mask[1, 9:] = False
    mask[2, 4:] = False
    for kw in (dict(causal=causal), dict(causal=causal, key_padding_mask=mask)):
        _close(_run(backend, q, k, v, **kw), _run("math", q, k, v, **kw))


@pytest.mark.parametrize("backend", available_backends(DEVICE, DTYPE))
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_padded(backend, causal):
    """Packed sequences (cu_seqlens) give each sequence exactly its padded result."""
    lengths = [5, 1, 9, 3]
    q, k, v = _inputs((sum(lengths), 4, 8))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    packed = attention(q, k, v, cu_seqlens=cu, causal=causal, backend=backend)
    for i in range(len(lengths)):
        s = slice(int(cu[i]), int(cu[i + 1]))
        alone = attention(q[s][None], k[s][None], v[s][None], causal=causal, backend="math")[0]
        torch.testing.assert_close(packed[s].float(), alone.float(), rtol=2e-2, atol=2e-2)
    _close(
        _run(backend, q, k, v, cu_seqlens=cu, causal=causal),
        _run("math", q, k, v, cu_seqlens=cu, causal=causal),
    )


def test_selection_and_errors(monkeypatch):
    assert select_backend(None, "cpu", torch.float32) == "sdpa"
    monkeypatch.setenv("LLM2CLIP_ATTN_BACKEND", "math")
    assert select_backend(None, "cpu", torch.float32) == "math"
    assert select_backend("sdpa", "cpu", torch.float32) == "sdpa"  # the argument wins
    monkeypatch.setenv("LLM2CLIP_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown attention backend 'nonsense'"):
        select_backend(None, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match="cannot run cpu"):
        select_backend("flash_attn", "cpu", torch.float32)
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="must be"):
        attention(q, q, q)
    assert set(BACKENDS) >= set(available_backends("cpu"))
