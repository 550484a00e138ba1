"""Registers, spills, shared memory and occupancy of every loss kernel on Hopper (sm_90a), no GPU.

The host launchers of ``llm2clip_kernels._triton`` run on CPU tensors with ``_launch`` recording
instead of launching; each launch is specialised as Triton's JIT does and compiled for sm_90a
with every autotune config (``ptxas -v``); the CUDA extension through ``nvcc -Xptxas -v``. How and
why: bench/README.md; the table and its reading: docs/loss.md.

    python bench/kernel_resources.py                      # everything (~300 compiles), table + JSON
    python bench/kernel_resources.py --paths main --dtypes bf16,fp16 --no-cuda-ext --fail-on-spill
    python bench/kernel_resources.py --first-config       # every variant compiles (its smallest config)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as bench/kernel_resources.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

# H100 / H200 (sm_90) per-SM limits: CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (9.0).
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers per warp are allocated in multiples of this
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

DTYPES = ("bf16", "fp16", "fp32")
BATCHES = (4096, 24576)  # one backward superblock; 3 x 3 (every accumulator case)
DIM = 1024
TARGET_SMS = 132  # H100 SXM: sets the forward's column splits as on the card


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way the losses are called."""

    dtype: str  # bf16 | fp16 | fp32
    loss: str  # infonce | sigmoid
    bias: bool
    groups: bool

    @property
    def main(self) -> bool:
        """The paths CI keeps spill-free: 16-bit inputs, InfoNCE without / sigmoid with a bias."""
        return self.dtype in ("bf16", "fp16") and self.bias == (self.loss == "sigmoid")

    @property
    def label(self) -> str:
        flags = ("+bias" if self.bias else "") + ("+groups" if self.groups else "")
        return f"{self.dtype} {self.loss}{flags}"


def variants(dtypes, paths: str = "all") -> list[Variant]:
    """Every variant of the given dtypes; paths 'main' keeps the main paths, 'other' the rest."""
    out = [
        Variant(dt, loss, bias, groups)
        for dt in dtypes
        for loss in ("infonce", "sigmoid")
        for bias in (False, True)
        for groups in (False, True)
    ]
    return [v for v in out if paths == "all" or v.main == (paths == "main")]


def record_launches(kernels_mod, variant: Variant, batches, dim: int) -> list[tuple[str, tuple, dict]]:
    """(kernel name, args, flags) of every launch one forward + backward makes, nothing run."""
    import torch

    calls = []
    K = kernels_mod
    saved = K._launch, K._target_programs
    K._launch = lambda name, grid, *args, **flags: calls.append((name, args, flags))
    K._target_programs = lambda device: 2 * TARGET_SMS
    dtype = common.torch_dtype(variant.dtype)
    sigmoid = variant.loss == "sigmoid"
    try:
        for n in batches:
            image = torch.zeros(n, dim, dtype=dtype)
            text = torch.zeros(n, dim, dtype=dtype)
            scale = torch.tensor(10.0)
            bias = torch.tensor(-10.0) if variant.bias else None
            pos = torch.arange(n)
            groups = torch.arange(n) if variant.groups else None
            row_groups = None if groups is None else groups[pos]
            K.forward_stats(image, text, scale, bias, pos, row_groups, groups, sigmoid)
            vecs = torch.zeros(4, n), torch.zeros(4, n)
            K.backward_grads(
                torch.tensor(1.0), image, text, scale, bias, pos, row_groups, groups, *vecs, sigmoid
            )
    finally:
        K._launch, K._target_programs = saved
    return calls


def _specialize_arg(value, backend):
    """(type, attribute) of one argument as Triton's JIT specialises it at a launch."""
    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # older Triton: the same rule, written out
        native_specialize_impl = None
    if native_specialize_impl is not None:
        ty, attr = native_specialize_impl(backend, value, False, True, True)[:2]
        return ty, attr
    import torch

    if isinstance(value, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
        names.update({torch.int64: "i64", torch.int32: "i32"})
        return "*" + names[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), "D" if value % 16 == 0 else ""
    return "fp32", None


def specialization(fn, args, flags, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile of fn launched with args, flags, config."""
    from triton.backends.nvidia.compiler import CUDABackend

    bound = dict(zip(fn.arg_names, args))
    bound.update(flags)
    bound.update(config.kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", value
            continue
        ty, attr = _specialize_arg(value, CUDABackend)
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = attr
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return sig, consts, attrs


@dataclasses.dataclass
class Task:
    """One kernel x specialisation x autotune config to compile."""

    kernel: str
    config_index: int
    config: str
    num_warps: int
    num_stages: int
    sig: dict
    consts: dict
    attrs: dict
    flags: dict  # the launch's constexpr flags (for the table)
    strides: str  # which operands are contiguous along which side (GEMMs differ by it)
    used_by: list = dataclasses.field(default_factory=list)


def _tile_size(cfg) -> int:
    """Elements of a config's tiles (the smallest compiles fastest)."""
    size = 1
    for k in ("BM", "BN", "BK"):
        size *= cfg.kwargs.get(k, 128)
    return size * cfg.num_stages


def _config_label(cfg) -> str:
    tiles = "x".join(str(cfg.kwargs[k]) for k in ("BM", "BN", "BK") if k in cfg.kwargs)
    return f"{tiles} w{cfg.num_warps} s{cfg.num_stages}"


def collect_tasks(vs, batches, dim, first_config: bool, kernels=None) -> list[Task]:
    common.import_kernels()
    K = importlib.import_module("llm2clip_kernels._triton")
    tasks: dict[tuple, Task] = {}
    for v in vs:
        for name, args, flags in record_launches(K, v, batches, dim):
            if kernels and name not in kernels:
                continue
            fn, configs = K.KERNELS[name][0], K.KERNELS[name][1]
            picked = (
                [min(range(len(configs)), key=lambda i: _tile_size(configs[i]))] if first_config else None
            )
            for ci, cfg in enumerate(configs):
                if picked is not None and ci not in picked:
                    continue
                sig, consts, attrs = specialization(fn, args, flags, cfg)
                key = (
                    name,
                    ci,
                    tuple(sig.items()),
                    repr(sorted(consts.items())),
                    repr(sorted(attrs.items())),
                )
                if key not in tasks:
                    unit = [n for n, t in sig.items() if t == "constexpr" and n.startswith("stride")]
                    bools = {k: val for k, val in flags.items() if isinstance(val, bool)}
                    strides = ",".join(u.replace("stride_", "") for u in unit)
                    label = _config_label(cfg)
                    tasks[key] = Task(
                        name, ci, label, cfg.num_warps, cfg.num_stages, sig, consts, attrs, bools, strides
                    )
                if v.label not in tasks[key].used_by:
                    tasks[key].used_by.append(v.label)
    return list(tasks.values())


# fmt: off
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "frame": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}
# fmt: on


def parse_ptxas(log: str) -> dict:
    """registers, stack frame, spill stores / loads and static smem from one kernel's ptxas -v log."""
    regs = _PTXAS_RE["registers"].search(log)
    frame = _PTXAS_RE["frame"].search(log)
    smem = _PTXAS_RE["smem"].search(log)
    if regs is None or frame is None:
        raise ValueError(f"no register / spill report in the ptxas log:\n{log[-2000:]}")
    return {
        "registers": int(regs.group(1)),
        "stack_frame_bytes": int(frame.group(1)),
        "spill_store_bytes": int(frame.group(2)),
        "spill_load_bytes": int(frame.group(3)),
        "static_smem_bytes": int(smem.group(1)) if smem else 0,
    }


def occupancy(registers: int, warps_per_block: int, smem_bytes: int) -> dict:
    """Resident blocks and warps per SM on sm_90, and what limits them."""
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    # On a tie the hardware caps (warps, blocks) are named first: more registers would not help.
    limits = {
        "warps": MAX_WARPS_PER_SM // warps_per_block,
        "blocks": MAX_BLOCKS_PER_SM,
        "registers": REGS_PER_SM // (regs_per_warp * warps_per_block),
    }
    if smem_bytes > SMEM_PER_BLOCK:
        limits["shared memory"] = 0
    elif smem_bytes:
        limits["shared memory"] = SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    limiter = next(k for k in limits if limits[k] == blocks)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps_per_block, "limited_by": limiter}


def _ptxas_path() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _compile_task(task: Task) -> dict:
    """Compile one task for sm_90a and read its resources (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    common.import_kernels()
    K = importlib.import_module("llm2clip_kernels._triton")
    fn = K.KERNELS[task.kernel][0]
    t0 = time.perf_counter()
    out = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its own ptxas -v log: captured here
    with contextlib.redirect_stdout(out):
        compiled = triton.compile(
            ASTSource(fn, task.sig, task.consts, task.attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": task.num_warps, "num_stages": task.num_stages},
        )
    log = out.getvalue()
    ptx = compiled.asm["ptx"]
    if "Used " not in log:  # a Triton that does not print the log: run its ptxas ourselves
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "kernel.ptx"
            src.write_text(ptx)
            cmd = [_ptxas_path(), "-lineinfo", "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"]
            log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    res = parse_ptxas(log)
    res["smem_bytes"] = int(compiled.metadata.shared) + res["static_smem_bytes"]
    res["mma"] = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "none")
    res["compile_s"] = time.perf_counter() - t0
    return res


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # empty: every kernel is compiled, nothing reused
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(tasks: list[Task], jobs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kernel_resources_cache_") as cache:
        with concurrent.futures.ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=(cache,)) as ex:
            futures = {ex.submit(_compile_task, t): t for t in tasks}
            for fut in concurrent.futures.as_completed(futures):
                t = futures[fut]
                row = {
                    "kernel": t.kernel,
                    "config": t.config,
                    "config_index": t.config_index,
                    "num_warps": t.num_warps,
                    "num_stages": t.num_stages,
                    "flags": t.flags,
                    "unit_strides": t.strides,
                    "used_by": t.used_by,
                    "dtypes": sorted({u.split()[0] for u in t.used_by}),
                    "main": any(_variant_of(u).main for u in t.used_by),
                }
                try:
                    row.update(fut.result())
                    row.update(occupancy(row["registers"], t.num_warps, row["smem_bytes"]))
                    row["status"] = "ok" if row["blocks_per_sm"] else "does not fit"
                except Exception as e:  # noqa: BLE001 - report every kernel, failures included
                    row.update(status="error", error=f"{type(e).__name__}: {str(e).strip()[-1500:]}")
                rows.append(row)
    order = {
        k: i for i, k in enumerate(("forward", "positive", "grad", "grad32", "gemm", "gemm_acc", "gemm32"))
    }
    rows.sort(
        key=lambda r: (
            order.get(r["kernel"], 99),
            r["dtypes"],
            str(r["flags"]),
            r["unit_strides"],
            r["config_index"],
        )
    )
    return rows


def _variant_of(label: str) -> Variant:
    dtype, rest = label.split()
    loss = rest.split("+")[0]
    return Variant(dtype, loss, "+bias" in rest, "+groups" in rest)


_NVCC_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")


def cuda_ext_report(source: Path, arch: str = "sm_90") -> list[dict]:
    """Per-kernel ptxas resources of the CUDA extension (nvcc -Xptxas -v), [] without nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or not source.exists():
        return []
    with tempfile.TemporaryDirectory() as d:
        obj = Path(d) / "k.o"
        cmd = [nvcc, "-c", str(source), "-I", str(source.parent), "-o", str(obj), "-Xptxas", "-v"]
        cmd += ["-gencode", f"arch=compute_{arch[3:]},code={arch}", "-O3"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return [{"kernel": source.name, "status": "error", "error": proc.stderr[-1500:]}]
        threads = _launch_bounds(obj)
    rows = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", proc.stderr):
        m = _NVCC_ENTRY.search(block)
        if not m:
            continue
        row = {"kernel": _demangle(m.group(1)), "mangled": m.group(1), "arch": m.group(2), "status": "ok"}
        row.update(parse_ptxas(block))
        row["smem_bytes"] = row["static_smem_bytes"]
        row["threads_per_block"] = threads.get(m.group(1), 256)
        row["threads_from"] = "launch bounds" if m.group(1) in threads else "assumed 256"
        warps = -(-row["threads_per_block"] // 32)
        row.update(occupancy(row["registers"], warps, row["smem_bytes"]))
        rows.append(row)
    return rows


def _launch_bounds(obj: Path) -> dict[str, int]:
    """Mangled kernel name -> max threads per block from its launch bounds (cuobjdump -elf)."""
    tool = shutil.which("cuobjdump") or str(Path(_ptxas_path()).with_name("cuobjdump"))
    try:
        elf = subprocess.run([tool, "-elf", str(obj)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for section in re.split(r"\n(?=\.nv\.info\.)", elf):
        head = section.split("\n", 1)[0]
        m = re.search(r"EIATTR_MAX_THREADS\s+Format:\s+\S+\s+Value:\s+(0x[0-9a-f]+)", section)
        if head.startswith(".nv.info.") and m:
            out[head[len(".nv.info.") :].strip()] = int(m.group(1), 16)
    return out


def _demangle(name: str) -> str:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    try:
        out = subprocess.run([tool, name], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return name
    out = re.sub(r"llm2clip::\(anonymous namespace\)::", "", out)
    return re.sub(r"^void ", "", out) or name


def _flags_text(flags: dict) -> str:
    short = dict(HAS_BIAS="bias", HAS_GROUPS="groups", SIGMOID="sigmoid", LOAD_ACC="load-acc",
                 STORE_OUT="store-out", DOT_FP32="upcast")  # fmt: skip
    return ",".join(short.get(k, k) for k, v in flags.items() if v and k in short) or "-"


# fmt: off
COLUMNS = [
    ("kernel", "kernel", ""), ("dtype", lambda r: ",".join(r["dtypes"]), ""),
    ("flags", lambda r: _flags_text(r["flags"]), ""), ("unit strides", "unit_strides", ""),
    ("config", "config", ""), ("regs", "registers", "d"),
    ("spill st/ld B", lambda r: f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", ""),
    ("stack B", "stack_frame_bytes", "d"), ("smem KiB", lambda r: r["smem_bytes"] / 1024, ".0f"),
    ("warps/SM", "warps_per_sm", "d"), ("limited by", "limited_by", ""), ("mma", "mma", ""),
    ("main", lambda r: "yes" if r["main"] else "", ""), ("status", "status", ""),
]
EXT_COLUMNS = [
    ("CUDA kernel (csrc/gather_kernels.cu)", "kernel", ""), ("arch", "arch", ""), ("regs", "registers", "d"),
    ("spill st/ld B", lambda r: f"{r['spill_store_bytes']}/{r['spill_load_bytes']}", ""),
    ("stack B", "stack_frame_bytes", "d"), ("smem B", "smem_bytes", "d"),
    ("threads", "threads_per_block", "d"),
    ("warps/SM", "warps_per_sm", "d"), ("limited by", "limited_by", ""), ("status", "status", ""),
]
# fmt: on


def format_table(rows, ext_rows) -> str:
    text = common.table(rows, COLUMNS, md=True)
    return text + ("\n\n" + common.table(ext_rows, EXT_COLUMNS, md=True) if ext_rows else "")


def summarize(rows, ext_rows) -> dict:
    main = [r for r in rows if r["main"]]
    bad = lambda r: r["status"] != "ok" or r["spill_store_bytes"] or r["spill_load_bytes"]  # noqa: E731
    return {
        "triton_kernels_compiled": len(rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "spilling": sum(
            r["status"] == "ok" and (r["spill_store_bytes"] + r["spill_load_bytes"]) > 0 for r in rows
        ),
        "not_fitting": sum(r["status"] == "does not fit" for r in rows),
        "main_path_kernels": len(main),
        "main_path_bad": [
            f"{r['kernel']} {','.join(r['dtypes'])} {_flags_text(r['flags'])} {r['config']}: "
            f"{r.get('error') or r['status']}, spills {r.get('spill_store_bytes')}/"
            f"{r.get('spill_load_bytes')}"
            for r in main
            if bad(r)
        ],
        "cuda_ext_kernels": len(ext_rows),
        "cuda_ext_spilling": sum(
            r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0) > 0 for r in ext_rows
        ),
    }


# fmt: off
OPTIONS = [
    ("--dtypes", common.str_list, DTYPES, "input dtypes (default bf16,fp16,fp32)"),
    ("--paths", ("all", "main", "other"), "all",
     "all variants (default), the main paths only (16-bit, InfoNCE / sigmoid+bias), or the others"),
    ("--first-config", bool, False, "one autotune config per kernel, the smallest tiles (a compile check)"),
    ("--kernels", common.str_list, None, "only these kernels of _triton.KERNELS (default: all)"),
    ("--batches", common.int_list, BATCHES,
     "b = B values whose launches are recorded (default 4096,24576: every accumulator case)"),
    ("--dim", int, DIM, "feature dim D of the recorded launches (default 1024)"),
    ("--jobs", int, os.cpu_count() or 1, "compile processes (default: all cores)"),
    ("--no-cuda-ext", bool, False, "skip the CUDA extension (nvcc) report"),
    ("--fail-on-spill", bool, False, "exit 1 if a main-path config spills or does not fit shared memory"),
]
# fmt: on


def main(argv=None) -> int:
    args = common.parse(common.parser(__doc__, OPTIONS, ("json",), plot=False), argv)
    common.check_choices(("--dtypes", args.dtypes, DTYPES))
    if os.environ.pop("TRITON_INTERPRET", None) and "llm2clip_kernels" in sys.modules:
        raise SystemExit(
            "llm2clip_kernels was imported under TRITON_INTERPRET=1: run this in a fresh process"
        )
    run = common.Run("kernel_resources", args, argv, mode="sm_90a", target="sm_90a")
    run.meta["sm_limits"] = dict(
        registers=REGS_PER_SM, reg_alloc_unit=REG_ALLOC_UNIT, smem_per_sm=SMEM_PER_SM,
        smem_per_block=SMEM_PER_BLOCK, smem_reserved_per_block=SMEM_RESERVED_PER_BLOCK,
        max_warps=MAX_WARPS_PER_SM, max_blocks=MAX_BLOCKS_PER_SM,
    )  # fmt: skip
    vs = variants(args.dtypes, args.paths)
    tasks = collect_tasks(vs, args.batches, args.dim, args.first_config, args.kernels)
    print(
        f"{len(vs)} variants -> {len(tasks)} kernel x config compiles for sm_90a ({args.jobs} processes)",
        flush=True,
    )
    run.rows = compile_all(tasks, max(1, args.jobs))
    ext_rows = [] if args.no_cuda_ext else cuda_ext_report(common.REPO_ROOT / "csrc" / "gather_kernels.cu")
    summary = summarize(run.rows, ext_rows)
    run.write(summary=summary, cuda_ext=ext_rows)
    table = format_table(run.rows, ext_rows)
    md = f"# Kernel resources (sm_90a, triton {run.meta['triton']})\n\n{table}\n"
    rc = run.finish(f"{table}\n\nsummary: {summary}", md=md)
    return 1 if rc or summary["errors"] or (args.fail_on_spill and summary["main_path_bad"]) else 0


if __name__ == "__main__":
    sys.exit(main())
