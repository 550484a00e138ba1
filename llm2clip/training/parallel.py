"""Data parallelism for the stage-2 model: DDP, or FSDP2 with the root's scalars replicated.

model = wrap_model(clip_model, fsdp=False, dist=dist)     # DDP when world > 1
average_replicated_grads(params, dist)                     # FSDP2 only, after the backward
weights, optim_state = full_state(model, optimizer)        # unsharded, on the CPU
"""

from __future__ import annotations

from torch import Tensor, nn

from llm2clip.distributed import DistInfo, all_reduce_grads
from llm2clip.training.optim import is_dtensor

__all__ = ["average_replicated_grads", "full_state", "scalar_value", "wrap_model"]


def wrap_model(model: nn.Module, fsdp: bool, dist: DistInfo) -> nn.Module:
    """DDP (several ranks), FSDP2 (`fsdp`), or the model itself (one rank).

    FSDP2 shards each ViT block, the vision tower and the adapter. The root's own parameters (the
    visual projection, the 0-d logit scale and bias, which fully_shard refuses) stay replicated:
    their gradients are averaged by :func:`average_replicated_grads` after the backward.
    """
    if not dist.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        for block in getattr(model.visual, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model.visual, mesh=mesh)
        fully_shard(model.adapter, mesh=mesh)
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_replicated_grads(params: list[Tensor], dist: DistInfo) -> None:
    """FSDP2: average the gradients of the parameters that are not sharded (one flat all-reduce)."""
    if dist.distributed:
        all_reduce_grads([p for p in params if not is_dtensor(p)], dist.world_size)


def full_state(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts with plain parameter names (the
    optimizer's is None when no optimizer is given). Every rank must call it (FSDP2 gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def scalar_value(p: Tensor) -> Tensor:
    """A 0-d parameter's value (FSDP2 holds it as a DTensor)."""
    p = p.detach()
    return p.full_tensor() if is_dtensor(p) else p
