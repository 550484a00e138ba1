"""Where this process sits among torchrun's ranks, and the few collectives the applications share.

    with distributed_session("auto") as dist:        # reads RANK / WORLD_SIZE / LOCAL_RANK
        print0(dist, "hello")                        # rank 0 only
        sizes = gather_object(len(batch), dist)      # a list, one entry per rank

A single process (no torchrun) is world size 1: every helper then works without a process group.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = [
    "DEVICES",
    "DistInfo",
    "all_reduce_grads",
    "all_reduce_mean",
    "broadcast_object",
    "distributed_session",
    "gather_object",
    "init_distributed",
    "print0",
    "release_process_groups",
]

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    """Rank / world size (1 without torchrun) and this process's device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _device(device: str, local_rank: int) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Read torchrun's environment, pick the device (auto: cuda:LOCAL_RANK when CUDA is available,
    else cpu) and init the process group when WORLD_SIZE > 1 (backend None: nccl on CUDA, gloo on
    the CPU)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    if world > 1 and not torch_dist.is_initialized():
        # torch.distributed.nn.functional binds group.WORLD as its functions' default `group` when
        # first imported: imported after the init (FSDP2 does, lazily) it would hold the group for
        # the life of the process. Imported now, the defaults are None (see release_process_groups).
        import torch.distributed.nn.functional  # noqa: F401

        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        torch_dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


@contextlib.contextmanager
def distributed_session(
    device: str = "auto", backend: str | None = None, timeout_s: float = 1800
) -> Iterator[DistInfo]:
    """init_distributed(), and on the way out destroy the process group this call created. On a
    clean exit every rank passes a barrier first: gloo aborts a process whose peer tears its
    connections down while it is still in a collective. The groups are then released
    (:func:`release_process_groups`) so that none outlives the interpreter."""
    existed = torch_dist.is_available() and torch_dist.is_initialized()
    dist = init_distributed(device, backend, timeout_s)
    owner = dist.distributed and not existed
    try:
        yield dist
        if owner:
            torch_dist.barrier()
    finally:
        if owner and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            release_process_groups()


def release_process_groups() -> None:
    """Free the process groups that destroy_process_group() left alive, while Python still runs.

    FSDP2's DeviceMesh keeps its groups in ``_pg_registry``, and DTensor's sharding caches keep the
    mesh for the life of the process. Without this, the group and its gloo threads live until
    interpreter finalization and are torn down there, which now and then aborts the process after
    a successful run ("terminate called without an active exception", exit -6; seen in CI after a
    2-rank FSDP2 run). init_distributed() removes the other holder, torch.distributed.nn.functional.
    Call it only after destroy_process_group(): the meshes are unusable afterwards.
    """
    gc.collect()  # a model's reference cycles (module hooks) hold its mesh too
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch without DeviceMesh has no such holder
        return
    for obj in gc.get_objects():
        registry = getattr(obj, "_pg_registry", None) if isinstance(obj, DeviceMesh) else None
        if isinstance(registry, dict):
            registry.clear()
    gc.collect()


def print0(dist: DistInfo | None, *args, **kwargs) -> None:
    """print on rank 0 only (flushed)."""
    if dist is None or dist.is_main:
        print(*args, **kwargs, flush=True)


def gather_object(obj: Any, dist: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.distributed:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, dist: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_grads(params, world_size: int) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (small parameter sets)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch_dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of a tensor over ranks (a detached copy)."""
    if world_size <= 1:
        return value
    value = value.detach().clone()
    torch_dist.all_reduce(value)
    return value / world_size
