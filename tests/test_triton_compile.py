"""The Triton kernels compile for Hopper (sm_90a) in every variant, no GPU needed.

The interpreter (what CI runs) does not type-check the way the compiler does, so a kernel can
pass every CPU test and still fail to compile on the GPU. Triton compiles ahead of time for a
given target with its bundled ptxas; tests/sm90_compile_check.py does that in a subprocess
without TRITON_INTERPRET (the kernels are plain JIT functions only when it is unset at import)
for the variants outside the main paths, one config each; tests/test_kernel_resources.py compiles
the main paths with every config and checks their registers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA, HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(HAS_CUDA, reason="a GPU compiles and runs the real kernels in the other tests")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout
