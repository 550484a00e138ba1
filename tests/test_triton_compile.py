"""The Triton kernels compile for Hopper (sm_90) with every autotune config, no GPU needed.

The interpreter (what CI runs) does not type-check the way the compiler does, so a kernel can
pass every CPU test and still fail to compile on the GPU. Triton compiles ahead of time for a
given target with its bundled ptxas; this runs that in a subprocess without TRITON_INTERPRET
(the kernels are plain JIT functions only when it is unset at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import HAS_TRITON

_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llm2clip_kernels import _triton as K

    target = GPUTarget("cuda", 90, 32)

    def build(fn, types, consts, cfg):
        consts = dict(consts, **cfg.kwargs)
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        return kernel.asm["ptx"]

    count = 0
    # Every autotune config once on the bf16 path; the flag variants and the other dtypes with the
    # first config (each compile takes seconds, and CI has two cores).
    for dt, ws, dot_fp32, prec in [("bf16", "bf16", False, "tf32"), ("fp16", "fp32", False, "tf32"),
                                   ("fp32", "fp32", True, "ieee")]:
        main = dt == "bf16"
        types = dict(I="*" + dt, T="*" + dt, scale_ptr="*fp32", bias_ptr="*fp32", pos_ptr="*i64", grp_ptr="*i64",
                     row_out="*fp32", col_out="*fp32", grad_ptr="*fp32", row_vecs="*fp32", col_vecs="*fp32",
                     WS="*" + ws, partials="*fp32")
        for sigmoid in ((False, True) if main else (False,)):
            flags = dict(HAS_BIAS=True, HAS_GROUPS=True, SIGMOID=sigmoid, DOT_FP32=dot_fp32, PRECISION=prec)
            every = main and not sigmoid
            for cfg in K._FWD_CONFIGS if every else K._FWD_CONFIGS[:1]:
                ptx = build(K._forward_kernel, types, dict(flags, BM=K.FWD_BM), cfg)
                assert not main or "wgmma" in ptx, "bf16 forward does not use wgmma"
                count += 1
            for cfg in K._GRAD_CONFIGS if every else K._GRAD_CONFIGS[:1]:
                build(K._grad_logits_kernel, types, flags, cfg)
                count += 1
        gemm = dict(A="*" + ws, Bm="*" + dt, OUT="*" + dt, ACC="*fp32")
        variants = [(True, True), (False, True), (True, False), (False, False)] if main else [(True, True)]
        for load_acc, store_out in variants:
            every = main and load_acc and store_out
            for cfg in K._GEMM_CONFIGS if every else K._GEMM_CONFIGS[:1]:
                flags = dict(LOAD_ACC=load_acc, STORE_OUT=store_out, DOT_FP32=dot_fp32 or ws != dt, PRECISION=prec)
                ptx = build(K._gemm_kernel, gemm, flags, cfg)
                assert not main or "wgmma" in ptx, "bf16 GEMM does not use wgmma"
                count += 1
    print("compiled", count, "kernels for sm_90")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout
