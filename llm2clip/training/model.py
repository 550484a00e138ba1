"""The stage-2 ClipModel built from the config: a new tower + adapter, or one loaded to start from.

model = build_model(cfg.model, cfg.loss.kind, text_dim=cache.dim)
model.adapter.input_mean.copy_(cache_mean(cache))     # --center-text
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm2clip.cache import CacheSpec, EmbeddingCache, StaleCacheError
from llm2clip.cache.manifest import check_spec
from llm2clip.models.adapter import AdapterConfig, embedding_mean
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.training.config import CNN_TOWERS, ModelConfig

__all__ = ["build_model", "cache_mean"]


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


def build_model(cfg: ModelConfig, loss: str, spec: CacheSpec, cache_path: str = "the cache") -> ClipModel:
    """The run's ClipModel over the embeddings of a cache with `spec` (recorded in the model's
    config as ``text_spec``); the same init on every rank: call after seeding."""
    model = _load_init(cfg, spec, cache_path) if cfg.init_from else _new_model(cfg, loss, spec.dim)
    model.config.text_spec = spec.to_dict()
    return model


def _new_model(cfg: ModelConfig, loss: str, text_dim: int) -> ClipModel:
    kw = cfg.tower_overrides()
    if cfg.vision in CNN_TOWERS:
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
