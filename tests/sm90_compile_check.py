"""Compile every Triton kernel of llm2clip_kernels for Hopper (sm_90a) ahead of time, no GPU needed.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET. It covers the
variants that tests/test_kernel_resources.py does not (every dtype and flag combination outside
the bf16/fp16 main paths: fp32 inputs, InfoNCE with a bias, the sigmoid loss without one), one
autotune config per kernel (its smallest tiles, the fastest to compile), through
bench/kernel_resources.py: the launches are recorded from the real host launchers and specialised
as Triton's JIT specialises them. Fails if a kernel does not compile, or if a 16-bit kernel's tile
product does not use wgmma.
"""

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import kernel_resources  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "resources.json"
        argv = ["--paths", "other", "--first-config", "--no-cuda-ext", "--json", str(out), "--out", d]
        rc = kernel_resources.main(argv)
        rows = json.loads(out.read_text())["rows"]
    errors = [(r["kernel"], r["used_by"], r.get("error")) for r in rows if r["status"] == "error"]
    assert rc == 0 and not errors, errors
    no_tensor_cores = [
        (r["kernel"], r["used_by"])
        for r in rows
        if r["kernel"] != "positive" and "fp32" not in r["dtypes"] and r["mma"] != "wgmma"
    ]
    assert not no_tensor_cores, f"16-bit kernels without wgmma: {no_tensor_cores}"
    print("compiled", len(rows), "kernels for sm_90a")


if __name__ == "__main__":
    main()
