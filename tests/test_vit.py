"""ViT family: presets, attention backends, checkpointing, RoPE / SwiGLU, torch.compile, bf16."""

import dataclasses

import pytest
import torch

from llm2clip.models.attention import available_backends
from llm2clip.models.vit import PRESETS, ViT, ViTConfig, apply_rope, num_params, rope_2d, vit

TINY = dict(width=64, depth=2, heads=4, mlp_dim=96)


def tiny(name: str = "B/16", **kw) -> ViTConfig:
    """A preset shrunk to a 3 x 3 patch grid (odd on purpose) and 64-wide tokens."""
    patch = PRESETS[name].patch_size
    return ViTConfig.preset(name, **{**TINY, "image_size": 3 * patch, **kw})


def pixels(cfg: ViTConfig, batch: int = 2, dtype=torch.float32, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    side = size or cfg.image_size
    return torch.randn(batch, cfg.in_chans, side, side, generator=g).to(dtype)


def report(name, out, ref):
    d = (out.double() - ref.double()).abs()
    print(f"{name}: max {d.max().item():.3e} mean {d.mean().item():.3e}")
    return d.max().item()


# --- presets and config -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_tiny_shapes(name):
    cfg = tiny(name)
    model = ViT(cfg)
    x = pixels(cfg)
    pooled, tokens = model(x, return_tokens=True)
    expected_dim = PRESETS[name].output_dim or cfg.width
    assert cfg.output_dim == PRESETS[name].output_dim  # the override kept the preset's projection
    assert pooled.shape == (2, expected_dim) == (2, model.embed_dim)
    assert tokens.shape == (2, cfg.num_prefix_tokens + 9, cfg.width)
    assert model.forward_tokens(x).shape == tokens.shape
    assert torch.isfinite(pooled).all()


# Parameter counts of the full-size towers, as open_clip / transformers report them.
KNOWN_PARAMS = {
    "B/32": 87_849_216,
    "B/16": 86_192_640,
    "L/14": 303_966_208,
    "L/14-336": 304_293_888,
    "so400m/14": 428_225_600,
}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_preset_full_size_param_count(name):
    with torch.device("meta"):
        model = vit(name)
    assert num_params(model) == KNOWN_PARAMS[name]


def test_preset_so400m_shape():
    cfg = ViTConfig.preset("so400m/14")
    assert (cfg.width, cfg.depth, cfg.heads, cfg.hidden_dim, cfg.patch_size, cfg.image_size) == (
        1152, 27, 16, 4304, 14, 384,
    )  # fmt: skip
    assert cfg.grid_size == 27 and not cfg.class_token and cfg.pool == "map" and cfg.output_dim is None


def test_preset_aliases_and_copy():
    assert ViTConfig.preset("ViT-L/14-336") == PRESETS["L/14-336"]
    with torch.device("meta"):
        model = ViT(PRESETS["B/32"])
    model.set_grad_checkpointing(True)
    assert not PRESETS["B/32"].grad_checkpointing  # the model holds its own copy


@pytest.mark.parametrize(
    "bad",
    [
        dict(width=65),
        dict(pool="cls", class_token=False),
        dict(act="relu"),
        dict(mlp="geglu"),
        dict(rope=True, width=72, heads=4),  # head_dim 18, not a multiple of 4
        dict(pos_embed=False, rope=False),
        dict(attn_backend="flash3"),
        dict(depth=0),
        dict(image_size=8, patch_size=16),
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        ViTConfig.preset("B/16", **bad)


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown ViT preset"):
        ViTConfig.preset("H/14")


# --- attention backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["B/16", "so400m/14", "rope"])
def test_every_backend_matches_reference(variant):
    """Each available backend vs an fp64 reference; tolerance = 2x the math backend's own fp32 error."""
    kw = dict(rope=True, mlp="swiglu") if variant == "rope" else {}
    cfg = tiny("B/16" if variant == "rope" else variant, **kw)
    x = pixels(cfg)
    torch.manual_seed(0)
    base = ViT(dataclasses.replace(cfg, attn_backend="sdpa"))
    ref_model = ViT(dataclasses.replace(cfg, attn_backend="sdpa")).double()
    ref_model.load_state_dict(base.state_dict())
    ref_pooled, ref_tokens = ref_model(x.double(), return_tokens=True)

    def run(backend):
        base.set_attn_backend(backend)
        return base(x, return_tokens=True)

    pt_pooled, pt_tokens = run("math")
    tol_p = 2 * report("math pooled", pt_pooled, ref_pooled) + 1e-6
    tol_t = 2 * report("math tokens", pt_tokens, ref_tokens) + 1e-6
    for backend in available_backends("cpu", torch.float32):
        pooled, tokens = run(backend)
        assert report(f"{backend} pooled", pooled, ref_pooled) <= tol_p
        assert report(f"{backend} tokens", tokens, ref_tokens) <= tol_t


# --- activation checkpointing ---------------------------------------------------------------------


def test_grad_checkpointing_identical_gradients():
    cfg = tiny("B/16", rope=True)
    model = ViT(cfg).train()
    x = pixels(cfg)

    def grads(checkpointing: bool):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        calls = []
        # A pre-hook: recomputation stops early, after the last saved tensor, so post-hooks may not run.
        hook = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        model(x).square().sum().backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really was recomputed in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_grad_checkpointing_off_in_eval_and_no_grad():
    cfg = tiny("B/16", grad_checkpointing=True)
    model = ViT(cfg).eval()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(pixels(cfg))
    assert len(calls) == 1


# --- EVA02 options ----------------------------------------------------------------------------------


def test_rope_and_swiglu_variants_run_and_differ():
    x = pixels(tiny())
    outs = {}
    for name, kw in {
        "plain": {},
        "rope": dict(rope=True),
        "swiglu": dict(mlp="swiglu"),
        "eva": dict(rope=True, mlp="swiglu", mlp_norm=True),
    }.items():
        torch.manual_seed(0)
        model = ViT(tiny(**kw))
        out = model(x)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters()), name
        outs[name] = (out.detach(), set(model.state_dict()))
    # RoPE adds no parameters: same weights (same seed), different outputs.
    assert outs["rope"][1] == outs["plain"][1]
    assert not torch.allclose(outs["rope"][0], outs["plain"][0], atol=1e-4)
    assert "blocks.0.mlp.fc1_g.weight" in outs["swiglu"][1] and "blocks.0.mlp.norm.weight" in outs["eva"][1]
    assert not torch.allclose(outs["swiglu"][0], outs["plain"][0], atol=1e-4)


def test_rope_2d_is_relative():
    """Rotated q . k depends only on the (row, column) offset between the two patches."""
    gh, gw, hd = 4, 5, 16
    cos, sin = rope_2d(gh, gw, hd, 10000.0, "cpu")
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)
    rq = apply_rope(q.expand(1, gh * gw, 1, hd), cos.double(), sin.double())[0, :, 0]
    rk = apply_rope(k.expand(1, gh * gw, 1, hd), cos.double(), sin.double())[0, :, 0]
    s = (rq @ rk.T).reshape(gh, gw, gh, gw)
    # (r, c) -> (r', c') equals (r + 1, c + 2) -> (r' + 1, c' + 2)
    torch.testing.assert_close(s[:-1, :-2, :-1, :-2], s[1:, 2:, 1:, 2:])
    assert not torch.allclose(s[0, 0, 0, 0], s[0, 0, 1, 0])  # and it does depend on the offset


def test_rope_table():
    """One angle per (patch, pair); patch (0, 0) is unrotated."""
    cfg = tiny(rope=True)
    cos, sin = rope_2d(cfg.grid_size, cfg.grid_size, cfg.head_dim, cfg.rope_theta, "cpu")
    assert cos.shape == (9, cfg.head_dim // 2)
    torch.testing.assert_close(cos[0], torch.ones_like(cos[0]))  # position (0, 0) is unrotated


# --- other input sizes, compile, bf16 -------------------------------------------------------------


@pytest.mark.parametrize("name", ["B/16", "so400m/14"])
def test_other_image_size_resizes_positions(name):
    cfg = tiny(name, rope=True)
    model = ViT(cfg)
    pooled, tokens = model(pixels(cfg, size=5 * cfg.patch_size), return_tokens=True)
    assert tokens.shape == (2, cfg.num_prefix_tokens + 25, cfg.width)
    assert pooled.shape == (2, cfg.embed_dim) and torch.isfinite(pooled).all()


def test_torch_compile_matches_eager():
    cfg = tiny("B/16", rope=True)
    model = ViT(cfg).eval()
    x = pixels(cfg)
    with torch.no_grad():
        eager = model(x)  # also warms the attention selector's one-time log (not traceable)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    report("compiled", compiled, eager)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["B/16", "so400m/14"])
def test_bf16_forward(name):
    cfg = tiny(name, rope=name == "B/16")
    model = ViT(cfg)
    x = pixels(cfg)
    ref = model.double()(x.double())
    bf = model.to(torch.bfloat16)(x)  # fp32 pixels go in, cast to the weights' dtype
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()
    model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x)
    for out in (bf, auto):
        cos = torch.nn.functional.cosine_similarity(out.double(), ref, dim=-1)
        print(f"bf16 cosine to fp64: min {cos.min().item():.5f}")
        assert cos.min() > 0.99


def test_layer_ids_cover_depth():
    model = ViT(tiny("B/16"))
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["patch_embed.weight"] == ids["cls_token"] == ids["norm_pre.weight"] == 0
    assert ids["blocks.1.attn.qkv.weight"] == 2 and ids["proj.weight"] == ids["norm.weight"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["B/16", "so400m/14"])
def test_cuda_bf16_every_backend_and_inductor(name):
    cfg = tiny(name, rope=name == "B/16", attn_backend="sdpa")
    model = ViT(cfg).cuda().eval()
    x = pixels(cfg).cuda()
    with torch.no_grad():
        ref = ViT(cfg).cuda().double()
        ref.load_state_dict(model.state_dict())
        ref = ref(x.double())
        outs = {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for backend in available_backends("cuda", torch.bfloat16):
                model.set_attn_backend(backend)
                outs[backend] = model(x)
            outs["inductor"] = torch.compile(model, fullgraph=True)(x)
    for key, out in outs.items():
        cos = torch.nn.functional.cosine_similarity(out.double(), ref, dim=-1)
        print(f"{key}: bf16 cosine to fp64 min {cos.min().item():.5f}")
        assert cos.min() > 0.99, key
