"""Stage-2 recipes: published hyperparameters as one flag, each value overridable and traced.

    python -m llm2clip.train --recipe llm2clip-eva02-l14-336 --init-vision eva_clip:EVA02_CLIP_L_336.pt ...

A recipe replaces the defaults of the flags it names (``parse_config(..., defaults=...)``); a flag
given on the command line still wins. ``record`` writes, for every value the recipe names, the value
used and where it came from into ``cfg.recipe.provenance`` (so into config.json and every checkpoint);
``resolve_batch`` turns the global batch into the per-rank --batch-size once the world size is known;
``check_cache`` refuses a cache pooled otherwise than the recipe assumes. Values, their sources and
where the paper and the released code disagree: docs/recipes.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RECIPES",
    "RECIPE_NAMES",
    "Setting",
    "check_cache",
    "describe",
    "given_dests",
    "record",
    "resolve_batch",
]

PAPER = "paper (arXiv 2411.04997)"
RUN_SH = "released llm2clip/run.sh"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


_LLM2CLIP = {
    "optim.lr": Setting(1e-5, f"{PAPER}; {RUN_SH} --lr / --visual-lr 1e-5"),
    "optim.adapter_lr": Setting(1e-5, f"{RUN_SH} --text-lr 1e-5"),
    "optim.weight_decay": Setting(0.05, f"{PAPER}; {RUN_SH} --wd 0.05"),
    "optim.layer_decay": Setting(0.85, f"{RUN_SH} --visual-ld 0.85 (the adapter: --text-ld 1.01, i.e. none)"),
    "optim.grad_clip": Setting(5.0, f"{RUN_SH} --grad-clip-norm 5.0"),
    "optim.decay": Setting("cosine", f"{RUN_SH}: warmup_cosine_lr (to 0)"),
    "optim.min_lr_ratio": Setting(0.0, f"{RUN_SH}: warmup_cosine_lr (to 0)"),
    "optim.warmup_steps": Setting(0, f"{RUN_SH} --warmup 0"),
    "optim.epochs": Setting(4, f"{PAPER}: 4 epochs ({RUN_SH} says --epochs 20 over resampled shards)"),
    "optim.beta1": Setting(0.9, f"{RUN_SH}: get_default_params (model names without 'vit')"),
    "optim.beta2": Setting(0.999, f"{RUN_SH}: get_default_params (model names without 'vit')"),
    "optim.eps": Setting(1e-8, f"{RUN_SH}: get_default_params (model names without 'vit')"),
    "recipe.global_batch_size": Setting(4096, f"{PAPER}; {RUN_SH} --batch-size 512 x 8 GPUs"),
    "recipe.expect_pooling": Setting("mean", f"{PAPER}: mean-pooled LLM2Vec caption embeddings"),
    "model.embed_dim": Setting(1280, "released model_configs: embed_dim 1280"),
    "model.adapter_depth": Setting(4, "released TextProj: 4 residual MLP blocks (x2 expansion), LN, Linear"),
    "model.init_vision_proj": Setting("replace", "released factory.load_checkpoint drops visual.head"),
    "loss.kind": Setting("infonce", f"{RUN_SH} --local-loss --gather-with-grad (CLIP's InfoNCE)"),
}
RECIPES: dict[str, dict[str, Setting]] = {
    "llm2clip": _LLM2CLIP,
    "llm2clip-eva02-l14-336": {
        **_LLM2CLIP, "model.vision": Setting("EVA02-L/14-336", f"{RUN_SH} MODEL=EVA02-CLIP-L-14-336"),
    },
    "llm2clip-eva02-b16": {
        **_LLM2CLIP, "model.vision": Setting("EVA02-B/16", "released model_configs/EVA02-CLIP-B-16.json"),
    },
    "llm2clip-openai-l14": {
        **_LLM2CLIP, "model.vision": Setting("L/14", "released model_configs/OpenaiCLIP-L-14.json"),
    },
}  # fmt: skip
RECIPE_NAMES = tuple(RECIPES)


def given_dests(config_cls: type, argv: Sequence[str]) -> set[str]:
    """The config fields (dotted paths) that argv sets explicitly."""
    from llm2clip.cli import build_parser

    parser = build_parser(config_cls, "", "")
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _get(cfg, dest: str) -> Any:
    for part in dest.split("."):
        cfg = getattr(cfg, part)
    return cfg


def record(cfg, given: set[str]):
    """cfg with recipe.provenance filled ({dest: {"value", "source"}} for every value the recipe sets)
    and the batch settled: an explicit --batch-size beats the recipe's global batch; giving both
    --batch-size and --global-batch-size is refused."""
    rc = cfg.recipe
    if "data.batch_size" in given and "recipe.global_batch_size" in given and rc.global_batch_size:
        raise ValueError("give one of --batch-size (per rank) and --global-batch-size (over all ranks)")
    if not rc.recipe:
        return cfg
    settings = RECIPES[rc.recipe]
    provenance = {}
    for dest, setting in settings.items():
        value = _get(cfg, dest)
        if dest in given:
            source = f"command line (recipe {rc.recipe}: {setting.value!r})"
        else:
            source = f"recipe {rc.recipe}: {setting.source}"
        provenance[dest] = {"value": value, "source": source}
    global_batch = rc.global_batch_size
    if "data.batch_size" in given and "recipe.global_batch_size" not in given:
        global_batch = 0
        provenance["recipe.global_batch_size"] = {
            "value": 0,
            "source": "dropped: --batch-size given per rank",
        }
    rc = dataclasses.replace(rc, global_batch_size=global_batch, provenance=provenance)
    return dataclasses.replace(cfg, recipe=rc)


def resolve_batch(cfg, world_size: int):
    """With a global batch: --batch-size = global / world size (refused when it does not divide)."""
    rc = cfg.recipe
    if not rc.global_batch_size:
        return cfg
    if rc.global_batch_size % world_size:
        raise ValueError(
            f"--global-batch-size {rc.global_batch_size} does not divide over {world_size} ranks: pick a "
            f"multiple of {world_size}, or a per-rank --batch-size"
        )
    per_rank = rc.global_batch_size // world_size
    provenance = dict(rc.provenance or {})
    provenance["data.batch_size"] = {
        "value": per_rank, "source": f"--global-batch-size {rc.global_batch_size} / {world_size} ranks",
    }  # fmt: skip
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=per_rank),
        recipe=dataclasses.replace(rc, provenance=provenance),
    )


def check_cache(cfg, spec, cache_path: str) -> None:
    """Refuse a cache whose embeddings were pooled otherwise than --expect-pooling (a recipe's value)."""
    want = cfg.recipe.expect_pooling
    if want and want != "any" and spec.pooling != want:
        origin = f" (from --recipe {cfg.recipe.recipe})" if cfg.recipe.recipe else ""
        raise ValueError(
            f"--expect-pooling {want}{origin}: {cache_path} holds {spec.pooling}-pooled LLM embeddings; "
            f"extract with --pooling {want}, or pass --expect-pooling any"
        )


def describe(cfg) -> str:
    """One line per value of the recipe: flag, value, source."""
    from llm2clip.cli import build_parser

    rc = cfg.recipe
    if not rc.provenance:
        return ""
    flags = {
        a.dest: a.option_strings[0] for a in build_parser(type(cfg), "", "")._actions if a.option_strings
    }
    lines = [f"recipe {rc.recipe}:"]
    for dest, entry in sorted(rc.provenance.items()):
        lines.append(f"  {flags.get(dest, dest)} {entry['value']!r}  <- {entry['source']}")
    return "\n".join(lines)
