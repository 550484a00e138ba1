"""CPU smoke tests of the benchmarks in bench/ at tiny sizes, and of their harness (bench/common.py).

Each benchmark runs end to end through the harness and writes its JSON with the fields its
consumers read (bench/gpu_check.sh's summary, the plots, the README). Nothing here is a speed
target. The training step benchmark: test_bench_train.py; the attention benchmark:
test_text_embedder.py; the kernel resource report and the roofline model: test_kernel_resources.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402


@pytest.fixture
def fast_ceiling(monkeypatch):
    # common.matmul_rate times a 2048^3 fp32 matmul six times: ~10 s on two shared cores.
    monkeypatch.setattr(
        common, "matmul_rate", lambda *a, **k: {"what": "stub (test)", "ms": 1.0, "tflops": 0.01}
    )


def _doc(out: Path, pattern: str) -> dict:
    (path,) = out.glob(f"{pattern}-*.json")
    return json.loads(path.read_text())


def _argv(tmp_path, *a):
    return [*map(str, a), "--out", str(tmp_path)]


def test_harness_rows_skips_and_exit_status(tmp_path, capsys):
    """A failed case is a row (oom / error / a status of its own); the larger cases of its group
    are skipped; --max-seconds turns the rest into skipped rows; an error row makes the exit status 1."""
    args = common.parse(common.parser("test", std=("max_seconds",)), _argv(tmp_path, "--no-plot"))

    def fail(exc):
        raise exc

    cases = [
        common.Case({"m": "a", "b": 1}, lambda: {"x": 1.0}, group="a", size=(1,)),
        common.Case({"m": "a", "b": 2}, lambda: fail(MemoryError("simulated")), group="a", size=(2,)),
        common.Case({"m": "a", "b": 4}, lambda: {"x": 4.0}, group="a", size=(4,)),
        common.Case({"m": "b", "b": 4}, lambda: {"x": 4.0}, group="b", size=(4,)),
        common.Case({"m": "b", "b": 8}, lambda: fail(ValueError("broken")), group="b", size=(8,)),
        common.Case({"m": "c", "b": 1}, status="not installed", note="no package"),
    ]
    with common.Run("harness", args, []) as run:
        run.sweep(cases)
    got = [(r["m"], r["b"], r["status"]) for r in run.rows]
    assert got == [
        ("a", 1, "ok"),
        ("a", 2, "oom"),
        ("a", 4, "skipped"),
        ("b", 4, "ok"),
        ("b", 8, "error"),
        ("c", 1, "not installed"),
    ]
    run.target("x >= 1", 1.0, True)
    table = common.table(run.rows, [("m", "m", ""), ("x", "x", ".1f"), ("note", common.note, "")])
    assert run.finish(table) == 1
    doc = _doc(tmp_path, "harness-cpu")
    assert doc["meta"]["git_sha"] and doc["meta"]["torch"] and doc["meta"]["argv"] == []
    assert [r["status"] for r in doc["rows"]] == [s for _, _, s in got]
    assert doc["targets"] == [{"target": "x >= 1", "value": 1.0, "pass": True, "note": None}]
    out = capsys.readouterr().out
    assert "oom: MemoryError: simulated" in out and "- x >= 1: 1 -> PASS" in out

    args.max_seconds = 1e-9  # every case after the start is out of time; a stop keeps the rows
    with common.Run("harness", args, [], mode="again") as run:
        run.sweep(
            [
                common.Case({"m": "a"}, lambda: {"x": 1.0}),
                common.Case({"m": "b"}, lambda: fail(common.Stop())),
            ]
        )
    assert run.rows[0]["note"] == "--max-seconds 1e-09 reached" and run.interrupted is False
    args.max_seconds = None
    with common.Run("harness", args, [], mode="stop") as run:
        run.sweep(
            [
                common.Case({"m": "a"}, lambda: {"x": 1.0}),
                common.Case({"m": "b"}, lambda: fail(common.Stop())),
            ]
        )
    assert (
        run.interrupted
        and run.finish() == 130
        and _doc(tmp_path, "harness-cpu-*-stop")["rows"][0]["x"] == 1.0
    )


def test_loss_sweep_and_simulated_world(tmp_path, fast_ceiling):
    from bench import loss_throughput as lt

    # b = B = 512: naive's logits (1 MiB each) show in the host memory high-water mark; at 64 both
    # peaks can round to 0.0 MiB and the ours/naive ratio is then undefined (no row).
    argv = _argv(tmp_path, "--device", "cpu", "--methods", "ours,naive", "--batches", "512", "--dims", "16")
    assert lt.main([*argv, "--repeats", "1"]) == 0
    doc = _doc(tmp_path, "loss_throughput-cpu-*[0-9]")
    assert {r["method"] for r in doc["rows"]} == {"ours", "naive"}
    for r in doc["rows"]:  # what gpu_check.sh's summary and the plot read
        assert r["status"] == "ok" and r["b"] == r["B"] == 512 and r["D"] == 16, r
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_extra_mib"] is not None
        assert r["fwd_bwd_tflops"] > 0 and r["fwd_bwd_x_floor"] > 0 and r["timed_runs"] == 1
    assert doc["meta"]["memory_ratios"][0]["b"] == 512 and len(doc["meta"]["predictions"]) == 4

    assert (
        lt.main(
            _argv(
                tmp_path,
                "--device",
                "cpu",
                "--simulate-world",
                "1,2",
                "--batches",
                "64",
                "--dims",
                "16",
                "--repeats",
                "1",
                "--no-plot",
            )
        )
        == 0
    )
    sim = _doc(tmp_path, "loss_throughput-cpu-*-simW1-2")
    assert [(r["world"], r["b"], r["B"], r["status"]) for r in sim["rows"]] == [
        (2, 32, 64, "ok"),
        (1, 64, 64, "ok"),
    ]
    assert all(
        r["peak_minus_gathered_mib"] == r["peak_extra_mib"] - r["gathered_text_mib"] for r in sim["rows"]
    )


def test_loss_distributed_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "bench" / "loss_throughput.py"),
        "--distributed",
        "--device",
        "cpu",
        "--batches",
        "32",
        "--dims",
        "16",
        "--repeats",
        "2",
        "--repeat-seconds",
        "1",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _doc(tmp_path, "loss_throughput-cpu-*-dist2")
    assert doc["meta"]["world"] == 2 and len(doc["meta"]["ranks"]) == 2
    assert sorted(r["rank"] for r in doc["rows"]) == [0, 1]
    for r in doc["rows"]:
        assert r["status"] == "ok" and r["B"] == 64 and r["step_ms"] > 0 and r["comm_ms"] > 0, r
        assert 0 <= r["hidden_frac"] <= 1 and r["comm_gbps"] > 0 and r["compute_ms"] > 0


def test_cache_gather_cpu(tmp_path):
    from bench import cache_gather

    argv = _argv(tmp_path, "--device", "cpu", "--host-table-mib", "4", "--dims", "64", "--batches", "256")
    assert cache_gather.main([*argv, "--repeats", "3", "--no-plot"]) == 0
    doc = _doc(tmp_path, "cache_gather-cpu")
    assert doc["meta"]["ceilings"]["memcpy_gbps"] > 0 and doc["targets"] == []  # targets are GPU-only
    assert [r["method"] for r in doc["rows"]] == ["ext-cpu", "torch-cpu"]
    assert all(r["status"] == "ok" and r["gbps"] > 0 and r["ceiling"] == "memcpy" for r in doc["rows"])
    assert doc["rows"][0]["matches_torch"] is True


def test_extract_cpu(tmp_path):
    from bench import extract_throughput

    argv = _argv(tmp_path, "--device", "cpu", "--quick", "--captions", "16", "--shards", "1")
    assert extract_throughput.main(argv) == 0
    rows = _doc(tmp_path, "extract_throughput-cpu")["rows"]
    assert [r["mode"] for r in rows] == ["packed", "padded-sorted", "padded-unsorted"]
    assert all(r["status"] == "ok" and r["captions"] == 16 and 0 < r["busy"] <= 1 for r in rows)
    assert rows[0]["slots"] == rows[0]["tokens"] and rows[2]["slots"] > rows[2]["tokens"]
    assert rows[1]["packed_x"] > 0 and "packed_x" not in rows[0]


def test_data_decode_read_and_worker_rate(tmp_path):
    from bench import data_throughput

    argv = _argv(tmp_path, "--device", "cpu", "--sizes", "512", "--images", "4", "--read-samples", "16")
    assert data_throughput.main([*argv, "--repeats", "1"]) == 0
    path = next(tmp_path.glob("data_throughput-cpu-*.json"))
    doc = json.loads(path.read_text())
    read = [r for r in doc["rows"] if r["part"] == "read"]
    (decode,) = [r for r in doc["rows"] if r["part"] == "decode"]
    assert len(read) == 6 and read[0]["vs_full"] == 1.0 and all(r["samples_per_s"] > 0 for r in read)
    assert decode["short_side"] == 512 and decode["pil_per_s"] > 0 and decode["draft_per_s"] > 0
    assert decode["psnr_min"] > 20 and "nvjpeg_per_s" not in decode
    (target,) = doc["targets"]
    assert target["value"] == decode["draft_speedup"] and target["pass"] == (decode["draft_speedup"] >= 2)
    # What the training benchmark's breakdown reads: the draft path's rate from this JSON, or a number.
    assert data_throughput.worker_rate(str(path))["samples_per_s"] == decode["draft_per_s"]
    assert data_throughput.worker_rate("123.5")["samples_per_s"] == 123.5


def test_data_decode_device_case_runs_the_trainers_path():
    """The GPU column's code (finish_batch of decode="device"), run with the CPU's decoder."""
    from bench import data_throughput

    pytest.importorskip("torchcodec", reason="the device decode path's JPEG decoder")
    jpegs = data_throughput.make_jpegs(4, 300)
    row = data_throughput.nvjpeg_case(jpegs, batch=8, device="cpu")
    assert row["nvjpeg_per_s"] > 0
    assert row["nvjpeg_mae_worst"] <= 0.5 and row["nvjpeg_psnr_min"] >= 40  # tests/test_device_decode.py


def test_cache_verify_cpu(tmp_path):
    from bench import cache_verify

    argv = _argv(tmp_path, "--rows", "512", "--dim", "64", "--batch", "128", "--repeats", "1")
    assert cache_verify.main(argv) == 0
    doc = _doc(tmp_path, "cache_verify-cpu")
    (row,) = doc["rows"]
    assert row["status"] == "ok" and row["touched"] == 1.0 and row["batch"] == 128
    assert all(row[k] > 0 for k in cache_verify.RATES) and set(doc["summary"]) == {
        *cache_verify.RATES,
        "check_again",
    }


def test_roofline_cli(capsys):
    from bench import roofline

    assert roofline.main(["--batches", "4096", "--dims", "256", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith(("H100", "H200")) and line.endswith("predicted") for line in lines) == 2
    assert sum("-bound)" in line for line in lines) == 10  # five kernels per card


def test_gpu_summary(tmp_path):
    """bench/gpu_summary.py (the GPU check's last step) on the files a check leaves behind."""
    from bench import gpu_summary

    (tmp_path / "steps.tsv").write_text("wheels\tok\t0\tgpu_check.log\nloss sweep\ttimeout\t300\tbench.log\n")
    (tmp_path / "gpu_check.log").write_text("device NVIDIA H200 sm 9.0\n")
    rows = [
        {
            "method": "ours",
            "b": 4096,
            "B": 4096,
            "D": 1024,
            "status": "ok",
            "fwd_bwd_ms": 1.5,
            "roofline_fwd_bwd_ms": 1.2,
            "fwd_bwd_of_roofline": 0.8,
        },
        {"method": "naive", "status": "ok"},
    ]
    target = {"target": "draft >= 2x pil", "value": 2.51234, "pass": True, "note": None}
    docs = {
        "loss_throughput-cuda-H200-1.json": {"rows": rows},
        "data_throughput-cuda-H200-1.json": {
            "meta": {"device_name": "NVIDIA H200"},
            "targets": [target],
            "rows": [{"part": "decode", "short_side": 512, "draft_per_s": 300.0, "nvjpeg_per_s": 4000.0}],
        },
        "train_throughput-cuda-H200-quick-1.json": {
            "rows": [{"kind": "breakdown", "model": "B/16", "batch": 4096, "fraction": None}]
        },
    }
    for name, doc in docs.items():
        (tmp_path / name).write_text(json.dumps(doc))
    assert gpu_summary.main([str(tmp_path), "480", "400"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ok"] is False and [s["step"] for s in res["steps"]] == ["wheels", "loss sweep"]
    assert res["loss"] == [{k: rows[0].get(k) for k in gpu_summary.LOSS_FIELDS}]
    assert res["data"]["decode"][0]["nvjpeg_per_s"] == 4000.0 and res["targets"][0]["verdict"] == "PASS"
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: FAILED in 400 s (budget 480 s)") and "Card: device NVIDIA H200" in md
    assert "- PASS: draft >= 2x pil: 2.512" in md and "80%" in md and "4000" in md
    assert "B/16 b=4096: not measured" in md and "(no resource report" in md
