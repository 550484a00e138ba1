"""Caption-cache row gather throughput: llm2clip._C against the stock ways, beside the card's own
measured copy bandwidths (docs/cache.md).

Methods (GPU mode; table rows in the cache layout, bf16 storage and bf16 output by default):

    ext-device       llm2clip gather_rows on a GPU-resident table (sort + dedup on)
    ext-device-nodd  the same with dedup=False (no sort)
    ext-host         llm2clip gather_rows on a host table pinned in place with cudaHostRegister
                     and read by the kernel over PCIe (zero-copy; register_host_table)
    torch-device     stock torch index_select on the GPU-resident table (viewed as the storage
                     dtype), then the dequantising cast
    torch-host       stock torch index_select (CUDA kernel) on the same registered host table
                     viewed from the GPU ("index_select on a pinned table")
    cpu-then-cuda    CPU index_select on the host table, then .cuda() and the cast on the GPU

Ceilings measured in the same run: h2d = pinned host -> device copy (copy engine), GB/s = bytes /
time; d2d = device -> device copy, GB/s = (bytes read + bytes written) / time.

Work count: a row moves dim * itemsize table bytes (read) and dim * out_size bytes (written).
Host-tier GB/s count the table bytes read (what crosses PCIe) and compare with h2d; device-tier
GB/s count read + written bytes and compare with d2d. Timing: triton.testing.do_bench (median,
20th and 80th percentile; it clears the L2 cache between repetitions, so a 4k-row batch cannot
hit in L2), CUDA events without triton; cpu-then-cuda: time.perf_counter medians.

Targets (checked at the largest batch of each dim, printed as PASS / FAIL and kept in the JSON):

    ext-host    >= 80% of the measured h2d bandwidth
    ext-device  >= 70% of the measured d2d copy bandwidth
    both        >= 3x the rows/s of cpu-then-cuda

CPU mode (no GPU, or --device cpu): a small run of the extension's CPU op against torch
index_select + cast on a CPU table, beside a measured CPU memcpy bandwidth (clone of a 256 MiB
tensor; GB/s = read + written bytes).

    python bench/cache_gather.py                # GPU: dims 2048, 4096, batches 4k..64k
    python bench/cache_gather.py --quick        # GPU: dim 4096, batches 4k and 64k
    python bench/cache_gather.py --device cpu   # CPU op vs index_select

Writes a table to stdout and cache_gather-<device>-<time>.json (+ .png with matplotlib) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as bench/cache_gather.py
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

GPU_METHODS = ("ext-device", "ext-device-nodd", "ext-host", "torch-device", "torch-host", "cpu-then-cuda")
CPU_METHODS = ("ext-cpu", "torch-cpu")
GPU_BATCHES = (4096, 16384, 65536)
GPU_QUICK_BATCHES = (4096, 65536)
DIMS = (2048, 4096)
QUICK_DIMS = (4096,)
CPU_BATCHES = (4096, 16384)
STORAGE_NAMES = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "fp8": 4}
TARGET_HOST_X_H2D = 0.80
TARGET_DEVICE_X_D2D = 0.70
TARGET_X_CPU = 3.0


def _storage_dtype(torch, code: int):
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn)
    return dtypes[code]


def _import_ext():
    try:
        from llm2clip.cache import _ext
    except ImportError:
        sys.path.insert(0, str(common.REPO_ROOT))
        from llm2clip.cache import _ext
    return _ext


# ----------------------------------------------------------------------------- timing


def bench_cuda(fn, warmup_ms: float, rep_ms: float) -> dict:
    """{ms, ms_p20, ms_p80} of fn() on the GPU."""
    import torch

    if common.triton_version() is not None:
        med, p20, p80 = common.do_bench_ms(fn, warmup_ms, rep_ms)
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 1000):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    q = statistics.quantiles(times, n=10)
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def bench_host(fn, repeats: int, sync=None) -> dict:
    """perf_counter median / p20 / p80 (ms) of fn() followed by sync()."""
    fn()
    if sync:
        sync()
    times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "ms": statistics.median(times),
        "ms_p20": times[int(0.2 * (len(times) - 1))],
        "ms_p80": times[int(0.8 * (len(times) - 1) + 0.5)],
    }


# ----------------------------------------------------------------------------- ceilings


def measure_gpu_ceilings(args) -> dict:
    import torch

    nbytes = args.copy_mib << 20
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t_h2d = bench_cuda(partial(dst.copy_, pinned, non_blocking=True), args.warmup_ms, args.rep_ms)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    t_d2d = bench_cuda(partial(dst.copy_, on_device), args.warmup_ms, args.rep_ms)
    return {
        "h2d_gbps": nbytes / (t_h2d["ms"] * 1e-3) / 1e9,
        "d2d_gbps": 2 * nbytes / (t_d2d["ms"] * 1e-3) / 1e9,
        "copy_mib": args.copy_mib,
    }


def measure_cpu_ceiling(args) -> dict:
    import torch

    src = torch.empty(256 << 20, dtype=torch.uint8).random_(0, 256)
    t = bench_host(src.clone, args.repeats)
    return {"memcpy_gbps": 2 * src.numel() / (t["ms"] * 1e-3) / 1e9, "copy_mib": 256}


# ----------------------------------------------------------------------------- tables


def torch_dequant(torch, q, scales_rows, out_dtype):
    """The stock path's cast: q (n, dim) storage dtype -> out_dtype (q * scale for int8 / fp8)."""
    if scales_rows is None:
        return q.to(out_dtype)
    return (q.to(torch.float32) * scales_rows[:, None]).to(out_dtype)


def torch_gather(torch, table, scales, idx, dim, code, out_dtype):
    """The stock gather: view the bytes as the storage dtype, index_select, dequantise."""
    q = table.view(_storage_dtype(torch, code))[:, :dim].index_select(0, idx)
    return torch_dequant(torch, q, None if scales is None else scales.index_select(0, idx), out_dtype)


def _same(a, b) -> bool:
    """Equal values; the random table bytes include NaNs, compared as equal to each other."""
    return a.shape == b.shape and bool((a.nan_to_num() == b.nan_to_num()).all())


def make_tables(args, dim: int, code: int):
    """{dev, host, alias, s_dev, s_host, s_alias}: the GPU-resident table, the host table (CPU,
    pageable, then page-locked in place), its CUDA alias, and the matching scales (or None)."""
    import torch

    _ext = _import_ext()
    itemsize = _storage_dtype(torch, code).itemsize
    stride = -(-dim * itemsize // 128) * 128
    dev_rows = max(1, (args.device_table_mib << 20) // stride)
    host_rows = max(1, (args.host_table_mib << 20) // stride)
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    dev = torch.randint(0, 256, (dev_rows, stride), dtype=torch.uint8, device="cuda", generator=g)
    host = torch.empty((host_rows, stride), dtype=torch.uint8)
    step = min(host_rows, max(1, (256 << 20) // stride))
    chunk = torch.randint(0, 256, (step, stride), dtype=torch.uint8, device="cuda", generator=g)
    for r in range(0, host_rows, step):  # fill from the GPU: much faster than a CPU RNG
        n = min(step, host_rows - r)
        host[r : r + n].copy_(chunk[:n])
    del chunk
    tabs = {"dev": dev, "host": host, "alias": _ext.register_host_table(host)}
    tabs.update(s_dev=None, s_host=None, s_alias=None)
    if code in (3, 4):
        tabs["s_dev"] = torch.rand(dev_rows, device="cuda", generator=g) * 0.01
        tabs["s_host"] = torch.rand(host_rows, generator=torch.Generator().manual_seed(args.seed)) * 0.01
        tabs["s_alias"] = _ext.register_host_table(tabs["s_host"])
    return tabs


# ----------------------------------------------------------------------------- GPU sweep


def gpu_methods(ext, torch, tabs: dict, ids: dict, dim, code, out_dtype, errors) -> dict:
    """method name -> fn() returning the (n, dim) rows, for one table set and one batch of ids."""
    sdt = _storage_dtype(torch, code)
    dev_v = tabs["dev"].view(sdt)[:, :dim]
    alias_v = tabs["alias"].view(sdt)[:, :dim]
    host_v = tabs["host"].view(sdt)[:, :dim]
    s_dev, s_host, s_alias = tabs["s_dev"], tabs["s_host"], tabs["s_alias"]
    i_dev, i_host, i_cpu = ids["dev"], ids["host"], ids["host_cpu"]

    def rows_of(s, i):
        return None if s is None else s.index_select(0, i)

    def cpu_then_cuda():
        q = host_v.index_select(0, i_cpu).cuda()
        s = None if s_host is None else s_host.index_select(0, i_cpu).cuda()
        return torch_dequant(torch, q, s, out_dtype)

    return {
        "ext-device": partial(
            ext.gather_rows, tabs["dev"], s_dev, i_dev, dim, code, out_dtype, error_flag=errors
        ),
        "ext-device-nodd": partial(
            ext.gather_rows, tabs["dev"], s_dev, i_dev, dim, code, out_dtype, error_flag=errors, dedup=False
        ),
        "ext-host": partial(
            ext.gather_rows, tabs["alias"], s_alias, i_host, dim, code, out_dtype, error_flag=errors
        ),
        "torch-device": lambda: torch_dequant(
            torch, dev_v.index_select(0, i_dev), rows_of(s_dev, i_dev), out_dtype
        ),
        "torch-host": lambda: torch_dequant(
            torch, alias_v.index_select(0, i_host), rows_of(s_alias, i_host), out_dtype
        ),
        "cpu-then-cuda": cpu_then_cuda,
    }


def run_gpu_dim(args, meta, emit, dim: int) -> list[dict]:
    import torch

    ext = _import_ext()
    ceil = meta["ceilings"]
    out_dtype = getattr(torch, args.out_dtype)
    code = STORAGE_NAMES[args.storage]
    sdt = _storage_dtype(torch, code)
    tabs = make_tables(args, dim, code)
    errors = ext.GatherErrors("cuda")
    rows = []
    for b in args.batches:
        g = torch.Generator().manual_seed(args.seed + b)
        i_dev = torch.randint(0, tabs["dev"].shape[0], (b,), generator=g)
        i_host = torch.randint(0, tabs["host"].shape[0], (b,), generator=g)
        ids = {"dev": i_dev.cuda(), "host": i_host.cuda(), "host_cpu": i_host}
        fns = gpu_methods(ext, torch, tabs, ids, dim, code, out_dtype, errors)
        # Correctness once per size: the extension and the stock path agree.
        same_dev = _same(fns["ext-device"](), fns["torch-device"]())
        same_host = _same(fns["ext-host"](), fns["torch-host"]())
        for m in args.methods:
            row = {"method": m, "dim": dim, "batch": b, "storage": args.storage, "out": args.out_dtype}
            try:
                if m == "cpu-then-cuda":
                    t = bench_host(fns[m], args.repeats, torch.cuda.synchronize)
                else:
                    t = bench_cuda(fns[m], args.warmup_ms, args.rep_ms)
            except Exception as e:  # record and go on (OOM, a registration failure, ...)
                row.update(status="error", note=f"{type(e).__name__}: {e}"[:200])
                emit(row)
                rows.append(row)
                continue
            read = b * dim * sdt.itemsize
            written = b * dim * out_dtype.itemsize
            host_tier = m in ("ext-host", "torch-host", "cpu-then-cuda")
            gbps = (read if host_tier else read + written) / (t["ms"] * 1e-3) / 1e9
            row.update(t, status="ok", rows_per_s=b / (t["ms"] * 1e-3), gbps=gbps)
            row["ceiling"] = "h2d" if host_tier else "d2d"
            row["x_ceiling"] = gbps / ceil[f"{row['ceiling']}_gbps"]
            if m.startswith("ext"):
                row["matches_torch"] = same_host if m == "ext-host" else same_dev
            emit(row)
            rows.append(row)
    errors.check()
    return rows


def run_gpu(args, meta, emit) -> list[dict]:
    import torch

    ext = _import_ext()
    if not (ext.AVAILABLE and ext.WITH_CUDA):
        raise SystemExit(f"llm2clip._C with CUDA is needed: {ext.UNAVAILABLE_REASON or 'built without CUDA'}")
    rows = []
    for dim in args.dims:
        rows += run_gpu_dim(args, meta, emit, dim)
        torch.cuda.empty_cache()
    return rows


def evaluate_targets(rows) -> list[dict]:
    by = {(r["method"], r["dim"], r["batch"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for dim in sorted({r["dim"] for r in rows}):
        b = max(r["batch"] for r in rows if r["dim"] == dim)
        cpu = by.get(("cpu-then-cuda", dim, b))
        for m, ratio in (("ext-host", TARGET_HOST_X_H2D), ("ext-device", TARGET_DEVICE_X_D2D)):
            r = by.get((m, dim, b))
            if r is None:
                continue
            checks = {f"x_{r['ceiling']} >= {ratio}": r["x_ceiling"] >= ratio}
            if cpu:
                checks[f"x_cpu >= {TARGET_X_CPU}"] = r["rows_per_s"] / cpu["rows_per_s"] >= TARGET_X_CPU
            out.append(
                {
                    "method": m,
                    "dim": dim,
                    "batch": b,
                    "x_ceiling": r["x_ceiling"],
                    "x_cpu": r["rows_per_s"] / cpu["rows_per_s"] if cpu else None,
                    "checks": checks,
                    "pass": all(checks.values()),
                }
            )
    return out


# ----------------------------------------------------------------------------- CPU sweep


def run_cpu(args, meta, emit) -> list[dict]:
    import torch

    ext = _import_ext()
    if not ext.AVAILABLE:
        raise SystemExit(f"llm2clip._C is needed: {ext.UNAVAILABLE_REASON}")
    out_dtype = getattr(torch, args.out_dtype)
    code = STORAGE_NAMES[args.storage]
    sdt = _storage_dtype(torch, code)
    rows = []
    for dim in args.dims:
        stride = -(-dim * sdt.itemsize // 128) * 128
        n_rows = max(1, (args.host_table_mib << 20) // stride)
        table = torch.empty((n_rows, stride), dtype=torch.uint8).random_(0, 256)
        scales = torch.rand(n_rows) * 0.01 if code in (3, 4) else None
        for b in args.batches:
            idx = torch.randint(0, n_rows, (b,), generator=torch.Generator().manual_seed(args.seed + b))
            fns = {
                "ext-cpu": partial(ext.gather_rows, table, scales, idx, dim, code, out_dtype),
                "torch-cpu": partial(torch_gather, torch, table, scales, idx, dim, code, out_dtype),
            }
            same = _same(fns["ext-cpu"](), fns["torch-cpu"]())
            for m in args.methods:
                t = bench_host(fns[m], args.repeats)
                gbps = b * dim * (sdt.itemsize + out_dtype.itemsize) / (t["ms"] * 1e-3) / 1e9
                row = {"method": m, "dim": dim, "batch": b, "storage": args.storage, "out": args.out_dtype}
                row.update(t, status="ok", rows_per_s=b / (t["ms"] * 1e-3), gbps=gbps, ceiling="memcpy")
                row["x_ceiling"] = gbps / meta["ceilings"]["memcpy_gbps"]
                if m == "ext-cpu":
                    row["matches_torch"] = same
                emit(row)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- output


def format_row(r) -> str:
    if r.get("status") != "ok":
        return f"{r['method']:16s} {r['dim']:5d} {r['batch']:7d}  {r.get('status')}: {r.get('note', '')}"
    same = {True: "", False: "  MISMATCH vs torch", None: ""}[r.get("matches_torch")]
    return (
        f"{r['method']:16s} {r['dim']:5d} {r['batch']:7d} {common.fmt(r['ms'], '9.3f')} "
        f"{common.fmt(r['rows_per_s'] / 1e6, '10.2f')} {common.fmt(r['gbps'], '8.1f')} "
        f"{common.fmt(r['x_ceiling'], '6.2f')} {r['ceiling']:>6s}{same}"
    )


TABLE_HEAD = (
    f"{'method':16s} {'dim':>5s} {'batch':>7s} {'ms':>9s} {'Mrows/s':>10s} {'GB/s':>8s} "
    f"{'x ceil':>6s} {'ceil':>6s}"
)


def plot(rows, meta, path: Path) -> bool:
    plt = common.import_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for di, dim in enumerate(sorted({r["dim"] for r in rows})):
        for mi, m in enumerate(methods):
            pts = [
                (r["batch"], r["gbps"])
                for r in rows
                if r["method"] == m and r["dim"] == dim and r.get("gbps")
            ]
            if pts:
                ax.plot(*zip(*pts), styles[di % 3], marker="o", color=f"C{mi}", label=f"{m} dim={dim}")
    for name, v in (meta.get("ceilings") or {}).items():
        if name.endswith("_gbps"):
            ax.axhline(v, color="k", lw=0.8, ls=":")
            ax.annotate(name[:-5], (ax.get_xlim()[0], v), fontsize=7)
    common.style_log_axes(ax, "rows per batch", "GB/s (host tier: bytes read; device tier: read + written)")
    title = f"cache row gather, {meta['device_name']} ({meta['storage']} -> {meta['out_dtype']})"
    common.save_figure(fig, path, title)
    return True


def collect_meta(args) -> dict:
    import torch

    meta = {
        "timestamp": common.utc_timestamp(),
        "device": args.device,
        "storage": args.storage,
        "out_dtype": args.out_dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": common.cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        **common.git_meta(),
        "loadavg_start": common.loadavg(),
        "table_mib": {"device": args.device_table_mib, "host": args.host_table_mib},
    }
    if args.device == "cuda":
        meta["device_name"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
        meta["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        meta["device_name"] = meta["cpu"]
    return meta


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption-cache row gather: llm2clip._C vs index_select baselines."
    )
    common.add_device_arg(p)
    p.add_argument(
        "--methods",
        type=common.str_list,
        default=None,
        help=f"subset of {','.join(GPU_METHODS)} (GPU) or {','.join(CPU_METHODS)} (CPU); default all",
    )
    p.add_argument(
        "--dims", type=common.int_list, default=None, help="row dims (default 2048,4096; --quick: 4096)"
    )
    p.add_argument(
        "--batches",
        type=common.int_list,
        default=None,
        help="rows per batch (default GPU 4096,16384,65536; CPU 4096,16384)",
    )
    p.add_argument(
        "--storage", choices=tuple(STORAGE_NAMES), default="bf16", help="table storage (default bf16)"
    )
    p.add_argument("--out-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="output dtype")
    p.add_argument("--quick", action="store_true", help="GPU: dim 4096, batches 4096 and 65536")
    p.add_argument(
        "--device-table-mib", type=int, default=4096, help="GPU-resident table size in MiB (default 4096)"
    )
    p.add_argument(
        "--host-table-mib",
        type=int,
        default=None,
        help="host table size in MiB (default 8192 on GPU, 512 in CPU mode); it is page-locked in place",
    )
    p.add_argument("--copy-mib", type=int, default=1024, help="bytes per copy-bandwidth measurement (MiB)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up ms (default 25)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench repetition ms (default 100)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the host-timed methods (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tables and ids")
    common.add_output_args(p, "directory for JSON / PNG (default bench/results)")
    return p


def resolve_args(args):
    import torch

    args.device = common.resolve_device(args.device)
    gpu = args.device == "cuda"
    allowed = GPU_METHODS if gpu else CPU_METHODS
    args.methods = args.methods or allowed
    bad = [m for m in args.methods if m not in allowed]
    if bad:
        raise SystemExit(f"unknown methods {bad} for {args.device}; choose from {allowed}")
    args.dims = args.dims or (QUICK_DIMS if args.quick else DIMS)
    args.batches = args.batches or (
        (GPU_QUICK_BATCHES if args.quick else GPU_BATCHES) if gpu else CPU_BATCHES
    )
    if args.host_table_mib is None:
        args.host_table_mib = 8192 if gpu else 512
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    meta = collect_meta(args)
    meta["ceilings"] = measure_gpu_ceilings(args) if args.device == "cuda" else measure_cpu_ceiling(args)
    print(f"# {meta['device_name']}, torch {meta['torch']}, {args.storage} -> {args.out_dtype}")
    print(
        "# ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in meta["ceilings"].items() if k.endswith("gbps"))
    )
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD))

    def emit(row):
        print(format_row(row), flush=True)

    rows = run_gpu(args, meta, emit) if args.device == "cuda" else run_cpu(args, meta, emit)
    targets = evaluate_targets(rows) if args.device == "cuda" else []
    for t in targets:
        checks = ", ".join(f"{k}: {'ok' if v else 'MISSED'}" for k, v in t["checks"].items())
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"target {t['method']} dim {t['dim']} batch {t['batch']}: {verdict} ({checks})")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = common.result_stem("cache_gather", args.device, common.file_stamp(), args.tag)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows, "targets": targets}, indent=1))
    print(f"wrote {path}")
    if not args.no_plot and plot(rows, meta, args.out / f"{stem}.png"):
        print(f"wrote {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
