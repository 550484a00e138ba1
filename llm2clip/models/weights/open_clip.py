"""open_clip vision towers <-> ViT (one key map, both ways).

A checkpoint (``.pt`` / ``.bin`` / ``.safetensors``, a full CLIP with keys under ``visual.`` or the
visual tower alone) and its model config: ``open_clip_config.json`` in the folder or beside the file
(the hub layout: {"model_cfg": ..., "preprocess_cfg": ...}), or --init-vision-config (an open_clip model
name, which needs open_clip installed, or a model-config JSON). Heads, activation and pooling are in the
config only; without one they must be given (--vision-overrides '{"heads": .., "act": .., "pool": ..}').
Configs naming a ``timm_model_name`` (open_clip's EVA02 and SigLIP models) are timm towers under
``visual.trunk.`` and load through the timm key maps. Key map of open_clip's VisionTransformer::

    conv1.weight                                        <-> patch_embed.weight
    class_embedding / positional_embedding              <-> cls_token / pos_embed
    ln_pre / ln_post                                    <-> norm_pre / norm
    transformer.resblocks.N.ln_1 / ln_2                 <-> blocks.N.norm1 / norm2
    transformer.resblocks.N.attn.in_proj_{weight,bias}  <-> blocks.N.attn.qkv.{weight,bias}
    transformer.resblocks.N.attn.out_proj               <-> blocks.N.attn.proj
    transformer.resblocks.N.mlp.c_fc / c_proj           <-> blocks.N.mlp.fc1 / fc2
    proj (width, out)                                   <-> proj.weight (out, width)  (transposed)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from llm2clip.models.vit import CLIP_MEAN, CLIP_STD, ViTConfig
from llm2clip.models.weights.files import OPENCLIP_FILES, find_weights, read_json, read_state_dict
from llm2clip.models.weights.keymap import (
    ExportError,
    KeyMap,
    LoadReport,
    Plan,
    Rule,
    mlp_ratio,
    strip_prefix,
    wb,
)

__all__ = [
    "OPENCLIP_KEYMAP", "VISUAL_FILE", "export_open_clip", "openclip_config_from_vit", "plan_openclip",
    "vit_config_from_openclip",
]  # fmt: skip

VISUAL_FILE = "open_clip_visual.safetensors"
_B = "transformer.resblocks.{i}."
OPENCLIP_KEYMAP = KeyMap(
    "open_clip",
    [
        Rule("patch_embed.weight", "conv1.weight"),
        Rule("cls_token", "class_embedding"),
        Rule("pos_embed", "positional_embedding"),
        *wb("norm_pre", "ln_pre", when=lambda c: c.pre_norm),
        *wb("blocks.{i}.norm1", _B + "ln_1"),
        Rule("blocks.{i}.attn.qkv.weight", _B + "attn.in_proj_weight"),
        Rule("blocks.{i}.attn.qkv.bias", _B + "attn.in_proj_bias"),
        *wb("blocks.{i}.attn.proj", _B + "attn.out_proj"),
        *wb("blocks.{i}.norm2", _B + "ln_2"),
        *wb("blocks.{i}.mlp.fc1", _B + "mlp.c_fc"),
        *wb("blocks.{i}.mlp.fc2", _B + "mlp.c_proj"),
        *wb("norm", "ln_post"),
        Rule("proj.weight", "proj", "t", when=lambda c: c.output_dim is not None),
    ],
)
# open_clip vision options ViT does not have, with the value that means "off"
_OFF = {
    "ls_init_value": None, "attentional_pool": False, "final_ln_after_pool": False,
    "pos_embed_type": "learnable", "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "act_kwargs": None,
    "global_average_pool": False,
}  # fmt: skip
# A placeholder text tower for the exported model config: LLM2CLIP's text side is the LLM + adapter.
_TEXT_PLACEHOLDER = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"open_clip config: a non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def vit_config_from_openclip(model_cfg: Mapping, **overrides) -> ViTConfig:
    """Our ViTConfig from an open_clip model config ({"embed_dim", "quick_gelu", "vision_cfg", ...}) or
    an open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}); options ViT lacks are refused."""
    pre = model_cfg.get("preprocess_cfg") or {}
    mc = model_cfg.get("model_cfg", model_cfg)
    v = dict(mc.get("vision_cfg") or {})
    if isinstance(v.get("layers"), (list, tuple)):
        raise ValueError("open_clip config: a ModifiedResNet tower (layers is a list) is not a ViT")
    for key, off in _OFF.items():
        if v.get(key) is not None and v[key] != off:
            raise ValueError(
                f"open_clip config: vision_cfg.{key}={v[key]!r} is not supported by llm2clip's ViT"
            )
    if v.get("block_type") not in (None, "default"):
        raise ValueError(f"open_clip config: vision_cfg.block_type={v['block_type']!r} is not supported")
    pool = {"tok": "cls", "avg": "mean"}.get(v.get("pool_type", "tok"))
    if pool is None:
        raise ValueError(f"open_clip config: vision_cfg.pool_type={v['pool_type']!r} is not supported")
    width = v.get("width", 768)
    cfg = dict(
        name="open_clip", image_size=_square(v.get("image_size", 224), "image_size"),
        patch_size=_square(v.get("patch_size", 16), "patch_size"), width=width, depth=v.get("layers", 12),
        heads=width // v.get("head_width", 64), mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
        output_dim=mc.get("embed_dim", 512), act="quick_gelu" if mc.get("quick_gelu") else "gelu",
        class_token=True, pre_norm=not v.get("no_ln_pre", False), pool=pool, patch_bias=False,
        ln_eps=(v.get("norm_kwargs") or {}).get("eps", 1e-5),
        image_mean=tuple(pre.get("mean", CLIP_MEAN)), image_std=tuple(pre.get("std", CLIP_STD)),
    )  # fmt: skip
    cfg.update(overrides)
    return ViTConfig(**cfg)


def _config_from_weights(sd: Mapping[str, Tensor], overrides: Mapping, where: str) -> ViTConfig:
    """Shapes give width, patch, image size, depth, MLP size, output dim and ln_pre; heads, activation and
    pooling live in the model config only, so without one they must be given."""
    missing = [k for k in ("heads", "act", "pool") if k not in overrides]
    if missing:
        raise ValueError(
            f"{where}: an open_clip checkpoint without its model config does not say "
            f"{', '.join(missing)}; give --init-vision-config (an open_clip model name such as "
            "ViT-B-16-quickgelu, or its JSON) or "
            '--vision-overrides \'{"heads": 12, "act": "quick_gelu", "pool": "cls"}\''
        )
    width, in_chans, patch, _ = sd["conv1.weight"].shape
    grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)
    cfg = dict(
        name="open_clip", image_size=grid * patch, patch_size=patch, width=width, in_chans=in_chans,
        depth=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")),
        mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        output_dim=sd["proj"].shape[1] if "proj" in sd else None, pre_norm="ln_pre.weight" in sd,
        class_token=True, patch_bias=False, ln_eps=1e-5,
    )  # fmt: skip
    cfg.update(overrides)
    return ViTConfig(**cfg)


def _find_config(folder: Path | None, config: str | Mapping | None) -> dict | None:
    """The model config: given (a mapping, a JSON file, an open_clip model name) or the
    open_clip_config.json of the checkpoint's folder."""
    if isinstance(config, Mapping):
        return dict(config)
    if config:
        if config.endswith(".json") or Path(config).is_file():
            return read_json(config, "--init-vision-config")
        try:
            import open_clip
        except ImportError:
            raise ValueError(
                f"--init-vision-config {config}: an open_clip model name needs open_clip "
                "(pip install open-clip-torch)"
            ) from None
        found = open_clip.get_model_config(config)
        if found is None:
            raise ValueError(f"--init-vision-config {config!r}: not an open_clip model name")
        return dict(found)
    if folder is not None and (folder / "open_clip_config.json").is_file():
        return read_json(folder / "open_clip_config.json", "open_clip config")
    return None


def _timm_trunk(model_cfg: Mapping, sd: Mapping[str, Tensor], report: LoadReport, overrides: Mapping) -> Plan:
    """open_clip's TimmModel: a timm trunk under visual.trunk. [+ a linear projection visual.head.proj]."""
    from llm2clip.models.weights.timm import meta_model, plan_timm_model

    mc = model_cfg.get("model_cfg", model_cfg)
    v, embed = mc["vision_cfg"], mc.get("embed_dim", 512)
    proj, pool = v.get("timm_proj", "linear"), v.get("timm_pool", "avg")
    if proj == "mlp" or pool in ("abs_attn", "rot_attn"):
        raise ValueError(f"open_clip config: timm_proj={proj!r} / timm_pool={pool!r} is not supported")
    extra = proj == "linear"
    model = meta_model(
        v["timm_model_name"], num_classes=0 if extra or proj == "none" else embed, global_pool=pool
    )
    trunk, _ = strip_prefix(sd, "visual.trunk.")
    report.ignored = len(sd) - len(trunk)
    kw = dict(overrides)
    if extra:
        trunk["head.weight"] = sd["visual.head.proj.weight"]
        bias = sd.get("visual.head.proj.bias")
        if bias is not None:
            trunk["head.bias"] = bias
        report.ignored -= 1 + (bias is not None)
        kw.update(output_dim=embed, proj_bias=bias is not None)
    return plan_timm_model(model, trunk, report, kw)


def plan_openclip(
    source: str | Path | Mapping[str, Tensor],
    config: str | Mapping | None = None,
    overrides: Mapping | None = None,
) -> Plan:
    """Read an open_clip checkpoint (file, folder or state dict) and its model config."""
    overrides = dict(overrides or {})
    mapping = isinstance(source, Mapping)
    where = "open_clip state dict" if mapping else f"--init-vision open_clip:{source}"
    folder = None if mapping else Path(source) if Path(source).is_dir() else Path(source).parent
    sd = read_state_dict(
        find_weights(folder, where, OPENCLIP_FILES) if not mapping and folder == Path(source) else source
    )
    model_cfg = _find_config(folder, config)
    report = LoadReport("open_clip" if mapping else f"open_clip:{source}")
    vision_cfg = (model_cfg or {}).get("model_cfg", model_cfg or {}).get("vision_cfg") or {}
    if vision_cfg.get("timm_model_name"):
        return _timm_trunk(model_cfg, sd, report, overrides)
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    vision, report.ignored = strip_prefix(sd, prefix)
    if not vision or "conv1.weight" not in vision:
        raise ValueError(
            f"{where}: no {prefix}conv1.weight: not an open_clip checkpoint with a ViT visual tower"
        )
    if model_cfg is not None:
        cfg = vit_config_from_openclip(model_cfg, **overrides)
    else:
        cfg = _config_from_weights(vision, overrides, where)
    return Plan(cfg, vision, OPENCLIP_KEYMAP, report, proj_keys=("proj",))


# ---------------------------------------------------------------------------------------------
# Export


def openclip_config_from_vit(cfg: ViTConfig, embed_dim: int) -> dict:
    """open_clip_config.json for a tower open_clip's VisionTransformer can hold; ExportError naming the
    option otherwise."""
    off = dict(class_token=True, pos_embed=True, rope=False, mlp="mlp", mlp_norm=False, attn_norm=False,
               qkv_bias=True, patch_bias=False, proj_bias=False, in_chans=3)  # fmt: skip
    if cfg.pool == "map" or cfg.act == "gelu_tanh":
        bad = "pool='map'" if cfg.pool == "map" else "act='gelu_tanh'"
        raise ExportError(f"--format open_clip: open_clip's VisionTransformer has no ViTConfig.{bad}")
    for name, ok in off.items():
        if getattr(cfg, name) != ok:
            raise ExportError(f"--format open_clip cannot express ViTConfig.{name}={getattr(cfg, name)!r}")
    vision = dict(
        image_size=cfg.image_size, layers=cfg.depth, width=cfg.width, head_width=cfg.head_dim,
        mlp_ratio=mlp_ratio(cfg.width, cfg.hidden_dim), patch_size=cfg.patch_size, no_ln_pre=not cfg.pre_norm,
        pool_type={"cls": "tok", "mean": "avg"}[cfg.pool],
    )  # fmt: skip
    if cfg.ln_eps != 1e-5:
        vision["norm_kwargs"] = {"eps": cfg.ln_eps}
    model = dict(
        embed_dim=embed_dim, quick_gelu=cfg.act == "quick_gelu", vision_cfg=vision, text_cfg=_TEXT_PLACEHOLDER
    )
    pre = dict(
        size=cfg.image_size, mean=list(cfg.image_mean), std=list(cfg.image_std), interpolation="bicubic"
    )
    return {"model_cfg": model, "preprocess_cfg": pre}


def export_open_clip(
    tower_sd: Mapping[str, Tensor],
    cfg: ViTConfig,
    projection: Tensor,
    out: str | Path,
    bias: Tensor | None = None,
) -> str:
    """Write open_clip_config.json + open_clip_visual.safetensors (model.visual's state dict; the
    projection is the whole map into the shared space). Load with
    ``open_clip.create_model('local-dir:OUT', load_weights=False, pretrained_image_path=OUT/VISUAL_FILE)``
    (the text tower in the config is a placeholder: LLM2CLIP's text side is the LLM and the adapter)."""
    config = openclip_config_from_vit(cfg, projection.shape[0])
    if bias is not None and bias.count_nonzero():
        raise ExportError(
            "--format open_clip: the map into the shared space has a bias (a kept tower head with a bias, "
            "--init-vision-proj keep), which open_clip's proj cannot hold: use --format timm"
        )
    sd = {k: v for k, v in tower_sd.items() if not k.startswith("proj.")}
    cfg = dataclasses.replace(cfg, output_dim=projection.shape[0], proj_bias=False)
    theirs = OPENCLIP_KEYMAP.to_theirs({**sd, "proj.weight": projection}, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(out / VISUAL_FILE))
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return "open_clip VisionTransformer (open_clip_config.json + " + VISUAL_FILE + ")"
