"""The distributed mode of bench/loss_throughput.py (``torchrun ... --distributed``; the CLI lives
there and imports this module, never the reverse): per rank and per (loss, b, D), B = W * b, the
step, its collectives alone, the kernels alone, the hidden fraction and peak memory (the columns:
bench/README.md). A failing case raises: the other ranks would wait in a collective forever.
"""

from __future__ import annotations

import math
import os
import time

from bench import common


def comm_only(W: int, rank: int, text_local, B: int, sigmoid: bool):
    """A function issuing the collectives of one distributed loss step, with no compute between them,
    as llm2clip_kernels.distributed_loss issues them: the metadata all_gather (13 int64) and its
    host read-back, W async broadcasts of (b, D) text chunks (the local one waited for first), the
    InfoNCE column statistics (MAX all-reduce of (B,), SUM all-reduce of (4, B), fp32), and W async
    reduces of fp32 (b, D) text-gradient chunks with at most three outstanding. One rank: nothing."""
    import torch
    import torch.distributed as dist

    if W == 1:
        return lambda: None
    b, D = text_local.shape
    text_local, dev = text_local.detach(), text_local.device
    meta_row = torch.zeros(13, dtype=torch.int64, device=dev)
    col_max, sums = torch.zeros(B, device=dev), torch.zeros(4, B, device=dev)
    grads = [torch.zeros(b, D, device=dev) for _ in range(W)]

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


def time_together(fn, cuda: bool, world: int) -> float:
    """Seconds of fn() on this rank, started on every rank at once (barrier first)."""
    import torch
    import torch.distributed as dist

    common.sync("cuda" if cuda else "cpu")
    if world > 1:
        dist.barrier()
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def measure_case(env, k, sigmoid: bool, b: int, D: int, args, rate: float | None) -> dict:
    """One (loss, b, D) case on this rank; every rank calls it with the same arguments."""

    from llm2clip.distributed import gather_object

    W, rank, dev, cuda = env.world_size, env.rank, env.device, env.device.type == "cuda"
    B, dtype = W * b, common.torch_dtype(args.dtype)
    img, txt, scale, bias = common.contrastive_inputs(
        b, b, D, dtype, dev, args.seed + rank, args.scale, args.bias
    )
    c_img, c_txt, c_scale, c_bias = common.contrastive_inputs(
        b, B, D, dtype, dev, args.seed + 1000, args.scale, args.bias
    )
    extra, c_extra = ((bias,), (c_bias,)) if sigmoid else ((), ())
    leaves, c_leaves = [img, txt, scale, *extra], [c_img, c_txt, c_scale, *c_extra]
    dist_fn = k.distributed_sigmoid_loss if sigmoid else k.distributed_infonce_loss
    one_fn = k.sigmoid_loss if sigmoid else k.infonce_loss

    def step():
        common.clear_grads(leaves)
        loss = dist_fn(img, txt, scale, *extra, backend=args.backend)
        loss.backward()
        return loss

    def compute():  # this rank's images against all B texts through the single-device kernels
        common.clear_grads(c_leaves)
        one_fn(c_img, c_txt, c_scale, *c_extra, positive_offset=rank * b, backend=args.backend).backward()

    comm = comm_only(W, rank, txt, B, sigmoid)
    loss = step()  # warm-up: Triton compiles and autotunes on the first calls
    for fn in (compute, comm, compute):
        time_together(fn, cuda, W)
    t_warm = max(gather_object(time_together(step, cuda, W), env))
    mem = common.PeakMemory(env.device.type).start()
    step()
    peak = mem.mib()
    if cuda:
        reps = max(10, min(100, math.ceil(args.rep_ms * 1e-3 / max(t_warm, 1e-6))))
    else:
        reps = max(1, min(args.repeats, int(args.repeat_seconds / max(t_warm, 1e-6))))
    parts = {"step": [], "comm": [], "compute": []}
    for _ in range(reps):
        for name, fn in (("step", step), ("comm", comm), ("compute", compute)):
            parts[name].append(time_together(fn, cuda, W))
    common.clear_grads(leaves + c_leaves)

    itemsize = common.ITEMSIZE[args.dtype]
    row = {
        "rank": rank,
        "world": W,
        "B": B,
        "backend": args.backend,
        "reps": reps,
        "loss": float(loss.detach()),
        "peak_extra_mib": peak,
        "mem_how": mem.how,
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
        if rate:
            row[f"{part}_x_floor"] = row[f"{part}_ms"] / (flops / (rate * 1e12) * 1e3)
    # Bytes through this rank's link in one direction: the B - b remote text rows in, the fp32
    # gradients of the B - b remote rows out, and for InfoNCE the 5B-float column statistics twice.
    row["comm_bytes"] = (B - b) * D * (itemsize + 4) + (0 if sigmoid else 2 * 5 * B * 4)
    row["comm_gbps"] = row["comm_bytes"] / (comm_ms * 1e-3) / 1e9 if W > 1 and comm_ms > 0 else None
    if rate and row["comm_gbps"]:
        # On paper (bench/README.md): forward hides a chunk iff b >= R * itemsize / (2 BW);
        # backward iff b >= (2/3) R / BW (fp32 gradients). Here with the measured R and BW.
        r_over_bw = rate * 1e12 / (row["comm_gbps"] * 1e9)
        row["b_hide_fwd"] = r_over_bw * itemsize / 2
        row["b_hide_bwd"] = r_over_bw * 2 / 3
    return row


# fmt: off
COLUMNS = [
    ("loss", "loss_kind", ""), ("rank", "rank", "d"), ("W", "world", "d"), ("b", "b", "d"), ("B", "B", "d"),
    ("D", "D", "d"), ("dtype", "dtype", ""), ("step ms", "step_ms", ".2f"), ("comm ms", "comm_ms", ".2f"),
    ("comp ms", "compute_ms", ".2f"), ("hidden", "hidden_frac", ".2f"), ("TFLOP/s", "step_tflops", ".3g"),
    ("x floor", "step_x_floor", ".2f"), ("GB/s", "comm_gbps", ".3g"), ("peak MiB", "peak_extra_mib", ".1f"),
    ("B*D MiB", "gathered_text_mib", ".1f"), ("note", common.note, ""),
]
# fmt: on


def slowest(rows) -> list[dict]:
    """Per (loss, D, b) and part (step, comm, compute): the slowest rank's median ms."""
    out = {}
    for r in rows:
        for part in ("step", "comm", "compute"):
            if r.get(f"{part}_ms") is not None:
                key = (r["loss_kind"], r["D"], r["b"], part)
                out[key] = max(out.get(key, 0.0), r[f"{part}_ms"])
    return [{"loss_kind": k, "D": D, "b": b, "part": p, "ms": ms} for (k, D, b, p), ms in out.items()]


def run(args, argv=None) -> int:
    """The distributed mode: every rank measures, rank 0 prints and writes the results."""
    import torch

    from llm2clip.distributed import broadcast_object, distributed_session, gather_object

    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise SystemExit(
            "--distributed needs torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...); run e.g.\n"
            "  torchrun --nproc_per_node=2 bench/loss_throughput.py --distributed"
        )
    with distributed_session(args.device, timeout_s=600) as env:
        k = common.import_kernels()
        if args.threads:
            torch.set_num_threads(args.threads)
        rate = common.ceiling(args.device, args.dtype)
        mine = {
            "rank": env.rank,
            "device_name": common.device_meta(args.device)["device_name"],
            "host": os.uname().nodename,
            "threads": torch.get_num_threads(),
            "matmul_rate": rate,
        }
        per_rank = gather_object(mine, env)
        run = common.Run("loss_throughput", args, argv, mode=f"dist{env.world_size}", writer=env.is_main)
        run.catch, run.agree = False, lambda flag: broadcast_object(flag, env)
        run.meta.update(
            dtype=args.dtype,
            world=env.world_size,
            ranks=per_rank,
            mode="distributed",
            matmul_rate=rate,
            dist_backend=torch.distributed.get_backend() if env.distributed else None,
            flop_count="8*b*B*D per rank per forward+backward (B = W*b)",
        )
        run.print(
            f"distributed: W={env.world_size}, {run.meta['device_name']} ({args.device}); losses "
            f"{'infonce,sigmoid' if args.sigmoid else 'infonce'}; per-rank b in {args.batches}; D in "
            f"{args.dims}; {args.dtype}; threads per rank {[p['threads'] for p in per_rank]}; matmul "
            f"rate per rank: {', '.join(format(p['matmul_rate']['tflops'], '.3g') for p in per_rank)} TFLOP/s"
        )
        kinds = (False, True) if args.sigmoid else (False,)
        cases = (
            common.Case(
                {
                    "mode": "distributed",
                    "loss_kind": "sigmoid" if s else "infonce",
                    "b": b,
                    "D": D,
                    "dtype": args.dtype,
                    "device": args.device,
                },
                lambda s=s, b=b, D=D: gather_object(measure_case(env, k, s, b, D, args, rate["tflops"]), env),
            )
            for D in args.dims
            for b in args.batches
            for s in kinds
        )
        with run:
            run.sweep(cases)
        text = common.table(run.rows, COLUMNS)
        if args.device == "cpu":
            text += (
                "\n\nCPU: the ranks share this machine's cores and gloo moves data through memory, so comm "
                "and hidden say little about a GPU cluster; they check that the mode works."
            )
        panels = [
            common.Panel(
                "ms",
                "ms (median; slowest rank)",
                xlabel="per-rank batch b",
                series=("D",),
                style="part",
                where=lambda r, k=k: r["loss_kind"] == k,
                title=f"distributed {k}",
            )
            for k in dict.fromkeys(r["loss_kind"] for r in run.rows)
        ]
        title = f"{run.meta['device_name']} ({args.dtype})"
        return run.finish(text, title=title, panels=panels, plot_rows=slowest(run.rows))
