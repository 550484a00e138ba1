"""API-level tests of the fused contrastive losses: input validation, backend selection, strides,
autocast, torch.compile / opcheck, determinism, the module wrappers and the scale / bias gradients.

The numerical accuracy of the kernels themselves is tested in test_contrastive_loss.py; here the
shapes are small and odd so the Triton backend stays fast under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, TRITON_DEVICE, requires_triton
from torch import nn

from llm2clip_kernels import InfoNCELoss, SigmoidLoss, infonce_loss, resolve_backend, sigmoid_loss
from llm2clip_kernels.contrastive_loss import BACKEND_ENV
from llm2clip_kernels.reference import reference_infonce_loss, reference_sigmoid_loss

LOSSES = {"infonce": infonce_loss, "sigmoid": sigmoid_loss}
REFERENCES = {"infonce": reference_infonce_loss, "sigmoid": reference_sigmoid_loss}
MODULES = {"infonce": InfoNCELoss, "sigmoid": SigmoidLoss}

# Floor added to the "2 x the plain PyTorch error" bound (see CONTRIBUTING.md), relative to the
# reference's magnitude (at least 1): about 8 fp32 ulps, for when plain PyTorch happens to be exact.
TINY = 1e-6

backends = pytest.mark.parametrize("backend,device", BACKENDS, ids=[b for b, _ in BACKENDS])
losses = pytest.mark.parametrize("kind", list(LOSSES))


def _features(b, B, D, device, dtype=torch.float32):
    image = F.normalize(torch.randn(b, D, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    return image.to(device, dtype), text.to(device, dtype)


def _loss_and_grads(fn, image, text, scale, bias=None, **kwargs):
    """Loss and the gradients w.r.t. every tensor argument, on fresh leaves."""
    leaves = [t.detach().requires_grad_() for t in (image, text, scale)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    loss = fn(*leaves[:3], leaves[3] if bias is not None else None, **kwargs)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _assert_matches_reference(out, ref, pt, name):
    """max|out - ref| <= 2 max|pt - ref| + tiny: ref in fp64, pt the plain PyTorch computation."""
    err = (out.double() - ref.double()).abs().max().item()
    pt_err = (pt.double() - ref.double()).abs().max().item()
    tiny = TINY * max(1.0, ref.double().abs().max().item())
    print(f"{name}: max|out - ref| = {err:.3e}, max|pt - ref| = {pt_err:.3e}, floor {tiny:.1e}")
    assert err <= 2 * pt_err + tiny, f"{name}: error {err:.3e} vs plain PyTorch {pt_err:.3e}"


def _skip_value_checks_on_cuda(device):
    # On CUDA the value checks are device-side asserts (no host sync): a failing one poisons the
    # CUDA context for every later test, so they are only exercised on CPU tensors.
    if device != "cpu":
        pytest.skip("value checks are device-side asserts on CUDA")


# ----------------------------------------------------------------------------- 1. invalid input


@backends
@losses
@pytest.mark.parametrize(
    "case,error,match",
    [
        ("mismatched_dim", ValueError, r"feature dims differ: image_feats has D=13, text_feats D=12"),
        ("mismatched_dtype", TypeError, r"dtypes differ"),
        ("empty_image", ValueError, r"image_feats is empty"),
        ("empty_text", ValueError, r"text_feats is empty"),
        ("zero_dim", ValueError, r"image_feats is empty"),
        ("one_d_image", ValueError, r"image_feats must be 2-D"),
        ("three_d_text", ValueError, r"text_feats must be 2-D"),
        ("int_features", TypeError, r"features must be bfloat16, float16, float32 or float64"),
        ("not_a_tensor", TypeError, r"image_feats must be a tensor"),
        ("positive_index_shape", ValueError, r"positive_index must have shape \(7,\)"),
        ("positive_index_2d", ValueError, r"positive_index must have shape \(7,\)"),
        ("positive_index_float", TypeError, r"positive_index must be an integer tensor"),
        ("positive_offset_too_large", ValueError, r"positive_offset=3 puts the positives"),
        ("positive_offset_negative", ValueError, r"positive_offset=-1 puts the positives"),
        ("positive_offset_float", TypeError, r"positive_offset must be an int, got float 1.5"),
        ("positive_offset_bool", TypeError, r"positive_offset must be an int, got bool True"),
        ("positive_offset_and_index", ValueError, r"pass positive_index or positive_offset, not both"),
        ("group_ids_shape", ValueError, r"group_ids must have shape \(9,\)"),
        ("group_ids_float", TypeError, r"group_ids must be an integer tensor"),
        ("scale_shape", ValueError, r"logit_scale must hold one value"),
        ("scale_type", TypeError, r"logit_scale must be a tensor or a number"),
        ("scale_bool_tensor", TypeError, r"logit_scale must be a real number, not a torch.bool tensor"),
        ("scale_bool", TypeError, r"logit_scale must be a tensor or a number, not a bool \(True\)"),
        ("bias_bool_tensor", TypeError, r"logit_bias must be a real number, not a torch.bool tensor"),
        ("scale_complex", TypeError, r"logit_scale must be a real number, not a torch.complex64 tensor"),
        ("bias_shape", ValueError, r"logit_bias must hold one value"),
        ("unknown_backend", ValueError, r"backend must be one of"),
    ],
)
def test_invalid_input_raises(backend, device, kind, case, error, match):
    b, B, D = 7, 9, 13
    image, text = _features(b, B, D, device)
    scale, bias = torch.tensor(2.0, device=device), None
    kwargs = dict(backend=backend)
    if case == "mismatched_dim":
        text = text[:, :12]
    elif case == "mismatched_dtype":
        text = text.double()
    elif case == "empty_image":
        image = image[:0]
    elif case == "empty_text":
        text = text[:0]
    elif case == "zero_dim":
        image, text = image[:, :0], text[:, :0]
    elif case == "one_d_image":
        image = image[0]
    elif case == "three_d_text":
        text = text[None]
    elif case == "int_features":
        image, text = image.int(), text.int()
    elif case == "not_a_tensor":
        image = image.tolist()
    elif case == "positive_index_shape":
        kwargs["positive_index"] = torch.arange(b - 1, device=device)
    elif case == "positive_index_2d":
        kwargs["positive_index"] = torch.arange(b, device=device)[:, None]
    elif case == "positive_index_float":
        kwargs["positive_index"] = torch.arange(b, device=device, dtype=torch.float32)
    elif case == "positive_offset_too_large":
        kwargs["positive_offset"] = B - b + 1
    elif case == "positive_offset_negative":
        kwargs["positive_offset"] = -1
    elif case == "positive_offset_float":
        kwargs["positive_offset"] = 1.5  # inside [0, B - b]: it used to pass the range check
    elif case == "positive_offset_bool":
        kwargs["positive_offset"] = True
    elif case == "positive_offset_and_index":
        kwargs["positive_offset"] = 1
        kwargs["positive_index"] = torch.arange(b, device=device)
    elif case == "group_ids_shape":
        kwargs["group_ids"] = torch.arange(b, device=device)
    elif case == "group_ids_float":
        kwargs["group_ids"] = torch.arange(B, device=device, dtype=torch.float32)
    elif case == "scale_shape":
        scale = torch.ones(2, device=device)
    elif case == "scale_type":
        scale = "2.0"
    elif case == "scale_bool_tensor":
        scale = torch.tensor(True, device=device)
    elif case == "scale_bool":
        scale = True
    elif case == "bias_bool_tensor":
        bias = torch.tensor(False, device=device)
    elif case == "scale_complex":
        scale = torch.tensor(2.0 + 0j, device=device)
    elif case == "bias_shape":
        bias = torch.zeros(1, 2, device=device)
    elif case == "unknown_backend":
        kwargs["backend"] = "cuda"
    else:
        raise AssertionError(case)
    with pytest.raises(error, match=match):
        LOSSES[kind](image, text, scale, bias, **kwargs)


@backends
@losses
@pytest.mark.parametrize(
    "case,match",
    [
        ("nan_scale", r"logit_scale is NaN or infinite"),
        ("inf_scale", r"logit_scale is NaN or infinite"),
        ("neg_inf_scale", r"logit_scale is NaN or infinite"),
        ("nan_scale_float", r"logit_scale is NaN or infinite"),
        ("nan_bias", r"logit_bias is NaN or infinite"),
        ("inf_bias", r"logit_bias is NaN or infinite"),
        ("positive_index_too_large", r"a positive index is outside \[0, 9\)"),
        ("positive_index_negative", r"a positive index is outside \[0, 9\)"),
    ],
)
def test_invalid_values_raise(backend, device, kind, case, match):
    """Checks that need the data (run inside the custom op, before any kernel)."""
    _skip_value_checks_on_cuda(device)
    b, B, D = 7, 9, 13
    image, text = _features(b, B, D, device)
    scale, bias, kwargs = torch.tensor(2.0, device=device), None, dict(backend=backend)
    if case == "nan_scale":
        scale = torch.tensor(float("nan"), device=device)
    elif case == "inf_scale":
        scale = torch.tensor(float("inf"), device=device)
    elif case == "neg_inf_scale":
        scale = torch.tensor([float("-inf")], device=device)
    elif case == "nan_scale_float":
        scale = float("nan")
    elif case == "nan_bias":
        bias = torch.tensor(float("nan"), device=device)
    elif case == "inf_bias":
        bias = float("inf")
    elif case == "positive_index_too_large":
        kwargs["positive_index"] = torch.tensor([0, 1, 2, 3, 4, 5, B], device=device)
    elif case == "positive_index_negative":
        kwargs["positive_index"] = torch.tensor([0, 1, 2, -1, 4, 5, 6], device=device)
    else:
        raise AssertionError(case)
    with pytest.raises(ValueError, match=match):
        LOSSES[kind](image, text, scale, bias, **kwargs)


@backends
@losses
@pytest.mark.parametrize("where", ["image", "text"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_give_non_finite_loss(backend, device, kind, where, value):
    """Documented: features are not checked (a pass over them, and a host sync on CUDA); a NaN or
    infinite feature makes the loss NaN or infinite, never a finite number, and raises nothing."""
    image, text = _features(5, 7, 8, device)
    (image if where == "image" else text)[3, 2] = value
    bias = torch.tensor(-1.0, device=device)
    loss = LOSSES[kind](image, text, torch.tensor(4.0, device=device), bias, backend=backend)
    assert not torch.isfinite(loss), f"{where} feature {value} gave the finite loss {loss.item()}"


@backends
@pytest.mark.parametrize(
    "where,match",
    [
        ("text", r"image_feats is on (cpu|cuda\S*) but text_feats is on meta"),
        ("image", r"image_feats is on meta but text_feats is on (cpu|cuda\S*)"),
        ("scale", r"logit_scale is on meta but the features are on (cpu|cuda\S*)"),
        ("bias", r"logit_bias is on meta but the features are on (cpu|cuda\S*)"),
        ("positive_index", r"positive_index is on meta but the features are on (cpu|cuda\S*)"),
        ("group_ids", r"group_ids is on meta but the features are on (cpu|cuda\S*)"),
    ],
)
def test_device_mismatch_raises(backend, device, where, match):
    """A "meta" tensor stands in for a second device."""
    b, B, D = 5, 6, 8
    image, text = _features(b, B, D, device)
    scale, bias, kwargs = torch.tensor(2.0, device=device), None, dict(backend=backend)
    if where == "text":
        text = text.to("meta")
    elif where == "image":
        image = image.to("meta")
    elif where == "scale":
        scale = scale.to("meta")
    elif where == "bias":
        bias = torch.tensor(0.5, device="meta")
    elif where == "positive_index":
        kwargs["positive_index"] = torch.arange(b, device="meta")
    elif where == "group_ids":
        kwargs["group_ids"] = torch.arange(B, device="meta")
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(image, text, scale, bias, **kwargs)


@requires_triton
@losses
def test_fp64_on_triton_raises(kind, monkeypatch):
    if TRITON_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    image, text = _features(3, 4, 5, TRITON_DEVICE, torch.float64)
    with pytest.raises(TypeError, match=r"float64 features run on backend='torch' only"):
        LOSSES[kind](image, text, 2.0, backend="triton")


def test_env_backend_junk_raises(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "junk")
    image, text = _features(3, 4, 5, "cpu")
    with pytest.raises(ValueError, match=rf"{BACKEND_ENV} must be one of .*'junk'"):
        infonce_loss(image, text, 2.0)
    with pytest.raises(ValueError, match=rf"{BACKEND_ENV} must be one of"):
        resolve_backend("auto", torch.device("cpu"))
    # The variable only overrides 'auto': an explicit backend ignores it.
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    infonce_loss(image, text, 2.0, backend="torch")


@requires_triton
def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    image, text = _features(3, 4, 5, "cpu")
    match = r"backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; got cpu"
    with pytest.raises(RuntimeError, match=match):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(RuntimeError, match=match):
        sigmoid_loss(image, text, 2.0, backend="triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match=match):
        infonce_loss(image, text, 2.0)


# ----------------------------------------------------------------------------- 2. backend selection


@requires_triton
def test_auto_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve_backend("auto", cpu) == "torch"
    # The environment variable overrides 'auto' (and an empty value means 'auto').
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert resolve_backend("auto", cpu) == "triton"
    # Explicit choices are returned as given.
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"


def test_auto_backend_on_meta_is_torch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("meta")) == "torch"


# ----------------------------------------------------------------------------- 3. strides


def _strided_copy(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous tensor equal to x."""
    n, d = x.shape
    if layout == "column_slice":
        wide = torch.randn(n, d + 7, dtype=x.dtype, device=x.device)
        view = wide[:, 3 : 3 + d]
    elif layout == "transposed":
        return x.t().contiguous().t()
    elif layout == "row_strided":
        view = torch.randn(2 * n, d, dtype=x.dtype, device=x.device)[::2]
    else:
        raise AssertionError(layout)
    view.copy_(x)
    return view


@backends
@losses
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_strided"])
def test_non_contiguous_inputs(backend, device, kind, layout):
    b, B, D = 37, 45, 19  # several 32 x 32 interpreter tiles in each direction
    image, text = _features(b, B, D, device)
    scale = torch.tensor(7.3, device=device)
    bias = torch.tensor(-1.3, device=device)
    groups = torch.arange(B, device=device) % 11
    fn = LOSSES[kind]
    kw = dict(backend=backend, group_ids=groups)
    expected = _loss_and_grads(fn, image, text, scale, bias, **kw)
    image_v, text_v = _strided_copy(image, layout), _strided_copy(text, layout)
    assert not image_v.is_contiguous() and not text_v.is_contiguous()
    assert torch.equal(image_v, image) and torch.equal(text_v, text)
    got = _loss_and_grads(fn, image_v, text_v, scale, bias, **kw)
    for name, g, e in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], got, expected):
        if backend == "torch":
            assert torch.equal(g, e), f"{name} differs for {layout} inputs"
        else:
            torch.testing.assert_close(g, e, rtol=1.3e-6, atol=1e-7, msg=f"{name} ({layout})")


# ----------------------------------------------------------------------------- 4. autocast


class _Towers(nn.Module):
    """Two linear projections (fp32 parameters) into a shared embedding space."""

    def __init__(self, d_img=11, d_txt=7, d=13):
        super().__init__()
        self.img = nn.Linear(d_img, d)
        self.txt = nn.Linear(d_txt, d)

    def forward(self, x, y):
        return self.img(x), self.txt(y)

    def forward_bf16(self, x, y):
        """What autocast does, written out: the linears in bf16."""
        w = lambda lin, inp: F.linear(inp.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16())
        return w(self.img, x), w(self.txt, y)


@backends
@losses
def test_autocast_bf16(backend, device, kind):
    torch.manual_seed(1)
    towers = _Towers().to(device)
    x, y = torch.randn(9, 11, device=device), torch.randn(12, 7, device=device)
    scale = torch.tensor(4.0, device=device)
    bias = torch.tensor(-1.0, device=device) if kind == "sigmoid" else None
    fn, reference = LOSSES[kind], REFERENCES[kind]

    def weight_grads():
        out = [p.grad.clone() for p in towers.parameters()]
        towers.zero_grad(set_to_none=True)
        return out

    with torch.autocast(device, dtype=torch.bfloat16):
        image, text = towers(x, y)
        assert image.dtype == text.dtype == torch.bfloat16
        image.retain_grad()
        text.retain_grad()
        loss = fn(image, text, scale, bias, backend=backend)
    assert loss.dtype == torch.float32
    loss.backward()
    got = weight_grads()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in got)

    # The same computation with the bf16 casts written out, outside autocast.
    image_x, text_x = towers.forward_bf16(x, y)
    explicit = fn(image_x, text_x, scale, bias, backend=backend)
    explicit.backward()
    torch.testing.assert_close(loss, explicit, rtol=1.6e-2, atol=1e-5)
    for g, e in zip(got, weight_grads()):
        torch.testing.assert_close(g, e, rtol=1.6e-2, atol=1e-5)

    # The loss itself against the truth on the same bf16 features: fp64 reference, and plain
    # PyTorch (the reference) in bf16.
    ref_in = [t.detach().double().requires_grad_() for t in (image, text)]
    ref = reference(*ref_in, scale.double(), bias)
    ref.backward()
    pt_in = [t.detach().requires_grad_() for t in (image, text)]
    pt = reference(*pt_in, scale.bfloat16(), bias)
    pt.backward()
    _assert_matches_reference(loss, ref, pt, "loss")
    _assert_matches_reference(image.grad, ref_in[0].grad, pt_in[0].grad, "d_image")
    _assert_matches_reference(text.grad, ref_in[1].grad, pt_in[1].grad, "d_text")


@backends
def test_autocast_casts_mixed_dtypes(backend, device):
    """Under autocast both operands go to the autocast dtype, like a matmul; outside, it's an error."""
    image, text = _features(5, 6, 8, device)
    text16 = text.bfloat16()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = infonce_loss(image, text16, 3.0, backend=backend)
    expected = infonce_loss(image.bfloat16(), text16, 3.0, backend=backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    match = r"dtypes differ: image_feats is torch.float32, text_feats is torch.bfloat16"
    with pytest.raises(TypeError, match=match):
        infonce_loss(image, text16, 3.0, backend=backend)


# ----------------------------------------------------------------------------- 5. torch.compile


class _ClipHead(nn.Module):
    """Projections + learnable log-scale (+ bias for the sigmoid loss) + the fused loss module."""

    def __init__(self, kind, backend):
        super().__init__()
        self.towers = _Towers()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-2.0)) if kind == "sigmoid" else None
        self.loss = MODULES[kind](backend=backend)

    def forward(self, x, y):
        image, text = self.towers(x, y)
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        return self.loss(image, text, self.log_scale.exp(), self.bias)


@backends
@losses
def test_torch_compile_fullgraph(backend, device, kind):
    torch._dynamo.reset()
    model = _ClipHead(kind, backend).to(device)
    x, y = torch.randn(9, 11, device=device), torch.randn(12, 7, device=device)

    def run(m):
        loss = m(x, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = run(model)
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    # fullgraph=True: any graph break (e.g. in the argument checks) is an error.
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    loss, grads = run(compiled)
    assert len(graphs) == 1
    # By name: loading another extension (llm2clip._C) can rebuild torch.ops' cached op objects.
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert "llm2clip_kernels.contrastive_forward.default" in targets
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def _opcheck_sample(op: str, layout: str, sigmoid: bool, with_extras: bool):
    """Arguments for contrastive_forward / contrastive_backward (fp32, small, torch backend)."""
    b, B, D = 5, 7, 8
    image, text = _features(b, B, D, "cpu")
    if layout == "transposed":  # dense but not contiguous: strides (1, b)
        image = image.t().contiguous().t()
    scale = torch.tensor(3.0)
    bias = torch.tensor(-1.0) if with_extras else None
    pos = torch.tensor([0, 2, 1, 4, 6])
    groups = torch.tensor([0, 1, 2, 3, 4, 0, 1]) if with_extras else None
    if op == "forward":
        # Leaves that require grad, so that test_autograd_registration has something to check.
        for t in (image, text, scale, bias):
            if t is not None:
                t.requires_grad_()
        return (image, text, scale, bias, pos, groups, sigmoid, "torch")
    _, row_vecs, col_vecs = torch.ops.llm2clip_kernels.contrastive_forward(
        image, text, scale, bias, pos, groups, sigmoid, "torch"
    )
    grad = torch.tensor(0.7)
    return (grad, image, text, scale, bias, pos, groups, row_vecs, col_vecs, sigmoid, "torch")


_OPCHECK_UTILS = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]


@pytest.mark.parametrize(
    "op,layout,test_util",
    [
        (op, layout, util)
        for op in ("forward", "backward")
        for layout in ("contiguous", "transposed")
        for util in _OPCHECK_UTILS
    ],
)
def test_opcheck(op, layout, test_util):
    target = getattr(torch.ops.llm2clip_kernels, f"contrastive_{op}").default
    for sigmoid in (False, True):
        for with_extras in (False, True):
            args = _opcheck_sample(op, layout, sigmoid, with_extras)
            torch.library.opcheck(target, args, test_utils=test_util)


# ----------------------------------------------------------------------------- 6. determinism


@backends
@losses
def test_deterministic(backend, device, kind):
    b, B, D = 37, 45, 19
    image, text = _features(b, B, D, device)
    scale = torch.tensor(9.0, device=device)
    bias = torch.tensor(-2.5, device=device)
    kw = dict(backend=backend, positive_offset=3, group_ids=torch.arange(B, device=device) % 13)
    first = _loss_and_grads(LOSSES[kind], image, text, scale, bias, **kw)
    second = _loss_and_grads(LOSSES[kind], image, text, scale, bias, **kw)
    for name, a, c in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------- 7. module wrappers


@backends
@losses
def test_module_wrappers(backend, device, kind):
    b, B, D = 6, 10, 9
    image, text = _features(b, B, D, device)
    fn, module = LOSSES[kind], MODULES[kind](backend=backend)
    scale = torch.tensor(5.0, device=device)
    bias = torch.tensor(-1.5, device=device)
    groups = torch.arange(B, device=device) % 4
    pos = torch.tensor([9, 0, 3, 3, 5, 1], device=device)

    assert torch.equal(module(image, text, scale), fn(image, text, scale, backend=backend))
    assert torch.equal(
        module(image, text, scale, bias, positive_index=pos, group_ids=groups),
        fn(image, text, scale, bias, positive_index=pos, group_ids=groups, backend=backend),
    )
    assert torch.equal(
        module(image, text, scale, positive_offset=4),
        fn(image, text, scale, positive_offset=4, backend=backend),
    )

    # logit_scale (and bias) as Python numbers: no gradient for them, the features still get one.
    image_l = image.clone().requires_grad_()
    loss = module(image_l, text, 5.0, -1.5)
    assert torch.equal(loss.detach(), fn(image, text, scale, bias, backend=backend))
    loss.backward()
    assert image_l.grad is not None and torch.isfinite(image_l.grad).all()
    no_grad = module(image, text, 5.0)
    assert not no_grad.requires_grad and no_grad.shape == () and no_grad.dtype == torch.float32

    # A (1,)-shaped scale (open_clip's logit_scale parameter is () but some keep (1,)).
    s0 = scale.clone().requires_grad_()
    s1 = scale.reshape(1).clone().requires_grad_()
    l0, l1 = module(image, text, s0, bias), module(image, text, s1, bias)
    assert l1.shape == () and torch.equal(l0, l1)
    l0.backward()
    l1.backward()
    assert s1.grad.shape == (1,) and torch.equal(s1.grad.reshape(()), s0.grad)


# ----------------------------------------------------------------------------- 8-9. scale and bias


@backends
@losses
def test_log_scale_gradient(backend, device, kind):
    """With s = exp(t), dL/dt = s dL/ds, checked against the fp64 reference."""
    b, B, D = 11, 17, 23
    image, text = _features(b, B, D, device)
    t0 = math.log(12.0)
    outs = {}
    for name, dtype, fn in [
        ("out", torch.float32, lambda *a: LOSSES[kind](*a, backend=backend)),
        ("pt", torch.float32, REFERENCES[kind]),
        ("ref", torch.float64, REFERENCES[kind]),
    ]:
        t = torch.tensor(t0, dtype=dtype, device=device, requires_grad=True)
        loss = fn(image.to(dtype), text.to(dtype), t.exp())
        loss.backward()
        outs[name] = (loss.detach(), t.grad)
    # Independent of autograd through exp: s * dL/ds of the reference.
    s = torch.tensor(t0, dtype=torch.float64, device=device).exp().requires_grad_()
    REFERENCES[kind](image.double(), text.double(), s).backward()
    torch.testing.assert_close(outs["ref"][1], s.detach() * s.grad, rtol=1e-12, atol=0)
    _assert_matches_reference(outs["out"][0], outs["ref"][0], outs["pt"][0], "loss")
    _assert_matches_reference(outs["out"][1], outs["ref"][1], outs["pt"][1], "d_log_scale")


@backends
def test_infonce_bias_cancels(backend, device):
    b, B, D = 11, 17, 23
    image, text = _features(b, B, D, device)
    scale = torch.tensor(8.0, device=device)
    beta = 3.7
    loss, *_, d_bias = _loss_and_grads(
        infonce_loss, image, text, scale, torch.tensor(beta, device=device), backend=backend
    )
    # Plain fp32 PyTorch with the bias, and the bias-free fp64 truth (d_bias = 0 exactly).
    pt_bias = torch.tensor(beta, device=device, requires_grad=True)
    pt = reference_infonce_loss(image, text, scale, pt_bias)
    pt.backward()
    ref = reference_infonce_loss(image.double(), text.double(), scale.double())
    _assert_matches_reference(loss, ref, pt, "loss with bias vs without")
    _assert_matches_reference(d_bias, torch.zeros((), dtype=torch.float64), pt_bias.grad, "d_bias")
    # The bias never changes the loss by more than the fp32 rounding of the logits.
    no_bias = infonce_loss(image, text, scale, backend=backend)
    _assert_matches_reference(no_bias, ref, pt, "loss without bias")


@backends
def test_sigmoid_bias_gradient(backend, device):
    b, B, D = 11, 17, 23
    image, text = _features(b, B, D, device)
    groups = torch.arange(B, device=device) % 5
    outs = {}
    for name, dtype, fn in [
        ("out", torch.float32, lambda *a, **k: sigmoid_loss(*a, **k, backend=backend)),
        ("pt", torch.float32, reference_sigmoid_loss),
        ("ref", torch.float64, reference_sigmoid_loss),
    ]:
        scale = torch.tensor(10.0, dtype=dtype, device=device, requires_grad=True)
        bias = torch.tensor(-3.0, dtype=dtype, device=device, requires_grad=True)
        loss = fn(image.to(dtype), text.to(dtype), scale, bias, group_ids=groups)
        loss.backward()
        outs[name] = (loss.detach(), bias.grad, scale.grad)
    for i, name in enumerate(["loss", "d_bias", "d_scale"]):
        _assert_matches_reference(outs["out"][i], outs["ref"][i], outs["pt"][i], name)
    assert outs["ref"][1].abs() > 0.1  # the bias gradient is not trivially zero here


def test_rejects_bool_indices_and_other_devices():
    image, text = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="positive_index must be an integer tensor"):
        infonce_loss(image, text, 1.0, positive_index=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        infonce_loss(image, text, 1.0, group_ids=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="CPU or CUDA device"):
        infonce_loss(image.to("meta"), text.to("meta"), torch.tensor(1.0, device="meta"))
