"""Attention throughput: ViT blocks per backend, and LLM caption encoding packed vs padded.

Part `vit` (vision blocks): one transformer block of ViT-B/16 (197 tokens, width 768) and ViT-L/14
(257 tokens, width 1024) at 224 px, built from `llm2clip.models.vit` (its `Block`, config presets
and attention selector backend field), forward, backward and forward+backward per attention backend
available on the device (flash_attn -> xformers -> sdpa -> math). FLOPs per block forward (2 per
multiply-add): 2*B*N*(4*w^2 + 2*w*h_mlp) for the projections and MLP plus 4*B*N^2*w for the
attention products; backward = 2x forward. TFLOP/s are beside the card's measured bf16 8192^3
matmul rate ("% mm"). GPU batch sizes (256 and 512 for B/16, 128 and 256 for L/14) fill an H100.

Part `llm` (caption encoding, forward only, no gradients): `LLMTextEmbedder` over a random-weight
Llama of the Llama-3.2-1B and Llama-3-8B shapes (CPU: a tiny shape), on captions whose token
lengths follow a realistic distribution:

    short   lognormal, median 18 tokens, sigma 0.45, clipped to [4, 77] (COCO / CC3M-like alt-text)
    dense   normal around 150 tokens, sd 35, clipped to [40, 400] (ShareGPT4V-style dense captions)
    mixed   50/50 short and dense (LLM2CLIP's per-sample choice of caption)

The same captions, grouped into the same batches of --captions-per-batch, run in each layout:

    padded         arrival order, each batch padded to its longest caption (what a dataloader gives)
    padded-sorted  captions sorted by length before batching (the best a padded extractor can do)
    packed         no pad tokens: one row, positions restarting per caption, cu_seqlens; attention
                   through the selector's varlen kernel where one exists (flash-attn, xformers),
                   otherwise re-padded inside each attention call (the MLPs/projections still see
                   only real tokens)
    packed-varlen  (not in the default set) packed with the selector's cu_seqlens path forced: on
                   SDPA / math that is a (T, T) block-diagonal mask, O(T^2) per layer

Backends: every one available for the ViT part; for the LLM part on GPU the selector's first
choice and SDPA (math only materialises the scores). tokens/s counts real tokens only.

TARGET (GPU, bf16, short captions): packed >= 1.5x padded tokens/s. Why it should hold: at ~20
tokens a caption, a Llama layer spends ~24 d^2 FLOPs per token on projections and MLP against
~4 L d on attention, so time follows the token slots computed; arrival-order padding of the short
distribution wastes ~50-60% of them (the CPU run prints pad %), packing none.

GPU: bf16, timings with CUDA synchronisation around --repeats passes over the batches (median,
p20, p80) after a warm-up pass; ViT with triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8]); peak
memory from torch.cuda.max_memory_allocated. CPU: fp32, time.perf_counter medians (noisy on a
shared machine; the load average is in the JSON).

    python bench/attention_throughput.py                   # GPU: full run (a few minutes)
    python bench/attention_throughput.py --quick           # GPU: fewer batches and repeats
    python bench/attention_throughput.py --device cpu --quick   # CPU: tiny shapes, ~1 minute

Writes a table to stdout and attention_throughput-<device>-<card>[-<tag>]-<time>.json into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # a plain checkout: import llm2clip and bench.common from here
    sys.path.insert(0, str(REPO_ROOT))
from bench import common  # noqa: E402
from bench.common import DTYPES  # noqa: E402

VIT_MODELS = ("B/16", "L/14")
GPU_VIT_BATCHES = {"B/16": (256, 512), "L/14": (128, 256)}
CPU_VIT_BATCHES = {"B/16": (2,), "L/14": (1,)}
LAYOUTS = ("padded", "padded-sorted", "packed", "packed-varlen")
DEFAULT_LAYOUTS = ("padded", "padded-sorted", "packed")
DISTS = ("short", "dense", "mixed")
TARGET_SPEEDUP = 1.5

# Llama shapes with random weights (transformers LlamaConfig fields).
LLM_SHAPES = {
    "tiny": dict(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=4096,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
    ),
}  # fmt: skip


def matmul_rate(device: str, dtype) -> dict:
    """Dense matmul rate of this device: bf16 8192^3 on CUDA (do_bench median), 2048^3 on CPU."""
    return common.matmul_rate(device, dtype, str(dtype))


# ----------------------------------------------------------------------------- part (a): ViT blocks


def vit_block(name: str, backend: str, device: str, dtype):
    """(block, width, tokens, mlp hidden, source) for a ViT preset's transformer block."""
    from llm2clip.models.vit import Block, ViTConfig

    cfg = ViTConfig.preset(name, attn_backend=backend)
    tokens = cfg.grid_size**2 + cfg.num_prefix_tokens
    block = Block(cfg).to(device=device, dtype=dtype)
    return block, cfg.width, tokens, cfg.hidden_dim, "llm2clip.models.vit.Block"


def vit_flops(batch: int, tokens: int, width: int, hidden: int) -> float:
    """Forward FLOPs of one pre-LN block: qkv + proj (4 w^2), MLP (2 w h), QK^T and PV (2 N^2 w each)."""
    return 2 * batch * tokens * (4 * width * width + 2 * width * hidden) + 4 * batch * tokens * tokens * width


def run_vit(args, meta, emit) -> None:
    import torch

    from llm2clip.models.attention import available_backends

    dtype = getattr(torch, DTYPES[args.dtype])
    rate = meta["matmul_rate"]["tflops"]
    for name in args.vit_models:
        batches = args.vit_batches or (GPU_VIT_BATCHES if args.device == "cuda" else CPU_VIT_BATCHES)[name]
        for backend in args.backends or available_backends(args.device, dtype):
            skip = False
            for batch in batches:
                row = {"part": "vit", "model": name, "backend": backend, "batch": batch, "dtype": args.dtype}
                if skip:
                    emit({**row, "status": "skipped", "note": "a smaller batch ran out of memory"})
                    continue
                try:
                    row.update(_time_vit_block(name, backend, batch, dtype, args))
                    row["status"] = "ok"
                    row["fwd_bwd_tflops"] = 3 * row["flops_fwd"] / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                    row["fwd_tflops"] = row["flops_fwd"] / (row["fwd_ms"] * 1e-3) / 1e12
                    row["pct_matmul"] = 100 * row["fwd_bwd_tflops"] / rate
                except Exception as exc:  # noqa: BLE001 - a failed case is a row, not the end of the run
                    if not common.is_oom(exc):
                        raise
                    row.update(status="oom", note=str(exc).splitlines()[0][:120])
                    skip = True
                common.free_memory(args.device)
                emit(row)


def _time_vit_block(name, backend, batch, dtype, args) -> dict:
    import torch

    block, width, tokens, hidden, source = vit_block(name, backend, args.device, dtype)
    x = torch.randn(batch, tokens, width, device=args.device, dtype=dtype, requires_grad=True)
    leaves = [x, *block.parameters()]
    fwd = lambda: block(x)
    out = fwd()
    grad = torch.randn_like(out)
    out.backward(grad)  # warm-up
    row = {"tokens": tokens, "width": width, "mlp_hidden": hidden, "block": source}
    row["flops_fwd"] = vit_flops(batch, tokens, width, hidden)
    bwd = lambda out, **kw: out.backward(grad, **kw)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd().backward(grad)
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out = None
        row.update(common.do_bench_fwd_bwd(fwd, bwd, leaves, args.warmup_ms, args.rep_ms))
        return row
    times = {"fwd": [], "bwd": [], "fwd_bwd": []}
    for _ in range(args.repeats):
        common.clear_grads(leaves)
        _, t_fwd, t_bwd = common.perf_fwd_bwd(fwd, bwd)
        times["fwd"].append(t_fwd)
        times["bwd"].append(t_bwd)
        times["fwd_bwd"].append(t_fwd + t_bwd)
    for key, ts in times.items():
        row.update(common.ms_fields(key, common.ms_quantiles(ts)))
    return row


# ----------------------------------------------------------------------------- part (b): LLM captions


def caption_lengths(dist: str, n: int, seed: int, max_len: int) -> list[int]:
    """Token counts of n captions drawn from a named distribution (see the module docstring)."""
    import random

    rng = random.Random(seed)

    def short() -> int:
        return int(min(77, max(4, round(math.exp(rng.gauss(math.log(18), 0.45))))))

    def dense() -> int:
        return int(min(400, max(40, round(rng.gauss(150, 35)))))

    pick = {"short": short, "dense": dense, "mixed": lambda: short() if rng.random() < 0.5 else dense()}[dist]
    return [min(max_len, pick()) for _ in range(n)]


def make_llm(shape: str, device: str, dtype):
    import torch
    import transformers

    from llm2clip.models.text_embedder import ATTN_IMPLEMENTATION

    cfg = transformers.LlamaConfig(**LLM_SHAPES[shape], attn_implementation=ATTN_IMPLEMENTATION)
    with torch.device(device):
        model = transformers.LlamaModel._from_config(cfg, dtype=dtype)
    return model.eval()


def run_llm(args, meta, emit) -> None:
    import torch

    from llm2clip.models.text_embedder import LLMTextEmbedder, TextEmbedderConfig, collate

    dtype = getattr(torch, DTYPES[args.dtype])
    for shape in args.llm_models:
        try:
            model = make_llm(shape, args.device, dtype)
        except Exception as exc:  # noqa: BLE001
            if not common.is_oom(exc):
                raise
            emit({"part": "llm", "model": shape, "status": "oom", "note": "model does not fit"})
            common.free_memory(args.device)
            continue
        vocab = model.config.vocab_size
        params = sum(p.numel() for p in model.parameters())
        for backend in args.backends or _llm_backends(args.device, dtype):
            cfg = TextEmbedderConfig(dtype=DTYPES[args.dtype],
                                     attn_backend=backend, max_length=512)  # fmt: skip
            emb = LLMTextEmbedder(model, None, cfg)
            for dist in args.dists:
                n = args.captions_per_batch * args.num_batches
                lengths = caption_lengths(dist, n, args.seed, cfg.max_length)
                g = torch.Generator().manual_seed(args.seed)
                ids = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]
                for layout in args.layouts:
                    order = (
                        sorted(range(n), key=lambda i: lengths[i]) if layout == "padded-sorted" else range(n)
                    )
                    order = list(order)
                    chunks = [
                        order[i : i + args.captions_per_batch] for i in range(0, n, args.captions_per_batch)
                    ]
                    packed = layout.startswith("packed")
                    emb.config.packed_attention = "varlen" if layout == "packed-varlen" else "auto"
                    batches = [collate([ids[i] for i in c], packed=packed).to(args.device) for c in chunks]
                    real = sum(lengths)
                    slots = sum(b.input_ids.numel() for b in batches)
                    row = {
                        "part": "llm", "model": shape, "params_m": params / 1e6, "backend": backend,
                        "dist": dist, "layout": layout, "dtype": args.dtype, "captions": n,
                        "captions_per_batch": args.captions_per_batch, "real_tokens": real,
                        "token_slots": slots, "pad_fraction": 1 - real / slots,
                        "mean_len": real / n, "max_len": max(lengths),
                    }  # fmt: skip
                    try:
                        row.update(_time_llm(emb, batches, args))
                        row["tokens_per_s"] = real / (row["ms"] * 1e-3)
                        row["status"] = "ok"
                    except Exception as exc:  # noqa: BLE001
                        if not common.is_oom(exc):
                            raise
                        row.update(status="oom", note=str(exc).splitlines()[0][:120])
                    del batches
                    common.free_memory(args.device)
                    emit(row)
        del model, emb
        common.free_memory(args.device)


def _llm_backends(device: str, dtype) -> list[str]:
    """Default LLM backends: on GPU the selector's choice and SDPA (math is only a reference there)."""
    from llm2clip.models.attention import available_backends

    names = available_backends(device, dtype)
    if device != "cuda":
        return names
    return list(dict.fromkeys([names[0], "sdpa"]))


def _time_llm(emb, batches, args) -> dict:
    import torch

    out = {}
    with torch.inference_mode():
        for b in batches[:1]:
            emb(b)  # warm-up
        common.sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ts = []
        for _ in range(args.repeats):
            common.sync(args.device)
            t0 = time.perf_counter()
            for b in batches:
                emb(b)
            common.sync(args.device)
            ts.append(time.perf_counter() - t0)
        if args.device == "cuda":
            out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["ms"], out["ms_p20"], out["ms_p80"] = common.ms_quantiles(ts)
    return out


def speedups(rows) -> list[dict]:
    """packed (and padded-sorted) tokens/s over padded tokens/s, per model, backend and distribution."""
    by = {
        (r["model"], r["backend"], r["dist"], r["layout"]): r["tokens_per_s"]
        for r in rows
        if r.get("part") == "llm" and r.get("status") == "ok"
    }
    out = []
    for (model, backend, dist, layout), tps in by.items():
        base = by.get((model, backend, dist, "padded"))
        if layout != "padded" and base:
            out.append(
                {"model": model, "backend": backend, "dist": dist, "layout": layout, "x_padded": tps / base}
            )
    return out


# ----------------------------------------------------------------------------- output


def format_vit(rows) -> str:
    head = (
        f"{'model':6s} {'backend':10s} {'batch':>6s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} "
        f"{'fwd TF/s':>9s} {'f+b TF/s':>9s} {'% mm':>6s} {'peak MiB':>9s}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:6s} {r['backend']:10s} {r['batch']:6d} {common.fmt(r.get('fwd_ms'), '9.2f')} "
            f"{common.fmt(r.get('bwd_ms'), '9.2f')} {common.fmt(r.get('fwd_bwd_ms'), '9.2f')} "
            f"{common.fmt(r.get('fwd_tflops'), '9.3g')} {common.fmt(r.get('fwd_bwd_tflops'), '9.3g')} "
            f"{common.fmt(r.get('pct_matmul'), '6.1f')} {common.fmt(r.get('peak_extra_mib'), '9.0f')}  "
            f"{r['status']} {r.get('note', '')}"
        )
    return "\n".join(lines)


def format_llm(rows) -> str:
    head = (
        f"{'model':13s} {'backend':9s} {'dist':6s} {'layout':14s} {'mean len':>8s} {'pad %':>6s} "
        f"{'ms':>9s} {'tokens/s':>11s} {'peak MiB':>9s}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "layout" not in r:
            lines.append(f"{r['model']:13s} {r['status']}: {r.get('note', '')}")
            continue
        lines.append(
            f"{r['model']:13s} {r['backend']:9s} {r['dist']:6s} {r['layout']:14s} {r['mean_len']:8.1f} "
            f"{100 * r['pad_fraction']:6.1f} {common.fmt(r.get('ms'), '9.1f')} "
            f"{common.fmt(r.get('tokens_per_s'), '11.0f')} "
            f"{common.fmt(r.get('peak_extra_mib'), '9.0f')}  {r['status']} {r.get('note', '')}"
        )
    return "\n".join(lines)


def collect_meta(args) -> dict:
    import torch
    import transformers

    meta = {
        "timestamp": common.utc_timestamp(),
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "loadavg_start": common.loadavg(),
        **common.git_meta(),
        "triton": common.triton_version(),
        **common.device_meta(args.device),
    }
    return meta


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ViT block attention throughput and LLM caption encoding, packed vs padded."
    )
    common.add_device_arg(p)
    p.add_argument(
        "--parts", type=common.str_list, default=("vit", "llm"), help="vit, llm or both (default both)"
    )
    p.add_argument(
        "--backends", type=common.str_list, default=None,
        help="attention backends (default: every one available; for the LLM part on GPU, the "
        "selector's choice and sdpa)",
    )  # fmt: skip
    p.add_argument(
        "--vit-models", type=common.str_list, default=VIT_MODELS, help="ViT presets (default B/16,L/14)"
    )
    p.add_argument(
        "--vit-batches", type=common.int_list, default=None,
        help="ViT batch sizes (default GPU: 256,512 for B/16 and 128,256 for L/14; CPU: 2 / 1)",
    )  # fmt: skip
    p.add_argument(
        "--llm-models", type=common.str_list, default=None,
        help=f"LLM shapes from {tuple(LLM_SHAPES)} (default GPU: llama-3.2-1b,llama-3-8b; CPU: tiny)",
    )  # fmt: skip
    p.add_argument(
        "--dists", type=common.str_list, default=None, help=f"caption length distributions from {DISTS}"
    )
    p.add_argument("--layouts", type=common.str_list, default=DEFAULT_LAYOUTS, help=f"layouts from {LAYOUTS}")
    p.add_argument(
        "--captions-per-batch", type=int, default=None, help="captions per batch (GPU 128, CPU 16)"
    )
    p.add_argument(
        "--num-batches", type=int, default=None, help="batches per measurement (GPU 4, quick 2; CPU 2)"
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="bf16 on GPU, fp32 on CPU by default")
    p.add_argument("--repeats", type=int, default=None, help="timed passes (GPU 3, quick 2; CPU 3, quick 2)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per ViT case (GPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per ViT case (GPU)")
    p.add_argument("--quick", action="store_true", help="fewer batches, repeats and distributions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption lengths and token ids")
    common.add_output_args(
        p, "directory for the JSON results", "extra word in the output file name", plot=False
    )
    return p


def resolve_args(args):
    import torch

    args.device = common.resolve_device(args.device)
    gpu = args.device == "cuda"
    for name, values, allowed in (
        ("--parts", args.parts, ("vit", "llm")),
        ("--layouts", args.layouts, LAYOUTS),
        ("--vit-models", args.vit_models, VIT_MODELS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {allowed}")
    if args.llm_models is None:
        args.llm_models = ("llama-3.2-1b", "llama-3-8b") if gpu else ("tiny",)
    if bad := [m for m in args.llm_models if m not in LLM_SHAPES]:
        raise SystemExit(f"--llm-models: unknown {bad}; choose from {tuple(LLM_SHAPES)}")
    if args.dists is None:
        args.dists = ("short", "dense") if args.quick else DISTS
    if bad := [d for d in args.dists if d not in DISTS]:
        raise SystemExit(f"--dists: unknown {bad}; choose from {DISTS}")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.captions_per_batch = args.captions_per_batch or (128 if gpu else 16)
    args.num_batches = args.num_batches or ((2 if args.quick else 4) if gpu else 2)
    args.repeats = args.repeats or ((2 if args.quick else 3) if gpu else (2 if args.quick else 3))
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None) -> int:
    import torch

    args = resolve_args(build_parser().parse_args(argv))
    meta = collect_meta(args)
    meta["config"] = common.config_of(args)
    meta["argv"] = sys.argv if argv is None else list(argv)
    meta["target"] = f"GPU bf16 short captions: packed >= {TARGET_SPEEDUP}x padded tokens/s"
    meta["matmul_rate"] = matmul_rate(args.device, getattr(torch, DTYPES[args.dtype]))
    args.out.mkdir(parents=True, exist_ok=True)
    card = common.card_tag(meta["device_name"], args.device)
    stem = common.result_stem("attention_throughput", args.device, card, args.tag, common.file_stamp())
    json_path = args.out / f"{stem}.json"
    print(
        f"device {meta['device_name']} ({args.device}), torch {meta['torch']}, transformers "
        f"{meta['transformers']}, git {meta['git_sha'] or 'n/a'}; "
        f"matmul {meta['matmul_rate']['tflops']:.1f} TFLOP/s"
    )
    rows: list[dict] = []

    def write() -> None:
        doc = {"meta": {**meta, "loadavg_end": common.loadavg()}, "rows": rows, "speedups": speedups(rows)}
        json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")

    def emit(row: dict) -> None:
        rows.append(row)
        write()
        print("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                             if k in ("part", "model", "backend", "batch", "dist", "layout", "status",
                                      "fwd_bwd_tflops", "tokens_per_s")), flush=True)  # fmt: skip

    if "vit" in args.parts:
        run_vit(args, meta, emit)
    if "llm" in args.parts:
        run_llm(args, meta, emit)
    write()
    vit_rows = [r for r in rows if r["part"] == "vit"]
    llm_rows = [r for r in rows if r["part"] == "llm"]
    if vit_rows:
        print(
            "\nViT block forward+backward (one block; TFLOP/s from the analytic count, "
            "% of the measured matmul rate)"
        )
        print(format_vit(vit_rows))
    if llm_rows:
        print(
            f"\nLLM caption encoding, forward only ({args.captions_per_batch} captions per batch, "
            "real tokens/s)"
        )
        print(format_llm(llm_rows))
        print("\nspeed-up over padded (tokens/s ratio):")
        for s in speedups(rows):
            tag = ""
            if s["layout"] == "packed" and s["dist"] == "short" and args.device == "cuda":
                ok = s["x_padded"] >= TARGET_SPEEDUP
                tag = f"  <- target >= {TARGET_SPEEDUP}x: {'PASS' if ok else 'FAIL'}"
            print(
                f"  {s['model']:13s} {s['backend']:9s} {s['dist']:6s} {s['layout']:14s} "
                f"{s['x_padded']:6.2f}x{tag}"
            )
    print(f"\nresults: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
