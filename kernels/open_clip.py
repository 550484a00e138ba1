"""open_clip's loss interface on the fused kernels: ``ClipLoss``, ``SigLipLoss``, ``patch_open_clip``.

Drop-ins for ``open_clip.loss.ClipLoss`` / ``SigLipLoss``: the same constructor arguments and the
same ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
(``output_dict=True`` returns ``{"contrastive_loss": loss}``). open_clip's ``logit_scale`` is
already the multiplier (``logit_scale.exp()``).

    import llm2clip_kernels.open_clip as oc
    oc.patch_open_clip()              # open_clip.create_loss and open_clip_train.main.create_loss
    open_clip_train.main.main(argv)   # trains with the fused kernels

Every mode open_clip has is reproduced -- the loss value each rank returns and the gradients
after DDP's averaging, to floating-point rounding -- or refused when the loss is built:

=========================================================  =============================================
open_clip mode (world size W > 1)                           here
=========================================================  =============================================
``ClipLoss()`` (the default: global loss, gathered          ``distributed_infonce_loss(mean_over="global")``
features without gradient except the rank's own)            with the features' gradients scaled by 1/W;
                                                            returns the global loss on every rank
``ClipLoss(gather_with_grad=True)``                         ``mean_over="global"``; the global loss
``ClipLoss(local_loss=True, gather_with_grad=True)``        ``mean_over="local"``; this rank's loss
``ClipLoss(local_loss=True)`` (no gradient through the      refused: each feature gets only part of its
gathered features)                                          gradient, which the kernels do not compute
``SigLipLoss(dist_impl=any)``                               ``distributed_sigmoid_loss`` (the four
                                                            implementations are the same loss)
``use_horovod=True``                                        refused (torch.distributed only)
``CoCaLoss``, ``DistillClipLoss`` (``create_loss``)          refused by the patched ``create_loss``
=========================================================  =============================================

Why the default mode scales the features' gradients: open_clip computes the global loss L on every
rank, and each rank's features get dL/dfeatures once (the gathered copies carry no gradient), so
after DDP divides by W the model's gradient is (1/W) dL/dtheta while the logit scale's is dL/ds.
The fused loss gives each rank W dL/dfeatures (every rank's share, as an all_gather with gradient
does), hence the 1/W. ``cache_labels`` changes nothing here (no labels are built).

``report_global_loss=True`` returns the mean of the ranks' losses (one extra all-reduce of a
scalar) in the modes that return a per-rank loss (local loss, SigLIP), for logging; the gradients
are unchanged. The modes that return open_clip's global loss already do.

Precision: with bf16 autocast open_clip's logits are bf16 (its loss is then ~1e-3 off the fp64
loss of the same features); the fused kernels accumulate in fp32 (within ~1e-6), so the two loss
curves differ by ~1e-3 (the kernels' is the accurate one); in fp32 they agree to rounding.

This module imports without open_clip installed; only ``patch_open_clip`` imports it. The rest of
``llm2clip_kernels`` never imports open_clip.
"""

from __future__ import annotations

import numbers
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .contrastive_loss import infonce_loss, sigmoid_loss
from .distributed_loss import distributed_infonce_loss, distributed_sigmoid_loss

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

__all__ = ["SIGLIP_DIST_IMPLS", "ClipLoss", "SigLipLoss", "create_loss", "patch_open_clip"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _global_value(loss: Tensor, world: int) -> Tensor:
    """The mean of the ranks' losses as the value, this rank's loss as the gradient."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss + (total / world - loss).detach()


class _OpenClipLoss(nn.Module):
    """What ClipLoss and SigLipLoss share: rank / world checks, the output format."""

    def __init__(self, rank, world_size, backend, report_global_loss):
        super().__init__()
        for name, value in (("rank", rank), ("world_size", world_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.backend, self.report_global_loss = backend, bool(report_global_loss)
        if dist.is_available() and dist.is_initialized():
            self._check_world()

    def _check_world(self) -> None:
        """world_size > 1 must be torch.distributed's default group, with this rank's rank."""
        if self.world_size == 1:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"world_size={self.world_size} but torch.distributed is not initialised "
                f"(init_process_group first; horovod is not supported)"
            )
        actual = (dist.get_rank(), dist.get_world_size())
        if actual != (self.rank, self.world_size):
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} given, but torch.distributed's default "
                f"group has rank {actual[0]} of {actual[1]}"
            )

    def _output(self, loss: Tensor, output_dict: bool, value_is_global: bool):
        if self.world_size > 1 and self.report_global_loss and not value_is_global:
            loss = _global_value(loss, self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(_OpenClipLoss):
    """open_clip's ``ClipLoss`` (symmetric InfoNCE) on the fused kernels; see the module docstring.

    Args (open_clip's): local_loss, gather_with_grad, cache_labels, rank, world_size,
    use_horovod. Keyword-only (ours): backend ('auto', 'triton', 'torch'), report_global_loss.
    ``local_loss=True`` without ``gather_with_grad`` and ``use_horovod=True`` are refused.
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        *,
        backend="auto",
        report_global_loss=False,
    ):
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: the fused losses run on torch.distributed")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError(
                "ClipLoss(local_loss=True, gather_with_grad=False) is not reproduced: open_clip then gives "
                "each rank's features only the gradient of its own rows and columns (the gathered copies "
                "carry none). Use local_loss=True, gather_with_grad=True (--local-loss "
                "--gather-with-grad: the same loss, full gradients), or open_clip's own ClipLoss"
            )
        super().__init__(rank, world_size, backend, report_global_loss)
        self.local_loss, self.gather_with_grad = bool(local_loss), bool(gather_with_grad)
        self.cache_labels = cache_labels

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """(b, D) features of this rank, logit_scale the multiplier -> the loss open_clip returns."""
        if self.world_size == 1:
            loss = infonce_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
            return self._output(loss, output_dict, value_is_global=True)
        self._check_world()
        if self.local_loss:
            loss = distributed_infonce_loss(
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                mean_over="local",
                backend=self.backend,
            )
            return self._output(loss, output_dict, value_is_global=False)
        if not self.gather_with_grad:
            factor = 1.0 / self.world_size
            image_features = _ScaleGrad.apply(image_features, factor)
            text_features = _ScaleGrad.apply(text_features, factor)
        loss = distributed_infonce_loss(
            image_features, text_features, logit_scale, logit_bias, mean_over="global", backend=self.backend
        )
        # open_clip returns the global loss on every rank.
        return self._output(_global_value(loss, self.world_size), output_dict, value_is_global=True)


class SigLipLoss(_OpenClipLoss):
    """open_clip's ``SigLipLoss`` on the fused kernels (every ``dist_impl`` is the same loss).

    Args (open_clip's): cache_labels, rank, world_size, dist_impl (None, 'bidir', 'shift',
    'reduce', 'gather'). Keyword-only (ours): backend, report_global_loss.
    """

    def __init__(
        self,
        cache_labels=False,
        rank=0,
        world_size=1,
        dist_impl=None,
        *,
        backend="auto",
        report_global_loss=False,
    ):
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        super().__init__(rank, world_size, backend, report_global_loss)
        self.cache_labels, self.dist_impl = cache_labels, dist_impl

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """(b, D) features of this rank -> this rank's loss (its images against every rank's texts)."""
        if self.world_size == 1:
            loss = sigmoid_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
            return self._output(loss, output_dict, value_is_global=True)
        self._check_world()
        loss = distributed_sigmoid_loss(
            image_features, text_features, logit_scale, logit_bias, mean_over="local", backend=self.backend
        )
        return self._output(loss, output_dict, value_is_global=False)


def create_loss(args, *, backend: str = "auto", report_global_loss: bool = False) -> nn.Module:
    """open_clip's ``create_loss(args)`` with the fused losses; CoCa and distillation are refused."""
    if getattr(args, "distill", False):
        raise ValueError(
            "distillation (open_clip's DistillClipLoss) is not supported by llm2clip_kernels.open_clip: "
            "train without patch_open_clip()"
        )
    if "coca" in str(getattr(args, "model", "")).lower():
        raise ValueError(
            f"CoCa models ({args.model}: open_clip's CoCaLoss) are not supported by "
            f"llm2clip_kernels.open_clip: train without patch_open_clip()"
        )
    ours = dict(backend=backend, report_global_loss=report_global_loss)
    if getattr(args, "siglip", False):
        if getattr(args, "horovod", False):
            raise ValueError("horovod is not supported: the fused losses run on torch.distributed")
        dist_impl = getattr(args, "loss_dist_impl", None)
        return SigLipLoss(rank=args.rank, world_size=args.world_size, dist_impl=dist_impl, **ours)
    return ClipLoss(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=getattr(args, "horovod", False),
        **ours,
    )


def patch_open_clip(*, backend: str = "auto", report_global_loss: bool = False):
    """Make ``open_clip.create_loss`` (and ``open_clip.factory``'s) and, when it is importable,
    ``open_clip_train.main.create_loss`` build the fused losses. Both modules copy the name at
    import, so replacing ``open_clip.loss.ClipLoss`` alone would change nothing. Idempotent;
    returns a function that restores the originals."""
    try:
        import open_clip
        import open_clip.factory
    except ImportError as e:
        raise ImportError("patch_open_clip() needs open_clip (pip install open-clip-torch)") from e
    try:
        import open_clip_train.main  # noqa: F401 (imported so that its copy of the name is patched)
    except ImportError:
        pass  # not installed (or its training deps are not): a later import copies the patched name

    def fused_create_loss(args):
        return create_loss(args, backend=backend, report_global_loss=report_global_loss)

    fused_create_loss.llm2clip_fused = True
    targets = [open_clip, open_clip.factory, sys.modules.get("open_clip_train.main")]
    saved = [(m, m.create_loss) for m in targets if m is not None and hasattr(m, "create_loss")]
    for module, _ in saved:
        module.create_loss = fused_create_loss

    def restore():
        for module, original in saved:
            if getattr(original, "llm2clip_fused", False):
                continue  # patched twice: the first patch's restore brings back open_clip's own
            module.create_loss = original

    return restore
