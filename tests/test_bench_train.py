"""Smoke test of bench/train_throughput.py in its CPU mode (tiny ViT): the script runs end to end,
writes its JSON / markdown (/ PNG) files with the expected rows, and reports memory.

Nothing here is a GPU target: on CPU the script evaluates none, and this test checks only what a
CPU run can show honestly (the gradient cache holds one chunk's activations at any batch, the plain
step's grow with the batch).
"""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest


def _load():
    # bench/ is not an installed package: load the script by path (it puts the repository root on
    # sys.path for its own `from bench import common`)
    path = Path(__file__).resolve().parent.parent / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tt = _load()
common = tt.common


@pytest.fixture
def fast_ceiling(monkeypatch):
    # common.matmul_rate times a 2048^3 fp32 matmul six times: ~10 s on two shared cores, and it
    # is common's helper, not what this test is about.
    fake = {"what": "stub (test)", "ms": 1.0, "tflops": 0.01}
    monkeypatch.setattr(common, "matmul_rate", lambda *a, **k: fake)


def test_cpu_smoke(tmp_path, fast_ceiling):
    # The decode rates as a GPU check's data_throughput JSON holds them (draft per worker, nvJPEG).
    rates = tmp_path / "data_throughput-cuda-test.json"
    rates.write_text(json.dumps({"rows": [{"part": "decode", "short_side": 512, "draft_per_s": 50.0,
                                           "nvjpeg_per_s": 400.0}]}))  # fmt: skip
    rc = tt.main(
        [
            "--device", "cpu", "--threads", "2", "--out", str(tmp_path),
            "--batches", "8,16", "--chunk-size", "4", "--methods", "fused+gc,plain", "--steps", "2",
            "--find-max", "--find-max-methods", "fused+gc,plain", "--max-batch", "32",
            "--breakdown-batch", "16", "--decode-rate", str(rates), "--data-workers", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    (json_path,) = tmp_path.glob("train_throughput-cpu-*.json")
    assert json_path.with_suffix(".md").exists()
    if common.import_pyplot() is not None:
        assert json_path.with_suffix(".png").exists()
    doc = json.loads(json_path.read_text())
    meta, rows = doc["meta"], doc["rows"]
    assert meta["device"] == "cpu" and "git_sha" in meta and meta["matmul_rate"]["tflops"] > 0
    assert doc["targets"] == []  # no GPU target is evaluated on CPU
    assert doc["models"]["tiny"]["fwd_gflops_per_sample"] > 0

    by = {(r["kind"], r["method"], r["batch"]): r for r in rows}
    for method in ("fused+gc", "plain"):
        for b in (8, 16):
            r = by[("sweep", method, b)]
            assert r["status"] == "ok", r
            assert r["steps"] == 2 and r["step_ms_p20"] <= r["step_ms"] <= r["step_ms_p80"]
            assert r["samples_per_s"] > 0 and r["tflops"] > 0 and r["peak_gib"] is not None
        # find-max: the sweep's sizes are reused, the others probed with one step, up to --max-batch
        assert by[("probe", method, 32)]["status"] == "ok"
        assert ("probe", method, 8) not in by and ("probe", method, 16) not in by
    assert ("probe", "plain", 4) not in by  # plain starts at 8 on CPU, the gradient cache at its chunk
    assert by[("probe", "fused+gc", 4)]["chunks"] == 1
    maxes = {m["method"]: m for m in doc["max_batch"]}
    assert maxes["fused+gc"]["max_batch"] == 32 and maxes["fused+gc"]["stopped_by"] == "--max-batch 32"

    # memory: the gradient cache keeps one chunk (4) of activations whatever the batch; the plain step
    # keeps the whole batch's, twice as much at 16 as at 8
    gc8, gc16 = by[("sweep", "fused+gc", 8)], by[("sweep", "fused+gc", 16)]
    p8, p16 = by[("sweep", "plain", 8)], by[("sweep", "plain", 16)]
    assert gc8["chunks"] == 2 and gc16["chunks"] == 4
    assert gc16["saved_act_mib"] == pytest.approx(gc8["saved_act_mib"], rel=0.05)
    assert p16["saved_act_mib"] > 1.8 * p8["saved_act_mib"]
    assert p16["saved_act_mib"] > 3 * gc16["saved_act_mib"]

    # The breakdown's data cost: the main process's receive (twice with the gradient cache) plus the
    # wait for the loader: 2 workers at 50 samples/s decode 16 samples in 160 ms, and the step waits
    # for whatever of that its own time does not cover.
    (bd,) = [r for r in rows if r["kind"] == "breakdown"]
    assert bd["status"] == "ok" and bd["batch"] == 16 and bd["data_passes"] == 2
    assert (
        bd["data_workers"] == 2
        and bd["decode_per_worker_per_s"] == 50
        and bd["decode_ms"] == pytest.approx(160)
    )
    assert bd["data_wait_ms"] == pytest.approx(max(0.0, 160 - bd["step_ms"]))
    assert bd["workers_keep_up"] == (160 <= bd["step_ms"])
    assert bd["workers_needed"] == math.ceil(16 / (50 * bd["step_ms"] * 1e-3))
    parts = bd["loss_ms"] + bd["gather_ms"] + 2 * bd["data_ms"] + bd["data_wait_ms"]
    assert bd["parts_ms"] == pytest.approx(parts) and bd["fraction"] == pytest.approx(parts / bd["step_ms"])
    assert doc["data_rate"] == {"samples_per_s": 50.0, "short_side": 512, "source": str(rates),
                                "nvjpeg_per_s": 400.0, "workers": 2}  # fmt: skip
    # --decode device instead: 16 samples at 400/s in the main process, beside the loader's wait
    assert bd["device_decode_ms"] == pytest.approx(40)
    assert bd["cheaper_decode"] == ("device" if 40 < bd["data_wait_ms"] else "draft")


def test_oom_is_a_row_and_ends_the_doubling(tmp_path, fast_ceiling, monkeypatch):
    """An out-of-memory step (simulated: no GPU here) is recorded, the larger sizes are skipped and
    the search stops there; the run still writes its files and exits 0."""
    import torch

    real_step = tt.train_step

    def step(st, images, text, fused, chunk):
        if images.shape[0] >= 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(st, images, text, fused, chunk)

    monkeypatch.setattr(tt, "train_step", step)
    argv = ["--device", "cpu", "--out", str(tmp_path), "--batches", "4,16,32", "--methods", "plain",
            "--steps", "1", "--find-max", "--find-max-methods", "plain", "--find-max-start", "4",
            "--breakdown-batch", "0", "--no-plot"]  # fmt: skip
    assert tt.main(argv) == 0
    doc = json.loads(next(tmp_path.glob("train_throughput-cpu-*.json")).read_text())
    got = [(r["kind"], r["batch"], r["status"]) for r in doc["rows"]]
    assert got == [("sweep", 4, "ok"), ("sweep", 16, "oom"), ("sweep", 32, "skipped"), ("probe", 8, "ok")]
    (mx,) = doc["max_batch"]
    assert mx["max_batch"] == 8 and mx["oom"] and mx["stopped_by"] == "oom at 16"


def _row(method, b, status, peak_gib, kind="sweep"):
    fused, gc = tt.METHODS[method]
    return {
        "kind": kind, "model": "B/16", "method": method, "fused_loss": fused, "grad_cache": gc,
        "chunk": 256 if gc else 0, "batch": b, "status": status, "peak_gib": peak_gib,
    }  # fmt: skip


def test_targets_lower_bound_is_not_a_failure():
    """Evaluation only (no GPU): a largest batch below 128k that no limit stopped is 'not measured',
    never FAIL; the 16x ratio and the memory slope come from the rows."""
    args = SimpleNamespace(find_max=True, find_max_methods=("plain",), max_batch=262144, breakdown_batch=4096)
    rows = [_row("fused+gc", b, "ok", 30 + b * 40e3 / 2**30) for b in (1024, 4096, 16384)]
    rows += [_row("plain", b, "ok", 5 + b * 0.1, "probe") for b in (64, 128, 256)]
    rows += [_row("plain", 512, "oom", None, "probe")]
    maxes = tt.max_batches(rows, args)
    targets = tt.evaluate_targets(rows, maxes, {"B/16": 256}, args)
    got = {
        k: next(t for t in targets if k in t["target"]) for k in ("batch >=", "x plain", "flat", "step at")
    }
    assert got["batch >="]["value"] == 16384 and got["batch >="]["pass"] is None
    assert got["x plain"]["value"] == 64 and got["x plain"]["pass"] is True  # 16384 / 256
    assert got["flat"]["pass"] is True and got["flat"]["value"] < 1e-3
    assert got["step at"]["pass"] is None  # no breakdown row

    rows[-4:] = [_row("fused+gc", 32768, "oom", None, "probe")] + rows[-4:]
    maxes = tt.max_batches(rows, args)
    targets = tt.evaluate_targets(rows, maxes, {"B/16": 256}, args)
    assert next(t for t in targets if "batch >=" in t["target"])["pass"] is False  # OOM below 128k
