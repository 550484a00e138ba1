"""EVA-CLIP checkpoints (baaivision/EVA, EVA-CLIP/rei/eva_clip: EVAVisionTransformer) -> ViT.

EVA-CLIP has no package to install; this naming is written from its public model code
(``eva_vit_model.py``: Attention, SwiGLU, Block, EVAVisionTransformer; ``rope.py``:
VisionRotaryEmbeddingFast; ``model.py``: _build_vision_tower) and cross-checked against timm's own
EVA-CLIP converter (``timm.models.eva.checkpoint_filter_fn``: ``inner_attn_ln`` -> ``attn.norm``,
``ffn_ln`` -> ``mlp.norm``, ``w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``, ``q_bias/v_bias`` -> ``q/v_proj.bias``).
Keys sit under ``visual.`` in a full CLIP checkpoint, at the top in a vision-only one::

    cls_token (1, 1, D) / pos_embed (1, N + 1, D)            -> cls_token / pos_embed
    patch_embed.proj.{weight,bias}                           -> patch_embed.{weight,bias}
    blocks.N.norm1 / norm2                                   -> blocks.N.norm1 / norm2
    blocks.N.attn.{q,k,v}_proj.weight (subln, no biases)     -> blocks.N.attn.qkv.weight   (RoPE: q, k
      or blocks.N.attn.qkv.weight (no subln)                                                 rows permuted)
    blocks.N.attn.q_bias, v_bias (no k bias)                 -> blocks.N.attn.qkv.bias (k third zero)
    blocks.N.attn.inner_attn_ln (subln)                      -> blocks.N.attn.norm
    blocks.N.attn.proj                                       -> blocks.N.attn.proj
    blocks.N.mlp.w1 / w2 / ffn_ln / w3 (naiveswiglu)         -> blocks.N.mlp.fc1_g / fc1_x / norm / fc2
      or blocks.N.mlp.fc1 / ffn_ln / fc2
    norm                                                     -> norm
    head.{weight,bias}                                       -> proj.{weight,bias}
    rope.freqs_cos / freqs_sin (and blocks.N.attn.rope.*)    checked against ViT's RoPE table, not loaded

The architecture comes from an EVA-CLIP model config (--init-vision-config: a JSON in EVA-CLIP's
model_configs format, or the name of one of LLM2CLIP's towers: EVA02-CLIP-B-16, EVA02-CLIP-L-14,
EVA02-CLIP-L-14-336) or, without one, from the weights: shapes give the sizes, the presence of keys the
options, and the stored RoPE table the head width and the reference grid (pt_hw_seq_len).
Refused (no ViT equivalent): layer scale (gamma_1/2), mean pooling with fc_norm, relative position
biases, post-norm blocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from llm2clip.models.vit import CLIP_MEAN, CLIP_STD, ViTConfig, rope_2d
from llm2clip.models.weights.files import read_json, read_state_dict
from llm2clip.models.weights.keymap import KeyMap, LoadReport, Plan, Rule, strip_prefix, wb

__all__ = ["EVA_CLIP_KEYMAP", "NAMED", "eva_clip_rope_table", "plan_eva_clip", "vit_config_from_eva_clip"]

_B = "blocks.{i}."
_subln = lambda c: c.attn_norm  # noqa: E731  (EVA-CLIP's subln: separate q/k/v + the attention sub-LN)
_fused = lambda c: not c.attn_norm  # noqa: E731
_swiglu = lambda c: c.mlp == "swiglu"  # noqa: E731
_plain = lambda c: c.mlp == "mlp"  # noqa: E731
EVA_CLIP_KEYMAP = KeyMap(
    "EVA-CLIP",
    [
        Rule("cls_token", "cls_token", "lead2"),
        Rule("pos_embed", "pos_embed", "lead1"),
        *wb("patch_embed", "patch_embed.proj"),
        *wb(_B + "norm1", _B + "norm1"),
        Rule(
            _B + "attn.qkv.weight", tuple(f"{_B}attn.{p}_proj.weight" for p in "qkv"), "qkv_rope", when=_subln
        ),
        Rule(_B + "attn.qkv.weight", _B + "attn.qkv.weight", "fused_rope", when=_fused),
        Rule(
            _B + "attn.qkv.bias",
            (_B + "attn.q_bias", _B + "attn.v_bias"),
            "qv_bias_rope",
            when=lambda c: c.qkv_bias,
        ),
        *wb(_B + "attn.norm", _B + "attn.inner_attn_ln", when=_subln),
        *wb(_B + "attn.proj", _B + "attn.proj"),
        *wb(_B + "norm2", _B + "norm2"),
        *wb(_B + "mlp.fc1_g", _B + "mlp.w1", when=_swiglu),
        *wb(_B + "mlp.fc1_x", _B + "mlp.w2", when=_swiglu),
        *wb(_B + "mlp.fc2", _B + "mlp.w3", when=_swiglu),
        *wb(_B + "mlp.fc1", _B + "mlp.fc1", when=_plain),
        *wb(_B + "mlp.fc2", _B + "mlp.fc2", when=_plain),
        *wb(_B + "mlp.norm", _B + "mlp.ffn_ln", when=lambda c: c.mlp_norm),
        *wb("norm", "norm"),
        *wb("proj", "head", when=lambda c: c.output_dim is not None),
    ],
    ignore=[r"(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)", r".*relative_position_index"],
)
# EVA-CLIP model names of LLM2CLIP's EVA02 towers -> the ViT presets with their exact configs
# (EVA-CLIP / LLM2CLIP model_configs: head_width 64, mlp_ratio 2.6667, rope, pt_hw_seq_len 16, intp_freq,
# naiveswiglu, subln; the visual embed_dim of EVA-CLIP's own release: 512 for B/16, 768 for L/14).
NAMED = {
    "EVA02-CLIP-B-16": "EVA02-B/16",
    "EVA02-CLIP-L-14": "EVA02-L/14",
    "EVA02-CLIP-L-14-336": "EVA02-L/14-336",
}
# Features of EVAVisionTransformer that ViT does not have, by a key that only they create.
_REFUSED = {
    "gamma_1": "layer scale (init_values)", "fc_norm": "mean pooling with fc_norm (use_mean_pooling)",
    "relative_position_bias_table": "relative position biases",
    "rel_pos_bias": "a shared relative position bias",
}  # fmt: skip


def vit_config_from_eva_clip(model_cfg: Mapping, **overrides) -> ViTConfig:
    """Our ViTConfig from an EVA-CLIP model config ({"embed_dim", "vision_cfg": {..., "eva_model_name"}}),
    following _build_vision_tower / EVAVisionTransformer (LayerNorm eps 1e-6, GELU MLP unless naiveswiglu)."""
    v = model_cfg.get("vision_cfg") or {}
    if not v.get("eva_model_name"):
        raise ValueError("EVA-CLIP config: vision_cfg has no eva_model_name (not an EVA vision tower)")
    for key, what in (("global_average_pool", "mean pooling"), ("postnorm", "post-norm blocks"),
                      ("ls_init_value", "layer scale")):  # fmt: skip
        if v.get(key):
            raise ValueError(f"EVA-CLIP config: vision_cfg.{key} ({what}) is not supported by llm2clip's ViT")
    width, grid = v.get("width", 768), v.get("image_size", 224) // v.get("patch_size", 16)
    pt = v.get("pt_hw_seq_len", 16)
    if v.get("rope") and not v.get("intp_freq") and grid != pt:
        raise ValueError(
            f"EVA-CLIP config: rope without intp_freq needs a {pt} x {pt} grid, the tower has {grid}"
        )
    subln = bool(v.get("subln"))
    cfg = dict(
        name=f"eva_clip:{v['eva_model_name']}", image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 16), width=width, depth=v.get("layers", 12),
        heads=width // v.get("head_width", 64), mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
        output_dim=model_cfg.get("embed_dim", 512), proj_bias=True, act="gelu",
        mlp="swiglu" if v.get("naiveswiglu") else "mlp", mlp_norm=subln, attn_norm=subln,
        rope=bool(v.get("rope")), rope_ref_grid=pt if v.get("rope") else None,
        qkv_bias=v.get("qkv_bias", True), k_bias=False, class_token=True, pre_norm=False, pool="cls",
        patch_bias=True, ln_eps=1e-6, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    cfg.update(overrides)
    return ViTConfig(**cfg)


def eva_clip_rope_table(cfg: ViTConfig, grid: int) -> Tensor:
    """VisionRotaryEmbeddingFast's freqs_cos (grid * grid, head_dim) as ViT would compute it: each
    angle twice (interleaved pairs), the row angles then the column angles."""
    cos, _ = rope_2d(grid, grid, cfg.head_dim, cfg.rope_theta, "cpu", cfg.rope_ref_grid, torch.float64)
    return cos.repeat_interleave(2, dim=-1)


def _rope_from_table(cos: Tensor, sin: Tensor, grid: int, theta: float = 10000.0) -> tuple[int, int]:
    """(head_dim, reference grid) of stored freqs_cos / freqs_sin: head_dim is their width; row 1 is at
    position ref_grid / grid, so its angle in the slowest row band (frequency theta ** (1/q - 1), q =
    head_dim / 4; small, so its atan2 is exact and unambiguous) gives ref_grid."""
    head_dim, q = cos.shape[-1], cos.shape[-1] // 4
    angle = math.atan2(float(sin[grid, 2 * (q - 1)]), float(cos[grid, 2 * (q - 1)]))
    return head_dim, round(angle / theta ** ((1 - q) / q) * grid)


def _config_from_weights(sd: Mapping[str, Tensor], where: str, overrides: Mapping) -> ViTConfig:
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    swiglu = "blocks.0.mlp.w1.weight" in sd
    heads, ref = overrides.get("heads"), None
    if "rope.freqs_cos" in sd and "rope.freqs_sin" in sd:
        head_dim, ref = _rope_from_table(sd["rope.freqs_cos"], sd["rope.freqs_sin"], grid)
        heads = width // head_dim
    elif "heads" not in overrides:
        raise ValueError(
            f"{where}: no RoPE table in the checkpoint to read the heads and RoPE options from; give "
            "--init-vision-config (an EVA-CLIP model config JSON, or EVA02-CLIP-B-16 / -L-14 / -L-14-336)"
        )
    subln = "blocks.0.attn.inner_attn_ln.weight" in sd
    cfg = dict(
        name="eva_clip", image_size=grid * patch, patch_size=patch, width=width, heads=heads,
        depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
        mlp_dim=sd["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0],
        output_dim=sd["head.weight"].shape[0] if "head.weight" in sd else None, proj_bias="head.bias" in sd,
        act="gelu", mlp="swiglu" if swiglu else "mlp", mlp_norm="blocks.0.mlp.ffn_ln.weight" in sd,
        attn_norm=subln, rope=ref is not None, rope_ref_grid=ref, qkv_bias="blocks.0.attn.q_bias" in sd,
        k_bias=False, class_token=True, pre_norm=False, pool="cls", patch_bias=True, ln_eps=1e-6,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )  # fmt: skip
    cfg.update(overrides)
    return ViTConfig(**cfg)


def _check_rope(sd: Mapping[str, Tensor], cfg: ViTConfig, report: LoadReport, where: str) -> None:
    """The stored RoPE table must be the one ViT computes for this config (a wrong head count or
    reference grid cannot pass unnoticed)."""
    stored = sd.get("rope.freqs_cos")
    if stored is None or not cfg.rope:
        return
    grid = cfg.image_size // cfg.patch_size
    ours = eva_clip_rope_table(cfg, grid)
    if stored.shape != ours.shape or (stored.double() - ours).abs().max() > 1e-4:
        raise ValueError(
            f"{where}: the checkpoint's RoPE table (rope.freqs_cos {tuple(stored.shape)}) is not the one of "
            f"heads={cfg.heads}, rope_ref_grid={cfg.rope_ref_grid} at a {grid} x {grid} grid "
            f"{tuple(ours.shape)}: the config does not describe these weights"
        )
    report.notes.append(f"RoPE table verified (head_dim {cfg.head_dim}, reference grid {cfg.rope_ref_grid})")


def plan_eva_clip(
    path: str | Path, config: str | Mapping | None = None, overrides: Mapping | None = None
) -> Plan:
    """Read an EVA-CLIP checkpoint (full model or visual tower) and its architecture."""
    where = f"--init-vision eva_clip:{path}"
    overrides = dict(overrides or {})
    sd = read_state_dict(path)
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    vision, outside = strip_prefix(sd, prefix)
    if "patch_embed.proj.weight" not in vision:
        raise ValueError(f"{where}: no {prefix}patch_embed.proj.weight: not an EVA-CLIP vision tower")
    for key, what in _REFUSED.items():
        if any(k.startswith(key) or f".{key}" in k for k in vision):
            raise ValueError(f"{where}: the tower has {what} ({key}), which llm2clip's ViT does not support")
    if isinstance(config, Mapping):
        cfg = vit_config_from_eva_clip(config, **overrides)
    elif config and not (config.endswith(".json") or Path(config).is_file()):
        if config not in NAMED:
            raise ValueError(f"--init-vision-config {config!r}: not a JSON file nor one of {sorted(NAMED)}")
        cfg = ViTConfig.preset(NAMED[config], **overrides)  # LLM2CLIP's towers by EVA-CLIP's name
    elif config:
        cfg = vit_config_from_eva_clip(read_json(config, "--init-vision-config"), **overrides)
    else:
        cfg = _config_from_weights(vision, where, overrides)
    report = LoadReport(f"eva_clip:{path}", ignored=outside)
    _check_rope(vision, cfg, report, where)
    return Plan(cfg, vision, EVA_CLIP_KEYMAP, report, proj_keys=("head.weight", "head.bias"))
