"""Contrastive-loss throughput and memory: llm2clip_kernels against the usual ways to write it.

Methods (all compute the same symmetric InfoNCE of DESIGN.md section 2, b == B, diagonal positives):

    ours            llm2clip_kernels.infonce_loss (backend --backend: auto on CUDA, torch on CPU)
    ours-sigmoid    llm2clip_kernels.sigmoid_loss, SigLIP loss with a learnable bias (--sigmoid)
    naive           logits = s * I @ T^T once, F.cross_entropy over rows and over columns
    naive-sigmoid   full-logits SigLIP loss, the baseline for ours-sigmoid (--sigmoid)
    openclip-local  open_clip ClipLoss local_loss: logits_per_image = s I T^T and
                    logits_per_text = s T I^T (two b x B GEMMs), cross entropy on each
    infcl           Inf-CL (PyPI inf-cl): cal_inf_loss(s I, T) and cal_inf_loss(s T, I), averaged;
                    CUDA only, recorded as "not installed" when `import inf_cl` fails

Work count: every method is credited the same useful work, 8 b B D FLOPs for forward + backward
(2bBD forward, 6bBD backward: one b x B GEMM forward, its recompute plus the two gradient GEMMs
backward), whatever it really executes (open_clip does 12bBD, Inf-CL 20bBD). TFLOP/s therefore
compare like with like, and "x floor" is the time over 8bBD / R, where R is the dense matmul rate
of the same device measured in the same run (8192^3 bf16 torch.mm on CUDA, 2048^3 on CPU).

GPU mode (default when CUDA is available): bf16 inputs and a scale that require grad; forward,
backward (retain_graph, the forward outside the timing) and forward+backward timed with
triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8]); peak extra memory = max_memory_allocated
during one forward+backward minus the memory allocated before it (inputs); out-of-memory per
method and size is recorded as OOM and the run goes on. Beside every time, the roofline model of
the fused kernels at that shape on the detected card (bench/roofline.py: "roof ms") and the
fraction of it reached ("% roof" = model / measured).

CPU mode (default without CUDA, or --device cpu): fp32, backend torch (the chunked path). Each
method and size runs in a fresh Python process: time.perf_counter medians of forward, backward and
both over up to --repeats runs, and the peak memory of the first forward+backward over the memory
held once the inputs exist. That process reports ru_maxrss too, but uses VmHWM (reset after the
inputs are made) for the number, because Linux carries the parent's peak RSS into ru_maxrss of a
child (see _cpu_child). CPU timings are only as good as the machine is idle: the load average is
recorded in the JSON. The run ends with the roofline model's predictions for the README's headline
shapes (b = B = 32k and 256k, D = 1024) on H100 and H200, marked "predicted".

    python bench/loss_throughput.py                 # full sweep on the GPU
    python bench/loss_throughput.py --quick         # a few minutes on the GPU
    python bench/loss_throughput.py --device cpu    # CPU, includes the b = B = 16384, D = 256 case

Distributed mode (bench/loss_distributed.py), one process per rank under torchrun: per-rank step time
of distributed_infonce_loss (distributed_sigmoid_loss with --sigmoid), its communication alone, its
compute alone, the fraction of the communication hidden, and peak memory; --batches are per rank.

    torchrun --nproc_per_node=8 bench/loss_throughput.py --distributed --batches 4096,16384
    torchrun --nproc_per_node=2 bench/loss_throughput.py --device cpu --batches 256,1024 --dims 64

Simulated mode, one process: for each global B and each W, the per-rank work of a W-rank step
(b = B/W images against all B texts through the single-device kernels), with TFLOP/s, x floor and
peak memory beside B*D*itemsize. It leaves out the communication and the per-chunk launch structure.

    python bench/loss_throughput.py --simulate-world 1,8 --batches 32768,131072 --dims 1024

Writes a table to stdout, and loss_throughput-<device>-<card>[-dist<W>|-simW<W..>]-<time>.json / .png
into --out (rank 0 only in distributed mode).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as bench/loss_throughput.py
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import common, roofline  # noqa: E402
from bench.common import DTYPES, import_kernels  # noqa: E402,F401 - also used by loss_distributed

ALL_METHODS = ("ours", "ours-sigmoid", "naive", "naive-sigmoid", "openclip-local", "infcl")
SIGMOID_METHODS = ("ours-sigmoid", "naive-sigmoid")
BASELINES = ("naive", "naive-sigmoid", "openclip-local", "infcl")

GPU_BATCHES = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
GPU_DIMS = (768, 1024, 4096)
GPU_QUICK_BATCHES = (4096, 16384, 32768, 65536)
GPU_QUICK_DIMS = (1024, 4096)
GPU_QUICK_BASELINE_DIMS = (1024,)
CPU_BATCHES = (1024, 4096, 16384)
CPU_QUICK_BATCHES = (2048, 16384)
CPU_DIMS = (256,)
ACCEPTANCE = (16384, 256)  # b = B, D: ours must peak below 5% of naive's memory on CPU
ACCEPTANCE_RATIO = 0.05


class _Stop(Exception):
    """Raised from the SIGTERM handler so a run killed by `timeout` still writes its files."""


# ----------------------------------------------------------------------------- the losses


def _infcl_head_dim(D: int) -> int:
    for h in (256, 128, 64, 32, 16):
        if D % h == 0:
            return h
    raise ValueError(f"Inf-CL needs D divisible by 16, got {D}")


def make_loss(method: str, backend: str, bias=None):
    """Return (fn(img, txt, scale) -> 0-d loss, resolved backend name or None).

    Raises ImportError when the method's package is missing.
    """
    import torch
    import torch.nn.functional as F

    labels_cache = {}

    def labels(n, device):
        key = (n, str(device))
        if key not in labels_cache:
            labels_cache[key] = torch.arange(n, device=device)
        return labels_cache[key]

    if method in ("ours", "ours-sigmoid"):
        k = import_kernels()
        if method == "ours":
            return (lambda i, t, s: k.infonce_loss(i, t, s, backend=backend)), backend
        return (lambda i, t, s: k.sigmoid_loss(i, t, s, bias, backend=backend)), backend

    if method == "naive":

        def naive(i, t, s):
            logits = (s * (i @ t.T)).float()
            y = labels(i.shape[0], i.device)
            return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

        return naive, None

    if method == "openclip-local":

        def openclip_local(i, t, s):
            logits_per_image = s * i @ t.T
            logits_per_text = s * t @ i.T
            y = labels(i.shape[0], i.device)
            return (
                F.cross_entropy(logits_per_image.float(), y) + F.cross_entropy(logits_per_text.float(), y)
            ) / 2

        return openclip_local, None

    if method == "naive-sigmoid":

        def naive_sigmoid(i, t, s):
            logits = (s * (i @ t.T)).float() + bias
            z = 2 * torch.eye(i.shape[0], t.shape[0], device=i.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(z * logits).sum() / i.shape[0]

        return naive_sigmoid, None

    if method == "infcl":
        from inf_cl import cal_inf_loss  # ImportError -> "not installed"

        def infcl(i, t, s):
            # Scale folded into the rows here: inf_cl's own `scale=` path all-reduces the scale's
            # gradient, which needs an initialised process group.
            h = _infcl_head_dim(i.shape[1])
            return (cal_inf_loss(s * i, t, head_dim=h) + cal_inf_loss(s * t, i, head_dim=h)) / 2

        return infcl, None

    raise ValueError(f"unknown method {method!r}")


def make_inputs(b, B, D, dtype, device, seed, scale_value, bias_value):
    """L2-normalised leaf features (b x D, B x D), a scale and a bias leaf, all requiring grad."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    feats = []
    for n in (b, B):
        x = torch.randn(n, D, generator=g, dtype=torch.float32, device=device).to(dtype)
        x.div_(x.float().norm(dim=1, keepdim=True).to(dtype))
        feats.append(x.requires_grad_())
    scale = torch.tensor(scale_value, device=device, dtype=torch.float32, requires_grad=True)
    bias = torch.tensor(bias_value, device=device, dtype=torch.float32, requires_grad=True)
    return feats[0], feats[1], scale, bias


# ----------------------------------------------------------------------------- GPU measurement


def matmul_rate(device: str, dtype_name: str) -> dict:
    """The floor's rate R: bf16 8192^3 torch.mm on CUDA (do_bench median), dtype_name 2048^3 on CPU."""
    import torch

    if device == "cuda":
        return common.matmul_rate("cuda", torch.bfloat16, "bf16")
    return common.matmul_rate("cpu", getattr(torch, DTYPES[dtype_name]), dtype_name)


def measure_gpu(fn, img, txt, scale, bias, leaves, args) -> dict:
    """One method at one size on CUDA. Raises on OOM; the caller frees memory."""
    import torch

    common.clear_grads(leaves)
    fn(img, txt, scale).backward()  # warm-up: compilation and autotuning happen here
    common.clear_grads(leaves)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = fn(img, txt, scale)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base
    fwd_peak = torch.cuda.max_memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    single_s = time.perf_counter() - t0
    row = {
        "loss": float(loss.detach()),
        "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
        "fwd_peak_extra_mib": fwd_peak / 2**20,
        "saved_for_bwd_mib": saved / 2**20,
        "single_fwd_bwd_ms": single_s * 1e3,
    }
    del loss
    common.clear_grads(leaves)

    if single_s > args.slow_seconds:
        row["fwd_bwd_ms"] = single_s * 1e3
        row["note"] = f"single run (> --slow-seconds {args.slow_seconds:g}); larger sizes skipped"
        return row

    row.update(
        common.do_bench_fwd_bwd(
            lambda: fn(img, txt, scale),
            lambda loss, **kw: loss.backward(**kw),
            leaves,
            args.warmup_ms,
            args.rep_ms,
        )
    )
    return row


# ----------------------------------------------------------------------------- CPU measurement


def _cpu_child(spec_json: str) -> None:
    """One method at one size on CPU, in a fresh interpreter; prints one JSON line.

    Memory: ru_maxrss after the first forward+backward minus ru_maxrss once the inputs exist, as
    asked; but Linux carries the parent's peak RSS into a child across fork/vfork + exec
    (signal->maxrss), so when the parent is big that difference reads 0. The child therefore also
    reads VmHWM, the peak RSS of its own address space, reset to the current RSS right after the
    inputs are made (/proc/self/clear_refs); `peak_extra_mib` uses it whenever the reset works.
    Time: forward and backward of that first run and of up to `repeats` - 1 more, stopping once
    `repeat_seconds` of timed work has been done (a tiny warm-up precedes everything).
    """
    import resource

    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    # Warm up at a tiny size so lazy initialisation is not counted against the method.
    i, t, s, bias = make_inputs(64, 64, spec["D"], dtype, "cpu", 1, spec["scale"], spec["bias"])
    fn, _ = make_loss(spec["method"], spec["backend"], bias)
    fn(i, t, s).backward()
    del i, t, s
    gc.collect()
    img, txt, scale, bias = make_inputs(
        spec["b"], spec["B"], spec["D"], dtype, "cpu", spec["seed"], spec["scale"], spec["bias"]
    )
    fn, _ = make_loss(spec["method"], spec["backend"], bias)
    leaves = [img, txt, scale, bias]
    out = {
        "maxrss_inputs_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "hwm_inputs_kib": common.proc_status_kib("VmHWM"),
        "rss_inputs_kib": common.proc_status_kib("VmRSS"),
        "hwm_reset": common.reset_hwm(),
    }
    fw, bw, fb = [], [], []
    while len(fb) < spec["repeats"] and (not fb or sum(fb) < spec["repeat_seconds"]):
        common.clear_grads(leaves)
        loss, t_fwd, t_bwd = common.perf_fwd_bwd(lambda: fn(img, txt, scale), lambda loss: loss.backward())
        fw.append(t_fwd)
        bw.append(t_bwd)
        fb.append(t_fwd + t_bwd)
        if len(fb) == 1:
            out["maxrss_after_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["hwm_after_kib"] = common.proc_status_kib("VmHWM")
            out["loss"] = float(loss.detach())
        loss = None
    out["timed_runs"] = len(fb)
    for name, seconds in (("fwd", fw), ("bwd", bw), ("fwd_bwd", fb)):
        out.update(common.ms_fields(name, common.ms_quantiles(seconds)))
    print(json.dumps(out))


def measure_cpu(method, b, B, D, args) -> dict:
    """Run :func:`_cpu_child` in a fresh interpreter and turn its readings into row fields."""
    spec = {
        "method": method,
        "backend": args.backend,
        "b": b,
        "B": B,
        "D": D,
        "dtype": args.dtype,
        "seed": args.seed,
        "scale": args.scale,
        "bias": args.bias,
        "threads": _threads(),
        "repeats": args.repeats,
        "repeat_seconds": args.repeat_seconds,
    }
    here = str(Path(__file__).resolve())
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_loss_throughput', {here!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "m._cpu_child(sys.argv[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        msg = err[-1][:300] if err else f"exit {proc.returncode}"
        if (
            proc.returncode in (-9, 137)
            or "MemoryError" in proc.stderr
            or "DefaultCPUAllocator" in proc.stderr
        ):
            raise MemoryError(msg)
        raise RuntimeError(f"child failed: {msg}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {k: res[k] for k in res if k.endswith("_ms") or "_ms_p" in k}
    row["loss"] = res["loss"]
    row["timed_runs"] = res["timed_runs"]
    row["maxrss_extra_mib"] = (res["maxrss_after_kib"] - res["maxrss_inputs_kib"]) / 1024
    if res["hwm_after_kib"] is None:  # no /proc: ru_maxrss is all there is
        row.update(peak_extra_mib=row["maxrss_extra_mib"], mem_how="ru_maxrss delta")
    elif res["hwm_reset"]:
        row["peak_extra_mib"] = (res["hwm_after_kib"] - res["rss_inputs_kib"]) / 1024
        row["mem_how"] = "VmHWM reset after inputs, minus VmRSS after inputs"
    else:
        row.update(
            peak_extra_mib=(res["hwm_after_kib"] - res["hwm_inputs_kib"]) / 1024, mem_how="VmHWM delta"
        )
    return row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ----------------------------------------------------------------------------- the sweep


def _cases(args):
    """(D, b, B, method, extra row fields) in the order that lets a failure at one size skip the
    larger ones. b = B here; --simulate-world has its own cases (loss_distributed.sim_cases)."""
    for D in args.dims:
        for b in args.batches:
            for m in args.methods:
                if m in BASELINES and D not in args.baseline_dims:
                    continue
                yield D, b, b, m, {}


def _derive(row: dict, rate_tflops: float | None, model: roofline.Device | None = None) -> None:
    b, B, D = row["b"], row["B"], row["D"]
    if b is None:  # a skipped simulated case (B not a multiple of W)
        return
    # The roofline model of the fused kernels at this shape on this card (bench/roofline.py),
    # beside every measured time: roofline_*_ms and the fraction of it reached, model / measured.
    pred = None
    if model is not None:
        tf32 = row["dtype"] == "fp32" and _allow_tf32()
        pred = roofline.predict(b, B, D, model, row["dtype"], row["method"].endswith("sigmoid"), tf32)
    for part, flops in (("fwd", 2 * b * B * D), ("bwd", 6 * b * B * D), ("fwd_bwd", 8 * b * B * D)):
        ms = row.get(f"{part}_ms")
        if ms:
            row[f"{part}_tflops"] = flops / (ms * 1e-3) / 1e12
            if rate_tflops:
                row[f"{part}_x_floor"] = ms / (flops / (rate_tflops * 1e12) * 1e3)
            if pred is not None:
                row[f"roofline_{part}_ms"] = pred[f"{part}_ms"]
                row[f"{part}_of_roofline"] = pred[f"{part}_ms"] / ms
    if pred is not None:  # the sweeps' exps added to their tensor time (bench/roofline.py)
        row["roofline_with_exp_fwd_bwd_ms"] = pred["fwd_bwd_with_exp_ms"]


def _allow_tf32() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32)


def run_sweep(args, meta, emit, cases=None) -> list[dict]:
    """Every (D, b, B, method) case in order (default :func:`_cases`); a row per case, OOM and
    errors included. An `extra` dict of a case goes into its row; its "skip" key skips the case."""
    device = args.device
    rate = meta["matmul_rate"]["tflops"] if meta.get("matmul_rate") else None
    model = roofline.match_device(meta.get("device_name")) if device == "cuda" else None
    rows: list[dict] = []
    unavailable: dict[str, tuple[str, str]] = {}  # method -> (status, note)
    oom_bB: dict[str, tuple[int, int]] = {}  # method -> (b, B) of the smallest case out of memory
    slow_bBD: dict[str, int] = {}  # method -> smallest b*B*D over --slow-seconds
    t_start = time.perf_counter()
    inputs = {"key": None, "tensors": None}  # GPU inputs, shared by the methods at one size

    def add(row, status, note=None):
        row["status"] = status
        if note:
            row["note"] = note
        _derive(row, rate, model)
        rows.append(row)
        emit(rows)

    for D, b, B, method, extra in _cases(args) if cases is None else cases:
        extra = dict(extra)
        skip = extra.pop("skip", None)
        row = {"method": method, **extra, "b": b, "B": B, "D": D, "dtype": args.dtype, "device": device}
        if method in ("ours", "ours-sigmoid"):
            row["backend"] = args.backend
        if skip:
            add(row, "skipped", skip)
            continue
        if method not in unavailable:
            if method == "infcl" and device != "cuda":
                unavailable[method] = ("skipped", "not run on CPU (Inf-CL's kernels are CUDA-only)")
            else:
                try:
                    make_loss(method, args.backend, None)  # import check before any allocation
                except ImportError as e:
                    unavailable[method] = ("not installed", str(e))
        if method in unavailable:
            add(row, *unavailable[method])
            continue
        if method in oom_bB and b >= oom_bB[method][0] and B >= oom_bB[method][1]:
            add(row, "skipped", "OOM at b={}, B={}".format(*oom_bB[method]))
            continue
        if method in slow_bBD and b * B * D >= slow_bBD[method]:
            add(row, "skipped", f"over --slow-seconds at b*B*D={slow_bBD[method]}")
            continue
        if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
            add(row, "skipped", f"--max-seconds {args.max_seconds:g} reached")
            continue

        size = f"b=B={b:<7d}" if b == B else f"W={extra.get('world')} b={b} B={B}"
        print(f"  {method:15s} {size} D={D:<5d} ...", end="", flush=True)
        t0 = time.perf_counter()
        status, note = "ok", None
        try:
            if device == "cuda":
                row.update(_gpu_case(method, b, B, D, args, inputs))
            else:
                row.update(measure_cpu(method, b, B, D, args))
            if row.get("note", "").startswith("single run"):
                slow_bBD[method] = min(slow_bBD.get(method, b * B * D), b * B * D)
        except _Stop:
            raise
        except Exception as e:  # noqa: BLE001 - one failing case must not end the sweep
            if common.is_oom(e):
                status, note = "oom", type(e).__name__
                old = oom_bB.get(method)
                oom_bB[method] = (b, B) if old is None else (min(old[0], b), min(old[1], B))
            else:
                status, note = "error", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        finally:
            common.free_memory(device)
        print(f" {status} ({time.perf_counter() - t0:.1f}s)", flush=True)
        add(row, status, note)
    inputs["tensors"] = None
    common.free_memory(device)
    return rows


def _gpu_case(method, b, B, D, args, inputs) -> dict:
    """Make (or reuse) the inputs for this size and measure one method; raises on OOM."""
    import torch

    if inputs["key"] != (b, B, D):
        inputs["key"], inputs["tensors"] = None, None
        common.free_memory("cuda")
        dtype = getattr(torch, DTYPES[args.dtype])
        inputs["tensors"] = make_inputs(b, B, D, dtype, "cuda", args.seed, args.scale, args.bias)
        inputs["key"] = (b, B, D)
    img, txt, scale, bias = inputs["tensors"]
    fn, _ = make_loss(method, args.backend, bias)
    leaves = [img, txt, scale] + ([bias] if method in SIGMOID_METHODS else [])
    try:
        return measure_gpu(fn, img, txt, scale, bias, leaves, args)
    finally:
        common.clear_grads((img, txt, scale, bias))


# ----------------------------------------------------------------------------- output


def format_table(rows) -> str:
    head = (
        f"{'method':15s} {'b':>7s} {'B':>7s} {'D':>5s} {'dtype':5s} {'fwd ms':>9s} {'bwd ms':>9s} "
        f"{'f+b ms':>9s} {'TFLOP/s':>8s} {'x floor':>8s} {'roof ms':>8s} {'% roof':>6s} "
        f"{'peak MiB':>10s}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = r.get("peak_extra_mib")
        if r.get("status") == "oom":
            mem_s = "OOM"
        elif r.get("mem_status"):
            mem_s = r["mem_status"].upper()
        else:
            mem_s = common.fmt(mem, ".1f")
        note = r.get("note", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('note', '')}"
        lines.append(
            f"{r['method']:15s} {r['b']:7d} {r['B']:7d} {r['D']:5d} {r['dtype']:5s} "
            f"{common.fmt(r.get('fwd_ms'), '9.2f')} {common.fmt(r.get('bwd_ms'), '9.2f')} "
            f"{common.fmt(r.get('fwd_bwd_ms'), '9.2f')} {common.fmt(r.get('fwd_bwd_tflops'), '8.3g')} "
            f"{common.fmt(r.get('fwd_bwd_x_floor'), '8.2f')} "
            f"{common.fmt(r.get('roofline_fwd_bwd_ms'), '8.2f')} "
            f"{common.fmt(_percent(r.get('fwd_bwd_of_roofline')), '6.0f')} {mem_s:>10s}  {note}"
        )
    return "\n".join(lines)


def _percent(fraction):
    return None if fraction is None else 100 * fraction


def memory_ratios(rows) -> list[dict]:
    """ours / naive peak extra memory at every (b, D) where both have a number."""
    by = {(r["method"], r["b"], r["D"]): r.get("peak_extra_mib") for r in rows if r.get("status") == "ok"}
    out = []
    for (m, b, D), mem in sorted(by.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        naive = by.get(("naive", b, D))
        if m == "ours" and mem is not None and naive:
            out.append({"b": b, "D": D, "ours_mib": mem, "naive_mib": naive, "ratio": mem / naive})
    return out


def plot(rows, meta, path: Path) -> bool:
    plt = common.import_pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    dims = sorted({r["D"] for r in rows})
    styles = ["-", "--", ":", "-."]
    rate = (meta.get("matmul_rate") or {}).get("tflops")
    for di, D in enumerate(dims):
        ls = styles[di % len(styles)]
        for m in ALL_METHODS:
            pts = [r for r in rows if r["method"] == m and r["D"] == D and r.get("status") == "ok"]
            if not pts:
                continue
            color = f"C{ALL_METHODS.index(m)}"
            t = [(r["b"], r["fwd_bwd_ms"]) for r in pts if r.get("fwd_bwd_ms")]
            mm = [(r["b"], r["peak_extra_mib"]) for r in pts if (r.get("peak_extra_mib") or 0) > 0]
            if t:
                ax_t.plot(*zip(*t), ls, marker="o", color=color, label=f"{m} D={D}")
            if mm:
                ax_m.plot(*zip(*mm), ls, marker="o", color=color, label=f"{m} D={D}")
        if rate:
            bs = sorted({r["b"] for r in rows if r["D"] == D})
            ax_t.plot(
                bs,
                [8 * b * b * D / (rate * 1e12) * 1e3 for b in bs],
                ls,
                color="k",
                lw=0.8,
                label=f"floor D={D}",
            )
    for ax, ylab in ((ax_t, "forward+backward ms (median)"), (ax_m, "peak extra memory MiB")):
        common.style_log_axes(ax, "batch b = B", ylab)
    common.save_figure(fig, path, f"contrastive loss, {meta['device_name']} ({meta['dtype']})")
    return True


def collect_meta(args) -> dict:
    import torch

    meta = {
        "timestamp": common.utc_timestamp(),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "loadavg_start": common.loadavg(),
        "triton": common.triton_version(),
    }
    meta.update(common.device_meta(args.device))
    meta.update(common.git_meta())
    return meta


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time and memory of contrastive losses (ours vs naive, open_clip local_loss, Inf-CL).",
    )
    common.add_device_arg(p, "auto (default): cuda when available, else cpu")
    p.add_argument(
        "--methods",
        type=common.str_list,
        default=None,
        help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: ours,naive,openclip-local,infcl "
        "on CUDA; ours,naive on CPU)",
    )
    p.add_argument(
        "--sigmoid", action="store_true", help="also run ours-sigmoid and naive-sigmoid (SigLIP loss)"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="distributed mode, one process per rank under torchrun (implied when WORLD_SIZE is set): "
        "per-rank step, communication alone, compute alone, hidden fraction and peak memory of "
        "distributed_infonce_loss (and distributed_sigmoid_loss with --sigmoid); --batches are per rank",
    )
    p.add_argument(
        "--simulate-world",
        type=common.int_list,
        default=None,
        metavar="W[,W...]",
        help="one process doing the per-rank work of a W-rank step: b = B/W images against all B "
        "texts through the single-device kernels, for each global B in --batches and each W. Leaves "
        "out the communication and the per-chunk launch structure of the distributed loss",
    )
    p.add_argument(
        "--batches",
        type=common.int_list,
        default=None,
        help="b = B values, comma-separated (default by device); per-rank b with --distributed, "
        "global B with --simulate-world",
    )
    p.add_argument(
        "--dims",
        type=common.int_list,
        default=None,
        help="feature dims D, comma-separated (default by device)",
    )
    p.add_argument(
        "--baseline-dims",
        type=common.int_list,
        default=None,
        help="dims at which the baselines (naive*, openclip-local, infcl) run "
        "(default: --dims; --quick on CUDA: 1024)",
    )
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="input dtype (default bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default=None,
        help="backend for ours / ours-sigmoid (default auto on CUDA, torch on CPU)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small preset that fits a few minutes (see --max-seconds)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds; the rest are recorded as skipped "
        "(default: none; --quick on CUDA: 150)",
    )
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=None,
        help="CUDA: a method whose single forward+backward takes longer is timed once, not with do_bench, "
        "and skipped at larger b*B*D (default 5; --quick: 1)",
    )
    p.add_argument(
        "--warmup-ms", type=float, default=25, help="CUDA: do_bench warm-up ms per measurement (default 25)"
    )
    p.add_argument(
        "--rep-ms",
        type=float,
        default=100,
        help="CUDA: do_bench repetition ms per measurement (default 100); --distributed: about this "
        "many ms of steps are timed (10 to 100 repetitions)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: most timed runs per case (default 3; --quick: 1; --distributed: 10)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's default)")
    p.add_argument(
        "--repeat-seconds",
        type=float,
        default=5.0,
        help="CPU: no further timed runs of a case once its runs took this long in all (default 5)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1 / 0.07,
        help="logit scale s, the multiplier (exp of open_clip's t; default 1/0.07)",
    )
    p.add_argument(
        "--bias", type=float, default=-10.0, help="logit bias for the sigmoid methods (default -10)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random features (default 0)")
    common.add_output_args(p, "directory for the JSON results and PNG plot (default bench/results)")
    return p


def resolve_args(args):
    import torch

    args.device = common.resolve_device(args.device)
    gpu = args.device == "cuda"
    if args.simulate_world:
        if args.distributed or "WORLD_SIZE" in os.environ:
            raise SystemExit("--simulate-world runs in one process: not with --distributed or under torchrun")
        if min(args.simulate_world) < 1:
            raise SystemExit(f"--simulate-world needs W >= 1, got {args.simulate_world}")
    args.distributed = bool(args.distributed or "WORLD_SIZE" in os.environ)
    if args.distributed or args.simulate_world:
        return _resolve_mode_args(args, gpu)
    if args.methods is None:
        args.methods = ("ours", "naive", "openclip-local", "infcl") if gpu else ("ours", "naive")
    if args.sigmoid:
        args.methods = tuple(args.methods) + tuple(m for m in SIGMOID_METHODS if m not in args.methods)
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {ALL_METHODS}")
    if args.batches is None:
        args.batches = (
            (GPU_QUICK_BATCHES if args.quick else GPU_BATCHES)
            if gpu
            else (CPU_QUICK_BATCHES if args.quick else CPU_BATCHES)
        )
    if args.dims is None:
        args.dims = (GPU_QUICK_DIMS if args.quick else GPU_DIMS) if gpu else CPU_DIMS
    if args.baseline_dims is None:
        args.baseline_dims = GPU_QUICK_BASELINE_DIMS if (gpu and args.quick) else args.dims
    args.batches = tuple(sorted(args.batches))
    args.dims = tuple(sorted(args.dims))
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    if args.backend is None:
        args.backend = "auto" if gpu else "torch"
    if args.max_seconds is None and args.quick and gpu:
        args.max_seconds = 150.0
    if args.slow_seconds is None:
        args.slow_seconds = 1.0 if args.quick else 5.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def _resolve_mode_args(args, gpu: bool):
    """Defaults of the distributed and simulated modes (they run ours / ours-sigmoid only)."""
    import torch

    ld = _loss_distributed()
    if args.methods is not None:
        raise SystemExit("--methods does not apply to --distributed / --simulate-world (use --sigmoid)")
    if args.distributed:
        args.methods = ()
        default_b = (ld.DIST_GPU_QUICK_BATCHES if args.quick else ld.DIST_GPU_BATCHES) if gpu else None
        args.batches = args.batches or default_b or ld.DIST_CPU_BATCHES
        args.dims = args.dims or (ld.DIST_GPU_DIMS if gpu else ld.DIST_CPU_DIMS)
    else:
        args.methods = ("ours", "ours-sigmoid") if args.sigmoid else ("ours",)
        args.batches = args.batches or (ld.SIM_GPU_BATCHES if gpu else ld.SIM_CPU_BATCHES)
        args.dims = args.dims or ((1024,) if gpu else CPU_DIMS)
        args.simulate_world = tuple(sorted(set(args.simulate_world)))
    args.baseline_dims = ()
    args.batches = tuple(sorted(args.batches))
    args.dims = tuple(sorted(args.dims))
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.backend = args.backend or ("auto" if gpu else "torch")
    if args.slow_seconds is None:
        args.slow_seconds = 1.0 if args.quick else 5.0
    if args.threads and not args.distributed:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 1 if args.quick else (10 if args.distributed else 3)
    return args


def _loss_distributed():
    """bench/loss_distributed.py, sharing this module (not a second copy of it when run as a script)."""
    if __package__:
        return importlib.import_module(".loss_distributed", __package__)
    sys.modules.setdefault("loss_throughput", sys.modules[__name__])
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("loss_distributed")


def output_paths(args, meta, mode: str | None = None) -> tuple[Path, Path]:
    """(JSON, PNG) paths in --out: loss_throughput-<device>-<card>[-<mode>][-<tag>]-<time>."""
    args.out.mkdir(parents=True, exist_ok=True)
    dev_tag = common.card_tag(meta["device_name"], args.device)
    stem = common.result_stem("loss_throughput", args.device, dev_tag, mode, args.tag, common.file_stamp())
    return args.out / f"{stem}.json", args.out / f"{stem}.png"


def main(argv=None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    if args.distributed:
        return _loss_distributed().run_distributed(args, argv)
    sim = bool(args.simulate_world)
    ld = _loss_distributed() if sim else None
    meta = collect_meta(args)
    meta["config"] = common.config_of(args)
    meta["argv"] = sys.argv if argv is None else list(argv)
    meta["flop_count"] = "8*b*B*D forward+backward (2bBD fwd, 6bBD bwd) for every method"
    model = roofline.match_device(meta["device_name"]) if args.device == "cuda" else None
    meta["roofline"] = (
        {"device": model.name, "source": model.source,
         "what": "roofline_*_ms: the fused kernels' model time at "
         "this shape (bench/roofline.py); *_of_roofline = model / measured"}
        if model else None
    )  # fmt: skip
    mode = None
    if sim:
        mode = "simW" + "-".join(map(str, args.simulate_world))
        meta["mode"] = "simulated"
        meta["simulation"] = (
            "per-rank work of a W-rank step (b = B/W images against all B texts, single-device "
            "kernels); no communication, no per-chunk launch structure"
        )
    json_path, png_path = output_paths(args, meta, mode)

    print(
        f"device {meta['device_name']} ({args.device}), torch {meta['torch']}, triton {meta['triton']}, "
        f"git {meta['git_sha'] or 'n/a'}"
    )
    if sim:
        print(
            f"simulated W in {args.simulate_world}: {','.join(args.methods)}, b = B/W against B texts; "
            f"B in {args.batches}; D in {args.dims}; {args.dtype} (no communication, no per-chunk launches)"
        )
    else:
        print(
            f"methods {','.join(args.methods)}; b=B in {args.batches}; D in {args.dims} "
            f"(baselines D in {args.baseline_dims}); {args.dtype}"
        )
    meta["matmul_rate"] = matmul_rate(args.device, args.dtype)
    print(
        f"matmul rate: {meta['matmul_rate']['what']} = {meta['matmul_rate']['tflops']:.2f} TFLOP/s "
        f"(floor = 8bBD / this)"
    )

    def emit(rows):  # rewrite after every row so a killed run still leaves its results
        common.write_json_atomic(json_path, {"meta": meta, "rows": rows})

    def on_term(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    rows: list[dict] = []
    interrupted = False
    try:
        rows = run_sweep(args, meta, emit, cases=list(ld.sim_cases(args)) if sim else None)
    except (_Stop, KeyboardInterrupt):
        interrupted = True
        print("\ninterrupted: writing what was measured")
        rows = json.loads(json_path.read_text())["rows"] if json_path.exists() else []
    finally:
        signal.signal(signal.SIGTERM, old)

    if sim:
        ld.sim_notes(rows, args.device)
    ratios = [] if sim else memory_ratios(rows)
    meta["memory_ratios"] = ratios
    meta["interrupted"] = interrupted
    meta["loadavg_end"] = common.loadavg()
    emit(rows)
    print()
    print(ld.format_sim_table(rows) if sim else format_table(rows))
    if sim:
        print(
            "\nrest = peak - B*D*itemsize: at fixed b it should not grow with W (the per-rank memory "
            "claim);\nthe simulation leaves out communication and the per-chunk launches of the "
            "distributed loss."
        )
    if ratios:
        print("\npeak extra memory, ours / naive:")
        for r in ratios:
            tag = ""
            if (r["b"], r["D"]) == ACCEPTANCE and args.device == "cpu":
                ok = r["ratio"] < ACCEPTANCE_RATIO
                tag = f"  <- acceptance case, target < {ACCEPTANCE_RATIO:.0%}: {'PASS' if ok else 'FAIL'}"
            print(
                f"  b=B={r['b']:<7d} D={r['D']:<5d} {r['ours_mib']:10.1f} / {r['naive_mib']:10.1f} MiB "
                f"= {r['ratio']:.2%}{tag}"
            )
    if args.device == "cpu":
        # No GPU here: what the model predicts for the README's headline shapes (bf16, InfoNCE).
        devices = [roofline.H100_SXM, roofline.H200]
        meta["predictions"] = [
            {"b": b, "B": B, "D": D, **roofline.predict(b, B, D, dev)}
            for b, B, D in roofline.HEADLINE
            for dev in devices
        ]
        emit(rows)
        print(
            "\nroofline model of the fused kernels, bf16 InfoNCE "
            "(bench/roofline.py; predicted, not measured):"
        )
        print(roofline.format_predictions(roofline.HEADLINE, devices))
    print(f"\nresults: {json_path}")
    plotter = ld.plot_sim if sim else plot
    if not args.no_plot and rows and plotter(rows, meta, png_path):
        print(f"plot:    {png_path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.modules.setdefault("loss_throughput", sys.modules[__name__])  # for bench/loss_distributed.py
    sys.exit(main())
