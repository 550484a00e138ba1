"""python -m llm2clip.export: a stage-2 checkpoint's tower for transformers, open_clip and timm.

A tiny ClipModel (random, perturbed tower + projection + adapter) is saved as a stage-2 checkpoint
(ClipModel.save) and exported; each format is loaded back by its owning library with no llm2clip code
and compared with our model: image features (visual_proj o tower, un-normalised) and every block's
output, fp64 then fp32 (tests/tower_fixtures.py's rule; our side is the reference model). Then each
export is read back through our own loaders (--init-vision) to the same features: the round trip.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm2clip.apps.export import main
from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.models.vit import ViT, ViTConfig
from llm2clip.models.weights import ExportError, load_init_vision
from tests.tower_fixtures import compare, hooked, images, perturbed

TINY = dict(width=64, depth=2, heads=4, mlp_dim=96, patch_size=8, image_size=32)
TOWERS = {
    "clip": dict(name="B/16"),  # QuickGELU, class token, ln_pre, cls pooling, CLIP's projection kept
    "siglip": dict(name="so400m/14", output_dim=None),  # tanh-GELU, no class token, attention pooling
    "eva02": dict(name="EVA02-L/14"),  # RoPE, SwiGLU, sub-LNs, no k bias, head with a bias
}


def checkpoint(root, tower: str, **kw):
    """A saved stage-2 model around a tiny tower; returns (model, folder)."""
    spec = dict(TOWERS[tower])
    cfg = ViTConfig.preset(spec.pop("name"), **{**TINY, **spec, "init_source": "test:tower", **kw})
    torch.manual_seed(0)
    adapter = AdapterConfig(input_dim=24, embed_dim=16, depth=1)
    model = ClipModel(ViT(cfg), ClipModelConfig(embed_dim=16, adapter=adapter))
    perturbed(model)
    model.save(root)
    return model, root


def features(model, x):
    """Ours: the un-normalised image features in the shared space, then every hidden state."""
    return [model.visual_proj(model.visual(x)), *model.visual.forward_hidden_states(x)]


def export(ckpt, fmt, out):
    main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)])
    info = json.loads((out / "llm2clip_export.json").read_text())
    assert info["format"] == fmt and info["embed_dim"] == 16 and info["init_source"] == "test:tower"
    return out


def test_hf_clip_export_loads_with_transformers_alone(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model, ckpt = checkpoint(tmp_path / "ckpt", "clip")
    out = export(ckpt, "hf", tmp_path / "hf")
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert transformers.CLIPVisionModel.from_pretrained(out) is not None  # the plain class loads it too
    processor = transformers.CLIPImageProcessor.from_pretrained(out)
    assert processor.crop_size["height"] == 32 and list(processor.image_mean) == list(
        model.visual.config.image_mean
    )

    def hf_fn(m, x):
        o = m(pixel_values=x, output_hidden_states=True)
        return [o.image_embeds, *o.hidden_states]

    compare(hf_fn, features, hf, model.eval(), images(), fp32_parts=True)  # the composed projection
    back, _ = load_init_vision(f"hf:{out}", proj="keep", overrides={"attn_backend": "sdpa"})
    compare(lambda m, x: [m(x)], lambda m, x: features(m, x)[:1], back, model, images(), fp32_parts=True)


def test_hf_export_drives_a_tiny_llava(tmp_path):
    """A LlavaForConditionalGeneration around the exported tower: vision_feature_layer=-2 features are our
    second-to-last hidden state without the class token, through LLaVA's projector; a forward runs."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model, ckpt = checkpoint(tmp_path / "ckpt", "clip")
    out = export(ckpt, "hf", tmp_path / "hf")
    vision = transformers.CLIPVisionConfig.from_pretrained(out)
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=63, image_seq_length=16,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    llava = transformers.LlavaForConditionalGeneration(cfg).eval()
    tower = transformers.CLIPVisionModel.from_pretrained(out)
    llava.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    x = images(batch=1)
    with torch.no_grad():
        got = llava.model.get_image_features(pixel_values=x)
        got = got.pooler_output if hasattr(got, "pooler_output") else got
        got = torch.cat(list(got)) if isinstance(got, (list, tuple)) else got
        ours = model.visual.forward_hidden_states(x)[-2][:, 1:]
        want = llava.model.multi_modal_projector(ours)
        assert (got.reshape(want.shape) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
        ids = torch.tensor([[1, *[63] * 16, 5, 6]])
        logits = llava(input_ids=ids, pixel_values=x).logits
    assert logits.shape == (1, 19, 64) and torch.isfinite(logits).all()


def test_hf_siglip_export(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from safetensors.torch import load_file

    model, ckpt = checkpoint(tmp_path / "ckpt", "siglip")
    out = export(ckpt, "hf", tmp_path / "hf")
    hf = transformers.SiglipVisionModel.from_pretrained(out).eval()
    proj = load_file(str(out / "llm2clip_projection.safetensors"))["weight"]

    def hf_fn(m, x):
        o = m(pixel_values=x, output_hidden_states=True)
        return [o.pooler_output @ proj.to(o.pooler_output.dtype).T, *o.hidden_states]

    compare(hf_fn, features, hf, model.eval(), images())
    back, _ = load_init_vision(f"hf:{out}", overrides={"attn_backend": "sdpa"})  # the tower, then ours
    projected = lambda m, x: [(lambda y: y @ proj.to(y.dtype).T)(m(x))]  # noqa: E731
    compare(projected, lambda m, x: features(m, x)[:1], back, model, images())


def test_open_clip_export_loads_with_open_clip_alone(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (open-clip-torch) is not installed")
    from safetensors.torch import load_file

    model, ckpt = checkpoint(tmp_path / "ckpt", "clip")
    out = export(ckpt, "open_clip", tmp_path / "oc")
    weights = out / "open_clip_visual.safetensors"
    oc = open_clip.create_model(
        f"local-dir:{out}", load_weights=False, pretrained_image_path=str(weights)
    ).eval()
    oc.visual.load_state_dict(load_file(str(weights)), strict=True)  # every key fits, none is missing
    run = lambda m, x: hooked(
        m, [m.visual.ln_pre, *m.visual.transformer.resblocks], lambda: m.encode_image(x)
    )  # noqa: E731
    compare(run, features, oc, model.eval(), images(), fp32_parts=True)
    back, _ = load_init_vision(f"open_clip:{out}", proj="keep", overrides={"attn_backend": "sdpa"})
    compare(lambda m, x: [m(x)], lambda m, x: features(m, x)[:1], back, model, images(), fp32_parts=True)


@pytest.mark.parametrize("tower", ["eva02", "clip", "siglip"])
def test_timm_export_loads_with_timm_alone(tmp_path, tower):
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model, ckpt = checkpoint(tmp_path / "ckpt", tower)
    out = export(ckpt, "timm", tmp_path / "timm")
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(ref).__name__ == ("Eva" if tower == "eva02" else "VisionTransformer")
    assert tuple(ref.pretrained_cfg["mean"]) == model.visual.config.image_mean
    run = lambda m, x: hooked(m, [m.norm_pre, *m.blocks], lambda: m(x))  # noqa: E731
    composed = tower != "siglip"  # RoPE tables; a projection composed with the tower's own
    compare(run, features, ref, model.eval(), images(), fp32_parts=composed)
    back, _ = load_init_vision(f"timm:{out}", proj="keep", overrides={"attn_backend": "sdpa"})
    compare(lambda m, x: [m(x)], lambda m, x: features(m, x)[:1], back, model, images(), fp32_parts=composed)


def test_a_kept_head_with_a_bias_goes_to_timm_only(tmp_path):
    """An EVA tower whose own head (with a bias) was kept: the map into the shared space has a bias;
    timm's head holds it, hf and open_clip refuse naming why."""
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model, ckpt = checkpoint(tmp_path / "ckpt", "eva02", rope=False, mlp="mlp", act="gelu", attn_norm=False,
                             mlp_norm=False, k_bias=True, pre_norm=True, patch_bias=False)  # fmt: skip
    with torch.no_grad():
        model.visual.proj.bias.normal_()
        model.save(ckpt)
    for fmt in ("hf", "open_clip"):
        with pytest.raises(ExportError, match=f"--format {fmt}: .*bias.*use --format timm"):
            main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt)])
        assert not (tmp_path / fmt).exists()  # nothing half-written
    out = export(ckpt, "timm", tmp_path / "timm")
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()

    def ours(m, x):
        return [m.visual_proj(m.visual(x))]

    compare(lambda m, x: [m(x)], ours, ref, model.eval(), images(), fp32_parts=True)


@pytest.mark.parametrize(
    "tower, fmt, message",
    [
        (
            "eva02",
            "hf",
            r"--format hf cannot express ViTConfig\.rope=True \(2D RoPE \(EVA02\): use --format timm\)",
        ),
        ("eva02", "open_clip", r"--format open_clip cannot express ViTConfig\.rope=True"),
        (
            "siglip",
            "open_clip",
            r"--format open_clip: open_clip's VisionTransformer has no ViTConfig\.pool='map'",
        ),
        ("cnn", "timm", "the vision tower is a CNNTower, not a ViT"),
    ],
)
def test_formats_refuse_what_they_cannot_express(tmp_path, tower, fmt, message):
    if tower == "cnn":
        from llm2clip.models.cnn_tower import CNNTower, CNNTowerConfig

        model = ClipModel(
            CNNTower(CNNTowerConfig()), ClipModelConfig(embed_dim=16, adapter=AdapterConfig(24, 16))
        )
        model.save(tmp_path / "ckpt")
    else:
        checkpoint(tmp_path / "ckpt", tower)
    with pytest.raises(ValueError, match=message):
        main(["--checkpoint", str(tmp_path / "ckpt"), "--format", fmt, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_export_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    _, ckpt = checkpoint(tmp_path / "ckpt", "eva02")
    command = [
        "-m",
        "llm2clip.export",
        "--checkpoint",
        str(ckpt),
        "--format",
        "hf",
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot express ViTConfig.rope=True" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        main(["--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "full")])
    with pytest.raises(ValueError, match="--cache applies to --format bundle"):
        main(["--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "o"), "--cache", "c"])


def test_bundle_format_is_the_bundle_writer(tmp_path, monkeypatch):
    """--format bundle hands the checkpoint, the folder and --cache to llm2clip.bundle.export_bundle."""
    bundle = pytest.importorskip("llm2clip.bundle", reason="llm2clip.bundle is not there yet")
    calls = []
    monkeypatch.setattr(
        bundle, "export_bundle", lambda ckpt, out, cache_dir=None: calls.append((ckpt, out, cache_dir))
    )
    main(["--checkpoint", "ckpt", "--format", "bundle", "--out", str(tmp_path / "b"), "--cache", "cache"])
    assert calls == [("ckpt", tmp_path / "b", "cache")]
