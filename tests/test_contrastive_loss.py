"""Numerical tests of the fused contrastive losses against float64 references.

Tolerances come from PyTorch's own error (CONTRIBUTING.md, "Tests"): for every output and gradient,
``max|ours - ref| <= 2 * max|pt - ref| + tiny`` where ``ref`` is the naive full-logits loss in
float64 on the same rounded inputs and ``pt`` the same naive loss in the test dtype. The Triton
backend runs under TRITON_INTERPRET=1 without a GPU (conftest.py), so its sizes stay small.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, HAS_TRITON
from torch.utils._python_dispatch import TorchDispatchMode

from llm2clip_kernels import _chunked, infonce_loss, sigmoid_loss
from llm2clip_kernels.reference import reference_infonce_loss, reference_sigmoid_loss

LOSSES = {
    "infonce": (infonce_loss, reference_infonce_loss),
    "sigmoid": (sigmoid_loss, reference_sigmoid_loss),
}


def make_inputs(b, B, D, dtype, device="cpu", scale=14.3, bias=None):
    image = F.normalize(torch.randn(b, D, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)
    text = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1).to(device=device, dtype=dtype)
    # Pull each image towards its text so the positives carry weight, as in training.
    n = min(b, B)
    image[:n] = F.normalize(image[:n].double() + 0.7 * text[:n].double(), dim=1).to(dtype)
    s = torch.tensor(float(scale), device=device)
    beta = None if bias is None else torch.tensor(float(bias), device=device)
    return image, text, s, beta


def loss_and_grads(fn, image, text, scale, bias, **kw):
    leaves = [image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()]
    leaves.append(scale.detach().clone().requires_grad_())
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    loss = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach()] + [g.detach() for g in grads]


def check_against_reference(name, image, text, scale, bias, backend, **kw):
    """Compare ours with the float64 reference, within twice PyTorch's own error in this dtype."""
    fn, ref_fn = LOSSES[name]
    ours = loss_and_grads(lambda *a, **k: fn(*a, backend=backend, **k), image, text, scale, bias, **kw)
    f64 = lambda t: None if t is None else t.detach().double()
    ref_kw = {k: v for k, v in kw.items()}
    ref = loss_and_grads(ref_fn, f64(image), f64(text), f64(scale), f64(bias), **ref_kw)
    # PyTorch's error: the naive loss in the inputs' dtype (fp16 logits overflow past 65504, so
    # that reference runs in fp32 with fp16-rounded inputs... plus fp16 output rounding).
    pt = loss_and_grads(
        ref_fn, image, text, scale.to(image.dtype), None if bias is None else bias.to(image.dtype), **kw
    )
    eps = torch.finfo(image.dtype).eps
    names = ["loss", "d_image", "d_text", "d_scale", "d_bias"]
    for what, o, r, p in zip(names, ours, ref, pt):
        err = (o.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        tiny = eps * max(r.abs().max().item(), 1e-3)
        print(f"{name} {what}: ours {err:.3e}  pytorch {pt_err:.3e}  tiny {tiny:.1e}")
        assert torch.isfinite(o).all(), f"{what} is not finite"
        assert err <= 2 * pt_err + tiny, f"{what}: error {err:.3e} > 2 x PyTorch's {pt_err:.3e} + {tiny:.1e}"
    return ours, ref


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks so every multi-chunk path (row/column chunks, accumulators) runs at test sizes."""
    monkeypatch.setattr(_chunked, "ROW_CHUNK", 40)
    monkeypatch.setattr(_chunked, "COL_CHUNK", 48)
    if HAS_TRITON:
        from llm2clip_kernels import _triton

        monkeypatch.setattr(_triton, "ROW_BLOCKS_PER_CHUNK", 2)
        monkeypatch.setattr(_triton, "BWD_ROWS", 40)
        monkeypatch.setattr(_triton, "BWD_COLS", 48)


# ----------------------------------------------------------------------------- both backends

# Odd shapes: not tile multiples, B > b, D not a power of two.
SMALL_SHAPES = [(1, 1, 8), (97, 150, 59), (70, 70, 40), (5, 9, 1152)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,B,D", SMALL_SHAPES)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_matches_reference(name, b, B, D, dtype, backend, device):
    image, text, s, beta = make_inputs(
        b, B, D, dtype, device, scale=14.3, bias=-3.0 if name == "sigmoid" else None
    )
    check_against_reference(name, image, text, s, beta, backend, positive_offset=B - b)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 100.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_large_scales_near_orthogonal_column(name, dtype, scale, backend, device):
    """At scale 1000 a column whose logits are all ~0 sits 1000 below the row maxima: a shared or
    fixed max shift underflows its log-sum-exp to -inf; each column's own max does not."""
    b, B, D = 40, 45, 24
    image, text, s, beta = make_inputs(
        b, B, D, dtype, device, scale=scale, bias=-10.0 if name == "sigmoid" else None
    )
    ortho = torch.zeros(D, dtype=torch.float64)
    ortho[0] = 1.0
    image64 = image.double()
    image64[:, 0] = 0.0  # every image orthogonal to text 44's direction...
    image = F.normalize(image64, dim=1).to(dtype)
    text[44] = ortho.to(dtype)  # ...so column 44 is exactly 0 while positives sit near s
    ours, ref = check_against_reference(name, image, text, s, beta, backend, positive_offset=B - b)
    assert torch.isfinite(ref[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_bias_masks_and_positive_index(name, backend, device):
    b, B, D = 33, 50, 20
    image, text, s, beta = make_inputs(b, B, D, torch.float32, device, scale=20.0, bias=-2.5)
    pos = torch.randperm(B)[:b].to(device)
    groups = torch.randint(0, 12, (B,)).to(device)
    check_against_reference(name, image, text, s, beta, backend, positive_index=pos, group_ids=groups)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_duplicate_captions(name, backend, device):
    """The same caption twice gives identical logits; with group ids they stop being negatives."""
    b, D = 30, 16
    image, text, s, beta = make_inputs(b, b, D, torch.float32, device, scale=50.0)
    text[7] = text[3]
    text[20] = text[3]
    check_against_reference(name, image, text, s, beta, backend)
    groups = torch.arange(b)
    groups[[7, 20]] = 3
    check_against_reference(name, image, text, s, beta, backend, group_ids=groups.to(device))
    # Two images pointing at one text: that column has two positives.
    pos = torch.arange(b)
    pos[5] = 6
    check_against_reference(name, image, text, s, beta, backend, positive_index=pos.to(device))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_many_chunks(name, backend, device, small_chunks):
    """Several row and column chunks: column statistics merged across row chunks, fp32
    accumulators for dI and dT across backward superblocks."""
    # b = 150 with 2 row blocks per forward chunk (64-row tiles under the interpreter): a full chunk
    # of 128 rows, then a short one of a single block.
    image, text, s, beta = make_inputs(150, 197, 30, torch.bfloat16, device, scale=30.0, bias=-5.0)
    groups = torch.randint(0, 40, (197,)).to(device)
    check_against_reference(name, image, text, s, beta, backend, positive_offset=40, group_ids=groups)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_peaked_softmax_scale_gradient(backend, device):
    """Late in training P_ii = 1 - eps with eps below fp32 resolution near 1; the loss and the
    logit-scale gradient must keep their relative precision (naive fp32 loses it)."""
    b, D = 48, 32
    text = F.normalize(torch.randn(b, D, dtype=torch.float64), dim=1)
    image = F.normalize(text + 0.02 * torch.randn(b, D, dtype=torch.float64), dim=1)
    image32, text32 = image.float().to(device), text.float().to(device)
    s = torch.tensor(60.0, device=device)
    ours = loss_and_grads(lambda *a, **k: infonce_loss(*a, backend=backend, **k), image32, text32, s, None)
    ref = loss_and_grads(reference_infonce_loss, image32.double(), text32.double(), s.double(), None)
    naive = loss_and_grads(reference_infonce_loss, image32, text32, s, None)
    rel = lambda x: abs(x[0].item() - ref[0].item()) / abs(ref[0].item())
    rel_ds = lambda x: abs(x[3].item() - ref[3].item()) / abs(ref[3].item())
    print(f"loss {ref[0].item():.3e}: rel err ours {rel(ours):.2e} naive fp32 {rel(naive):.2e}")
    print(f"d_scale {ref[3].item():.3e}: rel err ours {rel_ds(ours):.2e} naive fp32 {rel_ds(naive):.2e}")
    assert ref[0].item() < 1e-6, "the case must be peaked to test anything"
    assert rel(ours) < 1e-4 and rel_ds(ours) < 1e-3


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_side_requires_grad(backend, device):
    """Each input's gradient on its own: only images, or only texts, require grad."""
    image, text, s, _ = make_inputs(20, 26, 12, torch.float32, device)
    i64, t64 = image.double().requires_grad_(), text.double().requires_grad_()
    ref_i, ref_t = torch.autograd.grad(reference_infonce_loss(i64, t64, s.double()), [i64, t64])
    img = image.clone().requires_grad_()
    (gi,) = torch.autograd.grad(infonce_loss(img, text, s, backend=backend), [img])
    txt = text.clone().requires_grad_()
    (gt,) = torch.autograd.grad(infonce_loss(image, txt, s, backend=backend), [txt])
    torch.testing.assert_close(gi.double(), ref_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.double(), ref_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_thousand_rows(name, backend, device):
    """b = B = 1000: many tiles each way (slow under the interpreter, so D is small)."""
    image, text, s, beta = make_inputs(1000, 1000, 12, torch.bfloat16, device, scale=100.0, bias=-8.0)
    check_against_reference(name, image, text, s, beta, backend)


# ----------------------------------------------------------------------------- chunked path at scale


@pytest.mark.parametrize("b,B,D", [(1000, 1000, 64), (200, 1000, 768), (97, 130, 1152)])
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_chunked_larger_shapes(name, b, B, D):
    image, text, s, beta = make_inputs(b, B, D, torch.bfloat16, scale=100.0, bias=-8.0)
    check_against_reference(name, image, text, s, beta, "torch", positive_offset=B - b)


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_gradcheck_float64(name, monkeypatch):
    """Autograd's finite-difference check of the chunked op in float64, several chunks each way."""
    monkeypatch.setattr(_chunked, "ROW_CHUNK", 7)
    monkeypatch.setattr(_chunked, "COL_CHUNK", 9)
    fn = LOSSES[name][0]
    image, text, s, beta = make_inputs(17, 25, 4, torch.float64, scale=5.0, bias=-1.0)
    groups = torch.randint(0, 10, (25,))
    inputs = [t.detach().clone().requires_grad_() for t in (image, text, s.double(), beta.double())]
    assert torch.autograd.gradcheck(
        lambda i, t, sc, bi: fn(i, t, sc, bi, positive_offset=6, group_ids=groups, backend="torch"), inputs
    )


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_never_allocates_the_logits(name, backend, device, small_chunks):
    """No tensor anywhere near b*B elements exists during forward + backward."""
    b = B = 160 if backend == "triton" else 400
    image, text, s, _ = make_inputs(b, B, 8, torch.float32, device)
    image.requires_grad_()
    text.requires_grad_()
    s.requires_grad_()
    with _LargestAllocation() as mode:
        loss = LOSSES[name][0](image, text, s, backend=backend)
        loss.backward()
    print(f"largest tensor {mode.largest} elements; b*B = {b * B}")
    assert mode.largest <= b * B // 8


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fp32_gradients_accumulate_in_place(small_chunks):
    """grad_dtype=float32 (the distributed loss's per-chunk calls): the Triton backward accumulates
    across superblocks in the gradient itself; it must match the chunked path."""
    from conftest import TRITON_DEVICE

    from llm2clip_kernels import _triton

    image, text, s, beta = make_inputs(97, 150, 30, torch.float32, TRITON_DEVICE, scale=30.0, bias=-5.0)
    pos = torch.arange(97, device=TRITON_DEVICE) + 53
    for sigmoid in (False, True):
        _, rows, cols = torch.ops.llm2clip_kernels.contrastive_forward(
            image, text, s, beta, pos, None, sigmoid, "torch"
        )
        g = torch.tensor(0.7, device=TRITON_DEVICE)
        args = (g, image, text, s, beta, pos, None, None, rows, cols, sigmoid)
        ours = _triton.backward_grads(*args, grad_dtype=torch.float32)
        ref = _chunked.backward_grads(*args, grad_dtype=torch.float32)
        assert ours[0].dtype == ours[1].dtype == torch.float32
        for a, c in zip(ours, ref):
            torch.testing.assert_close(a.double(), c.double(), rtol=1e-5, atol=1e-6)
