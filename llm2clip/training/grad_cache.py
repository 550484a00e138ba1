"""One contrastive training step whose batch is decoupled from activation memory (gradient cache).

A contrastive loss couples every pair of the batch, so it cannot be split into independent
micro-batches; but its inputs are only the features. Gao et al.'s gradient cache (GradCache,
arXiv 2101.06983) therefore runs the step in three passes:

1. encode the batch chunk by chunk **without autograd state**, keeping only the (n, D) features;
2. compute the loss over the whole batch (here: the fused loss over the global batch, every rank's
   texts included) on detached leaf copies of the features, and its gradients with respect to the
   features, the logit scale and the bias: cheap, O(n * D) memory with the fused loss;
3. re-encode each chunk **with** autograd and backpropagate its slice of the feature gradient
   (``torch.autograd.backward(features, grads)``); parameter gradients accumulate over chunks.

The parameter gradients equal those of one big batch exactly, up to floating-point summation
order, provided the encoders are per-sample functions. Two things make that true here:

* dropout / drop-path draw the same random numbers in both passes: each chunk's CPU and CUDA RNG
  states are recorded before pass 1 and restored before its pass-3 re-encode;
* BatchNorm in training mode would update its running statistics twice and normalise by chunk
  statistics: running stats are restored after pass 1 (so each chunk updates them once, as in
  micro-batching), but batch statistics stay per chunk (documented difference; LayerNorm towers,
  i.e. every ViT, are exact).

Peak activation memory is that of one chunk; the extra cost is one more forward (4 instead of 3
forward-equivalents per sample). ``chunk_size=0`` (or >= the batch) is the plain single-pass step.

Gradient synchronisation: the re-encodes call the (DDP- or FSDP-wrapped) model itself, so the
wrapper's hooks see every backward. ``sync(enabled)`` returns a context manager that turns the
cross-rank gradient reduction off for all but the last chunk (DDP ``no_sync``, FSDP2
``set_requires_gradient_sync``); see :func:`grad_sync_context`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["contrastive_backward", "grad_sync_context", "num_chunks"]

LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def num_chunks(n: int, chunk_size: int) -> int:
    return 1 if chunk_size <= 0 or chunk_size >= n else -(-n // chunk_size)


def grad_sync_context(model: nn.Module) -> Callable[[bool], contextlib.AbstractContextManager]:
    """sync(enabled) -> context manager: gradient all-reduce on (True) or deferred (False).

    DistributedDataParallel: ``no_sync()``; FSDP2 (``fully_shard``, on the model or any of its
    submodules): ``set_requires_gradient_sync`` on each;
    anything else: a no-op (single process, or gradients averaged by the caller).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return lambda enabled: contextlib.nullcontext() if enabled else model.no_sync()
    sharded = [m for m in model.modules() if hasattr(m, "set_requires_gradient_sync")]
    if sharded:  # FSDP2 modules anywhere in the tree (the root may be a plain module)

        @contextlib.contextmanager
        def fsdp_sync(enabled: bool) -> Iterator[None]:
            for m in sharded:
                m.set_requires_gradient_sync(enabled, recurse=False)
            try:
                yield
            finally:
                for m in sharded:
                    m.set_requires_gradient_sync(True, recurse=False)

        return fsdp_sync
    return lambda enabled: contextlib.nullcontext()


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _norm_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, saved copy) of every BatchNorm running statistic that a training forward updates."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    saved.append((b, b.detach().clone()))
    return saved


def _encode_without_grad(model, run, bounds, autocast, device):
    """Pass 1: every chunk's features without autograd state; the RNG state before each chunk is
    recorded and BatchNorm running statistics are restored afterwards."""
    states, img_parts, txt_parts = [], [], []
    saved = _norm_buffers(model)
    with torch.no_grad():
        for a, b in bounds:
            states.append(_rng_state(device))
            with autocast:
                fi, ft, scale, bias = run(a, b)
            img_parts.append(fi)
            txt_parts.append(ft)
        for buf, copy in saved:
            buf.copy_(copy)
    return states, (torch.cat(img_parts), torch.cat(txt_parts), scale, bias)


def _feature_grads(loss_fn, img, txt, scale, bias, autocast):
    """Pass 2: the loss over the whole batch and its gradients w.r.t. the features and scalars."""
    img = img.requires_grad_(True)
    txt = txt.requires_grad_(True)
    leaf_scale = scale.detach().requires_grad_(True)
    leaf_bias = bias.detach().requires_grad_(True) if bias is not None else None
    with autocast:
        loss = loss_fn(img, txt, leaf_scale, leaf_bias)
    loss.backward()
    return loss, (img.grad, txt.grad, leaf_scale.grad, leaf_bias.grad if leaf_bias is not None else None)


def _reencode_and_backward(run, bounds, states, grads, autocast, sync, device) -> None:
    """Pass 3: re-encode each chunk with autograd (its RNG replayed) and backpropagate its slice of
    the gradients. The scalars' gradients go through the first chunk's outputs (zero through the
    others, so that every parameter takes part in every backward, as DDP expects)."""
    g_img, g_txt, g_scale, g_bias = grads
    k = len(bounds)
    for c, (a, b) in enumerate(bounds):
        _set_rng_state(states[c], device)
        with sync(c == k - 1):
            with autocast:
                fi, ft, scale, bias = run(a, b)
            outs, grads_c = [fi, ft, scale], [g_img[a:b], g_txt[a:b]]
            grads_c.append(g_scale if c == 0 else torch.zeros_like(g_scale))
            if bias is not None:
                outs.append(bias)
                grads_c.append(g_bias if c == 0 else torch.zeros_like(g_bias))
            torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_c)])


def contrastive_backward(
    model: nn.Module,
    images: Tensor,
    text_embeddings: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
    sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    image_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Forward + backward of one contrastive step; parameter gradients accumulate into ``.grad``.

    Args:
        model: ``model(images, text_embeddings) -> (image_feats (n, D), text_feats (n, D),
            logit_scale (0-d, the multiplier), logit_bias (0-d) or None)``: a ClipModel, or one
            wrapped by DDP / FSDP2.
        images: (n, 3, H, W) images: normalised, on the model's device, unless image_fn prepares them.
        text_embeddings: (n, d_llm) cached LLM embeddings, row i the caption of image i.
        loss_fn: (image_feats, text_feats, scale, bias) -> () loss (the distributed losses take
            every rank's batch into account; this function only sees the local one).
        chunk_size: images per chunk of the gradient cache; 0 (or >= n): one pass with autograd.
        autocast: context for the forwards (bf16 autocast on CUDA); None: none.
        sync: ``sync(enabled)`` context, see :func:`grad_sync_context`; None: no-op.
        image_fn: applied to each chunk of ``images`` before the model (e.g. host uint8 -> device,
            normalised): the batch may then stay in (pinned) host memory, only a chunk at a time
            on the device. None: images are used as given.

    Returns:
        (the loss, detached; {"chunks": k}).
    """
    n = images.shape[0]
    if text_embeddings.shape[0] != n:
        raise ValueError(f"{n} images but {text_embeddings.shape[0]} text embeddings")
    autocast = autocast if autocast is not None else contextlib.nullcontext()
    image_fn = image_fn if image_fn is not None else (lambda x: x)
    sync = sync if sync is not None else (lambda enabled: contextlib.nullcontext())
    k = num_chunks(n, chunk_size)
    if k == 1:
        with sync(True):
            with autocast:
                feats = model(image_fn(images), text_embeddings)
                loss = loss_fn(*feats)
            loss.backward()
        return loss.detach(), {"chunks": 1}

    bounds = [(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)]
    device = text_embeddings.device
    run = lambda a, b: model(image_fn(images[a:b]), text_embeddings[a:b])  # noqa: E731
    states, (img, txt, scale, bias) = _encode_without_grad(model, run, bounds, autocast, device)
    after_pass1 = _rng_state(device)
    loss, grads = _feature_grads(loss_fn, img, txt, scale, bias, autocast)
    del img, txt
    _reencode_and_backward(run, bounds, states, grads, autocast, sync, device)
    _set_rng_state(after_pass1, device)
    return loss.detach(), {"chunks": k}
