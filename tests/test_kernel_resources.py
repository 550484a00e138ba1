"""No register spills on the loss kernels' main paths for Hopper (sm_90a), checked without a GPU.

bench/kernel_resources.py compiles every Triton kernel the bf16 and fp16 main paths launch
(InfoNCE without a bias and the sigmoid loss with one, each with and without group ids: the
forward sweep, the positive logits, the dS tiles and the backward GEMMs with and without an fp32
accumulator) with every autotune config, specialised as a launch on an H100 specialises them, and
reads Triton's ptxas -v. A spill goes to local memory, i.e. global-memory traffic inside the hot
loops; a config that spills, does not fit in shared memory or does not compile fails here. It runs
in a subprocess without TRITON_INTERPRET (the kernels must be imported as JIT functions) and with
an empty Triton cache, so nothing is reused between runs. The CUDA extension's kernels are checked
the same way with nvcc -Xptxas -v.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_TRITON

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "kernel_resources.py"


def _has_ptxas() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not _has_ptxas(), reason="triton's bundled ptxas is missing (a non-NVIDIA triton build)")
def test_main_paths_do_not_spill(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.json"
    cmd = [sys.executable, str(SCRIPT), "--paths", "main", "--dtypes", "bf16,fp16", "--no-cuda-ext"]
    cmd += ["--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    kernels = {"forward", "positive", "grad", "grad32", "gemm", "gemm_acc", "gemm32"}
    assert {r["kernel"] for r in rows} == kernels
    assert all(r["main"] for r in rows) and {d for r in rows for d in r["dtypes"]} == {"bf16", "fp16"}
    broken = [r for r in rows if r["status"] != "ok"]
    assert not broken, [(r["kernel"], r["config"], r["status"], r.get("error")) for r in broken]
    spills = [
        f"{r['kernel']} {','.join(r['dtypes'])} {r['flags']} {r['config']}: {r['registers']} registers, "
        f"spill stores {r['spill_store_bytes']} B, loads {r['spill_load_bytes']} B"
        for r in rows
        if r["spill_store_bytes"] or r["spill_load_bytes"]
    ]
    assert not spills, "\n".join(spills)
    # Every 16-bit tile product runs on the tensor cores (wgmma), the fp16 path's GEMMs in tf32.
    assert all(r["mma"] == "wgmma" for r in rows if r["kernel"] != "positive")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_extension_kernels_do_not_spill():
    sys.path.insert(0, str(REPO))
    try:
        from bench.kernel_resources import cuda_ext_report
    finally:
        sys.path.remove(str(REPO))
    rows = cuda_ext_report(REPO / "csrc" / "gather_kernels.cu")
    for r in rows:
        print(r)
    assert rows, "no kernel found in the nvcc -Xptxas -v output"
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["kernel"].split("<")[0].split("::")[-1] for r in rows} >= {
        "gather_rows_kernel",
        "copy_duplicates_kernel",
    }
    assert not [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert all(r["warps_per_sm"] > 0 for r in rows)


def _bench(name: str):
    sys.path.insert(0, str(REPO))
    try:
        return __import__(f"bench.{name}", fromlist=[name])
    finally:
        sys.path.remove(str(REPO))


def test_roofline_model():
    """bench/roofline.py: the tiling it models is the kernels', and its times bound the work."""
    roofline = _bench("roofline")
    if HAS_TRITON:
        from llm2clip_kernels import _triton

        assert (roofline.FWD_BM, roofline.WS_ROWS, roofline.WS_COLS) == (
            _triton.FWD_BM,
            _triton.BWD_ROWS,
            _triton.BWD_COLS,
        )
    h100, h200 = roofline.H100_SXM, roofline.H200
    assert roofline.match_device("NVIDIA H100 80GB HBM3") is h100
    assert roofline.match_device("NVIDIA H100 PCIe") is roofline.H100_PCIE
    assert roofline.match_device("NVIDIA H200") is h200 and roofline.match_device("NVIDIA A100") is None
    b = B = 32768
    D = 1024
    p = roofline.predict(b, B, D, h100)
    floor_ms = 8 * b * B * D / (h100.tflops["bf16"] * 1e12) * 1e3
    assert floor_ms <= p["fwd_bwd_ms"] <= 1.1 * floor_ms  # tensor-bound at D = 1024
    assert all(k["bound"] in ("tensor", "memory") for k in p["kernels"])
    # Small D: the backward's workspace traffic (about D FLOPs per byte) makes it memory-bound,
    # and more so on the card with less bandwidth.
    small = roofline.predict(b, B, 128, h100)
    assert [k["bound"] for k in small["kernels"] if k["part"] == "bwd"] == ["memory"] * 3
    assert roofline.predict(b, B, 128, h200)["bwd_ms"] < small["bwd_ms"]
    text = roofline.format_predictions(roofline.HEADLINE, [h100, h200])
    rows = [line for line in text.splitlines() if line.startswith(("H100", "H200"))]
    assert len(rows) == 4 and all(line.endswith("predicted") for line in rows)


def test_loss_benchmark_roofline_columns():
    """The loss benchmark puts the model time and the fraction reached beside a GPU time."""
    lt = _bench("loss_throughput")
    roofline = _bench("roofline")
    row = {"method": "ours", "b": 32768, "B": 32768, "D": 1024, "dtype": "bf16", "fwd_bwd_ms": 12.0}
    row.update(fwd_ms=3.0, bwd_ms=9.0)
    lt.derive(row, 800.0, roofline.H100_SXM)
    model = roofline.predict(32768, 32768, 1024, roofline.H100_SXM)
    assert row["roofline_fwd_bwd_ms"] == pytest.approx(model["fwd_bwd_ms"])
    assert row["fwd_bwd_of_roofline"] == pytest.approx(model["fwd_bwd_ms"] / 12.0)
    assert "% roof" in lt.format_table([dict(row, status="ok", device="cuda")])
