"""Contrastive-loss throughput and memory: llm2clip_kernels against the usual ways to write it.

Methods ``ours``, ``naive``, ``openclip-local``, ``infcl`` (CUDA) and with --sigmoid the SigLIP
pair; every method is credited 8bBD FLOPs per forward+backward, "x floor" is against the run's
matmul ceiling, "roof" the roofline model (bench/roofline.py). --simulate-world W: a W-rank
step's per-rank work in one process; --distributed (torchrun): bench/loss_distributed.py. The
measurement details (do_bench, the CPU child processes, the acceptance case): bench/README.md.

    python bench/loss_throughput.py                 # GPU: b=B 4k..256k, D 768/1024/4096
    python bench/loss_throughput.py --quick         # GPU: a few minutes
    python bench/loss_throughput.py --device cpu    # CPU, with the acceptance case
    python bench/loss_throughput.py --simulate-world 1,8 --batches 32768,131072 --dims 1024
    torchrun --nproc_per_node=8 bench/loss_throughput.py --distributed --batches 4096,16384
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/loss_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, loss_distributed, roofline  # noqa: E402

ALL_METHODS = ("ours", "ours-sigmoid", "naive", "naive-sigmoid", "openclip-local", "infcl")
SIGMOID_METHODS = ("ours-sigmoid", "naive-sigmoid")
BASELINES = ("naive", "naive-sigmoid", "openclip-local", "infcl")
# fmt: off
DEFAULTS = {  # (gpu, quick) -> batches, dims, baseline dims; per-rank b (distributed), global B (simulated)
    "sweep": {(1, 0): ((4096, 8192, 16384, 32768, 65536, 131072, 262144), (768, 1024, 4096), None),
              (1, 1): ((4096, 16384, 32768, 65536), (1024, 4096), (1024,)),
              (0, 0): ((1024, 4096, 16384), (256,), None), (0, 1): ((2048, 16384), (256,), None)},
    "distributed": {(1, 0): ((2048, 8192, 32768), (1024,), ()), (1, 1): ((4096, 16384), (1024,), ()),
                    (0, 0): ((256, 1024), (128,), ()), (0, 1): ((256, 1024), (128,), ())},
    "simulated": {(1, 0): ((32768, 131072), (1024,), ()), (1, 1): ((32768, 131072), (1024,), ()),
                  (0, 0): ((4096, 16384), (256,), ()), (0, 1): ((4096, 16384), (256,), ())},
}
OPTIONS = [
    ("--methods", common.str_list, None,
     f"subset of {','.join(ALL_METHODS)} (default ours,naive,openclip-local,infcl; CPU ours,naive)"),
    ("--sigmoid", bool, False, "also run ours-sigmoid and naive-sigmoid (SigLIP loss)"),
    ("--distributed", bool, False, "one process per rank under torchrun (implied by WORLD_SIZE): per-rank "
     "step, communication alone, compute alone, hidden fraction, peak memory; --batches per rank"),
    ("--simulate-world", common.int_list, None, "W[,W...]: one process doing the per-rank work of a W-rank "
     "step (b = B/W images against all B texts); no communication, no per-chunk launches"),
    ("--batches", common.int_list, None,
     "b = B values (default by device); per-rank b with --distributed, global B with --simulate-world"),
    ("--dims", common.int_list, None, "feature dims D (default by device)"),
    ("--baseline-dims", common.int_list, None, "dims at which the baselines run (default --dims; --quick on "
     "CUDA: 1024)"),
    ("--dtype", tuple(common.DTYPES), None, "input dtype (default bf16 on CUDA, fp32 on CPU)"),
    ("--backend", ("auto", "triton", "torch"), None, "backend of ours (default auto on CUDA, torch on CPU)"),
    ("--slow-seconds", float, None, "CUDA: a method slower than this per forward+backward is timed once "
     "and skipped at larger b*B*D (default 5; --quick 1)"),
    ("--repeat-seconds", float, 5.0, "CPU: no further timed runs of a case after this long (default 5)"),
    ("--scale", float, 1 / 0.07, "logit scale s, the multiplier (default 1/0.07)"),
    ("--bias", float, -10.0, "logit bias of the sigmoid methods (default -10)"),
]
STD = ("device", "quick", "max_seconds", "warmup_ms", "rep_ms", "repeats", "threads", "seed")
HELP = {"max_seconds": (None, "start no new case after this many seconds (default none; quick on CUDA 150)"),
        "repeats": (None, "CPU: most timed runs per case (default 3; --quick 1; --distributed 10)")}
# fmt: on
ACCEPTANCE = (16384, 256)  # b = B, D: ours must peak below 5% of naive's memory on CPU
ACCEPTANCE_RATIO = 0.05


def make_loss(method: str, backend: str, bias=None):
    """fn(img, txt, scale) -> 0-d loss of a method; ImportError when its package is missing."""
    import torch
    import torch.nn.functional as F

    labels = lambda i: torch.arange(i.shape[0], device=i.device)
    if method in ("ours", "ours-sigmoid"):
        k = common.import_kernels()
        if method == "ours":
            return lambda i, t, s: k.infonce_loss(i, t, s, backend=backend)
        return lambda i, t, s: k.sigmoid_loss(i, t, s, bias, backend=backend)
    if method == "naive":

        def naive(i, t, s):
            logits = (s * (i @ t.T)).float()
            return (F.cross_entropy(logits, labels(i)) + F.cross_entropy(logits.T, labels(i))) / 2

        return naive
    if method == "openclip-local":

        def openclip_local(i, t, s):
            per_image, per_text = (s * i @ t.T).float(), (s * t @ i.T).float()
            return (F.cross_entropy(per_image, labels(i)) + F.cross_entropy(per_text, labels(i))) / 2

        return openclip_local
    if method == "naive-sigmoid":

        def naive_sigmoid(i, t, s):
            logits = (s * (i @ t.T)).float() + bias
            z = 2 * torch.eye(i.shape[0], t.shape[0], device=i.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(z * logits).sum() / i.shape[0]

        return naive_sigmoid
    if method == "infcl":
        from inf_cl import cal_inf_loss  # ImportError -> "not installed"

        def infcl(i, t, s):
            # The scale folded into the rows: inf_cl's own `scale=` path all-reduces its gradient,
            # which needs an initialised process group.
            h = next(h for h in (256, 128, 64, 32, 16) if i.shape[1] % h == 0)
            return (cal_inf_loss(s * i, t, head_dim=h) + cal_inf_loss(s * t, i, head_dim=h)) / 2

        return infcl
    raise ValueError(f"unknown method {method!r}")


def measure_gpu(fn, img, txt, scale, leaves, args) -> dict:
    """One method at one size on CUDA: peak memory of one forward+backward over the inputs, then
    do_bench (or that single run, past --slow-seconds)."""
    import torch

    common.clear_grads(leaves)
    fn(img, txt, scale).backward()  # warm-up: compilation and autotuning happen here
    common.clear_grads(leaves)
    gc.collect()
    mem = common.PeakMemory("cuda").start()
    t0 = time.perf_counter()
    loss = fn(img, txt, scale)
    torch.cuda.synchronize()
    saved, fwd_peak = (torch.cuda.memory_allocated() - mem.base) / 2**20, mem.mib()
    loss.backward()
    torch.cuda.synchronize()
    single_s = time.perf_counter() - t0
    row = {
        "loss": float(loss.detach()),
        "peak_extra_mib": mem.mib(),
        "fwd_peak_extra_mib": fwd_peak,
        "saved_for_bwd_mib": saved,
        "single_fwd_bwd_ms": single_s * 1e3,
    }
    del loss
    common.clear_grads(leaves)
    if single_s > args.slow_seconds:
        note = f"single run (> --slow-seconds {args.slow_seconds:g}); larger sizes skipped"
        return {**row, "fwd_bwd_ms": single_s * 1e3, "note": note}
    backward = lambda loss, **kw: loss.backward(**kw)
    return {**row, **common.fwd_bwd_ms(lambda: fn(img, txt, scale), backward, leaves, "cuda", args)}


def cpu_child(spec_json: str) -> None:
    """One method at one size on CPU, in a fresh interpreter; prints one JSON line. Memory: VmHWM
    reset once the inputs exist, minus VmRSS then (Linux carries the parent's peak RSS into a
    child's ru_maxrss, so that one is only recorded); time: up to `repeats` runs (`repeat_seconds`)."""
    import resource

    import torch

    s = json.loads(spec_json)
    torch.set_num_threads(s["threads"])
    dtype = common.torch_dtype(s["dtype"])
    i, t, sc, bias = common.contrastive_inputs(64, 64, s["D"], dtype, "cpu", 1, s["scale"], s["bias"])
    make_loss(s["method"], s["backend"], bias)(i, t, sc).backward()  # lazy initialisation, not timed
    del i, t, sc
    gc.collect()
    img, txt, scale, bias = common.contrastive_inputs(
        s["b"], s["B"], s["D"], dtype, "cpu", s["seed"], s["scale"], s["bias"]
    )
    fn = make_loss(s["method"], s["backend"], bias)
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {
        "maxrss_inputs_kib": maxrss(),
        "hwm_inputs_kib": common.proc_status_kib("VmHWM"),
        "rss_inputs_kib": common.proc_status_kib("VmRSS"),
        "hwm_reset": common.reset_hwm(),
    }

    def first(loss):
        out.update(maxrss_after_kib=maxrss(), hwm_after_kib=common.proc_status_kib("VmHWM"))
        out["loss"] = float(loss.detach())

    leaves = [img, txt, scale, bias]
    out.update(
        common.fwd_bwd_ms(
            lambda: fn(img, txt, scale),
            lambda loss: loss.backward(),
            leaves,
            "cpu",
            None,
            s["repeats"],
            s["repeat_seconds"],
            first,
        )
    )
    print(json.dumps(out))


def measure_cpu(method, b, B, D, args) -> dict:
    """Run :func:`cpu_child` in a fresh interpreter and turn its readings into row fields."""
    import torch

    keys = ("backend", "dtype", "seed", "scale", "bias", "repeats", "repeat_seconds")
    spec = {"method": method, "b": b, "B": B, "D": D, "threads": torch.get_num_threads()}
    spec.update((k, getattr(args, k)) for k in keys)
    code = (
        f"import sys; sys.path.insert(0, {str(common.REPO_ROOT)!r})\n"
        "from bench.loss_throughput import cpu_child; cpu_child(sys.argv[1])"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        msg = err[-1][:300] if err else f"exit {proc.returncode}"
        oom = (
            proc.returncode in (-9, 137)
            or "MemoryError" in proc.stderr
            or "DefaultCPUAllocator" in proc.stderr
        )
        raise MemoryError(msg) if oom else RuntimeError(f"child failed: {msg}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {k: v for k, v in res.items() if "_ms" in k or k in ("loss", "timed_runs")}
    row["maxrss_extra_mib"] = (res["maxrss_after_kib"] - res["maxrss_inputs_kib"]) / 1024
    if res["hwm_after_kib"] is None:  # no /proc: ru_maxrss is all there is
        return {**row, "peak_extra_mib": row["maxrss_extra_mib"], "mem_how": "ru_maxrss delta"}
    if res["hwm_reset"]:
        peak, how = (
            res["hwm_after_kib"] - res["rss_inputs_kib"],
            "VmHWM reset after inputs, minus VmRSS after inputs",
        )
    else:
        peak, how = res["hwm_after_kib"] - res["hwm_inputs_kib"], "VmHWM delta"
    return {**row, "peak_extra_mib": peak / 1024, "mem_how": how}


def derive(row: dict, rate: float | None, model: roofline.Device | None = None) -> dict:
    """TFLOP/s and x floor of every measured time (8bBD credited), the roofline model beside it
    (roofline_*_ms, *_of_roofline = model / measured) and, simulated, peak minus the gathered texts."""
    import torch

    b, B, D = row["b"], row["B"], row["D"]
    pred = None
    if model is not None:
        tf32 = row["dtype"] == "fp32" and bool(torch.backends.cuda.matmul.allow_tf32)
        pred = roofline.predict(b, B, D, model, row["dtype"], row["method"].endswith("sigmoid"), tf32)
        row["roofline_with_exp_fwd_bwd_ms"] = pred["fwd_bwd_with_exp_ms"]
    for part, flops in (("fwd", 2 * b * B * D), ("bwd", 6 * b * B * D), ("fwd_bwd", 8 * b * B * D)):
        ms = row.get(f"{part}_ms")
        if ms:
            row[f"{part}_tflops"] = flops / (ms * 1e-3) / 1e12
            if rate:
                row[f"{part}_x_floor"] = ms / (flops / (rate * 1e12) * 1e3)
            if pred is not None:
                row[f"roofline_{part}_ms"] = pred[f"{part}_ms"]
                row[f"{part}_of_roofline"] = pred[f"{part}_ms"] / ms
    if "gathered_text_mib" in row and row.get("peak_extra_mib") is not None:
        row["peak_minus_gathered_mib"] = row["peak_extra_mib"] - row["gathered_text_mib"]
    bwd_rows = getattr(sys.modules.get("llm2clip_kernels._triton"), "BWD_ROWS", None)
    simulated_cuda = "world" in row and row["device"] == "cuda"
    if simulated_cuda and bwd_rows and b > bwd_rows and row.get("backend") != "torch":
        acc = f"single-device bwd holds a (B, D) fp32 accumulator ({B * D * 4 / 2**20:.0f} MiB)"
        row["note"] = "; ".join(
            filter(None, [row.get("note"), f"b > {bwd_rows}: {acc} that a W-rank step holds per chunk only"])
        )
    return row


def measure(method, b, B, D, args, inputs: dict, rate, model, row: dict) -> dict:
    """One case: the inputs of a GPU size are made once and shared by its methods."""

    if args.device == "cuda":
        if inputs.get("key") != (b, B, D):
            inputs.clear()
            common.free_memory("cuda")
            dtype = common.torch_dtype(args.dtype)
            inputs.update(
                key=(b, B, D),
                t=common.contrastive_inputs(b, B, D, dtype, "cuda", args.seed, args.scale, args.bias),
            )
        img, txt, scale, bias = inputs["t"]
        leaves = [img, txt, scale] + ([bias] if method in SIGMOID_METHODS else [])
        try:
            got = measure_gpu(make_loss(method, args.backend, bias), img, txt, scale, leaves, args)
        finally:
            common.clear_grads(inputs["t"])
    else:
        got = measure_cpu(method, b, B, D, args)
    return derive({**row, **got}, rate, model)


def cases(run, rate, model):
    """The sweep's cases (b = B) or --simulate-world's (b = B / W per W), in the order that lets a
    failure at one size skip the larger ones."""
    args = run.args
    inputs, unavailable = {}, {}
    for D in args.dims:
        for B in args.batches:
            worlds = sorted(args.simulate_world, reverse=True) if args.simulate_world else (None,)
            for W in worlds:  # small b first at each B
                for method in args.methods:
                    if W is None and method in BASELINES and D not in args.baseline_dims:
                        continue
                    b = B if W is None else (B // W if B % W == 0 else None)
                    row = {"method": method}
                    if W is not None:
                        gathered = B * D * common.ITEMSIZE[args.dtype] / 2**20
                        row.update(mode="simulated", world=W, gathered_text_mib=gathered)
                    row.update(b=b, B=B, D=D, dtype=args.dtype, device=args.device)
                    if method.startswith("ours"):
                        row["backend"] = args.backend
                    if method not in unavailable:
                        unavailable[method] = availability(method, args)
                    slow = [
                        r["b"] * r["B"] * r["D"]
                        for r in run.rows
                        if r["method"] == method and r.get("note", "").startswith("single run")
                    ]
                    if b is None:
                        yield common.Case(row, note=f"B={B} is not a multiple of W={W}")
                    elif unavailable[method]:
                        yield common.Case(row, status=unavailable[method][0], note=unavailable[method][1])
                    elif slow and b * B * D >= min(slow):
                        yield common.Case(row, note=f"over --slow-seconds at b*B*D={min(slow)}")
                    else:
                        fn = partial(measure, method, b, B, D, args, inputs, rate, model, row)
                        yield common.Case(row, fn, group=method, size=(D, b, B))
    inputs.clear()


def availability(method, args) -> tuple[str, str] | None:
    if method == "infcl" and args.device != "cuda":
        return "skipped", "not run on CPU (Inf-CL's kernels are CUDA-only)"
    try:
        make_loss(method, args.backend, None)  # the import check, before any allocation
    except ImportError as e:
        return "not installed", str(e)
    return None


# fmt: off
COLUMNS = [  # (header, key, format); "sim": only with --simulate-world, after "D" / before "note"
    ("method", "method", ""), ("b", "b", "d"), ("B", "B", "d"), ("D", "D", "d"), ("dtype", "dtype", ""),
    ("fwd ms", "fwd_ms", ".2f"), ("bwd ms", "bwd_ms", ".2f"), ("f+b ms", "fwd_bwd_ms", ".2f"),
    ("TFLOP/s", "fwd_bwd_tflops", ".3g"), ("x floor", "fwd_bwd_x_floor", ".2f"),
    ("roof ms", "roofline_fwd_bwd_ms", ".2f"),
    ("% roof", lambda r: r.get("fwd_bwd_of_roofline") and 100 * r["fwd_bwd_of_roofline"], ".0f"),
    ("peak MiB", "peak_extra_mib", ".1f"),
]
SIM_COLUMNS = [("B*D MiB", "gathered_text_mib", ".1f"), ("rest MiB", "peak_minus_gathered_mib", ".1f")]
# fmt: on


def format_table(rows, sim: bool = False) -> str:
    cols = COLUMNS[:1] + [("W", "world", "d")] * sim + COLUMNS[1:] + SIM_COLUMNS * sim
    return common.table(rows, [*cols, ("note", common.note, "")])


def memory_ratios(rows) -> list[dict]:
    """ours / naive peak extra memory at every (b, D) where both have a number."""
    by = {(r["method"], r["b"], r["D"]): r.get("peak_extra_mib") for r in rows if r.get("status") == "ok"}
    out = []
    for (m, b, D), mem in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        naive = by.get(("naive", b, D))
        if m == "ours" and mem is not None and naive:
            out.append({"b": b, "D": D, "ours_mib": mem, "naive_mib": naive, "ratio": mem / naive})
    return out


def panels(rate, sim: bool, dtype: str):
    x, xlabel = ("B", "global batch B (b = B / W)") if sim else ("b", "batch b = B")
    series = ("method", "world") if sim else ("method",)

    def refs(label, y):  # one black line per D over its rows' x values
        return lambda rows: [
            (f"{label} D={D}", xs, [y(v, D) for v in xs])
            for D in sorted({r["D"] for r in rows})
            for xs in [sorted({r[x] for r in rows if r["D"] == D})]
        ]

    floor = refs("floor", lambda b, D: 8 * b * b * D / (rate * 1e12) * 1e3)  # 8bBD at the matmul rate
    gathered = refs("B*D*itemsize", lambda B, D: B * D * common.ITEMSIZE[dtype] / 2**20)
    specs = [
        ("fwd_bwd_ms", "forward+backward ms (median)", None if sim or not rate else floor),
        ("peak_extra_mib", "peak extra memory MiB", gathered if sim else None),
    ]
    return [common.Panel(y, label, x, xlabel, series, "D", refs=r) for y, label, r in specs]


def resolve(args):
    gpu = args.device == "cuda"
    if args.simulate_world and (args.distributed or "WORLD_SIZE" in os.environ):
        raise SystemExit("--simulate-world runs in one process: not with --distributed or under torchrun")
    if args.simulate_world and min(args.simulate_world) < 1:
        raise SystemExit(f"--simulate-world needs W >= 1, got {args.simulate_world}")
    args.distributed = bool(args.distributed or "WORLD_SIZE" in os.environ)
    mode = "distributed" if args.distributed else "simulated" if args.simulate_world else "sweep"
    if mode != "sweep" and args.methods is not None:
        raise SystemExit("--methods does not apply to --distributed / --simulate-world (use --sigmoid)")
    batches, dims, base_dims = DEFAULTS[mode][(int(gpu), int(args.quick))]
    if mode == "sweep":
        args.methods = args.methods or (
            ("ours", "naive", "openclip-local", "infcl") if gpu else ("ours", "naive")
        )
        if args.sigmoid:
            args.methods = tuple(args.methods) + tuple(m for m in SIGMOID_METHODS if m not in args.methods)
        common.check_choices(("--methods", args.methods, ALL_METHODS))
        if args.max_seconds is None and args.quick and gpu:
            args.max_seconds = 150.0
    else:
        args.methods = () if args.distributed else (("ours", "ours-sigmoid") if args.sigmoid else ("ours",))
        args.simulate_world = tuple(sorted(set(args.simulate_world or ())))
    args.batches = tuple(sorted(args.batches or batches))
    args.dims = tuple(sorted(args.dims or dims))
    args.baseline_dims = args.baseline_dims or base_dims or args.dims
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.backend = args.backend or ("auto" if gpu else "torch")
    args.slow_seconds = args.slow_seconds or (1.0 if args.quick else 5.0)
    args.repeats = args.repeats or (1 if args.quick else (10 if args.distributed else 3))
    return args


def main(argv=None) -> int:
    p = common.parser(__doc__, OPTIONS, STD, **HELP)
    args = resolve(common.parse(p, argv))
    if args.distributed:
        return loss_distributed.run(args, argv)
    sim = bool(args.simulate_world)
    run = common.Run(
        "loss_throughput", args, argv, mode="simW" + "-".join(map(str, args.simulate_world)) if sim else None
    )
    run.meta.update(
        dtype=args.dtype, flop_count="8*b*B*D forward+backward (2bBD fwd, 6bBD bwd) for every method"
    )
    model = roofline.match_device(run.meta["device_name"]) if args.device == "cuda" else None
    what = "roofline_*_ms: the fused kernels' model time at this shape (bench/roofline.py); "
    what += "*_of_roofline = model / measured"
    run.meta["roofline"] = model and {"device": model.name, "source": model.source, "what": what}
    if sim:
        run.meta.update(
            mode="simulated",
            simulation="per-rank work of a W-rank step (b = B/W images against "
            "all B texts, single-device kernels); no communication, no per-chunk launch structure",
        )
    run.meta["matmul_rate"] = rate = common.ceiling(args.device, args.dtype)
    what = (
        f"W in {args.simulate_world}, b = B/W against B texts"
        if sim
        else f"baselines D in {args.baseline_dims}"
    )
    print(
        f"{run.meta['device_name']} ({args.device}), torch {run.meta['torch']}, triton "
        f"{run.meta['triton']}, git {run.meta['git_sha']}\nmethods {','.join(args.methods)}; B in "
        f"{args.batches}; D in {args.dims} ({what}); {args.dtype}; matmul rate {rate['what']} = "
        f"{rate['tflops']:.3g} TFLOP/s (floor = 8bBD / this)"
    )
    with run:
        run.sweep(cases(run, rate["tflops"], model))
    text = format_table(run.rows, sim)
    if sim:
        text += (
            "\n\nrest = peak - B*D*itemsize: at fixed b it should not grow with W (the per-rank memory "
            "claim);\nthe simulation leaves out communication and the per-chunk launches of the "
            "distributed loss."
        )
    ratios = [] if sim else memory_ratios(run.rows)
    run.meta["memory_ratios"] = ratios
    if ratios:
        text += "\n\npeak extra memory, ours / naive:\n" + "\n".join(
            f"  b=B={r['b']:<7d} D={r['D']:<5d} {r['ours_mib']:10.1f} / {r['naive_mib']:10.1f} MiB "
            f"= {r['ratio']:.2%}"
            for r in ratios
        )
        for r in ratios:
            if (r["b"], r["D"]) == ACCEPTANCE and args.device == "cpu":
                run.target(
                    f"ours / naive peak memory < {ACCEPTANCE_RATIO:.0%} at b = B = {r['b']}, D = {r['D']} "
                    "(CPU)",
                    r["ratio"],
                    r["ratio"] < ACCEPTANCE_RATIO,
                )
    if args.device == "cpu":  # no GPU here: what the model predicts for the headline shapes
        devices = [roofline.H100_SXM, roofline.H200]
        run.meta["predictions"] = [
            {"b": b, "B": B, "D": D, **roofline.predict(b, B, D, dev)}
            for b, B, D in roofline.HEADLINE
            for dev in devices
        ]
        text += (
            "\n\nroofline model of the fused kernels, bf16 InfoNCE (bench/roofline.py; predicted, not "
            "measured):\n" + roofline.format_predictions(roofline.HEADLINE, devices)
        )
    title = f"{'simulated W ranks' if sim else 'contrastive loss'}, {run.meta['device_name']} ({args.dtype})"
    return run.finish(text, title=title, panels=panels(rate["tflops"], sim, args.dtype))


if __name__ == "__main__":
    sys.exit(main())
