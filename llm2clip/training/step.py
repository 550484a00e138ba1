"""One stage-2 optimizer step, the same for the trainer and the training benchmark.

    step = TrainStep(model, clip_model, optimizer, scheduler, loss_fn, dist,
                     chunk_size=1024, grad_clip=5.0, autocast=autocast, prepare_images=to_device)
    stats = step(images_u8, row_ids, rows)      # rows: llm2clip.cache.DeviceRows (launch / wait)

Order of work in a step (docs/training.md, "One step"):

1. ``rows.launch(row_ids)``: the caption rows' gather starts on its side stream;
2. the images (host uint8) of the first chunk go up and are normalised on the current stream,
   overlapping the gather;
3. ``rows.wait()``: the current stream waits for the gather (no host synchronisation);
4. the gradient-cache forward/backward (``grad_cache.contrastive_backward``);
5. FSDP2's replicated gradients averaged; the global gradient norm clipped; the loss and the norm
   averaged over ranks (the step's one host synchronisation); a non-finite loss or norm raises
   FloatingPointError before the optimizer step;
6. AdamW, the schedule, and the logit scale clamped to [0, ln 100];
7. a device flag records whether every parameter is still finite (one fused norm over the
   parameters, no synchronisation). The next step's synchronisation carries it, and
   ``check_parameters()`` reads it before anything is written: NonFiniteParameters names the
   first bad parameter, so no checkpoint ever holds a non-finite tensor.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from llm2clip.distributed import DistInfo
from llm2clip.training.grad_cache import contrastive_backward, grad_sync_context, num_chunks
from llm2clip.training.optim import clip_grads
from llm2clip.training.parallel import average_replicated_grads

__all__ = ["NonFiniteParameters", "StepStats", "TrainStep"]


class NonFiniteParameters(FloatingPointError):
    """The last optimizer step left a parameter NaN or infinite (the message names it)."""


@dataclass
class StepStats:
    """What one step measured (loss and norm averaged over ranks)."""

    loss: float
    grad_norm: float
    chunks: int
    seconds: float


class _FirstChunkReady:
    """prepare_images, with the first chunk's result computed ahead (before the gather's wait)."""

    def __init__(self, prepare: Callable[[Tensor], Tensor], images: Tensor, chunk_size: int):
        n = images.shape[0]
        self.prepare, self.first_end = prepare, chunk_size if num_chunks(n, chunk_size) > 1 else n
        self.first, self.ptr = prepare(images[: self.first_end]), images.data_ptr()
        self.used = False

    def __call__(self, x: Tensor) -> Tensor:
        if not self.used and x.data_ptr() == self.ptr and x.shape[0] == self.first_end:
            self.used = True  # pass 1 asks for the first chunk first
            return self.first
        return self.prepare(x)


class TrainStep:
    def __init__(
        self,
        model: nn.Module,
        clip_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loss_fn,
        dist: DistInfo,
        *,
        chunk_size: int = 0,
        grad_clip: float = 0.0,
        autocast: contextlib.AbstractContextManager | None = None,
        prepare_images: Callable[[Tensor], Tensor] | None = None,
        fsdp: bool = False,
    ):
        """model: the wrapped model (DDP / FSDP2 / the ClipModel); clip_model: the ClipModel inside
        (its logit scale is clamped); prepare_images: host batch slice -> model input (upload and
        normalise); None: images are used as given."""
        self.model, self.clip_model, self.optimizer, self.scheduler = model, clip_model, optimizer, scheduler
        self.loss_fn, self.dist, self.chunk_size, self.grad_clip = loss_fn, dist, chunk_size, grad_clip
        self.autocast, self.fsdp = autocast, fsdp
        self.prepare_images = prepare_images or (lambda x: x)
        self.sync = grad_sync_context(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self._bad: Tensor | None = None  # set after each optimizer step: any parameter not finite

    def __call__(self, images: Tensor, row_ids: Tensor, rows) -> StepStats:
        t0 = time.perf_counter()
        rows.launch(row_ids)
        image_fn = _FirstChunkReady(self.prepare_images, images, self.chunk_size)
        text = rows.wait()
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = contrastive_backward(
            self.model, images, text, self.loss_fn, chunk_size=self.chunk_size,
            autocast=self.autocast, sync=self.sync, image_fn=image_fn,
        )  # fmt: skip
        if self.fsdp:
            average_replicated_grads(self.params, self.dist)
        norm = clip_grads(self.params, self.grad_clip, self.dist)
        loss_value, norm_value, bad = self._averaged(loss, norm)
        if bad:
            raise NonFiniteParameters(self._bad_message())
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise FloatingPointError(
                f"loss {loss_value} / gradient norm {norm_value} is not finite; stopped before the "
                "optimizer step"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.clip_model.clamp_logit_scale()
        self._bad = _any_not_finite(self.params)
        return StepStats(loss_value, norm_value, info["chunks"], time.perf_counter() - t0)

    def check_parameters(self) -> None:
        """Raise NonFiniteParameters if the last optimizer step left a parameter non-finite on any
        rank (a synchronisation: call it before writing weights)."""
        if self._bad is None:
            return
        bad = self._bad.clone()
        if self.dist.distributed:
            torch_dist.all_reduce(bad)
        if bool(bad.item()):
            raise NonFiniteParameters(self._bad_message())

    def _bad_message(self) -> str:
        first = next(
            (n for n, p in zip(self.names, self.params) if not bool(_local(p).isfinite().all())), None
        )
        where = f"parameter {first}" if first else "a parameter (on another rank)"
        return f"the optimizer step left {where} NaN or infinite"

    def _averaged(self, loss: Tensor, norm: Tensor) -> tuple[float, float, bool]:
        """(loss, norm) averaged over ranks, and whether the previous step left any rank's
        parameters non-finite: one all-reduce, the step's one host synchronisation."""
        bad = self._bad if self._bad is not None else torch.zeros((), device=loss.device)
        stats = torch.stack([loss.float(), norm.float().to(loss.device), bad.float().to(loss.device)])
        if self.dist.distributed:
            torch_dist.all_reduce(stats)
            stats[:2] /= self.dist.world_size
        loss_value, norm_value, bad_value = stats.tolist()
        return loss_value, norm_value, bad_value > 0


def _local(p: Tensor) -> Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _any_not_finite(params: list[Tensor]) -> Tensor:
    """A 0-d float tensor, 1 when any parameter holds a NaN or an infinity (no synchronisation: one
    fused norm per device over this rank's parameters or shards)."""
    tensors = [_local(p.detach()) for p in params]
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors)
    return (~torch.stack([n.float() for n in norms]).isfinite().all()).float()
