"""The trainer's evaluation: sets loaded once on rank 0, evaluated every N steps and at the end.

    evaluator = PeriodicEval(cfg.eval, cache, image_size, dist, autocast, fresh_model=build)
    results = evaluator.run(step, model, clip_model, log)     # every rank calls it

Held-out captions come from ``--eval-cache`` (its spec must equal the training cache's) or the
training cache itself; zero-shot prompts and the captions of ``--eval-sets`` (CLIP_benchmark wds
sets, long-caption sets, XM3600: ``llm2clip.evaluation.specs``) are embedded once, by the LLM
rebuilt exactly as the training cache's extraction ran it (``embedder_like``, probe-checked), which
is then freed. Under FSDP2 the full weights are gathered and evaluated in an unsharded copy on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from llm2clip.cache import EmbeddingCache
from llm2clip.data.shards import expand_shards
from llm2clip.distributed import DistInfo, print0
from llm2clip.evaluation import (
    evaluate,
    format_table,
    load_retrieval_set,
    load_set,
    load_zeroshot_set,
    read_names,
)
from llm2clip.models.text_recipe import embedder_like
from llm2clip.training.config import EvalConfig
from llm2clip.training.optim import is_dtensor
from llm2clip.training.parallel import full_state

__all__ = ["PeriodicEval"]


def load_eval_sets(cfg: EvalConfig, cache: EmbeddingCache, image_size: int, device: torch.device) -> dict:
    """{name: set}: 'retrieval' (--eval-shards), 'zeroshot' (--zeroshot-shards), one per --eval-sets."""
    max_images = cfg.eval_max_images or None
    sets: dict = {}
    if cfg.eval_shards:
        eval_cache = (
            EmbeddingCache.open(cfg.eval_cache, expect=cache.spec, verify=cache.verify)
            if cfg.eval_cache
            else cache
        )
        sets["retrieval"] = load_retrieval_set(
            expand_shards(cfg.eval_shards), list(cfg.eval_fields), image_size,
            cache=eval_cache, max_images=max_images,
        )  # fmt: skip
    if not (cfg.zeroshot_shards or cfg.eval_sets):
        return sets
    embedder = embedder_like(cache.path, device)
    if cfg.zeroshot_shards:
        sets["zeroshot"] = load_zeroshot_set(
            expand_shards(cfg.zeroshot_shards), image_size, read_names(cfg.classnames),
            read_names(cfg.templates), embedder, max_images=max_images,
        )  # fmt: skip
    for spec in cfg.eval_sets:
        name, s = load_set(
            spec, image_size, embedder, languages=cfg.eval_languages or None, max_images=max_images,
            max_length=cfg.eval_max_length or None,
        )  # fmt: skip
        if name in sets:
            raise ValueError(f"--eval-sets: two evaluation sets are named {name!r}")
        sets[name] = s
    return sets


class PeriodicEval:
    def __init__(
        self,
        cfg: EvalConfig,
        cache: EmbeddingCache,
        image_size: int,
        dist: DistInfo,
        autocast,
        fresh_model: Callable[[], nn.Module],
    ):
        """fresh_model: an unsharded model of the run's architecture (FSDP2 evaluation)."""
        self.cfg, self.dist, self.autocast, self.fresh_model = cfg, dist, autocast, fresh_model
        self.results: dict = {}
        self.sets: dict = {}
        if cfg.enabled and dist.is_main:
            self.sets = load_eval_sets(cfg, cache, image_size, dist.device)

    def due(self, step: int, total: int) -> bool:
        """A periodic evaluation after this step (the final one is run separately)."""
        return bool(self.cfg.eval_every) and step % self.cfg.eval_every == 0 and step != total

    def run(self, step: int, model: nn.Module, clip_model: nn.Module, log) -> dict:
        """Evaluate (rank 0) and log an "eval" line; every rank must call it."""
        if not self.cfg.enabled:
            return self.results
        eval_model = clip_model
        if self.dist.distributed and any(is_dtensor(p) for p in model.parameters()):
            state = full_state(model)[0]  # FSDP2: every rank takes part in the gather
            eval_model = self.fresh_model() if self.dist.is_main else None
            if eval_model is not None:
                eval_model.load_state_dict(state)
                eval_model.to(self.dist.device)
        if self.dist.is_main:
            self.results = evaluate(
                eval_model, sets=self.sets, device=self.dist.device, autocast=self.autocast
            )
            print0(self.dist, format_table(self.results))
            log.write({"step": step, "eval": self.results})
        if self.dist.distributed:
            torch_dist.barrier()
        return self.results
