"""What a run reports: log.jsonl, TensorBoard, the progress line, and the one MFU definition.

    log = MetricsLogger(output_dir, dist, resumed_step=None, tensorboard=True,
                        progress=Progress(total, desc="stage2"))
    log.step({"step": 1, "loss": 0.7, ...}, show=("loss", "lr"))   # a line of log.jsonl (rank 0)
    log.close()

MFU (model FLOPs utilisation, as in PaLM): the *useful* FLOPs of a step (3x the forward of every
sample through tower, projection and adapter, plus 8 b B D for the contrastive loss) per second,
over the card's dense bf16 peak. Work a method adds on top (the gradient cache's extra forward,
activation checkpointing's recompute) counts in the executed FLOPs (TFLOP/s) but not in MFU, so
methods compare on the same useful work.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from llm2clip.distributed import DistInfo, print0
from llm2clip.progress import Progress

__all__ = ["PEAK_BF16_FLOPS", "MetricsLogger", "StepFlops", "forward_flops", "peak_bf16_flops"]

# Dense bf16 tensor-core peak (spec sheets: H100 / H200 SXM 989 TFLOP/s, A100 312 TFLOP/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak from PEAK_BF16_FLOPS (None on the CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def forward_flops(model: nn.Module, image_size: int, text_dim: int, device) -> float | None:
    """Forward FLOPs of one (image, caption embedding) pair through the ClipModel (torch's flop
    counter; a ViT's attention on its math backend so that QK^T and PV are counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    vis = model.visual
    prev = getattr(getattr(vis, "config", None), "attn_backend", None)
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    t = torch.zeros(1, text_dim, device=device)
    try:
        if hasattr(vis, "set_attn_backend"):
            vis.set_attn_backend("math")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x, t)
        return float(fc.get_total_flops())
    except Exception:  # informational: never fail a run over it
        return None
    finally:
        if hasattr(vis, "set_attn_backend"):
            vis.set_attn_backend(prev)


class StepFlops:
    """FLOPs of one rank's step: ``useful`` (MFU) and ``executed`` (TFLOP/s), module docstring."""

    def __init__(self, forward_per_sample: float, embed_dim: int):
        self.forward, self.embed_dim = forward_per_sample, embed_dim

    def useful(self, b: int, global_batch: int) -> float:
        return 3 * self.forward * b + 8 * b * global_batch * self.embed_dim

    def executed(self, b: int, global_batch: int, extra_forwards: int = 0) -> float:
        return self.useful(b, global_batch) + extra_forwards * self.forward * b

    @staticmethod
    def mfu(useful: float, seconds: float, peak: float) -> float:
        return useful / seconds / peak


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLogger:
    """log.jsonl + TensorBoard + the progress line, on rank 0. On resume, log lines after the
    resumed step are dropped (they belong to the steps about to be redone)."""

    def __init__(
        self,
        output_dir: str | Path,
        dist: DistInfo,
        resumed_step: int | None,
        tensorboard: bool = True,
        progress: Progress | None = None,
    ):
        self.enabled, self.progress = dist.is_main, progress
        self.path = Path(output_dir) / "log.jsonl"
        self.tb = None
        if not self.enabled:
            return
        self._start(resumed_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resumed_step)
            except ImportError:
                print0(dist, "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")

    def _start(self, resumed_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln and json.loads(ln)["step"] <= resumed_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        """One line of log.jsonl (and its numbers as TensorBoard scalars at record["step"])."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def step(self, record: dict, show: tuple[str, ...] = ()) -> None:
        """A step's record: written, and `show`'s keys (those present) on the progress line."""
        self.write(record)
        if self.progress is not None:
            self.progress.advance(**{k: record[k] for k in show if k in record})

    def close(self) -> None:
        """Close TensorBoard (the progress display is closed by its owner)."""
        if self.tb is not None:
            self.tb.close()
