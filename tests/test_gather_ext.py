"""The C++/CUDA row gather (csrc/, llm2clip/cache/_ext.py) against a local PyTorch reference.

The reference views the table bytes as the storage dtype, indexes the rows, dequantises in fp32
(q * scale) and casts to the output dtype: the very operations the kernels perform, in the same
order and rounding, so the results must be bitwise equal (no tolerance to choose).

Skipped when llm2clip._C is not built; the CUDA tests also need a GPU and a CUDA build.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llm2clip.cache import _ext
from llm2clip.cache.gather import AsyncGather

requires_ext = pytest.mark.skipif(
    not _ext.AVAILABLE, reason=f"llm2clip._C is not available: {_ext.UNAVAILABLE_REASON}"
)


def _cuda_ok() -> bool:
    return _ext.WITH_CUDA and torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(
    not _cuda_ok(), reason="needs a CUDA GPU and llm2clip._C built with CUDA (LLM2CLIP_FORCE_CUDA=1)"
)

STORAGE_DTYPES = {
    0: torch.float32,
    1: torch.bfloat16,
    2: torch.float16,
    3: torch.int8,
    4: torch.float8_e4m3fn,
}
QMAX = {3: 127.0, 4: 448.0}
CODES = sorted(STORAGE_DTYPES)
OUT_DTYPES = [torch.bfloat16, torch.float32]
DIMS = [1, 59, 384, 4096]


def make_table(rows: int, dim: int, code: int, *, seed: int = 0, device="cpu"):
    """(table_u8 (rows, stride), scales or None): random rows in the cache layout (128-byte stride)
    with random bytes in the padding, so a kernel that reads past `dim` shows it. Row 0 is zeros
    (scale 0 for the quantised codes)."""
    g = torch.Generator().manual_seed(seed)
    dt = STORAGE_DTYPES[code]
    row_bytes = dim * dt.itemsize
    stride = -(-row_bytes // 128) * 128
    x = torch.randn(rows, dim, generator=g) * 3
    x[0] = 0
    scales = None
    if code in QMAX:
        scales = x.abs().amax(1) / QMAX[code]
        q = x / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        q = q.round().clamp(-127, 127).to(torch.int8) if code == 3 else q.to(dt)
    else:
        q = x.to(dt)
    table = torch.randint(0, 256, (rows, stride), dtype=torch.uint8, generator=g)
    table[:, :row_bytes] = q.contiguous().view(torch.uint8)
    return table.to(device), None if scales is None else scales.to(device)


def reference(table, scales, index, dim, code, out_dtype):
    dt = STORAGE_DTYPES[code]
    idx = index.long().cpu()
    vals = table.cpu()[idx, : dim * dt.itemsize].contiguous().view(dt).float()
    if scales is not None:
        vals = vals * scales.cpu()[idx][:, None]
    return vals.to(out_dtype)


def assert_same(out, ref):
    out = out.cpu()
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    if out.numel():
        diff = (out.float() - ref.float()).abs()
        print(f"max |out - ref| = {diff.max().item():.3g}, mean = {diff.mean().item():.3g}")
    assert torch.equal(out, ref)


def make_index(rows: int, n: int, *, seed: int = 1, device="cpu") -> torch.Tensor:
    """n ids in [0, rows), unsorted, with duplicates (the last few repeat earlier ones)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (n,), generator=g)
    if n >= 8:
        idx[-4:] = idx[:4].flip(0)
    return idx.to(device)


# ----------------------------------------------------------------------------- the build


def test_extension_built_when_the_build_requires_it():
    """With LLM2CLIP_BUILD_EXT=1 or LLM2CLIP_FORCE_CUDA=1 exported for the whole CI run, a missing
    (or CPU-only) extension fails here instead of silently skipping every other test."""
    if os.environ.get("LLM2CLIP_BUILD_EXT") == "1" or os.environ.get("LLM2CLIP_FORCE_CUDA") == "1":
        assert _ext.AVAILABLE, _ext.UNAVAILABLE_REASON
    if os.environ.get("LLM2CLIP_FORCE_CUDA") == "1":
        assert _ext.WITH_CUDA, "LLM2CLIP_FORCE_CUDA=1 but llm2clip._C has no CUDA kernels"


# ----------------------------------------------------------------------------- CPU op


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("code", CODES)
@requires_ext
def test_cpu_matches_reference(code, out_dtype, dim):
    table, scales = make_table(200, dim, code, seed=code)
    idx = make_index(200, 97)
    out = _ext.gather_rows(table, scales, idx, dim, code, out_dtype)
    assert_same(out, reference(table, scales, idx, dim, code, out_dtype))


@pytest.mark.parametrize("code", [1, 3])
@requires_ext
def test_cpu_many_rows_multithreaded(code):
    """Enough rows that at::parallel_for splits the work over threads."""
    table, scales = make_table(1000, 384, code)
    idx = make_index(1000, 20000)
    out = _ext.gather_rows(table, scales, idx, 384, code, torch.bfloat16)
    assert_same(out, reference(table, scales, idx, 384, code, torch.bfloat16))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda i: i.to(torch.int32), id="int32"),
        pytest.param(lambda i: i.repeat_interleave(2)[::2], id="non-contiguous"),
        pytest.param(lambda i: i[:1], id="one"),
        pytest.param(lambda i: torch.full((50,), 7), id="all-same"),
        pytest.param(lambda i: i.sort().values, id="sorted"),
    ],
)
@requires_ext
def test_cpu_index_variants(make):
    table, scales = make_table(100, 59, 4)
    idx = make(make_index(100, 40))
    out = _ext.gather_rows(table, scales, idx, 59, 4, torch.float32)
    assert_same(out, reference(table, scales, idx, 59, 4, torch.float32))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["bf16", "fp32"])
@requires_ext
def test_empty_index(out_dtype):
    table, scales = make_table(10, 59, 3)
    out = _ext.gather_rows(table, scales, torch.empty(0, dtype=torch.long), 59, 3, out_dtype)
    assert out.shape == (0, 59) and out.dtype == out_dtype


@requires_ext
def test_table_slice():
    """A row slice of a table (non-zero storage offset) gathers its own rows."""
    table, _ = make_table(100, 384, 1)
    part = table[32:64]
    idx = torch.tensor([0, 31, 5])
    assert_same(
        _ext.gather_rows(part, None, idx, 384, 1, torch.float32),
        reference(part, None, idx, 384, 1, torch.float32),
    )


@pytest.mark.parametrize("bad", [-1, 100, 1 << 40])
@requires_ext
def test_cpu_out_of_range_raises(bad):
    table, _ = make_table(100, 59, 1)
    idx = torch.tensor([3, 5, bad, 7])
    with pytest.raises(IndexError, match=rf"index\[2\] = {bad} is out of range for a table of 100 rows"):
        _ext.gather_rows(table, None, idx, 59, 1, torch.bfloat16)


@requires_ext
def test_bad_arguments():
    table, scales = make_table(10, 59, 3)
    idx = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="needs per-row scales"):
        _ext.gather_rows(table, None, idx, 59, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="pass scales=None"):
        _ext.gather_rows(table, scales, idx, 59, 1, torch.bfloat16)
    with pytest.raises(RuntimeError, match="unknown storage code"):
        _ext.gather_rows(table, None, idx, 59, 5, torch.bfloat16)
    with pytest.raises(RuntimeError, match="out_dtype"):
        _ext.gather_rows(table, scales, idx, 59, 3, torch.float16)
    with pytest.raises(RuntimeError, match="does not fit"):
        _ext.gather_rows(table, scales, idx, 129, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="16-byte aligned"):  # stride 72
        _ext.gather_rows(torch.zeros(10, 72, dtype=torch.uint8), scales, idx, 59, 3, torch.bfloat16)
    shifted = table.view(-1)[1 : 1 + 9 * 128].view(9, 128)
    with pytest.raises(RuntimeError, match="16-byte aligned"):  # data pointer off by one byte
        _ext.gather_rows(shifted, scales[:9], idx, 59, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="contiguous"):
        _ext.gather_rows(table[:, :64], scales, idx, 59, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="1-D"):
        _ext.gather_rows(table, scales, idx[None], 59, 3, torch.bfloat16)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        _ext.gather_rows(table, scales[:5], idx, 59, 3, torch.bfloat16)


@requires_ext
def test_supports():
    table, scales = make_table(10, 59, 3)
    idx = torch.tensor([1, 2])
    assert _ext.supports(table, scales, idx, 59, 3, torch.bfloat16)
    assert not _ext.supports(table, scales, idx, 59, 3, torch.float16)
    assert not _ext.supports(table[:, :64], scales, idx, 59, 3, torch.bfloat16)
    assert not _ext.supports(torch.zeros(10, 72, dtype=torch.uint8), scales, idx, 59, 3, torch.bfloat16)
    assert not _ext.supports(table, scales, idx.to("meta"), 59, 3, torch.bfloat16)
    assert not _ext.supports(table, scales, idx, 200, 3, torch.bfloat16)


@pytest.mark.parametrize("code", [0, 3, 4])
@requires_ext
def test_opcheck(code):
    table, scales = make_table(50, 59, code)
    flag = torch.zeros(1, dtype=torch.int32)
    for out_dtype in OUT_DTYPES:
        args = (table, scales, make_index(50, 20), 59, code, out_dtype, flag, True)
        torch.library.opcheck(torch.ops.llm2clip.gather_rows.default, args)


@requires_ext
def test_torch_compile_fullgraph():
    table, scales = make_table(64, 384, 4)
    idx = make_index(64, 33)

    def f(t, s, i):
        return _ext.gather_rows(t, s, i, 384, 4, torch.float32) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert_same(compiled(table, scales, idx), reference(table, scales, idx, 384, 4, torch.float32) * 2)


@requires_ext
def test_matches_the_cache_fallback():
    """Both sides of llm2clip.cache.gather's switch give the same rows (when that module exists)."""
    gather = pytest.importorskip("llm2clip.cache.gather")
    fallback = getattr(gather, "gather_rows_torch", None)
    if fallback is None:
        pytest.skip("llm2clip.cache.gather has no gather_rows_torch")
    for code in CODES:
        table, scales = make_table(80, 59, code)
        idx = make_index(80, 30)
        for out_dtype in OUT_DTYPES:
            assert_same(
                _ext.gather_rows(table, scales, idx, 59, code, out_dtype),
                fallback(table, scales, idx, 59, code, out_dtype),
            )


@requires_ext
def test_async_gather_cpu_runs_inline():
    table, scales = make_table(40, 59, 2)
    idx = make_index(40, 12)
    ag = AsyncGather()
    ag.launch(table, scales, idx, 59, 2, torch.bfloat16)
    assert ag.ready()
    assert_same(ag.wait(), reference(table, scales, idx, 59, 2, torch.bfloat16))
    with pytest.raises(RuntimeError, match="nothing was launched"):
        ag.wait()


@pytest.mark.skipif(_ext.WITH_CUDA, reason="the CUDA build implements register_host_table")
@requires_ext
def test_register_host_table_needs_cuda_build():
    table, _ = make_table(4, 59, 1)
    with pytest.raises(RuntimeError, match="without CUDA"):
        _ext.register_host_table(table)
    with pytest.raises(RuntimeError, match="without CUDA"):
        torch.ops.llm2clip.register_host_table(table)


# ----------------------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "plain"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("code", CODES)
def test_cuda_matches_reference(code, out_dtype, dim, dedup):
    table, scales = make_table(300, dim, code, seed=code, device="cuda")
    idx = make_index(300, 257, device="cuda")
    errors = _ext.GatherErrors("cuda")
    out = _ext.gather_rows(table, scales, idx, dim, code, out_dtype, error_flag=errors, dedup=dedup)
    assert out.is_cuda
    assert_same(out, reference(table, scales, idx, dim, code, out_dtype))
    errors.check()


@requires_cuda
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "plain"])
def test_cuda_grid_stride_and_duplicates(dedup):
    """More rows than one capped grid covers, mostly duplicates, int32 and non-contiguous ids."""
    table, scales = make_table(1000, 59, 3, device="cuda")
    idx = make_index(1000, 400_001, device="cuda")
    for ids in (idx, idx.to(torch.int32), idx[::3], torch.full((5000,), 17, device="cuda")):
        out = _ext.gather_rows(table, scales, ids, 59, 3, torch.bfloat16, dedup=dedup)
        assert_same(out, reference(table, scales, ids, 59, 3, torch.bfloat16))
    _ext.check_errors("cuda")


@requires_cuda
@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "plain"])
def test_cuda_error_flag(dedup):
    table, scales = make_table(100, 384, 4, device="cuda")
    idx = torch.tensor([5, -1, 7, 100, 100, 5, 1 << 40], device="cuda")
    errors = _ext.GatherErrors("cuda")
    out = _ext.gather_rows(table, scales, idx, 384, 4, torch.float32, error_flag=errors, dedup=dedup)
    good = torch.tensor([0, 2, 5])
    bad = torch.tensor([1, 3, 4, 6])
    assert_same(out[good], reference(table, scales, idx[good], 384, 4, torch.float32))
    assert torch.count_nonzero(out[bad]).item() == 0
    # Distinct bad ids count once with dedup (-1, 100, 2^40), every bad position without it.
    assert errors.count() == (3 if dedup else 4)
    with pytest.raises(IndexError, match="out-of-range"):
        errors.check()
    assert errors.count() == 0
    errors.check()


@requires_cuda
def test_cuda_opcheck():
    table, scales = make_table(50, 59, 3, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    args = (table, scales, make_index(50, 20, device="cuda"), 59, 3, torch.bfloat16, flag, True)
    torch.library.opcheck(torch.ops.llm2clip.gather_rows.default, args)


@requires_cuda
@pytest.mark.parametrize("code", [1, 3, 4])
def test_cuda_host_table(tmp_path, code):
    """A read-only memory map, registered in place, gathered by the CUDA kernel over PCIe."""
    dim, rows, header = 384, 257, 4096
    table, scales = make_table(rows, dim, code)
    path = tmp_path / "rows.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * header)
        f.write(table.numpy().tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=tuple(table.shape))
    with pytest.warns(UserWarning, match="not writable"):
        cpu = torch.from_numpy(mm)
    try:
        host = _ext.register_host_table(cpu)
    except RuntimeError as e:
        if "does not support cudaHostRegisterReadOnly" in str(e):
            pytest.skip(str(e))
        raise
    assert host.is_cuda and host.shape == table.shape and host.dtype == torch.uint8
    dev_scales = None if scales is None else _ext.register_host_table(scales.clone())
    idx = make_index(rows, 1000, device="cuda")
    out = _ext.gather_rows(host, dev_scales, idx, dim, code, torch.bfloat16)
    assert_same(out, reference(table, scales, idx, dim, code, torch.bfloat16))
    # torch's elementwise kernels read the alias too (loads over PCIe, not cudaMemcpy)
    assert torch.equal(host[:4].to(torch.int16).cpu(), table[:4].to(torch.int16))
    del out, host, dev_scales
    torch.cuda.synchronize()


@requires_cuda
def test_cuda_host_table_rejects_cuda_tensor():
    with pytest.raises(RuntimeError, match="expects a CPU tensor"):
        torch.ops.llm2clip.register_host_table(torch.zeros(16, dtype=torch.uint8, device="cuda"))


@requires_cuda
def test_cuda_async_gather():
    table, scales = make_table(500, 4096, 1, device="cuda")
    ag = AsyncGather()
    for step in range(3):
        idx = make_index(500, 2048, seed=step, device="cuda") * 1  # made on the current stream
        ag.launch(table, scales, idx, 4096, 1, torch.bfloat16)
        busy = torch.randn(2048, 2048, device="cuda") @ torch.randn(2048, 2048, device="cuda")
        out = ag.wait()
        assert_same(out, reference(table, scales, idx, 4096, 1, torch.bfloat16))
        del busy
    assert ag.stream != torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="never wait"):
        ag.launch(table, scales, idx, 4096, 1, torch.bfloat16)
        ag.launch(table, scales, idx, 4096, 1, torch.bfloat16)


@requires_cuda
def test_cuda_torch_compile():
    table, scales = make_table(64, 384, 4, device="cuda")
    idx = make_index(64, 33, device="cuda")

    def f(t, s, i):
        return _ext.gather_rows(t, s, i, 384, 4, torch.bfloat16).float().sum(1)

    _ext.default_errors("cuda")  # create the default flag outside the compiled region
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(table, scales, idx), f(table, scales, idx))
