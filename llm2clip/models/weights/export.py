"""A stage-2 model's vision tower in another library's format: transformers, open_clip, timm.

The exported tower maps images into the shared image-text space: its projection is the whole linear
map of the ClipModel, visual_proj composed with the tower's own projection when it kept one (product
in fp64). What each format holds (the key maps of llm2clip.models.weights.{hf,open_clip,timm}, used
backwards) and what it refuses, by option:

    hf         CLIP-style ViTs -> CLIPVisionModelWithProjection; SigLIP-style -> SiglipVisionModel (the
               projection beside it, llm2clip_projection.safetensors); + image processor config
    open_clip  CLIP-style ViTs (class token, GELU / QuickGELU, cls or mean pooling) -> open_clip_config.json
               + open_clip_visual.safetensors (model.visual's state dict)
    timm       EVA02-option towers (RoPE, SwiGLU, sub-LN, no k bias) -> Eva; CLIP / SigLIP ViTs ->
               VisionTransformer; config.json with architecture + model_args, model.safetensors
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.models.vit import ViT
from llm2clip.models.weights.keymap import ExportError

__all__ = ["FORMATS", "export_tower", "tower_and_projection"]

FORMATS = ("hf", "open_clip", "timm")


def tower_and_projection(model) -> tuple[ViT, Tensor, Tensor | None]:
    """(tower, W, b): the ViT and the linear map from its pooled width into the shared space,
    W = visual_proj @ tower.proj (b = visual_proj @ tower.proj.bias when the kept head has a bias)."""
    tower = model.visual
    if not isinstance(tower, ViT):
        raise ExportError(
            f"the vision tower is a {type(tower).__name__}, not a ViT: hf, open_clip and timm hold ViTs only "
            "(--format bundle holds any llm2clip tower)"
        )
    w = model.visual_proj.weight.detach().double()
    bias = None
    if tower.proj is not None:
        if tower.proj.bias is not None:
            bias = (w @ tower.proj.bias.detach().double()).float()
        w = w @ tower.proj.weight.detach().double()
    return tower, w.float(), bias


def export_tower(model, fmt: str, out: str | Path) -> str:
    """Write the model's tower in `fmt` into the folder `out`; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} not in {FORMATS}")
    tower, w, bias = tower_and_projection(model)
    sd = {k: v.detach().cpu().float() for k, v in tower.state_dict().items() if not k.startswith("proj.")}
    cfg = dataclasses.replace(tower.config, output_dim=None, proj_bias=False)
    if fmt == "hf":
        from llm2clip.models.weights.hf import export_hf as write
    elif fmt == "open_clip":
        from llm2clip.models.weights.open_clip import export_open_clip as write
    else:
        from llm2clip.models.weights.timm import export_timm as write
    with torch.no_grad():
        return write(sd, cfg, w, out, bias)
