"""Stage 1: caption-contrastive (supervised SimCSE) LoRA fine-tuning of a bidirectional LLM.

    torchrun --nproc_per_node 8 -m llm2clip.stage1 --model /models/llama --shards 'data/{00000..00099}.tar' \
        --field-a txt --field-b json:dense_caption --eval-pairs 1000 --output-dir runs/stage1

Pairs (a, b) are two captions of the same image (two caption fields of a shard sample, and/or the
``{"a": ..., "b": ...}`` lines of ``--pairs-jsonl`` files; ``llm2clip.data.pairs``). Each caption
goes through the instruction template, the bidirectional LLM with a LoRA adapter (r 16, alpha 32,
dropout 0.05 on every projection) and mean pooling, then L2 normalisation; a and b of one rank's
batch run as one packed forward. Loss: symmetric InfoNCE a <-> b at a fixed scale (50 = 1 / tau
0.02) with in-batch negatives from every rank (the fused distributed loss); identical b captions
are not each other's negatives (``--dedup-negatives``). The adapter's gradients are averaged over
ranks (one flat all-reduce; no DDP wrapper). ``--mntp-steps`` first trains the same adapter with
LLM2Vec's masked next-token prediction (``llm2clip.training.caption_contrastive``). Held-out pairs
for CRA (caption a -> its b, top-1 cosine over all held-out b captions) are the first
``--eval-pairs`` valid pairs in file order (never trained on) or the ``--eval-jsonl`` file.

Outputs (``--output-dir``): ``config.json`` (the resolved config, written first),
``checkpoints/step_N/trainer_state.pt`` (adapter weights, optimizer, scheduler, step, data
position, every rank's RNG, metrics so far; every ``--checkpoint-every`` steps and at the end),
``adapter/`` (peft adapter), ``embedder_config.json`` (how to embed with it), ``merged/`` with
``--merge`` (full weights + tokenizer), ``metrics.json`` (losses, CRA before/after, pairs/s, time).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.cli import config_field as _f
from llm2clip.cli import parse_config, require_finite, run
from llm2clip.data.fields import FieldSpec
from llm2clip.data.pairs import PairStream, held_out_pairs
from llm2clip.data.shards import expand_shards
from llm2clip.distributed import DistInfo, all_reduce_grads, all_reduce_mean, distributed_session, print0
from llm2clip.files import atomic_write_json
from llm2clip.models.text_embedder import (
    DEFAULT_LORA_TARGETS,
    DTYPES,
    POOLING_MODES,
    LLMTextEmbedder,
    LoraSettings,
    TextEmbedderConfig,
)
from llm2clip.progress import Progress
from llm2clip.training.caption_contrastive import (
    build_model,
    caption_retrieval_accuracy,
    contrastive_loss,
    mntp_loss,
)
from llm2clip.training.checkpoint import CheckpointManager
from llm2clip.training.optim import DECAYS, clip_grads, lr_schedule
from llm2clip.training.rng import seed_everything

LOSS_BACKENDS = ("auto", "triton", "torch")
# Config fields that must match when resuming (they change what the adapter means).
_RESUME_MUST_MATCH = ("model", "instruction", "pooling", "max_length", "lora_r", "lora_alpha", "lora_targets")


@dataclass
class Stage1Config:
    """Everything a stage-1 run depends on; built from the CLI (one flag per field) and validated."""

    # ---- model
    model: str = _f("", "Local model directory or .gguf file (the base LLM; no hub downloads).")
    output_dir: str = _f("", "Run directory: config, checkpoint, adapter, merged weights, metrics.")
    instruction: str = _f(
        "{caption}", "Instruction template with one '{caption}'; its tokens are not pooled."
    )
    pooling: str = _f("mean", f"Pooling of the caption's hidden states: one of {POOLING_MODES}.")
    max_length: int = _f(512, "Token limit per caption (template and special tokens included).")
    dtype: str = _f(
        "auto", "Base weights: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32."
    )
    amp: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU).")
    packed: bool = _f(True, "Packed batches (no pad tokens) instead of padded ones.")
    gradient_checkpointing: bool = _f(
        False, "Recompute each decoder layer in backward (activation checkpointing)."
    )
    attn_backend: str | None = _f(None, "Attention backend override: flash_attn, xformers, sdpa, math.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(32.0, "LoRA alpha (update scale alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch while training.")
    lora_targets: tuple[str, ...] = _f(DEFAULT_LORA_TARGETS, "Linear layers that get LoRA adapters.")
    # ---- data
    shards: str | None = _f(None, "webdataset shards: a directory, glob, brace pattern, '::'-joined specs.")
    field_a: str = _f("txt", "Caption a of a shard sample: a member ('txt') or a JSON key ('json:key.sub').")
    field_b: str = _f("json:dense_caption", "Caption b of a shard sample (same syntax as --field-a).")
    pairs_jsonl: tuple[str, ...] = _f((), 'Text-pair files with one {"a": ..., "b": ...} per line.')
    eval_pairs: int = _f(0, "Hold out the first N valid pairs (file order) for CRA; never trained on.")
    eval_jsonl: str | None = _f(None, "Held-out pairs for CRA from this jsonl instead of --eval-pairs.")
    shuffle: bool = _f(True, "Permute sources and the pairs inside each source every epoch.")
    # ---- optimisation
    batch_size: int = _f(64, "Pairs per rank per step (global batch = batch_size x world size).")
    steps: int = _f(1000, "SimCSE (contrastive) optimizer steps, after the MNTP steps.")
    mntp_steps: int = _f(0, "MNTP warm-up steps before the contrastive ones (0: none).")
    mntp_mask_prob: float = _f(0.2, "MNTP: fraction of caption tokens masked.")
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(300, "Linear warmup steps.")
    decay: str = _f("cosine", f"LR decay after warmup: one of {DECAYS}.")
    min_lr_ratio: float = _f(0.0, "Final lr as a fraction of the peak.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    scale: float = _f(50.0, "Fixed logit scale (1 / temperature; 50 = tau 0.02).")
    dedup_negatives: bool = _f(True, "Identical b captions in the global batch are not negatives.")
    loss_backend: str = _f("auto", f"Fused loss backend: one of {LOSS_BACKENDS}.")
    seed: int = _f(0, "Seed for the adapter init, data order, dropout and MNTP masks.")
    # ---- run
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available), cpu or cuda.")
    checkpoint_every: int = _f(
        500,
        "Checkpoint every N steps into OUTPUT_DIR/checkpoints (and always at the end; 0: only at the end).",
    )
    keep_last: int = _f(1, "Keep the newest N checkpoints.")
    resume: str | None = _f(
        None, "Resume: a checkpoint directory, or bare --resume for the newest in OUTPUT_DIR/checkpoints.",
        nargs="?", const="auto",
    )  # fmt: skip
    stop_at_step: int = _f(0, "Stop after this global step with a checkpoint (time-limited jobs; 0: off).")
    merge: bool = _f(False, "Also write merged full weights (base + adapter) to OUTPUT_DIR/merged.")
    log_every: int = _f(10, "Progress line every N steps when no tqdm bar is shown.")

    def __post_init__(self) -> None:
        require_finite(self)
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        if isinstance(self.pairs_jsonl, str):
            self.pairs_jsonl = (self.pairs_jsonl,)
        self.pairs_jsonl = tuple(self.pairs_jsonl)
        if not self.model:
            raise ValueError("--model is required (a local model directory or .gguf file)")
        if not Path(self.model).exists():
            raise ValueError(
                f"--model {self.model}: no such file or directory (a local path: nothing is downloaded)"
            )
        if not self.output_dir:
            raise ValueError("--output-dir is required")
        if self.shards is None and not self.pairs_jsonl:
            raise ValueError("no training data: give --shards and/or --pairs-jsonl")
        for name in ("field_a", "field_b"):
            FieldSpec.parse(getattr(self, name))
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLING_MODES}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {('auto', *DTYPES)}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay {self.decay!r} not in {DECAYS}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend {self.loss_backend!r} not in {LOSS_BACKENDS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} not in ('auto', 'cpu', 'cuda')")
        positive = {"batch_size": self.batch_size, "lr": self.lr, "scale": self.scale, "lora_r": self.lora_r}
        positive["max_length"] = self.max_length - 1
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be positive, got {self.keep_last}")
        for name in ("steps", "mntp_steps", "warmup_steps", "eval_pairs", "checkpoint_every", "stop_at_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps + self.mntp_steps == 0:
            raise ValueError("nothing to train: --steps and --mntp-steps are both 0")
        if not 0.0 < self.mntp_mask_prob < 1.0:
            raise ValueError(f"mntp_mask_prob must be in (0, 1), got {self.mntp_mask_prob}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_alpha must be positive and lora_dropout in [0, 1), got "
                             f"{self.lora_alpha} and {self.lora_dropout}")  # fmt: skip
        if self.eval_jsonl is not None and self.eval_pairs:
            raise ValueError("give --eval-pairs or --eval-jsonl, not both")
        self.lora_settings()  # validates r / dropout / targets

    @property
    def total_steps(self) -> int:
        return self.mntp_steps + self.steps

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=self.lora_targets
        )

    def embedder_config(self, dtype: str) -> TextEmbedderConfig:
        return TextEmbedderConfig(
            model=self.model, pooling=self.pooling, instruction=self.instruction, max_length=self.max_length,
            dtype=dtype, packed=self.packed, attn_backend=self.attn_backend, normalize=True,
            gradient_checkpointing=self.gradient_checkpointing, lora=self.lora_settings(),
            tokens_per_batch=max(16384, self.max_length),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------


def config_from_args(argv: Sequence[str] | None = None) -> Stage1Config:
    return parse_config(
        Stage1Config, argv, prog="python -m llm2clip.stage1",
        description="Stage 1 of LLM2CLIP: caption-contrastive LoRA fine-tuning of a bidirectional LLM.",
    )  # fmt: skip


def make_sources(cfg: Stage1Config) -> list[tuple[str, str]]:
    sources = [("shard", p) for p in expand_shards(cfg.shards)] if cfg.shards else []
    return sources + [("jsonl", p) for p in cfg.pairs_jsonl]


def trainable(embedder: LLMTextEmbedder) -> dict[str, Tensor]:
    return {n: p for n, p in embedder.model.named_parameters() if p.requires_grad}


class _Run:
    """The parts of a stage-1 run that the loop sequences."""

    def __init__(self, cfg: Stage1Config, dist: DistInfo):
        dev = dist.device
        self.cfg, self.dist = cfg, dist
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and dev.type == "cuda" else nullcontext()
        )
        sources = make_sources(cfg)
        self.eval_set, held = held_out_pairs(
            sources, cfg.field_a, cfg.field_b, cfg.eval_pairs, cfg.eval_jsonl
        )
        self.stream = PairStream(sources, cfg.field_a, cfg.field_b, cfg.seed, cfg.shuffle, held)
        seed_everything(cfg.seed)  # the same adapter init on every rank
        self.embedder, self.lm_head = build_model(cfg.embedder_config(cfg.dtype), cfg.mntp_steps > 0, dev)
        seed_everything(cfg.seed + dist.rank)  # per-rank dropout
        self.params = list(trainable(self.embedder).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = lr_schedule(
            self.optimizer, cfg.warmup_steps, cfg.total_steps, cfg.decay, cfg.min_lr_ratio
        )
        self.ckpt = CheckpointManager(cfg.output_dir, cfg.keep_last, dist)
        n_params = sum(p.numel() for p in self.params)
        print0(
            dist,
            f"stage1: {len(sources)} sources, {len(self.eval_set)} eval pairs, world {dist.world_size}, "
            f"{n_params / 1e6:.2f}M trainable params, device {dev}, dtype {cfg.dtype}",
        )

    def loss_fn(self, step: int, pairs):
        cfg, dev = self.cfg, self.dist.device
        if step < cfg.mntp_steps:  # masks drawn from (seed, step, rank): reproducible after a resume
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + self.dist.rank)
            return partial(
                mntp_loss, self.embedder, self.lm_head, pairs, dev, gen, mask_prob=cfg.mntp_mask_prob
            )
        return partial(
            contrastive_loss, self.embedder, pairs, dev,
            scale=cfg.scale, dedup_negatives=cfg.dedup_negatives, backend=cfg.loss_backend,
        )  # fmt: skip

    def step(self, loss_fn) -> tuple[float, float]:
        """loss_fn() under autocast -> backward -> grads averaged over ranks -> clip -> AdamW.
        Returns (the loss averaged over ranks, the gradient norm before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = loss_fn()
        loss.backward()
        all_reduce_grads(self.params, self.dist.world_size)
        norm = clip_grads(self.params, self.cfg.grad_clip, self.dist)
        self.optimizer.step()
        self.scheduler.step()
        return float(all_reduce_mean(loss.detach().float(), self.dist.world_size)), float(norm)

    def save(self, step: int, metrics: dict) -> None:
        state = {
            "adapter": {n: p.detach().cpu() for n, p in trainable(self.embedder).items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "data": self.stream.state, "metrics": metrics,
        }  # fmt: skip
        self.ckpt.save(step, state, self.cfg)

    def resume(self) -> tuple[int, dict] | None:
        path = self.ckpt.resolve(self.cfg.resume)
        if path is None:
            return None
        state = self.ckpt.load(path, self.cfg, _RESUME_MUST_MATCH, self.cfg.seed)
        params = trainable(self.embedder)
        if set(params) != set(state["adapter"]):
            raise ValueError(f"{path}: adapter parameters differ from this model's")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["adapter"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.state = tuple(state["data"])
        print0(self.dist, f"resumed from {path} at step {state['step']}")
        return int(state["step"]), state["metrics"]

    def cra(self) -> float:
        return caption_retrieval_accuracy(self.embedder, self.eval_set, self.autocast)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run stage 1; returns the metrics dict (also written to OUTPUT_DIR/metrics.json)."""
    cfg = config_from_args(argv)
    with distributed_session(cfg.device) as dist:
        return train(cfg, dist)[0]


def train(cfg: Stage1Config, dist: DistInfo) -> tuple[dict, LLMTextEmbedder]:
    """The whole run for an already set-up process; returns (metrics, the trained embedder)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dist.device.type == "cuda" else "float32")
    cfg = dataclasses.replace(cfg, dtype=dtype)
    if dist.is_main:
        atomic_write_json(os.path.join(cfg.output_dir, "config.json"), dataclasses.asdict(cfg))
    run = _Run(cfg, dist)
    t_start = time.perf_counter()
    step, metrics = run.resume() or (0, {"losses": [], "mntp_losses": [], "train_time_s": 0.0,
                                         "contrastive_time_s": 0.0, "wall_time_s": 0.0})  # fmt: skip
    wall_before = metrics["wall_time_s"]  # over every invocation of the run (resumes add theirs)
    if "cra_before" not in metrics:
        metrics["cra_before"] = run.cra()
        print0(dist, f"CRA before: {metrics['cra_before']:.4f} on {len(run.eval_set)} pairs")
    end = min(cfg.total_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.total_steps
    global_batch = cfg.batch_size * dist.world_size
    progress = Progress(
        cfg.total_steps, initial=step, enabled=dist.is_main, every=cfg.log_every, desc="stage1"
    )
    while step < end:
        pairs = run.stream.take(global_batch)[dist.rank :: dist.world_size]
        mntp = step < cfg.mntp_steps
        t0 = time.perf_counter()
        loss, norm = run.step(run.loss_fn(step, pairs))
        dt = time.perf_counter() - t0
        step += 1
        metrics["mntp_losses" if mntp else "losses"].append(loss)
        metrics["train_time_s"] += dt
        metrics["contrastive_time_s"] += 0.0 if mntp else dt
        lr = run.scheduler.get_last_lr()[0]
        progress.advance(
            loss=loss, lr=lr, gnorm=norm, pairs_per_s=global_batch / dt, phase="mntp" if mntp else "cc"
        )
        if step == end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            metrics["wall_time_s"] = wall_before + time.perf_counter() - t_start
            run.save(step, metrics)
    progress.close()
    _finish(run, step, metrics, wall_before + time.perf_counter() - t_start)
    return metrics, run.embedder


def _finish(run: _Run, step: int, metrics: dict, wall_time_s: float) -> None:
    """CRA after, metrics.json, and the adapter (+ merged weights) of a finished run."""
    cfg, dist = run.cfg, run.dist
    global_batch = cfg.batch_size * dist.world_size
    n_cc = len(metrics["losses"])
    metrics.update(
        step=step, world_size=dist.world_size, global_batch=global_batch, data_state=list(run.stream.state),
        pairs_per_s=n_cc * global_batch / metrics["contrastive_time_s"] if n_cc else None,
        skipped=run.stream.skip_totals(), eval_pairs=len(run.eval_set), finished=step >= cfg.total_steps,
    )  # fmt: skip
    if metrics["finished"]:
        metrics["cra_after"] = run.cra()
        print0(dist, f"CRA after: {metrics['cra_after']:.4f} (before {metrics['cra_before']:.4f})")
    metrics["wall_time_s"] = wall_time_s
    if dist.is_main:
        if metrics["finished"]:
            write_outputs(cfg, run.embedder, cfg.output_dir)
        out = os.path.join(cfg.output_dir, "metrics.json")
        atomic_write_json(out, {"config": dataclasses.asdict(cfg), **metrics})
    if dist.distributed:
        torch.distributed.barrier()


def write_outputs(cfg: Stage1Config, embedder: LLMTextEmbedder, out: str) -> None:
    """adapter/ (peft), embedder_config.json, and merged/ (full weights + tokenizer) with --merge."""
    embedder.save_lora(os.path.join(out, "adapter"))
    ecfg = dataclasses.replace(embedder.config, lora=None, gradient_checkpointing=False)
    info = {"embedder": ecfg.to_dict(), "adapter": os.path.join(out, "adapter")}
    if cfg.merge:
        merged = os.path.join(out, "merged")
        embedder.merge_lora()
        embedder.model.save_pretrained(merged)
        embedder.tokenizer.save_pretrained(merged)
        info["merged"] = merged
    atomic_write_json(os.path.join(out, "embedder_config.json"), info)


if __name__ == "__main__":
    run(main, "llm2clip.stage1")
