"""The stage-2 ClipModel built from the config: a new tower + adapter, or one loaded to start from.

model = build_model(cfg.model, cfg.loss.kind, cache.spec, log=print)
model.adapter.input_mean.copy_(cache_mean(cache))     # --center-text

The tower is a preset (--vision), a pretrained checkpoint (--init-vision SOURCE:PATH, through
llm2clip.models.weights: its own projection replaced or kept, --init-vision-proj) or, with --init-from,
a whole saved ClipModel. The visual projection into --embed-dim and the adapter are always new.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llm2clip.cache import CacheSpec, EmbeddingCache, StaleCacheError
from llm2clip.cache.manifest import check_spec
from llm2clip.models.adapter import AdapterConfig, embedding_mean
from llm2clip.models.clip_model import ClipModel, ClipModelConfig, build_vision_tower
from llm2clip.training.config import CNN_TOWERS, ModelConfig

__all__ = ["build_model", "cache_mean", "fresh_like"]

# Tower fields a preset named with --vision must share with an --init-vision checkpoint's tower.
_SHAPE = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "heads",
    "hidden_dim",
    "mlp",
    "rope",
    "class_token",
    "pool",
)


def _load_init(cfg: ModelConfig, spec: CacheSpec, cache_path: str) -> ClipModel:
    model = ClipModel.load(cfg.init_from)
    if model.config.adapter.input_dim != spec.dim:
        raise StaleCacheError(
            f"--init-from {cfg.init_from}: its adapter takes {model.config.adapter.input_dim}-d LLM "
            f"embeddings, the cache {cache_path} holds {spec.dim}-d ones"
        )
    if model.config.text_spec is not None:  # trained on another LLM's embeddings: refuse
        check_spec(CacheSpec.from_dict(model.config.text_spec), spec, cache_path)
    centered = model.config.adapter.center_input
    if cfg.center_text != centered:
        flag = "--center-text" if centered else "--no-center-text"
        raise ValueError(
            f"--init-from {cfg.init_from}: its adapter has center_input={centered}; pass {flag} "
            "(the mean it subtracts comes with its weights)"
        )
    return model


def build_model(
    cfg: ModelConfig,
    loss: str,
    spec: CacheSpec,
    cache_path: str = "the cache",
    log: Callable[[str], None] | None = None,
) -> ClipModel:
    """The run's ClipModel over the embeddings of a cache with `spec` (recorded in the model's
    config as ``text_spec``); the same init on every rank: call after seeding. log: where to report
    what an --init-vision load used (one line)."""
    if cfg.init_from:
        model = _load_init(cfg, spec, cache_path)
    else:
        model = _new_model(cfg, loss, spec.dim, log or (lambda line: None))
    model.config.text_spec = spec.to_dict()
    return model


def fresh_like(model: ClipModel) -> ClipModel:
    """An unloaded ClipModel of the same architecture (the tower rebuilt from its recorded config)."""
    return ClipModel(build_vision_tower(model.config.vision), model.config)


def _pretrained_tower(cfg: ModelConfig, log: Callable[[str], None]):
    """--init-vision: the loaded tower, checked against --vision when a preset was named."""
    from llm2clip.models.vit import ViTConfig
    from llm2clip.models.weights import load_init_vision

    kw = {**cfg.tower_overrides(), "grad_checkpointing": cfg.grad_checkpointing}
    tower, report = load_init_vision(
        cfg.init_vision, cfg.init_vision_config, kw, cfg.init_vision_proj, cfg.allow_partial_init
    )
    log(f"--init-vision {cfg.init_vision}: {report.summary()}")
    if cfg.vision:
        preset = ViTConfig.preset(cfg.vision, **{k: v for k, v in kw.items() if k == "image_size"})
        fields = _SHAPE + (("act",) if preset.mlp == "mlp" else ())  # OpenAI towers: QuickGELU
        diff = [f"{k} {getattr(tower.config, k)!r} vs {getattr(preset, k)!r}" for k in fields
                if getattr(tower.config, k) != getattr(preset, k)]  # fmt: skip
        if diff:
            raise ValueError(
                f"--init-vision {cfg.init_vision} is not a --vision {cfg.vision} tower: "
                + ", ".join(diff)
                + " (drop --vision, or pick the recipe / preset of this checkpoint; --image-size resizes)"
            )
    return tower


def _new_model(cfg: ModelConfig, loss: str, text_dim: int, log: Callable[[str], None]) -> ClipModel:
    kw = cfg.tower_overrides()
    if cfg.init_vision:
        tower = _pretrained_tower(cfg, log)
    elif cfg.vision in CNN_TOWERS:
        from llm2clip.models.cnn_tower import CNNTower, CNNTowerConfig

        tower = CNNTower(CNNTowerConfig(pretrained=cfg.pretrained, freeze_backbone=cfg.freeze_backbone, **kw))
    else:
        from llm2clip.models.vit import ViT, ViTConfig

        tower = ViT(ViTConfig.preset(cfg.vision, grad_checkpointing=cfg.grad_checkpointing, **kw))
    adapter = AdapterConfig(
        input_dim=text_dim, embed_dim=cfg.embed_dim, depth=cfg.adapter_depth, center_input=cfg.center_text
    )
    return ClipModel(tower, ClipModelConfig(embed_dim=cfg.embed_dim, adapter=adapter, loss=loss))


def cache_mean(cache: EmbeddingCache, max_rows: int = 65536, seed: int = 0) -> Tensor:
    """Mean of the normalised cached embeddings over up to max_rows rows drawn without replacement."""
    n = cache.num_rows
    ids = (
        torch.arange(n) if n <= max_rows else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    )
    ids = ids[:max_rows].sort().values
    return embedding_mean(cache.gather(ids, torch.float32))
