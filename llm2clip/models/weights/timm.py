"""timm vision towers (``Eva``: eva02_*, eva02_*_clip_*; ``VisionTransformer``: vit_*) <-> ViT.

The architecture is read from the timm model itself, built on the meta device from the checkpoint's
config.json (timm's hub / ``save_for_hf`` layout: architecture + model_args) or a timm model name
(needs timm installed; the weights are read without it). Every option ViT cannot reproduce is refused
by name. Key maps (one per class, both ways; {i} = block)::

    Eva                                        VisionTransformer                    ViT
    cls_token (1, 1, D) / pos_embed (1, N, D)  same                                 cls_token / pos_embed
    patch_embed.proj                           same                                 patch_embed
    norm_pre                                   same                                 norm_pre
    blocks.i.norm1 / norm2                     same                                 blocks.i.norm1 / norm2
    blocks.i.attn.{q,k,v}_proj.weight          blocks.i.attn.qkv                    blocks.i.attn.qkv
      or attn.qkv.weight (fused)                 (q, k permuted to ViT's RoPE layout when RoPE)
    blocks.i.attn.q_proj.bias, v_proj.bias     (in attn.qkv.bias)                   attn.qkv.bias (k = 0)
      or attn.q_bias, attn.v_bias (fused)
    blocks.i.attn.norm (scale_attn_inner)      blocks.i.attn.norm (scale_attn_norm) blocks.i.attn.norm
    blocks.i.attn.proj                         same                                 blocks.i.attn.proj
    blocks.i.mlp.fc1_g / fc1_x (SwiGLU)        blocks.i.mlp.fc1 / fc2 (Mlp)        blocks.i.mlp.*
      or mlp.fc1 (GluMlp, packed: gate first)
    blocks.i.mlp.norm (scale_mlp) / mlp.fc2    same                                 blocks.i.mlp.norm / fc2
    norm                                       norm                                 norm
    --                                         attn_pool.latent, q + kv, proj,      attn_pool.probe, qkv,
                                               norm, mlp ('map', SigLIP)            proj, norm, mlp
    head (Linear with bias)                    head                                 proj (proj_bias)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from llm2clip.models.vit import CLIP_MEAN, CLIP_STD, ViTConfig
from llm2clip.models.weights.files import find_weights, read_state_dict
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

__all__ = ["eva_keymap", "export_timm", "plan_timm", "plan_timm_model", "vit_config_from_timm", "vit_keymap"]


def _swiglu(c: ViTConfig) -> bool:
    return c.mlp == "swiglu"


def _common_rules(b: str) -> list[Rule]:
    """What Eva and VisionTransformer name alike (b = 'blocks.{i}.')."""
    return [
        Rule("cls_token", "cls_token", "lead2", when=lambda c: c.class_token),
        Rule("pos_embed", "pos_embed", "lead1", when=lambda c: c.pos_embed),
        Rule("patch_embed.weight", "patch_embed.proj.weight"),
        Rule("patch_embed.bias", "patch_embed.proj.bias", when=lambda c: c.patch_bias),
        *wb("norm_pre", "norm_pre", when=lambda c: c.pre_norm),
        *wb(b + "norm1", b + "norm1"),
        *wb(b + "attn.norm", b + "attn.norm", when=lambda c: c.attn_norm),
        *wb(b + "attn.proj", b + "attn.proj"),
        *wb(b + "norm2", b + "norm2"),
        *wb(b + "mlp.fc1", b + "mlp.fc1", when=lambda c: c.mlp == "mlp"),
        *wb(b + "mlp.norm", b + "mlp.norm", when=lambda c: c.mlp_norm),
        *wb(b + "mlp.fc2", b + "mlp.fc2"),
        *wb("norm", "norm"),
        Rule("proj.weight", "head.weight", when=lambda c: c.output_dim is not None),
        Rule("proj.bias", "head.bias", when=lambda c: c.output_dim is not None and c.proj_bias),
    ]


def eva_keymap(fused: bool = False, packed_glu: bool = False, interleaved: bool = True) -> KeyMap:
    """timm's Eva naming: fused or separate q/k/v, a packed (GluMlp) or split SwiGLU, interleaved RoPE."""
    b = "blocks.{i}."
    has_bias = lambda c: c.qkv_bias  # noqa: E731
    if fused:
        attn = [
            Rule(b + "attn.qkv.weight", b + "attn.qkv.weight", "fused_rope" if interleaved else "copy"),
            Rule(b + "attn.qkv.bias", (b + "attn.q_bias", b + "attn.v_bias"), "qv_bias_rope", when=has_bias),
        ]
    else:
        qkv = tuple(f"{b}attn.{p}_proj.weight" for p in "qkv")
        bias = (b + "attn.q_proj.bias", b + "attn.v_proj.bias")
        attn = [
            Rule(b + "attn.qkv.weight", qkv, "qkv_rope" if interleaved else "qkv"),
            Rule(b + "attn.qkv.bias", bias, "qv_bias_rope" if interleaved else "qv_bias", when=has_bias),
        ]
    if not interleaved:
        attn[1] = dataclasses.replace(attn[1], op="qv_bias")
    if packed_glu:
        glu = [
            Rule((f"{b}mlp.fc1_g.{k}", f"{b}mlp.fc1_x.{k}"), f"{b}mlp.fc1.{k}", "split2", _swiglu)
            for k in ("weight", "bias")
        ]
    else:
        glu = [*wb(b + "mlp.fc1_g", b + "mlp.fc1_g", _swiglu), *wb(b + "mlp.fc1_x", b + "mlp.fc1_x", _swiglu)]
    return KeyMap("timm Eva", [*_common_rules(b), *attn, *glu], ignore=[r"rope\..*", r".*\.k_bias"])


def vit_keymap() -> KeyMap:
    """timm's VisionTransformer naming (CLIP and SigLIP towers)."""
    b = "blocks.{i}."
    m = lambda c: c.pool == "map"  # noqa: E731
    rules = [
        *_common_rules(b),
        Rule(b + "attn.qkv.weight", b + "attn.qkv.weight"),
        Rule(b + "attn.qkv.bias", b + "attn.qkv.bias", when=lambda c: c.qkv_bias),
        *wb(b + "mlp.fc1_g", b + "mlp.fc1_g", _swiglu),
        *wb(b + "mlp.fc1_x", b + "mlp.fc1_x", _swiglu),
        Rule("attn_pool.probe", "attn_pool.latent", "lead1", when=m),
        Rule("attn_pool.qkv.weight", ("attn_pool.q.weight", "attn_pool.kv.weight"), "q_kv", when=m),
        Rule("attn_pool.qkv.bias", ("attn_pool.q.bias", "attn_pool.kv.bias"), "q_kv", when=m),
        *wb("attn_pool.proj", "attn_pool.proj", when=m),
        *wb("attn_pool.norm", "attn_pool.norm", when=m),
        *wb("attn_pool.mlp.fc1", "attn_pool.mlp.fc1", when=m),
        *wb("attn_pool.mlp.fc2", "attn_pool.mlp.fc2", when=m),
    ]
    return KeyMap("timm VisionTransformer", rules)


# ---------------------------------------------------------------------------------------------
# Architecture from the timm module


def _refuse(what: str) -> None:
    raise ValueError(f"timm tower: {what} is not supported by llm2clip's ViT")


def _square(value, what: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        _refuse(f"a non-square {what} {tuple(value)}")
    return int(a)


def _mlp_options(mlp: nn.Module) -> dict:
    """ViT MLP options and the packed-SwiGLU layout flag of a timm MLP module."""
    kind = type(mlp).__name__
    norm = not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
    if kind == "SwiGLU":
        return dict(mlp="swiglu", mlp_dim=mlp.fc1_g.out_features, mlp_norm=norm, packed=False)
    if kind == "GluMlp":
        if mlp.gate_last or not isinstance(mlp.act, nn.SiLU):
            _refuse("a GluMlp other than SwiGLU with the gate first")
        return dict(mlp="swiglu", mlp_dim=mlp.fc1.out_features // 2, mlp_norm=norm, packed=True)
    if kind != "Mlp":
        _refuse(f"the MLP {kind}")
    act = type(mlp.act).__name__
    acts = {"QuickGELU": "quick_gelu", "GELU": "gelu", "GELUTanh": "gelu_tanh"}
    if act == "GELU" and getattr(mlp.act, "approximate", "none") == "tanh":
        act = "GELUTanh"
    if act not in acts:
        _refuse(f"the MLP activation {act}")
    return dict(mlp="mlp", mlp_dim=mlp.fc1.out_features, mlp_norm=norm, act=acts[act], packed=False)


def _pool_options(model: nn.Module) -> dict:
    pool = getattr(model, "global_pool", "token")
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        _refuse("a norm after pooling (fc_norm, timm's default with global_pool='avg')")
    if isinstance(model.norm, nn.Identity):
        _refuse("no final norm")
    if pool not in ("token", "map", "avg"):
        _refuse(f"global_pool={pool!r}")
    head = model.head
    out = dict(pool={"token": "cls", "map": "map", "avg": "mean"}[pool], output_dim=None, proj_bias=False)
    if isinstance(head, nn.Linear):
        out.update(output_dim=head.out_features, proj_bias=head.bias is not None)
    elif not isinstance(head, nn.Identity):
        _refuse(f"the head {type(head).__name__}")
    return out


def _block_options(block: nn.Module) -> dict:
    if type(block).__name__ not in ("EvaBlock", "Block"):
        _refuse(f"the block {type(block).__name__} (post-norm or parallel blocks)")
    for name in ("gamma_1", "gamma_2"):
        if getattr(block, name, None) is not None:
            _refuse("layer scale (init_values)")
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
            _refuse("layer scale (init_values)")
    attn = block.attn
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
        _refuse("qk_norm")
    if getattr(attn, "gate", None) is not None:
        _refuse("gated attention")
    return dict(
        heads=attn.num_heads, attn_norm=not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
    )


def _rope_options(model: nn.Module) -> dict:
    rope = getattr(model, "rope", None)
    if rope is None:
        return dict(rope=False, interleaved=True)
    if type(rope).__name__ != "RotaryEmbeddingCat" or rope.in_pixels:
        _refuse(f"RoPE {type(rope).__name__} (in_pixels={getattr(rope, 'in_pixels', None)})")
    expected = dict(
        grid_offset=0, grid_indexing="ij", shift_coords=None, jitter_coords=None, rescale_coords=None
    )
    for name, ok in expected.items():
        if getattr(rope, name, ok) != ok:
            _refuse(f"RoPE {name}={getattr(rope, name)!r}")
    ref = rope.ref_feat_shape
    ref = _square(ref, "RoPE ref_feat_shape") if ref is not None else None
    return dict(
        rope=True, rope_ref_grid=ref, rope_theta=float(rope.temperature), interleaved=not rope.rotate_half
    )


def vit_config_from_timm(model: nn.Module, **overrides) -> tuple[ViTConfig, dict]:
    """(ViTConfig, layout) of a timm Eva or VisionTransformer (on any device, meta included); layout
    holds the naming choices ViTConfig does not carry: class, fused qkv, packed SwiGLU, RoPE layout."""
    kind = type(model).__name__
    if kind not in ("Eva", "VisionTransformer"):
        raise ValueError(f"timm model class {kind} is not supported (Eva and VisionTransformer are)")
    if getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
        _refuse("register tokens / position embeddings without the class token")
    pe, blk = model.patch_embed, model.blocks[0]
    mlp, rope = _mlp_options(blk.mlp), _rope_options(model) if kind == "Eva" else dict(interleaved=True)
    fused = getattr(blk.attn, "qkv", None) is not None
    if fused:
        qkv_bias = blk.attn.qkv.bias is not None or getattr(blk.attn, "q_bias", None) is not None
    else:
        qkv_bias = blk.attn.q_proj.bias is not None
    cfg = dict(
        image_size=_square(pe.img_size, "image size"), patch_size=_square(pe.patch_size, "patch size"),
        width=model.embed_dim, depth=len(model.blocks), in_chans=pe.proj.in_channels,
        patch_bias=pe.proj.bias is not None, class_token=model.cls_token is not None,
        pos_embed=model.pos_embed is not None, pre_norm=not isinstance(model.norm_pre, nn.Identity),
        qkv_bias=qkv_bias, k_bias=kind == "VisionTransformer", ln_eps=float(blk.norm1.eps),
        **_block_options(blk), **_pool_options(model),
        **{k: v for k, v in mlp.items() if k != "packed"},
        **{k: v for k, v in rope.items() if k != "interleaved"},
    )  # fmt: skip
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    cfg.update(
        image_mean=tuple(pretrained.get("mean", CLIP_MEAN)), image_std=tuple(pretrained.get("std", CLIP_STD)),
        name=f"timm:{pretrained.get('architecture', kind)}",
    )  # fmt: skip
    cfg.update(overrides)
    layout = dict(kind=kind, fused=fused, packed_glu=mlp["packed"], interleaved=rope["interleaved"])
    return ViTConfig(**cfg), layout


def timm_keymap(layout: Mapping) -> KeyMap:
    if layout["kind"] == "Eva":
        return eva_keymap(layout["fused"], layout["packed_glu"], layout["interleaved"])
    return vit_keymap()


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm towers are read and written with timm: pip install timm") from None
    return timm


def meta_model(name: str, **kwargs) -> nn.Module:
    """A timm model built on the meta device (no weights allocated): its modules describe the tower."""
    timm = _timm()
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def plan_timm_model(
    model: nn.Module, sd: Mapping[str, Tensor], report: LoadReport, overrides: Mapping
) -> Plan:
    """Plan a load of (prefix-stripped) timm weights for the architecture of `model`."""
    cfg, layout = vit_config_from_timm(model, **overrides)
    keymap = timm_keymap(layout)
    proj = ("head.weight", "head.bias") if cfg.output_dim is not None else ()
    return Plan(cfg, dict(sd), keymap, report, proj_keys=proj)


def plan_timm(path: str | Path, config: str | None = None, overrides: Mapping | None = None) -> Plan:
    """A timm checkpoint: a folder with config.json (architecture, model_args) and weights, or a weight
    file with `config` = a timm model name or a config.json."""
    path = Path(path)
    if config is None and path.is_dir() and (path / "config.json").is_file():
        model = meta_model(f"local-dir:{path}")
    elif config is None:
        raise ValueError(
            f"--init-vision timm:{path}: no config.json beside the weights; give --init-vision-config "
            "(a timm model name such as eva02_large_patch14_clip_224, or a folder with its config.json)"
        )
    elif Path(config).is_dir() or config.endswith(".json"):
        folder = Path(config) if Path(config).is_dir() else Path(config).parent
        model = meta_model(f"local-dir:{folder}")
    else:
        model = meta_model(config)
    sd = read_state_dict(find_weights(path, str(path)) if path.is_dir() else path)
    sd, outside = (
        strip_prefix(sd, "visual.trunk.") if any(k.startswith("visual.trunk.") for k in sd) else (sd, 0)
    )
    return plan_timm_model(model, sd, LoadReport(f"timm:{path}", ignored=outside), overrides or {})


# ---------------------------------------------------------------------------------------------
# Export


def _model_args(cfg: ViTConfig, eva: bool) -> dict:
    args = dict(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.width,
        depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=mlp_ratio(cfg.width, cfg.hidden_dim),
        qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, num_classes=cfg.output_dim or 0,
        global_pool={"cls": "token", "map": "map", "mean": "avg"}[cfg.pool],
    )  # fmt: skip
    if eva:
        args.update(
            use_fc_norm=False, qkv_fused=False, swiglu_mlp=cfg.mlp == "swiglu", swiglu_align_to=1,
            scale_mlp=cfg.mlp_norm, scale_attn_inner=cfg.attn_norm, use_rot_pos_emb=cfg.rope,
            rope_temperature=cfg.rope_theta, ref_feat_shape=cfg.rope_ref_grid, use_abs_pos_emb=cfg.pos_embed,
            use_pre_transformer_norm=cfg.pre_norm,
        )  # fmt: skip
    else:
        args.update(
            fc_norm=False, pre_norm=cfg.pre_norm, act_layer=cfg.act, scale_attn_norm=cfg.attn_norm,
            scale_mlp_norm=cfg.mlp_norm,
        )  # fmt: skip
    return args


def timm_export_kind(cfg: ViTConfig) -> str:
    """'Eva' for towers with EVA02 options (RoPE, SwiGLU, sub-LN, no k bias), else 'VisionTransformer';
    ExportError naming the option timm cannot express."""
    eva = cfg.rope or cfg.mlp == "swiglu" or cfg.attn_norm or (cfg.qkv_bias and not cfg.k_bias)
    if cfg.pre_norm and cfg.patch_bias:
        raise ExportError(
            "--format timm: timm's towers with norm_pre have no patch bias (ViTConfig.patch_bias)"
        )
    if eva and cfg.pool == "map":
        raise ExportError("--format timm: timm's Eva has no SigLIP attention pooling (ViTConfig.pool='map')")
    if eva and cfg.mlp == "mlp" and cfg.act != "gelu":
        raise ExportError(f"--format timm: timm's Eva MLP is GELU, not ViTConfig.act={cfg.act!r}")
    eps = {1e-6} if eva else {1e-5, 1e-6}
    if cfg.ln_eps not in eps:
        raise ExportError(
            f"--format timm: ViTConfig.ln_eps={cfg.ln_eps} (timm's LayerNorm eps: {sorted(eps)})"
        )
    if not cfg.pos_embed and not eva:
        raise ExportError(
            "--format timm: a VisionTransformer needs a position embedding (ViTConfig.pos_embed)"
        )
    return "Eva" if eva else "VisionTransformer"


def _fill_for_timm(sd: dict[str, Tensor], cfg: ViTConfig, eva: bool) -> tuple[dict[str, Tensor], ViTConfig]:
    """Add the zero tensors timm always has (head bias; patch bias without norm_pre) and, without RoPE,
    zero a k bias for Eva (it adds the same q . b_k to every logit of a query: softmax ignores it)."""
    sd = dict(sd)
    sd.setdefault("proj.bias", torch.zeros(cfg.output_dim, dtype=sd["proj.weight"].dtype))
    if not cfg.pre_norm and not cfg.patch_bias:
        sd["patch_embed.bias"] = torch.zeros(cfg.width, dtype=sd["patch_embed.weight"].dtype)
    if eva and cfg.qkv_bias and not cfg.rope:
        for i in range(cfg.depth):
            b = sd[f"blocks.{i}.attn.qkv.bias"].clone()
            b[cfg.width : 2 * cfg.width] = 0
            sd[f"blocks.{i}.attn.qkv.bias"] = b
    cfg = dataclasses.replace(cfg, proj_bias=True, patch_bias=cfg.patch_bias or not cfg.pre_norm)
    return sd, cfg


def export_timm(
    tower_sd: Mapping[str, Tensor],
    cfg: ViTConfig,
    projection: Tensor,
    out: str | Path,
    bias: Tensor | None = None,
) -> str:
    """Write a timm folder (config.json with architecture + model_args, model.safetensors) that
    ``timm.create_model('local-dir:OUT', pretrained=True)`` rebuilds; the head (Linear, zero bias) is
    the whole map into the shared space. Returns what was written."""
    eva = timm_export_kind(cfg) == "Eva"  # refusals first: they need no timm
    timm = _timm()
    from timm.models import save_for_hf

    sd = {k: v for k, v in tower_sd.items() if not k.startswith("proj.")}
    sd["proj.weight"] = projection
    if bias is not None:
        sd["proj.bias"] = bias
    cfg = dataclasses.replace(cfg, output_dim=projection.shape[0])
    sd, cfg = _fill_for_timm(sd, cfg, eva)
    if eva:
        arch = "eva02_base_patch16_clip_224"
    else:
        arch = "vit_base_patch16_clip_224" if cfg.ln_eps == 1e-5 else "vit_base_patch16_siglip_224"
    theirs = (eva_keymap() if eva else vit_keymap()).to_theirs(sd, cfg)
    data = dict(
        mean=tuple(cfg.image_mean), std=tuple(cfg.image_std), input_size=(3, cfg.image_size, cfg.image_size)
    )
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=data, **_model_args(cfg, eva))
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if not k.endswith("k_bias")]
    if missing or unexpected:
        raise ExportError(f"timm {arch} does not take the export: missing {missing}, unexpected {unexpected}")
    save_for_hf(model, str(out), safe_serialization=True)
    return f"timm {type(model).__name__} ({arch} + model_args)"
