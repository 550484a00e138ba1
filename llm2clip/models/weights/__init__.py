"""Pretrained vision towers in and out of llm2clip's ViT, from local files only (no hub downloads).

    tower, report = load_init_vision("eva_clip:/ckpt/EVA02_CLIP_L_336_psz14_s6B.pt")
    tower, report = load_init_vision("hf:/models/clip-vit-large-patch14", proj="keep")
    tower, report = load_init_vision("open_clip:/ckpt/ViT-B-16.pt", config="ViT-B-16-quickgelu")
    tower, report = load_init_vision("timm:/models/eva02_large_patch14_clip_224")

Sources (``SOURCE:PATH``): ``hf`` (transformers CLIP / SigLIP / SigLIP2 folder), ``open_clip`` (a
checkpoint + its model config), ``timm`` (a timm Eva or VisionTransformer), ``eva_clip`` (EVA-CLIP's own
naming). Each has one key map (``keymap.KeyMap``) used both to load and to export; the architecture is read
from the checkpoint's config or from the weights, and what neither says must be given (``config`` or
``overrides``). A load lists unused checkpoint keys and parameters left unset and refuses both unless
``allow_partial``; shapes must always match. ``proj``: keep the tower's own projection ('keep') or drop it
('replace': LLM2CLIP trains a new projection from the tower's width into the shared space).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from llm2clip.models.vit import ViT
from llm2clip.models.weights.keymap import ExportError, IncompleteLoadError, LoadReport, Plan, load_into

__all__ = [
    "PROJ_MODES",
    "SOURCES",
    "ExportError",
    "IncompleteLoadError",
    "LoadReport",
    "build_tower",
    "load_init_vision",
    "parse_init_vision",
    "plan_vision",
]

SOURCES = ("hf", "open_clip", "timm", "eva_clip")
PROJ_MODES = ("replace", "keep")


def parse_init_vision(spec: str) -> tuple[str, Path]:
    """'SOURCE:PATH' -> (source, path); ValueError naming the flag for anything else."""
    source, sep, path = spec.partition(":")
    if not sep or source not in SOURCES or not path:
        raise ValueError(
            f"--init-vision {spec!r}: expected SOURCE:PATH with SOURCE one of {', '.join(SOURCES)}"
        )
    return source, Path(path)


def plan_vision(spec: str, config: str | Mapping | None = None, overrides: Mapping | None = None) -> Plan:
    """Read a checkpoint named by 'SOURCE:PATH' and work out its tower (nothing built yet)."""
    source, path = parse_init_vision(spec)
    if not path.exists():
        raise FileNotFoundError(f"--init-vision {spec}: {path} does not exist")
    if source == "hf":
        from llm2clip.models.weights.hf import plan_hf

        if config:
            raise ValueError("--init-vision-config: a transformers folder carries its own config.json")
        return plan_hf(path, overrides)
    if source == "open_clip":
        from llm2clip.models.weights.open_clip import plan_openclip

        return plan_openclip(path, config, overrides)
    if source == "timm":
        from llm2clip.models.weights.timm import plan_timm

        return plan_timm(path, config, overrides)
    from llm2clip.models.weights.eva_clip import plan_eva_clip

    return plan_eva_clip(path, config, overrides)


def build_tower(
    plan: Plan,
    proj: str = "keep",
    allow_partial: bool = False,
    flag: str = "--init-vision",
    source: str | None = None,
) -> tuple[ViT, LoadReport]:
    """The ViT of a plan with its weights loaded (see the module docstring for proj and allow_partial)."""
    if proj not in PROJ_MODES:
        raise ValueError(f"--init-vision-proj {proj!r} not in {PROJ_MODES}")
    cfg, sd, report = plan.config, dict(plan.state_dict), plan.report
    if proj == "replace" and cfg.output_dim is not None:
        report.dropped += [k for k in plan.proj_keys if k in sd]
        sd = {k: v for k, v in sd.items() if k not in plan.proj_keys}
        cfg = dataclasses.replace(cfg, output_dim=None, proj_bias=False)
    if source is not None:
        cfg = dataclasses.replace(cfg, init_source=source)
    model = ViT(cfg)
    ours = plan.keymap.to_ours(sd, model.config, report)
    where = f"{flag} {source}" if source else flag
    return load_into(model, ours, report, allow_partial, where), report


def load_init_vision(
    spec: str,
    config: str | Mapping | None = None,
    overrides: Mapping | None = None,
    proj: str = "replace",
    allow_partial: bool = False,
) -> tuple[ViT, LoadReport]:
    """--init-vision SOURCE:PATH as a loaded ViT and the report of what was loaded."""
    plan = plan_vision(spec, config, overrides)
    return build_tower(plan, proj, allow_partial, source=spec)
