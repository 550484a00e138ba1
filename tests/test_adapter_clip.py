"""Text adapter and the stage-2 CLIP wrapper: shapes, math, logit scale/bias, checkpoint round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llm2clip.models.adapter import AdapterConfig, adapter
from llm2clip.models.clip_model import ClipModel, ClipModelConfig, build_vision_tower, plain_state_dict


class TinyTower(nn.Module):
    """A dummy vision tower: (B, 3, H, W) -> (B, embed_dim)."""

    embed_dim = 24

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 4, 4)
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(self.conv(x).mean((2, 3)))


def _clip(loss="infonce", tower=None, **kw):
    cfg = ClipModelConfig(
        embed_dim=16, adapter=AdapterConfig(input_dim=32, embed_dim=16, depth=2), loss=loss, **kw
    )
    return ClipModel(tower if tower is not None else TinyTower(), cfg)


# ---------------------------------------------------------------------------------------------
# Adapter


def test_adapter_matches_explicit_math():
    torch.manual_seed(0)
    a = adapter(32, 16, depth=3)
    assert len(a.blocks) == 3 and a.config.hidden_dim == 64
    assert sorted(n for n, _ in a.named_parameters() if not n.startswith("blocks.")) == [
        "norm.bias", "norm.weight", "proj.bias", "proj.weight",
    ]  # fmt: skip
    assert {n.split(".", 2)[2] for n, _ in a.named_parameters() if n.startswith("blocks.")} == {
        "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    }  # fmt: skip
    x = torch.randn(5, 32, dtype=torch.float64)
    a64 = a.double()
    h = x / x.norm(dim=-1, keepdim=True)
    for blk in a64.blocks:
        z = F.layer_norm(h, (32,), blk.norm.weight, blk.norm.bias, 1e-5)
        h = h + blk.fc2(F.gelu(blk.fc1(z)))
    want = a64.proj(F.layer_norm(h, (32,), a64.norm.weight, a64.norm.bias, 1e-5))
    torch.testing.assert_close(a64(x), want)
    torch.testing.assert_close(a64(7.5 * x), want)  # L2-normalised input: scale-free


def test_adapter_linear_and_dtypes():
    lin = adapter(32, 16, kind="linear")
    assert len(lin.blocks) == 0 and isinstance(lin.norm, nn.Identity)
    x = torch.randn(4, 32)
    torch.testing.assert_close(lin(x), lin.proj(F.normalize(x, dim=-1)))
    a = adapter(32, 16, depth=1)
    y = a(x.to(torch.bfloat16))  # bf16 input, fp32 weights: runs in fp32
    assert y.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert a(x).dtype == torch.bfloat16
    assert adapter(32, 16, depth=0).norm is not None
    for bad in (dict(kind="conv"), dict(depth=-1), dict(input_dim=0), dict(mlp_ratio=0)):
        with pytest.raises(ValueError):
            AdapterConfig(**bad)


# ---------------------------------------------------------------------------------------------
# CLIP wrapper


def test_forward_features_and_scalars():
    torch.manual_seed(0)
    model = _clip()
    images, text = torch.randn(3, 3, 16, 16), torch.randn(3, 32)
    img, txt, scale, bias = model(images, text)
    assert img.shape == txt.shape == (3, 16) and bias is None
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(img, model.encode_image(images))
    torch.testing.assert_close(txt, model.encode_text_embedding(text))
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-6)
    sig = _clip("sigmoid")
    _, _, scale, bias = sig(images, text)
    assert math.isclose(scale.item(), 10.0, rel_tol=1e-6) and bias.item() == -10.0 and bias.requires_grad
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.clamp_logit_scale()
    assert math.isclose(model.logit_scale.item(), math.log(100), rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0
    (img.sum() + txt.sum() + scale).backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.logit_scale)


def test_config_validation():
    with pytest.raises(ValueError, match="adapter.embed_dim"):
        ClipModelConfig(embed_dim=16)
    with pytest.raises(ValueError, match="loss"):
        ClipModelConfig(loss="hinge")
    with pytest.raises(ValueError, match="sigmoid"):
        ClipModelConfig(init_logit_bias=-5.0)
    with pytest.raises(ValueError, match="vision_width"):
        ClipModel(nn.Linear(3, 3), ClipModelConfig())
    cfg = ClipModelConfig(
        loss="sigmoid", init_logit_scale=1.0, init_logit_bias=-3.0, adapter={"input_dim": 8}
    )
    assert (cfg.init_logit_scale, cfg.init_logit_bias, cfg.adapter.input_dim) == (1.0, -3.0, 8)


def test_checkpoint_round_trip_dummy_tower(tmp_path):
    torch.manual_seed(0)
    model = _clip("sigmoid")
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
        model.logit_bias.fill_(-7.0)
    model.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["vision"] is None and cfg["vision_width"] == 24 and cfg["loss"] == "sigmoid"
    with pytest.raises(ValueError, match="vision_tower"):
        ClipModel.load(tmp_path / "ckpt")
    loaded = ClipModel.load(tmp_path / "ckpt", vision_tower=TinyTower())
    images, text = torch.randn(2, 3, 16, 16), torch.randn(2, 32)
    for a, b in zip(model(images, text), loaded(images, text)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(loaded.state_dict()) == set(model.state_dict())


def test_checkpoint_names_are_plain(tmp_path):
    """Wrapped models (DDP's module., torch.compile's _orig_mod.) save and load the plain names."""
    from safetensors.torch import load_file

    model = _clip()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert set(plain_state_dict(state)) == set(model.state_dict())
    model.visual = torch.compile(model.visual, backend="eager")  # submodule wrapper, never run
    model.save(tmp_path / "c")
    names = set(load_file(str(tmp_path / "c" / "model.safetensors")))
    assert not any("_orig_mod" in n or n.startswith("module.") for n in names)
    assert {"visual.conv.weight", "visual_proj.weight", "adapter.proj.weight", "logit_scale"} <= names


def test_checkpoint_round_trip_llm2clip_vit(tmp_path):
    """An llm2clip ViT is rebuilt from config.json alone."""
    vit = pytest.importorskip("llm2clip.models.vit")
    torch.manual_seed(0)
    tower = vit.ViT(vit.ViTConfig.preset("B/16", image_size=32, width=32, depth=1, heads=2, output_dim=None))
    cfg = ClipModelConfig(embed_dim=16, adapter=AdapterConfig(input_dim=32, embed_dim=16, depth=1))
    model = ClipModel(tower, cfg).eval()
    assert model.config.vision_width == 32 and model.config.vision["class"] == "llm2clip.models.vit:ViT"
    model.save(tmp_path / "v")
    loaded = ClipModel.load(tmp_path / "v").eval()
    images, text = torch.randn(2, 3, 32, 32), torch.randn(2, 32)
    for a, b in zip(model(images, text), loaded(images, text)):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="refusing"):
        build_vision_tower({"class": "os:system", "config_class": "os:system", "config": {}})


def test_adapter_centering():
    """center_input subtracts input_mean from the normalised embedding and renormalises; a zero
    mean changes nothing; the buffer is saved and restored with the model."""
    import torch.nn.functional as F

    from llm2clip.models.adapter import AdapterConfig, TextAdapter, embedding_mean

    torch.manual_seed(0)
    plain = TextAdapter(AdapterConfig(input_dim=8, embed_dim=4, depth=1))
    centered = TextAdapter(AdapterConfig(input_dim=8, embed_dim=4, depth=1, center_input=True))
    centered.load_state_dict({**plain.state_dict(), "input_mean": torch.zeros(8)})
    x = torch.randn(5, 8) + 3.0  # a shared direction, as LLM embeddings have
    torch.testing.assert_close(centered(x), plain(x))
    mean = embedding_mean(x)
    torch.testing.assert_close(mean, F.normalize(x, dim=-1).mean(0))
    centered.input_mean.copy_(mean)
    manual = F.normalize(F.normalize(x, dim=-1) - mean, dim=-1)
    torch.testing.assert_close(centered(x), plain(manual))
    assert "input_mean" in centered.state_dict() and "input_mean" not in plain.state_dict()
