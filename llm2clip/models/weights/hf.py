"""transformers CLIP / SigLIP / SigLIP2 vision towers <-> ViT (one key map, both ways).

A folder with config.json + model.safetensors (or a sharded index, or pytorch_model.bin):
``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``, ``SiglipVisionModel``,
``SiglipModel``, ``Siglip2VisionModel``, ``Siglip2Model``. The vision keys may carry a ``vision_model.``
prefix or none (it depends on the class and version); the CLIP projection ``visual_projection.weight``
sits outside it::

    embeddings.class_embedding                    <-> cls_token
    embeddings.patch_embedding.{weight,bias}      <-> patch_embed.{weight,bias}  (SigLIP2: a Linear over
                                                      patches flattened (row, column, channel))
    embeddings.position_embedding.weight          <-> pos_embed
    pre_layrnorm                                  <-> norm_pre                (CLIP)
    encoder.layers.N.layer_norm1 / layer_norm2    <-> blocks.N.norm1 / norm2
    encoder.layers.N.self_attn.{q,k,v}_proj       <-> blocks.N.attn.qkv       (concatenated q, k, v)
    encoder.layers.N.self_attn.out_proj           <-> blocks.N.attn.proj
    encoder.layers.N.mlp.fc1 / fc2                <-> blocks.N.mlp.fc1 / fc2
    post_layernorm                                <-> norm
    head.probe (1, 1, D)                          <-> attn_pool.probe (1, D)  (SigLIP MAP head)
    head.attention.in_proj_{weight,bias}          <-> attn_pool.qkv.{weight,bias}
    head.attention.out_proj / head.layernorm      <-> attn_pool.proj / attn_pool.norm
    head.mlp.fc1 / fc2                            <-> attn_pool.mlp.fc1 / fc2
    visual_projection.weight (outside the prefix) <-> proj.weight             (CLIP with projection)

SigLIP2 keeps a position embedding for a fixed grid (num_patches) and resizes it per image (bilinear,
antialiased); the loader resizes it once, the same way, to the training grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2clip.models.vit import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ViTConfig
from llm2clip.models.weights.files import find_weights, read_json, read_state_dict
from llm2clip.models.weights.keymap import ExportError, KeyMap, LoadReport, Plan, Rule, strip_prefix, wb

__all__ = [
    "export_hf", "hf_export_family", "hf_family", "hf_keymap", "hf_to_vit_state_dict", "plan_hf",
    "vit_config_from_hf",
]  # fmt: skip

# transformers hidden_act -> ours ("gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation)
_HF_ACT = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
}  # fmt: skip
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "siglip2_vision_model": "siglip2"}


def _map(c: ViTConfig) -> bool:
    return c.pool == "map"


def hf_keymap(family: str) -> KeyMap:
    """The transformers naming of a CLIP ('clip'), SigLIP ('siglip') or SigLIP2 ('siglip2') vision tower."""
    layer = "encoder.layers.{i}."
    qkv = {kind: tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv") for kind in ("weight", "bias")}
    rules = [
        Rule("cls_token", "embeddings.class_embedding", when=lambda c: c.class_token),
        Rule(
            "patch_embed.weight",
            "embeddings.patch_embedding.weight",
            "patch_linear" if family == "siglip2" else "copy",
        ),
        Rule("patch_embed.bias", "embeddings.patch_embedding.bias", when=lambda c: c.patch_bias),
        Rule("pos_embed", "embeddings.position_embedding.weight"),
        *wb("norm_pre", "pre_layrnorm", when=lambda c: c.pre_norm),
        *wb("blocks.{i}.norm1", layer + "layer_norm1"),
        Rule("blocks.{i}.attn.qkv.weight", qkv["weight"], "qkv"),
        Rule("blocks.{i}.attn.qkv.bias", qkv["bias"], "qkv", when=lambda c: c.qkv_bias),
        *wb("blocks.{i}.attn.proj", layer + "self_attn.out_proj"),
        *wb("blocks.{i}.norm2", layer + "layer_norm2"),
        *wb("blocks.{i}.mlp.fc1", layer + "mlp.fc1"),
        *wb("blocks.{i}.mlp.fc2", layer + "mlp.fc2"),
        *wb("norm", "post_layernorm"),
        Rule("attn_pool.probe", "head.probe", "lead1", when=_map),
        Rule("attn_pool.qkv.weight", "head.attention.in_proj_weight", when=_map),
        Rule("attn_pool.qkv.bias", "head.attention.in_proj_bias", when=_map),
        *wb("attn_pool.proj", "head.attention.out_proj", when=_map),
        *wb("attn_pool.norm", "head.layernorm", when=_map),
        *wb("attn_pool.mlp.fc1", "head.mlp.fc1", when=_map),
        *wb("attn_pool.mlp.fc2", "head.mlp.fc2", when=_map),
        Rule("proj.weight", "visual_projection.weight", when=lambda c: c.output_dim is not None),
    ]
    return KeyMap(f"transformers {family}", rules, ignore=[r"embeddings\.position_ids"])


def _vision_config(hf: Mapping) -> tuple[Mapping, str, Mapping]:
    """(vision config, family, top-level config) of a vision or a full CLIP / SigLIP / SigLIP2 config."""
    model_type = hf.get("model_type", "")
    top = hf
    if model_type in ("clip", "siglip", "siglip2"):
        hf, model_type = hf.get("vision_config") or {}, f"{model_type}_vision_model"
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported transformers model_type {model_type!r} (CLIP, SigLIP, SigLIP2 vision towers only)"
        )
    return hf, _FAMILIES[model_type], top


def hf_family(hf: Mapping) -> str:
    return _vision_config(hf)[1]


def vit_config_from_hf(hf: Mapping, **overrides) -> ViTConfig:
    """Our ViTConfig from a transformers config dict (vision config, or a full CLIP / SigLIP config).

    ``output_dim`` is the CLIP ``projection_dim`` when the checkpoint has a visual projection; pass
    ``output_dim=...`` / ``None`` to override (the loaders decide from the weights). SigLIP2 has no
    image size: its default is the side of its position grid (sqrt(num_patches) x patch_size).
    """
    vision, family, top = _vision_config(hf)
    act = vision.get("hidden_act", "quick_gelu" if family == "clip" else "gelu_pytorch_tanh")
    if act not in _HF_ACT:
        raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_HF_ACT)}")
    patch = vision.get("patch_size", 32 if family == "clip" else 16)
    image = (
        vision.get("image_size", 224)
        if family != "siglip2"
        else math.isqrt(vision.get("num_patches", 256)) * patch
    )
    common = dict(
        image_size=image, patch_size=patch, width=vision.get("hidden_size", 768),
        depth=vision.get("num_hidden_layers", 12), heads=vision.get("num_attention_heads", 12),
        mlp_dim=vision.get("intermediate_size", 3072), in_chans=vision.get("num_channels", 3),
        act=_HF_ACT[act],
    )  # fmt: skip
    if family == "clip":
        # A full CLIPConfig's projection_dim is at the top; its vision_config carries a stale default.
        proj = top.get("projection_dim") if top is not hf else vision.get("projection_dim", 512)
        cfg = dict(
            common, output_dim=proj, class_token=True, pre_norm=True, pool="cls", patch_bias=False,
            ln_eps=vision.get("layer_norm_eps", 1e-5), image_mean=CLIP_MEAN, image_std=CLIP_STD,
        )  # fmt: skip
    else:
        pool = "map" if vision.get("vision_use_head", True) else "mean"
        cfg = dict(
            common, output_dim=None, class_token=False, pre_norm=False, pool=pool, patch_bias=True,
            ln_eps=vision.get("layer_norm_eps", 1e-6), image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
        )  # fmt: skip
    cfg.update(name=f"hf:{family}", **overrides)
    return ViTConfig(**cfg)


def _vision_prefix(keys) -> str:
    """The prefix in front of 'embeddings.patch_embedding.weight' (e.g. '', 'vision_model.')."""
    for k in keys:
        if k.endswith("embeddings.patch_embedding.weight") and "text" not in k:
            return k[: -len("embeddings.patch_embedding.weight")]
    raise ValueError("no '*embeddings.patch_embedding.weight' key: not a transformers CLIP/SigLIP checkpoint")


def _vision_keys(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Their vision keys with the prefix removed, the projection beside them; (keys, others skipped)."""
    prefix = _vision_prefix(sd)
    vision, outside = strip_prefix(sd, prefix)
    if prefix == "":  # an unprefixed tower: the text tower, if any, is under its own prefix
        vision = {
            k: v
            for k, v in vision.items()
            if k.startswith(("embeddings.", "encoder.", "pre_", "post_", "head."))
        }
        outside = len(sd) - len(vision)
    if "visual_projection.weight" in sd and "visual_projection.weight" not in vision:
        vision["visual_projection.weight"], outside = sd["visual_projection.weight"], outside - 1
    return vision, outside


def hf_to_vit_state_dict(sd: Mapping[str, Tensor], family: str = "clip") -> dict[str, Tensor]:
    """Map a transformers vision state dict (any prefix; text keys ignored) to ViT names (strict)."""
    vision, _ = _vision_keys(sd)
    cfg = _probe_config(vision, family)
    report = LoadReport("transformers")
    out = hf_keymap(family).to_ours(vision, cfg, report)
    if report.unused:
        raise ValueError(f"unmapped transformers vision keys: {report.unused}")
    return out


def _probe_config(vision: Mapping[str, Tensor], family: str) -> ViTConfig:
    """The options that decide which keys exist, read from the keys themselves (for key mapping only)."""
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    width = vision["embeddings.position_embedding.weight"].shape[1]
    proj = vision.get("visual_projection.weight")
    return ViTConfig(
        width=width, heads=1, depth=depth, class_token="embeddings.class_embedding" in vision,
        pool="map" if "head.probe" in vision else "cls" if "embeddings.class_embedding" in vision else "mean",
        pre_norm="pre_layrnorm.weight" in vision, patch_bias="embeddings.patch_embedding.bias" in vision,
        qkv_bias="encoder.layers.0.self_attn.q_proj.bias" in vision,
        output_dim=proj.shape[0] if proj is not None else None, patch_size=1, image_size=1,
    )  # fmt: skip


def _resize_siglip2_positions(pe: Tensor, grid: int) -> Tensor:
    """SigLIP2's resize of its (G * G, D) position grid to grid x grid: bilinear, antialiased."""
    g = math.isqrt(pe.shape[0])
    if g == grid:
        return pe
    x = pe.reshape(g, g, -1).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).reshape(grid * grid, -1).to(pe.dtype)


def plan_hf(path: str | Path, overrides: Mapping | None = None) -> Plan:
    """Read a transformers folder: its config, its vision weights, the key map."""
    path = Path(path)
    hf_config = read_json(path / "config.json", "transformers config")
    family = hf_family(hf_config)
    sd = read_state_dict(find_weights(path, str(path)))
    vision, outside = _vision_keys(sd)
    kw = dict(overrides or {})
    kw.setdefault(
        "output_dim",
        vision["visual_projection.weight"].shape[0] if "visual_projection.weight" in vision else None,
    )
    cfg = vit_config_from_hf(hf_config, **kw)
    report = LoadReport(f"hf:{path}", ignored=outside)
    if family == "siglip2":
        key = "embeddings.position_embedding.weight"
        old = vision[key].shape[0]
        vision[key] = _resize_siglip2_positions(vision[key], cfg.grid_size)
        if vision[key].shape[0] != old:
            report.notes.append(
                f"SigLIP2 positions resized (bilinear, antialiased) from {old} to {cfg.grid_size**2}"
            )
    return Plan(cfg, vision, hf_keymap(family), report, proj_keys=("visual_projection.weight",))


# ---------------------------------------------------------------------------------------------
# Export


def hf_export_family(cfg: ViTConfig) -> str:
    """'clip' or 'siglip': which transformers class can hold this tower; ExportError naming the option."""
    common = {
        "rope": "2D RoPE (EVA02): use --format timm", "mlp_norm": "the MLP sub-LN (EVA02)",
        "attn_norm": "the attention sub-LN (EVA02)", "proj_bias": "a bias on the projection",
    }  # fmt: skip
    for name, what in common.items():
        if getattr(cfg, name):
            raise ExportError(f"--format hf cannot express ViTConfig.{name}={getattr(cfg, name)!r} ({what})")
    if cfg.mlp != "mlp" or not cfg.pos_embed or not cfg.qkv_bias:
        bad = (
            "mlp='swiglu'"
            if cfg.mlp != "mlp"
            else "pos_embed=False"
            if not cfg.pos_embed
            else "qkv_bias=False"
        )
        raise ExportError(f"--format hf cannot express ViTConfig.{bad}")
    clip = dict(class_token=True, pre_norm=True, pool="cls", patch_bias=False)
    siglip = dict(class_token=False, pre_norm=False, pool="map", patch_bias=True)
    for family, want in (("clip", clip), ("siglip", siglip)):
        if all(getattr(cfg, k) == v for k, v in want.items()):
            return family
    near, want = ("clip", clip) if cfg.class_token else ("siglip", siglip)
    diff = ", ".join(f"{k}={getattr(cfg, k)!r}" for k, v in want.items() if getattr(cfg, k) != v)
    raise ExportError(
        f"--format hf: the tower is neither a CLIP nor a SigLIP vision model (as a {near} tower its {diff} "
        f"would have to be {', '.join(f'{k}={want[k]!r}' for k in want if getattr(cfg, k) != want[k])})"
    )


def _hf_config(cfg: ViTConfig, family: str, projection_dim: int | None):
    import transformers

    kw = dict(
        hidden_size=cfg.width, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, num_channels=cfg.in_chans, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=_ACT_TO_HF[cfg.act], layer_norm_eps=cfg.ln_eps,
    )  # fmt: skip
    if family == "clip":
        return transformers.CLIPVisionConfig(**kw, projection_dim=projection_dim)
    return transformers.SiglipVisionConfig(**kw, vision_use_head=True)


def export_hf(
    tower_sd: Mapping[str, Tensor],
    cfg: ViTConfig,
    projection: Tensor,
    out: str | Path,
    bias: Tensor | None = None,
) -> str:
    """Write a transformers folder: CLIPVisionModelWithProjection (projection = the whole map into the
    shared space) or SiglipVisionModel (+ llm2clip_projection.safetensors), with an image processor
    config. Returns the class name written."""
    family = hf_export_family(cfg)  # refusals first: they need no transformers
    if bias is not None and family == "clip" and torch.count_nonzero(bias):
        raise ExportError(
            "--format hf: the map into the shared space has a bias (a kept tower head with a bias, "
            "--init-vision-proj keep), which CLIP's visual_projection cannot hold: use --format timm"
        )
    try:
        import transformers
    except ImportError:
        raise ValueError("--format hf writes with transformers: pip install transformers") from None
    from safetensors.torch import save_file

    sd = {k: v for k, v in tower_sd.items() if not k.startswith("proj.")}
    out = Path(out)
    if family == "clip":
        cfg = dataclasses.replace(cfg, output_dim=projection.shape[0], proj_bias=False)
        theirs = hf_keymap("clip").to_theirs({**sd, "proj.weight": projection}, cfg)
        model = transformers.CLIPVisionModelWithProjection(_hf_config(cfg, family, projection.shape[0]))
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": cfg.image_size},
            crop_size={"height": cfg.image_size, "width": cfg.image_size},
            image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        )  # fmt: skip
    else:
        cfg = dataclasses.replace(cfg, output_dim=None, proj_bias=False)
        theirs = hf_keymap("siglip").to_theirs(sd, cfg)
        model = transformers.SiglipVisionModel(_hf_config(cfg, family, None))
        processor = transformers.SiglipImageProcessor(
            size={"height": cfg.image_size, "width": cfg.image_size},
            image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        )  # fmt: skip
    prefix = _vision_prefix(model.state_dict())
    theirs = {(k if k == "visual_projection.weight" else prefix + k): v for k, v in theirs.items()}
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ExportError(
            f"transformers {type(model).__name__} does not take the export: {missing} {unexpected}"
        )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if family == "siglip":
        extra = {"bias": bias.contiguous()} if bias is not None else {}
        save_file({"weight": projection.contiguous(), **extra}, str(out / "llm2clip_projection.safetensors"))
    return type(model).__name__
