"""Loading pretrained vision towers: the short entry points (the machinery is ``llm2clip.models.weights``).

    tower = load_hf_vision("/models/clip-vit-base-patch16")                 # transformers folder
    tower = load_openclip_vision("ViT-B-16.pt", config="ViT-B-16-quickgelu") # open_clip + its config
    tower = load_timm_vision("/models/eva02_large_patch14_clip_224")          # timm folder (config.json)
    tower = load_eva_clip_vision("EVA02_CLIP_L_psz14_s4B.pt")                 # EVA-CLIP naming

Each keeps the checkpoint's own projection (``proj="replace"`` drops it) and is strict: checkpoint keys
the tower cannot use, or tower parameters the checkpoint does not fill, are errors (``allow_partial``).
The key maps, the sources' formats and the exporters: ``llm2clip/models/weights/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from llm2clip.models.vit import ViT
from llm2clip.models.weights import build_tower
from llm2clip.models.weights.eva_clip import plan_eva_clip
from llm2clip.models.weights.files import read_safetensors_folder, read_state_dict
from llm2clip.models.weights.hf import hf_to_vit_state_dict, plan_hf, vit_config_from_hf
from llm2clip.models.weights.mobilenet import load_mobilenet_v2_imagenet, mobilenet_v2_weights_path
from llm2clip.models.weights.open_clip import plan_openclip, vit_config_from_openclip
from llm2clip.models.weights.timm import plan_timm

__all__ = [
    "hf_to_vit_state_dict",
    "load_eva_clip_vision",
    "load_hf_vision",
    "load_mobilenet_v2_imagenet",
    "load_openclip_vision",
    "load_timm_vision",
    "load_vit_state_dict",
    "mobilenet_v2_weights_path",
    "read_safetensors_folder",
    "read_state_dict",
    "vit_config_from_hf",
    "vit_config_from_openclip",
]


def load_hf_vision(path: str | Path, proj: str = "keep", allow_partial: bool = False, **overrides) -> ViT:
    """A ViT loaded from a transformers CLIP / SigLIP / SigLIP2 folder; overrides go to the ViTConfig."""
    return build_tower(plan_hf(path, overrides), proj, allow_partial, source=f"hf:{path}")[0]


def load_openclip_vision(
    source: str | Path | Mapping[str, Tensor],
    config: str | Mapping | None = None,
    proj: str = "keep",
    allow_partial: bool = False,
    **overrides,
) -> ViT:
    """A ViT loaded from an open_clip checkpoint (file, folder or state dict) and its model config."""
    plan = plan_openclip(source, config, overrides)
    where = None if isinstance(source, Mapping) else f"open_clip:{source}"
    return build_tower(plan, proj, allow_partial, source=where)[0]


def load_timm_vision(
    path: str | Path, config: str | None = None, proj: str = "keep", allow_partial: bool = False, **overrides
) -> ViT:
    """A ViT loaded from a timm Eva / VisionTransformer checkpoint (folder with config.json, or a file
    and a timm model name)."""
    return build_tower(plan_timm(path, config, overrides), proj, allow_partial, source=f"timm:{path}")[0]


def load_eva_clip_vision(
    path: str | Path,
    config: str | Mapping | None = None,
    proj: str = "keep",
    allow_partial: bool = False,
    **overrides,
) -> ViT:
    """A ViT loaded from an EVA-CLIP checkpoint (EVA-CLIP's naming)."""
    return build_tower(
        plan_eva_clip(path, config, overrides), proj, allow_partial, source=f"eva_clip:{path}"
    )[0]


def load_vit_state_dict(model: ViT, sd: Mapping[str, Tensor]) -> None:
    """Strict load of a ViT-named state dict with shapes checked and a readable error."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the ViT: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError("shape mismatch: " + "; ".join(bad))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
