"""DeviceRows: the CPU tier against EmbeddingCache.gather, the tier choice with a fake memory
query, and the order of operations on the side stream with a recording runtime (no GPU needed);
on a CUDA machine also the real tiers.

StreamRecorder is importable by other tests (`from test_cache_device import StreamRecorder`): pass
it as DeviceRows(..., runtime=...) with device "cuda" to record what would run on which stream.
"""

import contextlib

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from test_cache_writer import DIM, build

from llm2clip.cache import DeviceRows, EmbeddingCache
from llm2clip.cache import gather as gather_mod
from llm2clip.cache.device import GPU_FRACTION, choose_tier


class _Stream:
    def __init__(self, rec, name):
        self.rec, self.name = rec, name

    def wait_stream(self, other):
        self.rec.log.append(f"{self.name} waits for {other.name}")

    def wait_event(self, event):
        self.rec.log.append(f"{self.name} waits for the gather's event")


class _Event:
    def __init__(self, rec):
        self.rec = rec

    def record(self, stream):
        self.rec.log.append(f"event recorded on {stream.name}")

    def query(self):
        return True


class StreamRecorder:
    """A fake CudaRuntime: CPU tensors stay on the CPU, every CUDA call is logged in order, and
    the gather (gather.gather_rows, patched by `recording_gather`) logs the stream it ran on."""

    def __init__(self, free: int = 1 << 40, can_register: bool = True):
        self.free, self.can_register = free, can_register
        self.log: list[str] = []
        self.main, self.side = _Stream(self, "main"), _Stream(self, "side")
        self.active = self.main

    def free_memory(self, device):
        self.log.append("free memory queried")
        return self.free

    def to_device(self, tensor, device, non_blocking=False):
        self.log.append(f"copy {tuple(tensor.shape)} to {device}{' (async)' if non_blocking else ''}")
        return tensor.clone()

    def register_host(self, tensor, device):
        if not self.can_register:
            raise RuntimeError("fake: llm2clip._C was built without CUDA")
        self.log.append("host table registered")
        return tensor

    def current_stream(self, device):
        return self.active

    def new_stream(self, device, priority=0):
        return self.side

    @contextlib.contextmanager
    def use_stream(self, stream):
        before, self.active = self.active, stream
        try:
            yield
        finally:
            self.active = before

    def new_event(self):
        return _Event(self)

    def record_stream(self, tensor, stream):
        self.log.append(f"{tuple(tensor.shape)} recorded on {stream.name}")


@pytest.fixture
def recording_gather(monkeypatch):
    """Make gather.gather_rows log the stream it runs on into the recorder given to it."""
    recorders = []
    real = gather_mod.gather_rows

    def gather_rows(table, scales, index, *args, **kwargs):
        for rec in recorders:
            rec.log.append(f"gather of {index.numel()} rows on {rec.active.name}")
        return real(table, scales, index, *args, **kwargs)

    monkeypatch.setattr(gather_mod, "gather_rows", gather_rows)
    return recorders


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "int8"
    build(path, "int8", n_shards=2)
    return EmbeddingCache.open(path)


def _ids(cache, n=50, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, cache.num_rows, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tier_matches_cache_gather(cache, dtype):
    rows = DeviceRows(cache, "cpu", tier="gpu", dtype=dtype)  # the tier asked is moot on the CPU
    assert rows.tier == "cpu"
    for seed in range(3):
        ids = _ids(cache, seed=seed)
        rows.launch(ids)
        out = rows.wait()
        assert out.dtype == dtype and out.shape == (len(ids), DIM)
        assert torch.equal(out, cache.gather(ids, dtype))
    with pytest.raises(RuntimeError, match="nothing was launched"):
        rows.wait()
    rows.launch(ids)
    with pytest.raises(RuntimeError, match="never wait"):
        rows.launch(ids)
    with pytest.raises(ValueError, match="tier must be one of"):
        DeviceRows(cache, "cpu", tier="nvme")


def test_side_stream_order(cache, recording_gather):
    """The gather is queued on the side stream after it waited for the main stream; the main
    stream's work goes on meanwhile; wait() only makes the main stream wait for the event."""
    rec = StreamRecorder()
    recording_gather.append(rec)
    rows = DeviceRows(cache, torch.device("cuda"), "gpu", torch.float32, runtime=rec)
    assert rows.tier == "gpu"
    ids = _ids(cache, 7)
    rec.log.clear()
    rows.launch(ids)
    rec.log.append("main stream work")
    out = rows.wait()
    assert rec.log == [
        "copy (7,) to cuda (async)",
        "side waits for main",
        "gather of 7 rows on side",
        "event recorded on side",
        "(7,) recorded on side",
        "main stream work",
        "main waits for the gather's event",
        f"(7, {DIM}) recorded on main",
    ]
    assert torch.equal(out, cache.gather(ids, torch.float32))


@pytest.mark.parametrize(
    "tier, free, can_register, want, log",
    [
        ("auto", 1 << 40, True, "gpu", ["free memory queried", "copy table", "copy scales"]),
        ("auto", 0, True, "host", ["free memory queried", "host table registered", "copy scales"]),
        ("auto", 0, False, "cpu", ["free memory queried"]),
        ("gpu", 0, True, "gpu", ["copy table", "copy scales"]),
        ("host", 1 << 40, True, "host", ["host table registered", "copy scales"]),
        ("cpu", 1 << 40, True, "cpu", []),
    ],
)
def test_tier_choice(cache, recording_gather, tier, free, can_register, want, log):
    rec = StreamRecorder(free=free, can_register=can_register)
    recording_gather.append(rec)
    rows = DeviceRows(cache, "cuda", tier, torch.float32, runtime=rec)
    names = {f"copy {tuple(cache.rows_tensor().shape)} to cuda": "copy table"}
    names[f"copy ({cache.num_rows},) to cuda"] = "copy scales"
    assert rows.tier == want and [names.get(x, x) for x in rec.log] == log
    rec.log.clear()
    ids = _ids(cache, 5)
    rows.launch(ids)
    out = rows.wait()
    assert torch.equal(out, cache.gather(ids, torch.float32))
    if want == "cpu":  # gathered on the CPU, then copied: no side stream
        assert rec.log == ["gather of 5 rows on main", f"copy (5, {DIM}) to cuda (async)"]


def test_host_tier_needs_the_extension(cache):
    with pytest.raises(RuntimeError, match="tier 'host' needs the CUDA extension: fake: .* without CUDA"):
        DeviceRows(cache, "cuda", "host", runtime=StreamRecorder(can_register=False))


def test_choose_tier_threshold():
    assert choose_tier("auto", 199, 1000) == "gpu"
    assert choose_tier("auto", int(GPU_FRACTION * 1000), 1000) == "host"
    assert choose_tier("host", 1, 1000) == "host" and choose_tier("gpu", 10**12, 1) == "gpu"


def test_launch_checks_the_rows_first(cache, recording_gather, monkeypatch):
    rec = StreamRecorder()
    recording_gather.append(rec)
    rows = DeviceRows(cache, "cuda", "gpu", runtime=rec)
    rec.log.clear()
    with pytest.raises(IndexError, match="out of range"):
        rows.launch(torch.tensor([0, cache.num_rows]))
    assert rec.log == [], "nothing copied or gathered"
    called = []
    monkeypatch.setattr(cache, "check_rows", called.append)
    for check in (False, True):
        rows = DeviceRows(cache, "cuda", "gpu", check=check, runtime=rec)
        rows.launch(_ids(cache, 3))
        rows.wait()
    assert len(called) == 1


# ------------------------------------------------------------------------------------------------
# A real GPU


@requires_cuda
@pytest.mark.parametrize("tier", ["gpu", "host", "cpu"])
def test_cuda_tiers_match_cpu(cache, tier):
    from llm2clip.cache import _ext

    if tier == "host" and not _ext.WITH_CUDA:
        pytest.skip("the host tier needs llm2clip._C built with CUDA")
    rows = DeviceRows(cache, "cuda", tier, torch.bfloat16)
    assert rows.tier == tier
    for seed in range(3):
        ids = _ids(cache, 300, seed).pin_memory()
        rows.launch(ids)
        busy = torch.randn(1024, 1024, device="cuda") @ torch.randn(1024, 1024, device="cuda")
        out = rows.wait()
        assert out.is_cuda and torch.equal(out.cpu(), cache.gather(ids, torch.bfloat16))
        del busy
