"""Tiny random vision towers built with their owning libraries, and the comparison rule for them.

No pretrained tower exists offline, so every check starts from a randomly initialised model of the
library itself (transformers, open_clip, timm; pretrained=False), every parameter perturbed (a swapped
bias or LayerNorm would show), saved to disk in the library's own format.

``compare``: fp64 first (the mapping must be exact: 1e-10; where part of one side stays fp32 even in an
fp64 model - the RoPE tables of timm and of ours, SigLIP2's resized positions, an exported projection
composed in fp64 and stored in fp32 - that check is bounded by fp32 rounding, ~1e-7 relative, so it uses
1e-6 relative: fp32_parts=True), then fp32 with the tolerance from the reference's own fp32 error:
max|ours - ref64| <= 2 max|ref32 - ref64| + 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SIZE, PATCH, WIDTH, HEADS, DEPTH = 32, 8, 64, 4, 2


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return model.eval()


def images(size: int = SIZE, batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def report(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    d = (out.double() - ref.double()).abs()
    print(f"{name}: max {d.max().item():.3e} mean {d.mean().item():.3e}")
    return d.max().item()


def compare(ours_fn, ref_fn, ours, ref, x, fp32_parts: bool = False) -> None:
    """ours_fn(model, x) and ref_fn(model, x) return lists of tensors (pooled features, every block's
    output ...) in the same order; see the module docstring for the tolerances."""
    with torch.no_grad():
        ref64 = [t.double().clone() for t in ref_fn(ref.double(), x.double())]
        ours64 = ours_fn(ours.double(), x.double())
        assert len(ours64) == len(ref64)
        for i, (o, r) in enumerate(zip(ours64, ref64)):
            tol = 1e-6 * max(1.0, r.abs().max().item()) if fp32_parts else 1e-10
            assert report(f"fp64 output {i}", o, r) <= tol
        ref32 = ref_fn(ref.float(), x)
        ours32 = ours_fn(ours.float(), x)
        for i, (o, p, r) in enumerate(zip(ours32, ref32, ref64)):
            assert o.dtype == torch.float32
            assert report(f"fp32 output {i}", o, r) <= 2 * report(f"ref fp32 output {i}", p, r) + 1e-6


def hooked(model: torch.nn.Module, modules, run) -> list[torch.Tensor]:
    """Outputs of `modules` (in order) while run() executes, then run()'s own result first."""
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, o: outs.append(o)) for m in modules]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return [result, *outs]


def ours_all(model, x) -> list[torch.Tensor]:
    """Our pooled features and every hidden state (embeddings, each block)."""
    return [model(x), *model.forward_hidden_states(x)]


# --- transformers -----------------------------------------------------------------------------------

HF_SMALL = dict(
    hidden_size=WIDTH,
    intermediate_size=96,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    patch_size=PATCH,
)


def siglip2_inputs(x: torch.Tensor, patch: int = PATCH) -> dict:
    """Siglip2VisionModel's inputs for whole images: patches flattened (row, column, channel) as its
    image processor does, every patch valid, the grid as spatial_shapes."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(b, (h // patch) * (w // patch), patch * patch * c)
    mask = torch.ones(b, patches.shape[1], dtype=torch.int32)
    shapes = torch.tensor([[h // patch, w // patch]] * b)
    return dict(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


# --- open_clip --------------------------------------------------------------------------------------

OPENCLIP_TEXT = {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}


def openclip_folder(root: Path, vision_cfg: dict, quick_gelu: bool, embed_dim: int = 48):
    """A random, perturbed open_clip CLIP saved as its hub layout (open_clip_config.json +
    open_clip_model.safetensors); returns (model, folder)."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip (open-clip-torch) is not installed")
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": {"embed_dim": embed_dim, "quick_gelu": quick_gelu, "vision_cfg": vision_cfg,
                         "text_cfg": OPENCLIP_TEXT}}  # fmt: skip
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    model = perturbed(open_clip.create_model(f"local-dir:{root}", load_weights=False))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "open_clip_model.safetensors")
    )
    return model, root


def openclip_all(model, x) -> list[torch.Tensor]:
    v = model.visual
    return hooked(model, [v.ln_pre, *v.transformer.resblocks], lambda: model.encode_image(x))


# --- timm -------------------------------------------------------------------------------------------

TIMM_SMALL = dict(embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, img_size=SIZE, patch_size=PATCH)


def timm_folder(root: Path, arch: str, **kw):
    """A random, perturbed timm model saved with save_for_hf (config.json with model_args)."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    from timm.models import save_for_hf

    model = perturbed(timm.create_model(arch, pretrained=False, **{**TIMM_SMALL, **kw}))
    save_for_hf(model, str(root), safe_serialization=True)
    return model, root


def register_tiny_eva() -> str:
    """A tiny EVA02-CLIP registered as a timm model name (open_clip's TimmModel builds towers by name)."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    from timm.models import register_model
    from timm.models.eva import _create_eva

    name = "eva02_llm2clip_test_tiny"
    if name in timm.list_models(name):
        return name

    def eva02_llm2clip_test_tiny(pretrained: bool = False, **kwargs):
        args = dict(
            img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
            mlp_ratio=4 * 2 / 3, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
            use_rot_pos_emb=True, ref_feat_shape=(16, 16), global_pool=kwargs.pop("global_pool", "token"),
        )  # fmt: skip
        return _create_eva("eva02_large_patch14_clip_224", pretrained=pretrained, **dict(args, **kwargs))

    register_model(eva02_llm2clip_test_tiny)
    return name


def timm_all(model, x) -> list[torch.Tensor]:
    return hooked(model, [model.norm_pre, *model.blocks], lambda: model(x))


# --- EVA-CLIP naming --------------------------------------------------------------------------------


def eva_clip_rope(
    head_dim: int, pt: int, ft: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-CLIP's VisionRotaryEmbeddingFast buffers (freqs_cos, freqs_sin), following its public source
    (EVA-CLIP/rei/eva_clip/rope.py): dim = head_dim / 2, 'lang' frequencies, t = arange(ft) / ft * pt,
    each frequency repeated twice (interleaved pairs), rows then columns (broadcat on the last dim)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(ft) / ft * pt
    freqs = torch.einsum("..., f -> ... f", t, freqs).repeat_interleave(2, dim=-1)
    freqs = torch.cat([freqs[:, None, :].expand(ft, ft, dim), freqs[None, :, :].expand(ft, ft, dim)], dim=-1)
    return freqs.cos().reshape(-1, 2 * dim), freqs.sin().reshape(-1, 2 * dim)


# timm Eva -> EVA-CLIP names: the inverse of the renames timm.models.eva.checkpoint_filter_fn applies to
# EVA-CLIP checkpoints (inner_attn_ln -> attn.norm, ffn_ln -> mlp.norm, w1/w2/w3 -> fc1_g/fc1_x/fc2,
# q_bias/v_bias -> q_proj.bias/v_proj.bias), which match EVA-CLIP's eva_vit_model.py: Attention with
# subln has q_proj/k_proj/v_proj without biases plus q_bias, v_bias and inner_attn_ln; SwiGLU has
# w1, w2, ffn_ln, w3.
TIMM_TO_EVA_CLIP = (
    ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
    ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
    ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."),
)  # fmt: skip


def eva_clip_state_dict(timm_sd: dict, head_dim: int, pt: int, grid: int, depth: int) -> dict:
    """A timm EVA02-CLIP state dict in EVA-CLIP's naming, as a full CLIP checkpoint: keys under visual.,
    the RoPE buffers EVA-CLIP stores (on the tower and, shared, on every attention), a text key and the
    logit scale beside them."""
    out = {}
    for key, value in timm_sd.items():
        for theirs, eva in TIMM_TO_EVA_CLIP:
            key = key.replace(theirs, eva)
        out["visual." + key] = value
    cos, sin = eva_clip_rope(head_dim, pt, grid)
    for where in ["rope.", *(f"blocks.{i}.attn.rope." for i in range(depth))]:
        out[f"visual.{where}freqs_cos"], out[f"visual.{where}freqs_sin"] = cos, sin
    out["text.text_projection.weight"] = torch.zeros(4, 4)
    out["logit_scale"] = torch.tensor(4.6)
    return out
