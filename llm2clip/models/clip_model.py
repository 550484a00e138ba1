"""The stage-2 model: vision tower + visual projection, text adapter over frozen LLM embeddings, logit scale.

    images (B, 3, H, W) -> vision tower -> (B, vision_width) -> visual_proj (no bias) -> L2-normalise
    llm_embeddings (B, text_dim) -> TextAdapter (normalise, residual MLPs, LN, Linear) -> L2-normalise
    forward -> (image_feats, text_feats, logit_scale.exp(), logit_bias or None)

The vision tower is any module mapping images to (B, vision_width) (``llm2clip.models.vit.ViT``,
``llm2clip.models.cnn_tower.CNNTower``, or anything else). Logit scale t: learnable, exp(t) is the
softmax temperature's inverse, init ln(1/0.07) (InfoNCE) or ln(10) (sigmoid loss), clamped to
[0, ln 100] by ``clamp_logit_scale()`` after each optimizer step. The sigmoid (SigLIP) loss adds a
learnable logit bias, init -10.

Checkpoints (``save(dir)`` / ``ClipModel.load(dir)``): ``model.safetensors`` holding the plain
state dict (module names only: no ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) segments, no
kernel-specific names) and ``config.json`` beside it (this config, plus how to rebuild the vision
tower when it is one of llm2clip's own: its class and its dataclass config).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.models.adapter import AdapterConfig, TextAdapter

LOSSES = ("infonce", "sigmoid")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_REBUILDABLE_PREFIX = "llm2clip."  # only towers defined in this package are rebuilt from config.json


@dataclass
class ClipModelConfig:
    """Shapes and the loss-dependent scalars of the stage-2 model."""

    embed_dim: int = 1280
    """Shared embedding dimension of image and text features."""
    vision_width: int | None = None
    """Output size of the vision tower; None: read from the tower's ``embed_dim`` attribute."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The text adapter; its input_dim is the LLM's hidden size, its embed_dim must equal embed_dim."""
    loss: str = "infonce"
    """'infonce' (CLIP) or 'sigmoid' (SigLIP, adds a logit bias). Sets the defaults below."""
    init_logit_scale: float | None = None
    """Initial t (scale = exp(t)); None: ln(1/0.07) for infonce, ln(10) for sigmoid."""
    init_logit_bias: float | None = None
    """Initial bias of the sigmoid loss; None: -10. Must stay None for infonce."""
    max_logit_scale: float = math.log(100.0)
    """Upper clamp of t (clamp_logit_scale); the lower clamp is 0."""
    vision: dict | None = None
    """How to rebuild the vision tower (ClipModel writes class path + config); None: give it to load()."""
    text_spec: dict | None = None
    """The CacheSpec (``llm2clip.cache.CacheSpec.to_dict()``) of the caption embeddings the adapter
    was trained on: which LLM, adapter, template, pooling, length and width. None: not recorded."""

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} not in {LOSSES}")
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.adapter.embed_dim != self.embed_dim:
            raise ValueError(f"adapter.embed_dim {self.adapter.embed_dim} != embed_dim {self.embed_dim}")
        if self.loss == "infonce" and self.init_logit_bias is not None:
            raise ValueError("init_logit_bias is only used by the sigmoid loss")
        if self.init_logit_scale is None:
            self.init_logit_scale = math.log(1 / 0.07) if self.loss == "infonce" else math.log(10.0)
        if self.loss == "sigmoid" and self.init_logit_bias is None:
            self.init_logit_bias = -10.0
        if self.max_logit_scale < 0:
            raise ValueError("max_logit_scale must be >= 0")

    @property
    def has_bias(self) -> bool:
        return self.loss == "sigmoid"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _class_path(obj) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _import(path: str):
    module, _, name = path.partition(":")
    if not module.startswith(_REBUILDABLE_PREFIX):
        raise ValueError(f"refusing to rebuild {path!r}: only llm2clip towers are rebuilt from a config")
    return getattr(importlib.import_module(module), name)


def vision_spec(tower: nn.Module) -> dict | None:
    """{'class': ..., 'config_class': ..., 'config': {...}} for an llm2clip tower with a dataclass config."""
    cfg = getattr(tower, "config", None)
    if not type(tower).__module__.startswith(_REBUILDABLE_PREFIX) or not dataclasses.is_dataclass(cfg):
        return None
    return {"class": _class_path(tower), "config_class": _class_path(cfg), "config": dataclasses.asdict(cfg)}


def build_vision_tower(spec: dict) -> nn.Module:
    """Inverse of vision_spec. A ``pretrained`` flag is turned off: the weights come from the checkpoint."""
    config_cls, tower_cls = _import(spec["config_class"]), _import(spec["class"])
    config = dict(spec["config"])
    if config.get("pretrained"):
        config["pretrained"] = False
    return tower_cls(config_cls(**config))


def plain_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper segments from parameter names: DDP's leading 'module.', torch.compile's '_orig_mod.'."""
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        if parts and parts[0] == "module":
            parts = parts[1:]
        out[".".join(parts)] = value
    return out


class ClipModel(nn.Module):
    """Vision tower + visual projection, text adapter, logit scale (and bias for the sigmoid loss)."""

    def __init__(self, vision_tower: nn.Module, config: ClipModelConfig | None = None):
        super().__init__()
        self.config = cfg = dataclasses.replace(config) if config is not None else ClipModelConfig()
        width = cfg.vision_width if cfg.vision_width is not None else getattr(vision_tower, "embed_dim", None)
        if not isinstance(width, int):
            raise ValueError("set ClipModelConfig.vision_width: the vision tower has no integer `embed_dim`")
        cfg.vision_width = width
        if cfg.vision is None:
            cfg.vision = vision_spec(vision_tower)
        self.visual = vision_tower
        self.visual_proj = nn.Linear(width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=width**-0.5)
        self.adapter = TextAdapter(cfg.adapter)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.has_bias else None
        self.register_parameter("logit_bias", bias)

    # ---- features

    def encode_image(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> L2-normalised (B, embed_dim)."""
        x = self.visual_proj(self.visual(images))
        return F.normalize(x.float(), dim=-1).to(x.dtype)

    def encode_text_embedding(self, llm_embeddings: Tensor) -> Tensor:
        """Frozen LLM caption embeddings (B, text_dim) -> L2-normalised (B, embed_dim)."""
        x = self.adapter(llm_embeddings)
        return F.normalize(x.float(), dim=-1).to(x.dtype)

    def forward(
        self, images: Tensor, text_embeddings: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """-> (image_feats (B, D), text_feats (B', D), logit_scale.exp() (0-d fp32), logit_bias or None)."""
        return (
            self.encode_image(images),
            self.encode_text_embedding(text_embeddings),
            self.logit_scale.exp(),
            self.logit_bias,
        )

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp t to [0, max_logit_scale] in place (call after each optimizer step)."""
        self.logit_scale.clamp_(0.0, self.config.max_logit_scale)

    # ---- checkpoints

    def plain_state_dict(self) -> dict[str, Tensor]:
        return plain_state_dict(self.state_dict())

    def save(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write model.safetensors (plain names) and config.json into the directory `path`.

        state_dict: the full weights to write instead of this module's own (a sharded (FSDP)
        model's, gathered by the caller)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = plain_state_dict(state_dict) if state_dict is not None else self.plain_state_dict()
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        meta = {"format_version": str(FORMAT_VERSION)}
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path / WEIGHTS_NAME)
        config = {"format_version": FORMAT_VERSION, **self.config.to_dict()}
        tmp = path / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / CONFIG_NAME)
        return path

    @staticmethod
    def read_config(path: str | os.PathLike) -> ClipModelConfig:
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format_version {version!r}, expected {FORMAT_VERSION}")
        return ClipModelConfig(**raw)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        vision_tower: nn.Module | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
    ) -> ClipModel:
        """Rebuild from a save() directory. Pass `vision_tower` when it is not an llm2clip tower
        (its weights are still loaded from the checkpoint)."""
        from safetensors.torch import load_file

        config = cls.read_config(path)
        if vision_tower is None:
            if config.vision is None:
                raise ValueError(
                    f"{path}: the vision tower cannot be rebuilt from config.json; pass vision_tower="
                )
            vision_tower = build_vision_tower(config.vision)
        model = cls(vision_tower, config)
        state = plain_state_dict(load_file(str(Path(path) / WEIGHTS_NAME), device=str(map_location)))
        model.load_state_dict(state, strict=strict)
        return model.to(map_location)


__all__ = [
    "ClipModel",
    "ClipModelConfig",
    "LOSSES",
    "build_vision_tower",
    "plain_state_dict",
    "vision_spec",
]
