"""Compile every Triton kernel of llm2clip_kernels for Hopper (sm_90) ahead of time, no GPU needed.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET. Each autotune config
is compiled once on the bf16 path; the flag variants and the other dtypes use the first config
(each compile takes seconds, and CI has two cores).
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llm2clip_kernels import _triton as K

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, types, consts, cfg):
    consts = dict(consts, **cfg.kwargs)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=TARGET, options=options).asm["ptx"]


def main():
    count = 0
    dtypes = [
        ("bf16", "bf16", False, "tf32"),
        ("fp16", "fp32", False, "tf32"),
        ("fp32", "fp32", True, "ieee"),
    ]
    for dt, ws, dot_fp32, prec in dtypes:
        main_path = dt == "bf16"
        types = dict(I="*" + dt, T="*" + dt, WS="*" + ws, pos_ptr="*i64", partials="*fp64")
        types.update(row_grp_ptr="*i64", col_grp_ptr="*i64")
        for name in ("scale_ptr", "bias_ptr", "row_out", "col_out", "grad_ptr", "row_vecs", "col_vecs"):
            types[name] = "*fp32"
        for sigmoid in (False, True) if main_path else (False,):
            flags = dict(HAS_BIAS=True, HAS_GROUPS=True, SIGMOID=sigmoid, DOT_FP32=dot_fp32, PRECISION=prec)
            every = main_path and not sigmoid
            for cfg in K._FWD_CONFIGS if every else K._FWD_CONFIGS[:1]:
                ptx = build(K._forward_kernel, types, dict(flags, BM=K.FWD_BM), cfg)
                assert not main_path or "wgmma" in ptx, "bf16 forward does not use wgmma"
                count += 1
            for cfg in K._GRAD_CONFIGS if every else K._GRAD_CONFIGS[:1]:
                build(K._grad_logits_kernel, types, flags, cfg)
                count += 1
        gemm = dict(A="*" + ws, Bm="*" + dt, OUT="*" + dt, ACC="*fp32")
        variants = (
            [(True, True), (False, True), (True, False), (False, False)] if main_path else [(True, True)]
        )
        for load_acc, store_out in variants:
            every = main_path and load_acc and store_out
            for cfg in K._GEMM_CONFIGS if every else K._GEMM_CONFIGS[:1]:
                flags = dict(LOAD_ACC=load_acc, STORE_OUT=store_out, DOT_FP32=dot_fp32 or ws != dt)
                ptx = build(K._gemm_kernel, gemm, dict(flags, PRECISION=prec), cfg)
                assert not main_path or "wgmma" in ptx, "bf16 GEMM does not use wgmma"
                count += 1
    print("compiled", count, "kernels for sm_90")


if __name__ == "__main__":
    main()
