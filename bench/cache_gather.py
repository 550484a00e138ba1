"""Caption-cache row gather throughput: llm2clip._C against the stock ways, beside the card's own
measured copy bandwidths (docs/cache.md).

GPU methods (rows in the cache layout; bf16 storage and output by default): ``ext-device``
(gather_rows on a GPU-resident table; ``ext-device-nodd`` without sort + dedup), ``ext-host``
(gather_rows on a host table page-locked in place and read zero-copy over PCIe), ``torch-device``
/ ``torch-host`` (index_select on the same tables, then the dequantising cast), ``cpu-then-cuda``
(CPU index_select, .cuda(), cast). Ceilings measured in the same run: h2d (pinned host -> device
copy) and d2d (device -> device copy, read + written bytes). Host-tier GB/s count the table bytes
read and compare with h2d; device-tier GB/s count read + written bytes and compare with d2d.
do_bench (it clears the L2 between repetitions); cpu-then-cuda: perf_counter.

Targets at the largest batch of each dim: ext-host >= 80% of h2d, ext-device >= 70% of d2d, both
>= 3x the rows/s of cpu-then-cuda. CPU mode: the extension's CPU op against index_select + cast,
beside a measured memcpy bandwidth (clone of 256 MiB; read + written bytes).

    python bench/cache_gather.py                # GPU: dims 2048, 4096, batches 4k..64k
    python bench/cache_gather.py --quick        # GPU: dim 4096, batches 4k and 64k
    python bench/cache_gather.py --device cpu   # CPU op vs index_select
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/cache_gather.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

GPU_METHODS = ("ext-device", "ext-device-nodd", "ext-host", "torch-device", "torch-host", "cpu-then-cuda")
CPU_METHODS = ("ext-cpu", "torch-cpu")
HOST_TIER = ("ext-host", "torch-host", "cpu-then-cuda")
STORAGE = {"fp32": 0, "bf16": 1, "fp16": 2, "int8": 3, "fp8": 4}
TARGETS = {"ext-host": 0.80, "ext-device": 0.70}  # x the measured h2d / d2d bandwidth
TARGET_X_CPU = 3.0
# fmt: off
OPTIONS = [
    ("--methods", common.str_list, None, f"subset of {GPU_METHODS} (GPU) or {CPU_METHODS} (CPU); all"),
    ("--dims", common.int_list, None, "row dims (default 2048,4096; --quick: 4096)"),
    ("--batches", common.int_list, None, "rows per batch (default GPU 4096,16384,65536; CPU 4096,16384)"),
    ("--storage", tuple(STORAGE), "bf16", "table storage (default bf16)"),
    ("--out-dtype", ("bfloat16", "float32"), "bfloat16", "output dtype"),
    ("--device-table-mib", int, 4096, "GPU-resident table size in MiB (default 4096)"),
    ("--host-table-mib", int, None, "host table MiB, page-locked in place (default 8192 on GPU, 512 on CPU)"),
    ("--copy-mib", int, 1024, "bytes per copy-bandwidth measurement (MiB)"),
]
STD = ("device", "quick", "warmup_ms", "rep_ms", "repeats", "threads", "seed")
# fmt: on


def storage_dtype(code: int):
    import torch

    return (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn)[code]


def ceilings(args) -> dict:
    """GPU: h2d and d2d copy GB/s; CPU: memcpy GB/s of a 256 MiB clone."""
    import torch

    if args.device != "cuda":
        src = torch.empty(256 << 20, dtype=torch.uint8).random_(0, 256)
        ms = common.ms_quantiles(common.timings(src.clone, max(args.repeats, 3)))[0]
        return {"memcpy_gbps": 2 * src.numel() / (ms * 1e-3) / 1e9, "copy_mib": 256}
    nbytes = args.copy_mib << 20
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h2d = common.do_bench_ms(partial(dst.copy_, pinned, non_blocking=True), args.warmup_ms, args.rep_ms)[0]
    on_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    d2d = common.do_bench_ms(partial(dst.copy_, on_device), args.warmup_ms, args.rep_ms)[0]
    return {
        "h2d_gbps": nbytes / (h2d * 1e-3) / 1e9,
        "d2d_gbps": 2 * nbytes / (d2d * 1e-3) / 1e9,
        "copy_mib": args.copy_mib,
    }


def dequant(q, scales_rows, out_dtype):
    """The stock path's cast: q (n, dim) storage dtype -> out_dtype (q * scale for int8 / fp8)."""
    import torch

    if scales_rows is None:
        return q.to(out_dtype)
    return (q.to(torch.float32) * scales_rows[:, None]).to(out_dtype)


def make_tables(args, dim: int, code: int) -> dict:
    """{dev, host, alias, s_dev, s_host, s_alias}: the GPU-resident table, the host table (CPU,
    page-locked in place), its CUDA alias, and the matching scales (None unless int8 / fp8)."""
    import torch

    from llm2clip.cache import _ext

    stride = -(-dim * storage_dtype(code).itemsize // 128) * 128
    dev_rows = max(1, (args.device_table_mib << 20) // stride)
    host_rows = max(1, (args.host_table_mib << 20) // stride)
    g = torch.Generator(device="cuda").manual_seed(args.seed)
    dev = torch.randint(0, 256, (dev_rows, stride), dtype=torch.uint8, device="cuda", generator=g)
    host = torch.empty((host_rows, stride), dtype=torch.uint8)
    step = min(host_rows, max(1, (256 << 20) // stride))
    chunk = torch.randint(0, 256, (step, stride), dtype=torch.uint8, device="cuda", generator=g)
    for r in range(0, host_rows, step):  # filled from the GPU: much faster than a CPU RNG
        host[r : r + min(step, host_rows - r)].copy_(chunk[: min(step, host_rows - r)])
    tabs = {"dev": dev, "host": host, "alias": _ext.register_host_table(host), "s_dev": None, "s_host": None}
    if code in (3, 4):
        tabs["s_dev"] = torch.rand(dev_rows, device="cuda", generator=g) * 0.01
        tabs["s_host"] = torch.rand(host_rows, generator=torch.Generator().manual_seed(args.seed)) * 0.01
    tabs["s_alias"] = tabs["s_host"] if tabs["s_host"] is None else _ext.register_host_table(tabs["s_host"])
    return tabs


def gpu_methods(ext, tabs: dict, ids: dict, dim, code, out_dtype, errors) -> dict:
    """method -> fn() returning the (n, dim) rows, for one table set and one batch of ids."""
    sdt = storage_dtype(code)
    view = {k: tabs[k].view(sdt)[:, :dim] for k in ("dev", "alias", "host")}
    i_dev, i_host, i_cpu = ids["dev"], ids["host"], ids["host_cpu"]
    gather = partial(ext.gather_rows, dim=dim, storage_code=code, out_dtype=out_dtype, error_flag=errors)

    def cpu_then_cuda():
        s = None if tabs["s_host"] is None else tabs["s_host"].index_select(0, i_cpu).cuda()
        return dequant(view["host"].index_select(0, i_cpu).cuda(), s, out_dtype)

    return {
        "ext-device": partial(gather, tabs["dev"], tabs["s_dev"], i_dev),
        "ext-device-nodd": partial(gather, tabs["dev"], tabs["s_dev"], i_dev, dedup=False),
        "ext-host": partial(gather, tabs["alias"], tabs["s_alias"], i_host),
        "torch-device": partial(stock_gather, view["dev"], tabs["s_dev"], i_dev, out_dtype),
        "torch-host": partial(stock_gather, view["alias"], tabs["s_alias"], i_host, out_dtype),
        "cpu-then-cuda": cpu_then_cuda,
    }


def stock_gather(view, scales, idx, out_dtype):
    """index_select on the table viewed as its storage dtype, then the cast."""
    return dequant(
        view.index_select(0, idx), None if scales is None else scales.index_select(0, idx), out_dtype
    )


def same(a, b) -> bool:
    """Equal values; the random table bytes include NaNs, compared as equal to each other."""
    return a.shape == b.shape and bool((a.nan_to_num() == b.nan_to_num()).all())


def measure(fns, m, b, dim, sdt, out_dtype, args, ceil, matches) -> dict:
    import torch

    cpu_timed = args.device == "cpu" or m == "cpu-then-cuda"
    sync_fn = torch.cuda.synchronize if m == "cpu-then-cuda" else None
    if cpu_timed:
        t = common.ms_quantiles(common.timings(fns[m], max(args.repeats, 3), sync_fn))
    else:
        t = common.do_bench_ms(fns[m], args.warmup_ms, args.rep_ms)
    read, written = b * dim * sdt.itemsize, b * dim * out_dtype.itemsize
    host_tier = m in HOST_TIER
    gbps = (read if host_tier else read + written) / (t[0] * 1e-3) / 1e9
    ceiling = "memcpy" if args.device == "cpu" else ("h2d" if host_tier else "d2d")
    row = {"ms": t[0], "ms_p20": t[1], "ms_p80": t[2], "rows_per_s": b / (t[0] * 1e-3), "gbps": gbps}
    row.update(ceiling=ceiling, x_ceiling=gbps / ceil[f"{ceiling}_gbps"])
    if m.startswith("ext"):
        row["matches_torch"] = matches
    return row


def cases(args, ceil):
    import torch

    from llm2clip.cache import _ext

    out_dtype, code = getattr(torch, args.out_dtype), STORAGE[args.storage]
    sdt = storage_dtype(code)
    errors = _ext.GatherErrors("cuda") if args.device == "cuda" else None
    for dim in args.dims:
        stride = -(-dim * sdt.itemsize // 128) * 128
        if args.device == "cuda":
            tabs = make_tables(args, dim, code)
        else:
            n_rows = max(1, (args.host_table_mib << 20) // stride)
            table = torch.empty((n_rows, stride), dtype=torch.uint8).random_(0, 256)
            scales = torch.rand(n_rows) * 0.01 if code in (3, 4) else None
        for b in args.batches:
            g = torch.Generator().manual_seed(args.seed + b)
            if args.device == "cuda":
                i_dev = torch.randint(0, tabs["dev"].shape[0], (b,), generator=g)
                i_host = torch.randint(0, tabs["host"].shape[0], (b,), generator=g)
                ids = {"dev": i_dev.cuda(), "host": i_host.cuda(), "host_cpu": i_host}
                fns = gpu_methods(_ext, tabs, ids, dim, code, out_dtype, errors)
                # Correctness once per size: the extension and the stock path agree.
                matches = {
                    "dev": same(fns["ext-device"](), fns["torch-device"]()),
                    "host": same(fns["ext-host"](), fns["torch-host"]()),
                }
            else:
                idx = torch.randint(0, n_rows, (b,), generator=g)
                fns = {
                    "ext-cpu": partial(_ext.gather_rows, table, scales, idx, dim, code, out_dtype),
                    "torch-cpu": partial(stock_gather, table.view(sdt)[:, :dim], scales, idx, out_dtype),
                }
                matches = dict.fromkeys(("dev", "host"), same(fns["ext-cpu"](), fns["torch-cpu"]()))
            for m in args.methods:
                row = {"method": m, "dim": dim, "batch": b, "storage": args.storage, "out": args.out_dtype}
                ok = matches["host" if m == "ext-host" else "dev"]
                yield common.Case(row, partial(measure, fns, m, b, dim, sdt, out_dtype, args, ceil, ok))
        tabs = table = None
        common.free_memory(args.device)
    if errors is not None:
        errors.check()


def evaluate_targets(run) -> None:
    ok = {(r["method"], r["dim"], r["batch"]): r for r in run.rows if r.get("status") == "ok"}
    for dim in dict.fromkeys(r["dim"] for r in run.rows):
        b = max(r["batch"] for r in run.rows if r["dim"] == dim)
        cpu = ok.get(("cpu-then-cuda", dim, b))
        for m, ratio in TARGETS.items():
            if (r := ok.get((m, dim, b))) is None:
                continue
            x_cpu = r["rows_per_s"] / cpu["rows_per_s"] if cpu else None
            checks = {f"x_{r['ceiling']} >= {ratio}": r["x_ceiling"] >= ratio}
            if cpu:
                checks[f"x_cpu >= {TARGET_X_CPU}"] = x_cpu >= TARGET_X_CPU
            name = f"{m} dim {dim} batch {b}: {', '.join(checks)}"
            value = f"x_{r['ceiling']} {r['x_ceiling']:.2f}" + (f", x_cpu {x_cpu:.2f}" if cpu else "")
            extra = dict(method=m, dim=dim, batch=b, x_ceiling=r["x_ceiling"], x_cpu=x_cpu, checks=checks)
            run.target(name, value, all(checks.values()), **extra)


# fmt: off
COLUMNS = [
    ("method", "method", ""), ("dim", "dim", "d"), ("batch", "batch", "d"), ("ms", "ms", ".3f"),
    ("Mrows/s", lambda r: r.get("rows_per_s") and r["rows_per_s"] / 1e6, ".2f"), ("GB/s", "gbps", ".1f"),
    ("x ceil", "x_ceiling", ".2f"), ("ceil", "ceiling", ""),
    ("note", lambda r: common.note(r) + (" MISMATCH vs torch" if r.get("matches_torch") is False else ""),
     ""),
]
# fmt: on


def main(argv=None) -> int:
    args = common.parse(
        common.parser(__doc__, OPTIONS, STD, repeats=(5, "timed runs of the host-timed methods")), argv
    )
    gpu = args.device == "cuda"
    from llm2clip.cache import _ext

    if not (_ext.AVAILABLE and (_ext.WITH_CUDA or not gpu)):
        raise SystemExit(f"llm2clip._C{' with CUDA' if gpu else ''} is needed: {_ext.UNAVAILABLE_REASON}")
    args.methods = args.methods or (GPU_METHODS if gpu else CPU_METHODS)
    if bad := [m for m in args.methods if m not in (GPU_METHODS if gpu else CPU_METHODS)]:
        raise SystemExit(f"unknown methods {bad} for {args.device}")
    args.dims = args.dims or ((4096,) if args.quick else (2048, 4096))
    args.batches = args.batches or (
        ((4096, 65536) if args.quick else (4096, 16384, 65536)) if gpu else (4096, 16384)
    )
    args.host_table_mib = args.host_table_mib or (8192 if gpu else 512)
    run = common.Run("cache_gather", args, argv, storage=args.storage, out_dtype=args.out_dtype)
    run.meta.update(table_mib={"device": args.device_table_mib, "host": args.host_table_mib})
    run.meta["ceilings"] = ceil = ceilings(args)
    print(
        f"# {run.meta['device_name']}, torch {run.meta['torch']}, {args.storage} -> {args.out_dtype}; "
        "ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items() if k.endswith("gbps"))
    )
    with run:
        run.sweep(cases(args, ceil))
    if gpu:
        evaluate_targets(run)

    def refs(rows):  # the measured copy ceilings as flat lines
        xs = [min(r["batch"] for r in rows), max(r["batch"] for r in rows)]
        return [(k[:-5], xs, [v, v]) for k, v in ceil.items() if k.endswith("_gbps")]

    label = "GB/s (host tier: bytes read; device tier: read + written)"
    panel = common.Panel("gbps", label, "batch", "rows per batch", style="dim", refs=refs)
    title = f"cache row gather, {run.meta['device_name']} ({args.storage} -> {args.out_dtype})"
    return run.finish(common.table(run.rows, COLUMNS), title=title, panels=[panel])


if __name__ == "__main__":
    sys.exit(main())
