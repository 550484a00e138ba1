"""gather_rows: the PyTorch fallback against a manual numpy dequantisation, errors, and the
extension selector (with fake `_ext` modules; the real one is built in csrc/)."""

import sys
import types
import warnings

import numpy as np
import pytest
import torch

import llm2clip.cache as cache_pkg
from llm2clip.cache import format as fmt
from llm2clip.cache import gather as gather_mod
from llm2clip.cache.gather import available_backends, gather_rows

STORAGE_NAMES = [s.name for s in fmt.STORAGES]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def fresh_ext(monkeypatch):
    """Forget what gather.py learnt about the extension (import result, warning issued)."""
    monkeypatch.setattr(
        gather_mod, "_ext_state", {"loaded": False, "module": None, "reason": None, "warned": False}
    )


def _install(monkeypatch, mod):
    """Make `from . import _ext` in llm2clip.cache.gather return `mod` (restored after the test)."""
    monkeypatch.setitem(sys.modules, "llm2clip.cache._ext", mod)
    monkeypatch.setattr(cache_pkg, "_ext", mod, raising=False)


def _table(storage, n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    payload, scales = fmt.encode_rows(x, storage)
    return torch.from_numpy(payload), (torch.from_numpy(scales) if scales is not None else None)


def _manual_dequant(payload: np.ndarray, scales, idx: np.ndarray, dim: int, storage) -> np.ndarray:
    """Dequantise with numpy from the raw bytes (independent of gather_rows' torch views)."""
    st = fmt.storage_of(storage)
    raw = payload[idx, : dim * st.itemsize]
    if st.code == 0:
        return raw.copy().view("<f4").astype(np.float64)
    if st.code == 1:  # bf16 = the high half of a float32
        hi = raw.copy().view("<u2").astype(np.uint32) << 16
        return hi.view("<f4").astype(np.float64)
    if st.code == 2:
        return raw.copy().view("<f2").astype(np.float64)
    s = scales[idx].astype(np.float64)[:, None]
    if st.code == 3:
        return raw.copy().view(np.int8).astype(np.float64) * s
    # e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities; 0x7f/0xff NaN.
    b = raw.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = b & 0x7
    val = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7))
    return sign * val * s


@pytest.mark.parametrize("storage", STORAGE_NAMES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("backend", available_backends())
def test_gather_matches_manual_dequant(storage, out_dtype, backend):
    n, dim = 37, 59
    table, scales = _table(storage, n, dim)
    idx = torch.tensor([5, 0, 36, 5, 17, 1], dtype=torch.int64)  # repeats and the last row
    code = fmt.storage_of(storage).code
    if backend == "ext" and not cache_pkg._ext.supports(table, scales, idx, dim, code, out_dtype):
        pytest.skip(f"the extension does not take storage {storage} -> {out_dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = gather_rows(table, scales, idx, dim, fmt.storage_of(storage).code, out_dtype, backend=backend)
    assert out.shape == (len(idx), dim) and out.dtype == out_dtype
    ref = _manual_dequant(
        table.numpy(), None if scales is None else scales.numpy(), idx.numpy(), dim, storage
    )
    # The reference in fp64 rounded once to out_dtype is what the gather must give; the product
    # q * scale is formed in fp32 first (one extra fp32 rounding), hence the fp32 step here.
    want = torch.from_numpy(ref).float().to(out_dtype)
    assert torch.equal(out, want)


def test_gather_errors_and_edge_cases():
    table, scales = _table("int8", 10, 59)
    with pytest.raises(IndexError, match="row id 10 .*position 1"):
        gather_rows(table, scales, torch.tensor([3, 10]), 59, 3, backend="torch")
    with pytest.raises(IndexError, match="row id -1"):
        gather_rows(table, scales, torch.tensor([-1]), 59, 3, backend="torch")
    assert gather_rows(table, scales, torch.empty(0, dtype=torch.long), 59, 3, backend="torch").shape == (
        0,
        59,
    )
    with pytest.raises(ValueError, match="scales"):
        gather_rows(table, None, torch.tensor([1]), 59, 3, backend="torch")
    with pytest.raises(ValueError, match="does not fit"):
        gather_rows(table, scales, torch.tensor([1]), 200, 3, backend="torch")
    with pytest.raises(TypeError, match="integer"):
        gather_rows(table, scales, torch.tensor([True]), 59, 3, backend="torch")
    with pytest.raises(ValueError, match="storage code"):
        gather_rows(table, scales, torch.tensor([1]), 59, 7, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        gather_rows(table, scales, torch.tensor([1]), 59, 3, backend="cuda")
    # int32 ids are accepted
    a = gather_rows(table, scales, torch.tensor([2, 3], dtype=torch.int32), 59, 3, backend="torch")
    assert torch.equal(a, gather_rows(table, scales, torch.tensor([2, 3]), 59, 3, backend="torch"))


def test_fallback_warns_once(fresh_ext, monkeypatch):
    _install(monkeypatch, _fake_ext(False))  # as on a machine where the extension is not built
    table, scales = _table("bf16", 4, 8)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            gather_rows(table, scales, torch.tensor([1]), 8, 1)
    msgs = [str(w.message) for w in rec if "fallback" in str(w.message)]
    assert len(msgs) == 1 and "fake: built without CUDA" in msgs[0]
    with pytest.raises(RuntimeError, match="fake: built without CUDA"):
        gather_rows(table, scales, torch.tensor([1]), 8, 1, backend="ext")


def test_missing_extension_module_falls_back(fresh_ext, monkeypatch):
    monkeypatch.setitem(sys.modules, "llm2clip.cache._ext", None)  # import raises ImportError
    monkeypatch.delattr(cache_pkg, "_ext", raising=False)
    table, scales = _table("int8", 4, 8)
    with pytest.warns(RuntimeWarning, match="does not import"):
        out = gather_rows(table, scales, torch.tensor([3, 0]), 8, 3)
    assert torch.equal(out, gather_rows(table, scales, torch.tensor([3, 0]), 8, 3, backend="torch"))


def _fake_ext(available: bool, supports=lambda *a: True):
    mod = types.ModuleType("llm2clip.cache._ext")
    mod.__file__ = "<fake _ext>"
    mod.AVAILABLE = available
    mod.UNAVAILABLE_REASON = "fake: built without CUDA"
    mod.calls = 0

    def ext_gather(table_u8, scales, index, dim, storage_code, out_dtype):
        mod.calls += 1
        return gather_mod.gather_rows_torch(table_u8, scales, index, dim, storage_code, out_dtype)

    mod.gather_rows = ext_gather
    mod.supports = supports
    return mod


def test_selector_uses_available_extension(fresh_ext, monkeypatch):
    fake = _fake_ext(True, supports=lambda *a: True)
    _install(monkeypatch, fake)
    table, scales = _table("fp8_e4m3", 6, 16)
    idx = torch.tensor([4, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when the extension is used
        out = gather_rows(table, scales, idx, 16, 4)
    assert fake.calls == 1
    assert torch.equal(out, gather_rows(table, scales, idx, 16, 4, backend="torch"))
    assert available_backends() == ["torch", "ext"]


def test_selector_forced_ext_refuses_unsupported_arguments(fresh_ext, monkeypatch):
    _install(monkeypatch, _fake_ext(True, supports=lambda *a: False))
    table, scales = _table("bf16", 6, 16)
    with pytest.raises(ValueError, match="does not support"):
        gather_rows(table, scales, torch.tensor([1]), 16, 1, backend="ext")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" quietly uses torch when the extension declines
        gather_rows(table, scales, torch.tensor([1]), 16, 1)
