"""Small helpers shared by the trainers (stage 1, stage 2): distributed setup, print0, atomic
the LR schedule, a progress bar with a plain fallback, gradient all-reduce.

    dist = init_distributed()            # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    print0(dist, "hello")                # rank 0 only
    sched = lr_schedule(opt, warmup=300, total=10_000, decay="cosine")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
import typing
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

__all__ = [
    "DistInfo",
    "Progress",
    "all_reduce_grads",
    "all_reduce_mean",
    "build_parser",
    "capture_rng",
    "config_field",
    "init_distributed",
    "lr_factor",
    "lr_schedule",
    "print0",
    "restore_rng",
    "seed_everything",
]

DECAYS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank / world size (1 without torchrun), its device."""

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


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: float = 1800) -> DistInfo:
    """Read torchrun's environment, pick the device, and init the process group when WORLD_SIZE > 1.

    device: 'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu' or 'cuda'.
    backend: None = nccl on CUDA, gloo on CPU.
    """
    from datetime import timedelta

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if world > 1 and not torch_dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        torch_dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kw)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def print0(dist: DistInfo | None, *args, **kwargs) -> None:
    """print on rank 0 only (flushed)."""
    if dist is None or dist.is_main:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def capture_rng() -> dict:
    """This process's RNG states (python, torch CPU, the current CUDA device)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Configs -> CLIs


def config_field(default, help: str, **kw):
    """A dataclass field carrying its CLI help (and extra argparse keywords such as nargs / const);
    :func:`build_parser` turns every such field into one flag."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def build_parser(config_cls, prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--flag-name`` per dataclass field (bool: --x / --no-x; tuple: nargs; int, float, str,
    and Optional of those: typed), with the field's help and default."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta, kind = dict(f.metadata), hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": meta.pop("help"), "default": default, **meta}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(nargs="+" if default else "*", type=str)
        elif kind in (int, float, str):
            kw["type"] = kind
        else:  # Optional[...]: the first non-None member
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kw["type"] = args[0] if args and args[0] in (int, float, str) else str
        p.add_argument(flag, **kw)
    return p


# ---------------------------------------------------------------------------------------------
# LR schedule


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


# ---------------------------------------------------------------------------------------------
# Distributed arithmetic


def all_reduce_grads(params, world_size: int) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (small adapters)."""
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
    if world_size <= 1:
        return value
    value = value.detach().clone()
    torch_dist.all_reduce(value)
    return value / world_size


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar on rank 0 when tqdm is installed and stderr is a terminal (or forced), else a plain
    line every `every` steps. Disabled on other ranks."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 10, desc: str = ""):
        self.total, self.step, self.every, self.desc = total, initial, max(1, every), desc
        self.enabled, self._bar, self._t0 = enabled, None, time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, **stats) -> None:
        self.step += 1
        if not self.enabled:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.step % self.every == 0 or self.step == self.total:
            elapsed = time.perf_counter() - self._t0
            print(f"{self.desc} step {self.step}/{self.total} {text} ({elapsed:.1f}s)", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
