"""Optimizer, learning-rate schedule and gradient clipping shared by the trainers.

groups = param_groups(model, lr=1e-5, adapter_lr=1e-4, weight_decay=0.05, layer_decay=0.85)
opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6)
sched = lr_schedule(opt, warmup=100, total=10_000, decay="cosine")
norm = clip_grads(params, max_norm=5.0, dist=dist)      # global norm, DTensor-aware
"""

from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from llm2clip.distributed import DistInfo

__all__ = ["DECAYS", "clip_grads", "is_dtensor", "lr_factor", "lr_schedule", "param_groups"]

DECAYS = ("cosine", "linear", "constant")

# No weight decay on these (besides every 1-d tensor): embeddings, the logit scale and bias.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "positional_embedding", "probe", "logit_scale", "logit_bias")


def lr_factor(step: int, warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over `warmup`
    steps (step 0 already gets 1/warmup), then cosine / linear decay to `min_ratio` at `total`."""
    if decay not in DECAYS:
        raise ValueError(f"decay {decay!r} not in {DECAYS}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def lr_schedule(optimizer, warmup: int, total: int, decay: str = "cosine", min_ratio: float = 0.0):
    """A LambdaLR over :func:`lr_factor`; its state_dict (the step count) checkpoints and resumes."""
    if decay not in DECAYS:
        raise ValueError(f"decay {decay!r} not in {DECAYS}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, total, decay, min_ratio)
    )


def param_groups(
    model: nn.Module, *, lr: float, adapter_lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW groups of a ClipModel: (lr, weight decay) per parameter.

    Layer-wise decay: a vision parameter at depth d gets lr * layer_decay ** (top - d)
    (``tower.layer_id``); the projection, logit scale and bias get lr, the adapter adapter_lr.
    No weight decay on 1-d tensors and embeddings.
    """
    tower = model.visual
    layer_id = getattr(tower, "layer_id", None)
    names = [n for n, p in tower.named_parameters() if p.requires_grad]
    top = max((layer_id(n) for n in names), default=0) if layer_id else 0
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("visual.") and layer_id is not None:
            group_lr = lr * layer_decay ** (top - layer_id(name.removeprefix("visual.")))
        elif name.startswith("adapter."):
            group_lr = adapter_lr
        else:
            group_lr = lr
        wd = 0.0 if p.ndim < 2 or any(k in name for k in _NO_DECAY_NAMES) else weight_decay
        groups.setdefault((group_lr, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in sorted(groups.items())]


def is_dtensor(t: Tensor) -> bool:
    """A parameter or gradient sharded by FSDP2 (a DTensor)."""
    return hasattr(t, "full_tensor")


def clip_grads(params: list[Tensor], max_norm: float, dist: DistInfo) -> Tensor:
    """Global gradient norm (clipped to max_norm when > 0) over plain and sharded (DTensor)
    gradients: the shards' squared norms are summed across ranks, replicated ones counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_dtensor(g) for g in grads):
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm(grads)
    dev = grads[0].device
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    replicated = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if is_dtensor(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    torch_dist.all_reduce(sharded)
    norm = (sharded + replicated).sqrt().float()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if is_dtensor(g) else g).mul_(coef.to(g.dtype))
    return norm
