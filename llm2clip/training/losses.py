"""The stage-2 loss functions: the fused kernels, or a plain open_clip-style loss to compare against.

    loss_fn = make_loss("infonce", fused=True)       # llm2clip_kernels.distributed_infonce_loss
    loss = loss_fn(image_feats, text_feats, logit_scale, logit_bias)

Both kinds see one rank's (b_r, D) features and take every rank's batch into account; both follow
open_clip's DDP convention (per-rank loss = the mean over the rank's own pairs; gradients after
DDP's averaging equal those of the global loss, logit scale included), so a run with
``--fused-loss`` and one without give the same loss curve up to floating-point error.

The plain loss is open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` /
``SigLipLoss`` written out: all-gather the features with gradient
(``torch.distributed.nn.functional.all_gather``), materialise the (b_r, B) logits and use
``F.cross_entropy`` / ``F.logsigmoid``. It costs O(b_r * B) memory; that is what the fused loss
removes. Ranks may hold different batch sizes (dropped samples): the plain loss pads the gather to
the largest and drops the padding again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("infonce", "sigmoid")
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]

__all__ = ["LOSSES", "gather_with_grad", "make_loss", "plain_infonce_loss", "plain_sigmoid_loss"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of x, concatenated in rank order (gradients flow back to their owner),
    and the offset of this rank's rows. Uneven row counts are padded for the collective."""
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = max(sizes) - x.shape[0]
    padded = F.pad(x, (0, 0, 0, pad)) if pad else x
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


def _up(x: Tensor) -> Tensor:
    """fp32 at least (bf16 features are compared in fp32, as open_clip's autocast logits are)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def plain_infonce_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE as open_clip computes it with local_loss=True, gather_with_grad=True."""
    if bias is not None:
        raise ValueError("the InfoNCE loss takes no logit bias")
    all_image, offset = gather_with_grad(image)
    all_text, _ = gather_with_grad(text)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_per_image = scale * _up(image) @ _up(all_text).T
    logits_per_text = scale * _up(text) @ _up(all_image).T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def plain_sigmoid_loss(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's images against every rank's texts, summed over
    texts and divided by the local batch size (open_clip's SigLipLoss)."""
    if bias is None:
        raise ValueError("the sigmoid loss needs a logit bias")
    all_text, offset = gather_with_grad(text)
    b = image.shape[0]
    logits = scale * _up(image) @ _up(all_text).T + bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(b, device=image.device), torch.arange(b, device=image.device) + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b


def make_loss(loss: str, fused: bool, backend: str = "auto") -> LossFn:
    """(image_feats, text_feats, scale, bias) -> this rank's loss; see the module docstring."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} not in {LOSSES}")
    if not fused:
        return plain_infonce_loss if loss == "infonce" else plain_sigmoid_loss
    from llm2clip_kernels import distributed_infonce_loss, distributed_sigmoid_loss

    if loss == "infonce":

        def fused_infonce(image, text, scale, bias=None):
            if bias is not None:
                raise ValueError("the InfoNCE loss takes no logit bias")
            return distributed_infonce_loss(image, text, scale, backend=backend)

        return fused_infonce

    def fused_sigmoid(image, text, scale, bias):
        if bias is None:
            raise ValueError("the sigmoid loss needs a logit bias")
        return distributed_sigmoid_loss(image, text, scale, bias, backend=backend)

    return fused_sigmoid
