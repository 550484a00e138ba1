"""Distributed and simulated-W modes of bench/loss_throughput.py (the CLI lives there).

Distributed mode (``torchrun ... bench/loss_throughput.py --distributed``): every rank holds b image
and b text features (global batch B = W*b) and measures, per (loss, b, D):

    step     median time of one forward+backward of distributed_infonce_loss (distributed_sigmoid_loss
             with --sigmoid): gather, overlap and all
    comm     the collectives that step issues, with no compute: the metadata all_gather (13 int64 and a
             host read-back), W broadcasts of each rank's (b, D) text chunk, for InfoNCE the MAX
             all-reduce of (B,) and the SUM all-reduce of (4, B) fp32 column statistics, then W
             reduces of fp32 (b, D) text-gradient chunks with the same in-flight window
    compute  the same kernels with no communication: single-device infonce_loss (sigmoid_loss) of
             the local (b, D) images against a (B, D) text tensor
    hidden   fraction of the communication hidden behind compute, (compute + comm - step) / comm
             clipped to [0, 1]
    peak     peak memory of one step over the memory held before it (CUDA: max_memory_allocated;
             CPU: VmHWM reset before the step minus VmRSS then, after malloc_trim)

Every timed region starts after a barrier (and a device synchronise on CUDA) so the ranks run it
together; CUDA regions are timed with CUDA events, CPU regions with time.perf_counter. The three
parts are interleaved rep by rep, so drift hits them alike. Rank 0 gathers every rank's row with
all_gather_object after each case and rewrites the JSON, so a run that dies keeps what it measured.
An out-of-memory error on one rank ends the run (the others would wait in a collective forever).

The simulated mode (``--simulate-world W``) runs through loss_throughput.run_sweep; this module
only supplies its cases, table and plot.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common

if __package__:
    from . import loss_throughput as lt
else:  # run as bench/loss_throughput.py: that module registers itself as `loss_throughput`
    import loss_throughput as lt

# Defaults: per-rank batches b (distributed) and global batches B (simulated).
DIST_GPU_BATCHES = (2048, 8192, 32768)
DIST_GPU_QUICK_BATCHES = (4096, 16384)
DIST_GPU_DIMS = (1024,)
DIST_CPU_BATCHES = (256, 1024)
DIST_CPU_DIMS = (128,)
SIM_GPU_BATCHES = (32768, 131072)
SIM_CPU_BATCHES = (4096, 16384)
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


# ----------------------------------------------------------------------------- setup


@dataclass
class DistEnv:
    """What torchrun's environment says about this process, after the process group is up."""

    rank: int
    world: int
    local_rank: int
    device: str  # "cuda" or "cpu"
    backend: str  # "nccl" or "gloo"

    @property
    def torch_device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.device == "cuda" else torch.device("cpu")


def init_distributed(device: str) -> DistEnv:
    """Start the process group from torchrun's environment: nccl on CUDA (one GPU per local rank),
    gloo on CPU."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise SystemExit(
            "--distributed needs torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...); run e.g.\n"
            "  torchrun --nproc_per_node=2 bench/loss_throughput.py --distributed"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        kw = {"timeout": _dt.timedelta(minutes=10)}
        if device == "cuda":
            torch.cuda.set_device(local_rank)
            kw["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend, **kw)
    elif device == "cuda":
        torch.cuda.set_device(local_rank)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def print0(env: DistEnv, *a, **kw) -> None:
    if env.rank == 0:
        print(*a, **kw)


def _malloc_trim() -> None:
    """Hand glibc's free memory back to the OS, so the next VmHWM reading counts fresh pages."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ----------------------------------------------------------------------------- one case


def _comm_only(env: DistEnv, text_local, B: int, sigmoid: bool):
    """A function issuing the collectives of one distributed loss step, with no compute between them.

    Mirrors llm2clip_kernels.distributed_loss: metadata all_gather + read-back, W async broadcasts
    of (b, D) text chunks (waited for local chunk first, then in rank order), the InfoNCE column
    statistics (MAX all-reduce of (B,), SUM all-reduce of (4, B), fp32), and W async reduces of
    fp32 (b, D) text-gradient chunks with at most three outstanding. One rank: nothing (the loss
    is then the single-device one and issues no collective).
    """
    import torch
    import torch.distributed as dist

    W, rank, dev = env.world, env.rank, env.torch_device
    if W == 1:
        return lambda: None
    b, D = text_local.shape
    text_local = text_local.detach()
    meta_row = torch.zeros(13, dtype=torch.int64, device=dev)
    col_max = torch.zeros(B, dtype=torch.float32, device=dev)
    sums = torch.zeros(4, B, dtype=torch.float32, device=dev)
    grads = [torch.zeros(b, D, dtype=torch.float32, device=dev) for _ in range(W)]

    def comm():
        out = [torch.empty_like(meta_row) for _ in range(W)]
        dist.all_gather(out, meta_row)
        torch.stack(out).cpu()
        text_all = text_local.new_empty((B, D))
        handles = []
        for src in range(W):
            part = text_all[src * b : (src + 1) * b]
            if src == rank:
                part.copy_(text_local)
            handles.append(dist.broadcast(part, src, async_op=True))
        for src in [rank] + [r for r in range(W) if r != rank]:
            handles[src].wait()
        if not sigmoid:
            dist.all_reduce(col_max, op=dist.ReduceOp.MAX)
            dist.all_reduce(sums)
        pending = []
        for src in range(W):
            pending.append(dist.reduce(grads[src], src, async_op=True))
            if len(pending) > 2:
                pending.pop(0).wait()
        for work in pending:
            work.wait()

    return comm


def _timer(env: DistEnv):
    """time(fn) -> seconds of fn on this rank, started together on every rank (barrier first)."""
    import torch
    import torch.distributed as dist

    cuda = env.device == "cuda"

    def time_it(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_it


def _step_peak(env: DistEnv, step) -> tuple[float | None, str]:
    """Peak memory of one step over what is held before it, in MiB, and how it was read."""
    import torch
    import torch.distributed as dist

    gc.collect()
    if env.device == "cuda":
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, "max_memory_allocated - before"
    _malloc_trim()
    dist.barrier()
    if not common.reset_hwm() or common.proc_status_kib("VmRSS") is None:
        step()
        return None, "no /proc/self/clear_refs: not measured"
    rss0 = common.proc_status_kib("VmRSS")
    step()
    return (common.proc_status_kib("VmHWM") - rss0) / 1024, "VmHWM (reset before the step) - VmRSS then"


def _agree_max(env: DistEnv, x: float) -> float:
    import torch.distributed as dist

    values = [None] * env.world
    dist.all_gather_object(values, x)
    return max(values)


def measure_case(env: DistEnv, k, sigmoid: bool, b: int, D: int, args, rate_tflops: float | None) -> dict:
    """One (loss, b, D) case on this rank; every rank must call it with the same arguments."""
    import torch

    W, rank, dev = env.world, env.rank, env.torch_device
    B = W * b
    dtype = getattr(torch, common.DTYPES[args.dtype])
    img, txt, scale, bias = lt.make_inputs(b, b, D, dtype, dev, args.seed + rank, args.scale, args.bias)
    leaves = [img, txt, scale] + ([bias] if sigmoid else [])
    dist_fn = k.distributed_sigmoid_loss if sigmoid else k.distributed_infonce_loss
    one_fn = k.sigmoid_loss if sigmoid else k.infonce_loss
    extra = (bias,) if sigmoid else ()

    def step():
        common.clear_grads(leaves)
        loss = dist_fn(img, txt, scale, *extra, backend=args.backend)
        loss.backward()
        return loss

    # Compute alone: this rank's images against all B texts through the single-device kernels.
    c_img, c_txt, c_scale, c_bias = lt.make_inputs(
        b, B, D, dtype, dev, args.seed + 1000, args.scale, args.bias
    )
    c_leaves = [c_img, c_txt, c_scale] + ([c_bias] if sigmoid else [])
    c_extra = (c_bias,) if sigmoid else ()

    def compute():
        common.clear_grads(c_leaves)
        one_fn(c_img, c_txt, c_scale, *c_extra, positive_offset=rank * b, backend=args.backend).backward()

    comm = _comm_only(env, txt, B, sigmoid)
    time_it = _timer(env)

    # Warm-up (Triton compiles and autotunes on the first calls), memory, then the repetitions.
    loss = step()
    for fn in (compute, comm, compute):
        time_it(fn)
    t_warm = _agree_max(env, time_it(step))
    peak_mib, mem_how = _step_peak(env, step)
    if env.device == "cuda":
        reps = max(10, min(100, math.ceil(args.rep_ms * 1e-3 / max(t_warm, 1e-6))))
    else:
        reps = max(1, min(args.repeats, int(args.repeat_seconds / max(t_warm, 1e-6))))
    parts = {"step": [], "comm": [], "compute": []}
    for _ in range(reps):
        parts["step"].append(time_it(step))
        parts["comm"].append(time_it(comm))
        parts["compute"].append(time_it(compute))
    common.clear_grads(leaves + c_leaves)

    itemsize = ITEMSIZE[args.dtype]
    row = {
        "mode": "distributed",
        "loss_kind": "sigmoid" if sigmoid else "infonce",
        "rank": rank,
        "world": W,
        "b": b,
        "B": B,
        "D": D,
        "dtype": args.dtype,
        "backend": args.backend,
        "device": env.device,
        "reps": reps,
        "loss": float(loss.detach()),
        "peak_extra_mib": peak_mib,
        "mem_how": mem_how,
        "gathered_text_mib": B * D * itemsize / 2**20,
    }
    for name, xs in parts.items():
        row.update(common.ms_fields(name, common.ms_quantiles(xs)))
    step_ms, comm_ms, compute_ms = row["step_ms"], row["comm_ms"], row["compute_ms"]
    row["hidden_frac"] = (
        min(1.0, max(0.0, (compute_ms + comm_ms - step_ms) / comm_ms)) if W > 1 and comm_ms > 0 else None
    )
    flops = 8 * b * B * D
    for part in ("step", "compute"):
        row[f"{part}_tflops"] = flops / (row[f"{part}_ms"] * 1e-3) / 1e12
        if rate_tflops:
            row[f"{part}_x_floor"] = row[f"{part}_ms"] / (flops / (rate_tflops * 1e12) * 1e3)
    # Bytes through this rank's link in one direction: the B - b remote text rows in, the fp32
    # gradients of the B - b remote rows out (column statistics: 5B floats, negligible).
    comm_bytes = (B - b) * D * (itemsize + 4) + (0 if sigmoid else 2 * 5 * B * 4)
    row["comm_bytes"] = comm_bytes
    row["comm_gbps"] = comm_bytes / (comm_ms * 1e-3) / 1e9 if W > 1 and comm_ms > 0 else None
    if rate_tflops and row["comm_gbps"]:
        # On paper (README): forward hides a chunk iff b >= R * itemsize / (2 BW); backward iff
        # b >= (2/3) R / BW (fp32 gradients). Here with the measured R and effective BW.
        r_over_bw = rate_tflops * 1e12 / (row["comm_gbps"] * 1e9)
        row["b_hide_fwd"] = r_over_bw * itemsize / 2
        row["b_hide_bwd"] = r_over_bw * 2 / 3
    return row


# ----------------------------------------------------------------------------- the run


def format_dist_table(rows) -> str:
    head = (
        f"{'loss':8s} {'rank':>4s} {'W':>3s} {'b':>7s} {'B':>8s} {'D':>5s} {'dtype':5s} {'step ms':>9s} "
        f"{'comm ms':>9s} {'comp ms':>9s} {'hidden':>6s} {'TFLOP/s':>8s} {'x floor':>8s} {'GB/s':>7s} "
        f"{'peak MiB':>9s} {'B*D MiB':>8s}"
    )
    lines = [head, "-" * len(head)]
    f = common.fmt
    for r in sorted(rows, key=lambda r: (r["loss_kind"], r["D"], r["b"], r["rank"])):
        lines.append(
            f"{r['loss_kind']:8s} {r['rank']:4d} {r['world']:3d} {r['b']:7d} {r['B']:8d} {r['D']:5d} "
            f"{r['dtype']:5s} {f(r.get('step_ms'), '9.2f')} {f(r.get('comm_ms'), '9.2f')} "
            f"{f(r.get('compute_ms'), '9.2f')} {f(r.get('hidden_frac'), '6.2f')} "
            f"{f(r.get('step_tflops'), '8.3g')} {f(r.get('step_x_floor'), '8.2f')} "
            f"{f(r.get('comm_gbps'), '7.3g')} {f(r.get('peak_extra_mib'), '9.1f')} "
            f"{f(r.get('gathered_text_mib'), '8.1f')}"
        )
    return "\n".join(lines)


def plot_dist(rows, meta, path: Path) -> bool:
    """Slowest rank's step, comm and compute time against b, one panel per loss."""
    plt = common.import_pyplot()
    if plt is None:
        return False
    kinds = sorted({r["loss_kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for di, D in enumerate(sorted({r["D"] for r in rows})):
            sel = [r for r in rows if r["loss_kind"] == kind and r["D"] == D]
            bs = sorted({r["b"] for r in sel})
            for pi, part in enumerate(("step", "comm", "compute")):
                ys = [max(r[f"{part}_ms"] for r in sel if r["b"] == b) for b in bs]
                ax.plot(bs, ys, ["-", "--", ":"][pi], marker="o", color=f"C{di}", label=f"{part} D={D}")
        ax.set_title(f"distributed {kind}, W={meta['world']}", fontsize=9)
        common.style_log_axes(ax, "per-rank batch b", "ms (median; slowest rank)")
    common.save_figure(fig, path, f"{meta['device_name']} ({meta['dtype']}, {meta['dist_backend']})")
    return True


def run_distributed(args, argv=None) -> int:
    """The distributed mode: every rank measures, rank 0 prints and writes the results."""
    import torch
    import torch.distributed as dist

    env = init_distributed(args.device)
    k = common.import_kernels()
    if env.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    mine = {
        "rank": env.rank,
        "device_name": torch.cuda.get_device_name(env.local_rank)
        if env.device == "cuda"
        else common.cpu_name(),
        "host": os.uname().nodename,
        "threads": torch.get_num_threads(),
        "matmul_rate": lt.matmul_rate(env.device, args.dtype),
    }
    per_rank = [None] * env.world
    dist.all_gather_object(per_rank, mine)
    rate = mine["matmul_rate"]["tflops"]  # x floor against this rank's own device

    meta, json_path, png_path = {}, None, None
    if env.rank == 0:
        meta = lt.collect_meta(args)
        meta.update(world=env.world, dist_backend=env.backend, ranks=per_rank, mode="distributed")
        meta["matmul_rate"] = mine["matmul_rate"]
        meta["config"] = common.config_of(args)
        meta["argv"] = sys.argv if argv is None else list(argv)
        meta["flop_count"] = "8*b*B*D per rank per forward+backward (B = W*b)"
        json_path, png_path = lt.output_paths(args, meta, f"dist{env.world}")
        print(
            f"distributed: W={env.world} ({env.backend}), device {meta['device_name']} ({env.device}), "
            f"torch {meta['torch']}, triton {meta['triton']}, git {meta['git_sha'] or 'n/a'}"
        )
        print(
            f"losses {'infonce,sigmoid' if args.sigmoid else 'infonce'}; per-rank b in {args.batches}; "
            f"D in {args.dims}; {args.dtype}; backend {args.backend}; threads per rank "
            f"{[p['threads'] for p in per_rank]}"
        )
        rates = ", ".join(f"{p['matmul_rate']['tflops']:.3g}" for p in per_rank)
        print(f"matmul rate per rank ({mine['matmul_rate']['what']}): {rates} TFLOP/s")

    rows: list[dict] = []
    t_start = time.perf_counter()
    cases = [
        (s, D, b)
        for D in args.dims
        for b in args.batches
        for s in ((False, True) if args.sigmoid else (False,))
    ]
    for sigmoid, D, b in cases:
        stop = [bool(args.max_seconds and time.perf_counter() - t_start > args.max_seconds)]
        dist.broadcast_object_list(stop, src=0)
        kind = "sigmoid" if sigmoid else "infonce"
        if stop[0]:
            if env.rank == 0:
                row = {"mode": "distributed", "loss_kind": kind, "rank": 0, "world": env.world}
                row.update(b=b, B=env.world * b, D=D, dtype=args.dtype, status="skipped")
                rows.append({**row, "note": f"--max-seconds {args.max_seconds:g} reached"})
            continue
        print0(env, f"  {kind:8s} b={b:<7d} B={env.world * b:<8d} D={D:<5d} ...", end="", flush=True)
        t0 = time.perf_counter()
        row = measure_case(env, k, sigmoid, b, D, args, rate)
        row["status"] = "ok"
        gathered = [None] * env.world
        dist.all_gather_object(gathered, row)
        common.free_memory(env.device)
        if env.rank == 0:
            rows.extend(gathered)
            common.write_json_atomic(json_path, {"meta": meta, "rows": rows})
            worst = max(r["step_ms"] for r in gathered)
            print(f" ok ({time.perf_counter() - t0:.1f}s; slowest rank's step {worst:.2f} ms)", flush=True)

    if env.rank == 0:
        meta["loadavg_end"] = common.loadavg()
        common.write_json_atomic(json_path, {"meta": meta, "rows": rows})
        done = [r for r in rows if r.get("status") == "ok"]
        print()
        print(format_dist_table(done))
        for r in rows:
            if r.get("status") != "ok":
                print(f"{r['loss_kind']} b={r['b']} D={r['D']}: {r['status']} ({r.get('note', '')})")
        if env.device == "cpu":
            print(
                "\nCPU: the ranks share this machine's cores and gloo moves data through memory, so "
                "comm and hidden say little about a GPU cluster; they check that the mode works."
            )
        print(f"\nresults: {json_path}")
        if not args.no_plot and done and plot_dist(done, meta, png_path):
            print(f"plot:    {png_path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- simulated W


def sim_cases(args):
    """(D, b, B, method, extra row fields) for --simulate-world: b = B / W rows against all B texts."""
    methods = ("ours", "ours-sigmoid") if args.sigmoid else ("ours",)
    itemsize = ITEMSIZE[args.dtype]
    for D in args.dims:
        for B in args.batches:
            for W in sorted(args.simulate_world, reverse=True):  # small b first at each B
                extra = {"mode": "simulated", "world": W, "gathered_text_mib": B * D * itemsize / 2**20}
                for m in methods:
                    if B % W:
                        yield D, None, B, m, {**extra, "skip": f"B={B} is not a multiple of W={W}"}
                    else:
                        yield D, B // W, B, m, extra


def sim_notes(rows, device: str) -> None:
    """Per-row remarks for the simulated table: memory the single-device kernels hold that a W-rank
    step does not (the Triton backward's fp32 (B, D) accumulator once b exceeds its row superblock)."""
    bwd_rows = getattr(sys.modules.get("llm2clip_kernels._triton"), "BWD_ROWS", None)
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r.get("peak_extra_mib") is not None:
            r["peak_minus_gathered_mib"] = r["peak_extra_mib"] - r["gathered_text_mib"]
        if device == "cuda" and bwd_rows and r["b"] > bwd_rows and r.get("backend") != "torch":
            acc = r["B"] * r["D"] * 4 / 2**20
            r["note"] = (r.get("note", "") + "; " if r.get("note") else "") + (
                f"b > {bwd_rows}: single-device bwd holds a (B, D) fp32 accumulator ({acc:.0f} MiB) "
                "that a W-rank step holds per chunk only"
            )


def format_sim_table(rows) -> str:
    head = (
        f"{'method':13s} {'W':>4s} {'b':>7s} {'B':>8s} {'D':>5s} {'dtype':5s} {'fwd ms':>9s} {'bwd ms':>9s} "
        f"{'f+b ms':>9s} {'TFLOP/s':>8s} {'x floor':>8s} {'peak MiB':>9s} {'B*D MiB':>8s} "
        f"{'rest MiB':>9s}  note"
    )
    lines = [head, "-" * len(head)]
    f = common.fmt
    for r in rows:
        if r.get("status") == "oom":
            mem_s = "OOM"
        else:
            mem_s = f(r.get("peak_extra_mib"), "9.1f")
        note = r.get("note", "") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('note', '')}"
        lines.append(
            f"{r['method']:13s} {r['world']:4d} {f(r.get('b'), '7d')} {r['B']:8d} {r['D']:5d} "
            f"{r['dtype']:5s} {f(r.get('fwd_ms'), '9.2f')} {f(r.get('bwd_ms'), '9.2f')} "
            f"{f(r.get('fwd_bwd_ms'), '9.2f')} {f(r.get('fwd_bwd_tflops'), '8.3g')} "
            f"{f(r.get('fwd_bwd_x_floor'), '8.2f')} {mem_s:>9s} {f(r.get('gathered_text_mib'), '8.1f')} "
            f"{f(r.get('peak_minus_gathered_mib'), '9.1f')}  {note}"
        )
    return "\n".join(lines)


def plot_sim(rows, meta, path: Path) -> bool:
    """Per-rank step time and peak memory against the global batch B, one line per W."""
    plt = common.import_pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    ok = [r for r in rows if r.get("status") == "ok"]
    styles = ["-", "--", ":", "-."]
    for ci, (m, W) in enumerate(sorted({(r["method"], r["world"]) for r in ok})):
        for di, D in enumerate(sorted({r["D"] for r in ok})):
            sel = sorted(
                (r for r in ok if (r["method"], r["world"], r["D"]) == (m, W, D)), key=lambda r: r["B"]
            )
            ls = styles[di % len(styles)]
            t = [(r["B"], r["fwd_bwd_ms"]) for r in sel if r.get("fwd_bwd_ms")]
            mm = [(r["B"], r["peak_extra_mib"]) for r in sel if (r.get("peak_extra_mib") or 0) > 0]
            if t:
                ax_t.plot(*zip(*t), ls, marker="o", color=f"C{ci}", label=f"{m} W={W} D={D}")
            if mm:
                ax_m.plot(*zip(*mm), ls, marker="o", color=f"C{ci}", label=f"{m} W={W} D={D}")
    for di, D in enumerate(sorted({r["D"] for r in ok})):
        Bs = sorted({r["B"] for r in ok if r["D"] == D})
        gathered = [B * D * ITEMSIZE[meta["dtype"]] / 2**20 for B in Bs]
        ax_m.plot(Bs, gathered, styles[di % len(styles)], color="k", lw=0.8, label=f"B*D*itemsize D={D}")
    for ax, ylab in ((ax_t, "per-rank forward+backward ms (median)"), (ax_m, "peak extra memory MiB")):
        common.style_log_axes(ax, "global batch B (b = B / W)", ylab)
    title = f"simulated W ranks, {meta['device_name']} ({meta['dtype']}), no communication"
    common.save_figure(fig, path, title)
    return True
