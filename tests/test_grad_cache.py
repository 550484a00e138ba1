"""Gradient cache (llm2clip/grad_cache.py) and the stage-2 losses (llm2clip/losses.py).

The gradient-cache step must give the gradients of one big batch: checked on a ViT with dropout
(RNG replay) and a CNN tower in eval-mode BatchNorm, for both losses, fused and plain, against the
single-pass step. Tolerance: the single-pass gradients computed in float64 are the reference; the
float32 single-pass step's own error from it bounds the chunked step's (x 4 + tiny).
"""

from __future__ import annotations

import copy

import pytest
import torch

from llm2clip.models.adapter import AdapterConfig
from llm2clip.models.clip_model import ClipModel, ClipModelConfig
from llm2clip.models.cnn_tower import CNNTower, CNNTowerConfig
from llm2clip.models.vit import ViT, ViTConfig
from llm2clip.training.grad_cache import contrastive_backward, num_chunks
from llm2clip.training.losses import make_loss, plain_infonce_loss, plain_sigmoid_loss
from llm2clip_kernels.reference import reference_infonce_loss, reference_sigmoid_loss

D_LLM, EMBED = 24, 16


def _vit_model(loss: str, dropout: float = 0.0) -> ClipModel:
    cfg = ViTConfig.preset("B/16", width=32, depth=2, heads=2, image_size=16, patch_size=8)
    tower = ViT(cfg)
    if dropout:  # a dropout inside the tower: the re-encode must replay its random numbers
        tower.blocks[0].mlp = torch.nn.Sequential(tower.blocks[0].mlp, torch.nn.Dropout(dropout))
    adapter = AdapterConfig(input_dim=D_LLM, embed_dim=EMBED, depth=1)
    return ClipModel(tower, ClipModelConfig(embed_dim=EMBED, adapter=adapter, loss=loss))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, images, text, loss_fn, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout stream for every variant
    loss, info = contrastive_backward(model, images, text, loss_fn, chunk_size=chunk)
    return loss, _grads(model), info


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("chunk", [4, 5, 13])
def test_grad_cache_equals_one_batch(loss, fused, chunk):
    torch.manual_seed(0)
    model = _vit_model(loss, dropout=0.2 if chunk == 5 else 0.0)
    n = 13
    images, text = torch.randn(n, 3, 16, 16), torch.randn(n, D_LLM)
    loss_fn = make_loss(loss, fused=fused, backend="torch")

    ref_model = copy.deepcopy(model).double()
    ref_loss, ref, _ = _run(ref_model, images.double(), text.double(), loss_fn, 0)
    one_loss, one, _ = _run(model, images, text, loss_fn, 0)
    got_loss, got, info = _run(model, images, text, loss_fn, chunk)
    assert info["chunks"] == num_chunks(n, chunk)
    assert set(got) == set(ref) and "logit_scale" in got and ("logit_bias" in got) == (loss == "sigmoid")
    assert abs(float(got_loss) - float(ref_loss)) <= 4 * abs(float(one_loss) - float(ref_loss)) + 1e-6
    for name in ref:
        err_one = (one[name].double() - ref[name]).abs().max().item()
        err = (got[name].double() - ref[name]).abs().max().item()
        print(f"{name}: chunked {err:.2e}  single-pass fp32 {err_one:.2e}")
        assert err <= 4 * err_one + 1e-6 * ref[name].abs().max().item() + 1e-9, name


def test_grad_cache_batchnorm_running_stats_updated_once_per_chunk():
    torch.manual_seed(0)
    tower = CNNTower(CNNTowerConfig(image_size=32, embed_dim=32, heads=2))
    model = ClipModel(tower, ClipModelConfig(embed_dim=EMBED, adapter=AdapterConfig(D_LLM, EMBED, depth=1)))
    images, text = torch.randn(8, 3, 32, 32), torch.randn(8, D_LLM)
    micro = copy.deepcopy(model)
    contrastive_backward(model, images, text, plain_infonce_loss, chunk_size=4)
    with torch.no_grad():  # micro-batching reference: two chunk forwards in train mode
        micro(images[:4], text[:4])
        micro(images[4:], text[4:])
    for (n, a), (_, b) in zip(model.named_buffers(), micro.named_buffers()):
        assert torch.equal(a, b), n


def test_plain_losses_match_references():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(9, 8, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(9, 8, dtype=torch.float64), dim=1)
    s, b = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    torch.testing.assert_close(plain_infonce_loss(img, txt, s), reference_infonce_loss(img, txt, s))
    torch.testing.assert_close(plain_sigmoid_loss(img, txt, s, b), reference_sigmoid_loss(img, txt, s, b))


def test_bad_inputs():
    with pytest.raises(ValueError, match="loss 'clip'"):
        make_loss("clip", fused=True)
    with pytest.raises(ValueError, match="no logit bias"):
        ones = torch.ones(2, 4)
        make_loss("infonce", fused=True)(ones, ones, torch.tensor(1.0), torch.tensor(0.0))
    model = _vit_model("infonce")
    with pytest.raises(ValueError, match="3 images but 2 text"):
        contrastive_backward(model, torch.randn(3, 3, 16, 16), torch.randn(2, D_LLM), plain_infonce_loss)


def test_image_fn_prepares_each_chunk():
    """uint8 host images prepared chunk by chunk give exactly the gradients of the same chunked step
    on images prepared up front (the same operations on the same chunks)."""
    torch.manual_seed(0)
    model = _vit_model("infonce")
    raw = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    prep = lambda x: (x.float() / 255 - 0.5) / 0.25
    text = torch.randn(10, D_LLM)
    seen = []
    fn = lambda x: seen.append(x.shape[0]) or prep(x)
    _, want, _ = _run(model, prep(raw), text, plain_infonce_loss, 4)
    model.zero_grad(set_to_none=True)
    contrastive_backward(model, raw, text, plain_infonce_loss, chunk_size=4, image_fn=fn)
    assert seen == [4, 4, 2, 4, 4, 2]  # pass 1 and pass 3, one chunk at a time
    got = _grads(model)
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert torch.equal(g, want[name]), name
