"""Attention throughput: ViT blocks per backend, and LLM caption encoding packed vs padded.

Part ``vit``: one transformer block of ViT-B/16 (197 tokens, width 768) and ViT-L/14 (257
tokens, width 1024) at 224 px (llm2clip.models.vit.Block), forward, backward and both per
attention backend available (flash_attn -> xformers -> sdpa -> math). FLOPs per block forward:
2*B*N*(4*w^2 + 2*w*h_mlp) + 4*B*N^2*w; backward = 2x forward; "% mm" is the share of the card's
measured matmul rate. Part ``llm`` (forward only): LLMTextEmbedder over a random-weight Llama of
the Llama-3.2-1B / Llama-3-8B shapes (CPU: a tiny one) on captions whose token lengths follow a
distribution: ``short`` (lognormal, median 18, sigma 0.45, clipped to [4, 77]: alt-text),
``dense`` (normal 150 +- 35 in [40, 400]: ShareGPT4V-style), ``mixed`` (50/50). The same
captions in the same batches run ``padded`` (arrival order), ``padded-sorted`` (length-sorted),
``packed`` (no pad tokens, cu_seqlens; varlen attention where the backend has it, else re-padded
inside attention) and, on request, ``packed-varlen`` (the cu_seqlens path forced). tokens/s counts
real tokens. Target (GPU, bf16, short captions): packed >= 1.5x padded tokens/s.

    python bench/attention_throughput.py                         # GPU: full run (a few minutes)
    python bench/attention_throughput.py --quick                 # GPU: fewer batches and repeats
    python bench/attention_throughput.py --device cpu --quick    # CPU: tiny shapes, ~1 minute
"""

from __future__ import annotations

import math
import random
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/attention_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

VIT_MODELS = ("B/16", "L/14")
VIT_BATCHES = {"cuda": {"B/16": (256, 512), "L/14": (128, 256)}, "cpu": {"B/16": (2,), "L/14": (1,)}}
LAYOUTS = ("padded", "padded-sorted", "packed", "packed-varlen")
DISTS = ("short", "dense", "mixed")
TARGET_SPEEDUP = 1.5
# fmt: off
LLM_SHAPES = {  # Llama shapes with random weights (transformers LlamaConfig fields)
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0),
}
OPTIONS = [
    ("--parts", common.str_list, ("vit", "llm"), "vit, llm or both (default both)"),
    ("--backends", common.str_list, None,
     "attention backends (default: every one available; LLM part on GPU: the selector's choice and sdpa)"),
    ("--vit-models", common.str_list, VIT_MODELS, "ViT presets (default B/16,L/14)"),
    ("--vit-batches", common.int_list, None,
     "ViT batch sizes (default GPU 256,512 for B/16 and 128,256 for L/14; CPU 2 / 1)"),
    ("--llm-models", common.str_list, None,
     f"LLM shapes from {tuple(LLM_SHAPES)} (default GPU llama-3.2-1b,llama-3-8b; CPU tiny)"),
    ("--dists", common.str_list, None, f"caption length distributions from {DISTS}"),
    ("--layouts", common.str_list, LAYOUTS[:3], f"layouts from {LAYOUTS}"),
    ("--captions-per-batch", int, None, "captions per batch (GPU 128, CPU 16)"),
    ("--num-batches", int, None, "batches per measurement (GPU 4, quick 2; CPU 2)"),
    ("--dtype", tuple(common.DTYPES), None, "bf16 on GPU, fp32 on CPU by default"),
]
COLUMNS = {
    "vit": [("model", "model", ""), ("backend", "backend", ""), ("batch", "batch", "d"),
            ("fwd ms", "fwd_ms", ".2f"), ("bwd ms", "bwd_ms", ".2f"), ("f+b ms", "fwd_bwd_ms", ".2f"),
            ("fwd TF/s", "fwd_tflops", ".3g"), ("f+b TF/s", "fwd_bwd_tflops", ".3g"),
            ("% mm", "pct_matmul", ".1f"), ("peak MiB", "peak_extra_mib", ".0f"), ("note", common.note, "")],
    "llm": [("model", "model", ""), ("backend", "backend", ""), ("dist", "dist", ""),
            ("layout", "layout", ""),
            ("mean len", "mean_len", ".1f"), ("pad %", lambda r: 100 * r["pad_fraction"], ".1f"),
            ("ms", "ms", ".1f"), ("tokens/s", "tokens_per_s", ".0f"), ("peak MiB", "peak_extra_mib", ".0f"),
            ("note", common.note, "")],
}
# fmt: on


def vit_flops(batch: int, tokens: int, width: int, hidden: int) -> float:
    """Forward FLOPs of one pre-LN block: qkv + proj (4 w^2), MLP (2 w h), QK^T and PV (2 N^2 w each)."""
    return 2 * batch * tokens * (4 * width * width + 2 * width * hidden) + 4 * batch * tokens * tokens * width


def time_vit_block(name, backend, batch, args, rate) -> dict:
    import torch

    from llm2clip.models.vit import Block, ViTConfig

    dtype = common.torch_dtype(args.dtype)
    cfg = ViTConfig.preset(name, attn_backend=backend)
    tokens = cfg.grid_size**2 + cfg.num_prefix_tokens
    block = Block(cfg).to(device=args.device, dtype=dtype)
    x = torch.randn(batch, tokens, cfg.width, device=args.device, dtype=dtype, requires_grad=True)
    fwd = lambda: block(x)
    grad = torch.randn_like(fwd())
    bwd = lambda out, **kw: out.backward(grad, **kw)
    bwd(fwd())  # warm-up
    row = {
        "tokens": tokens,
        "width": cfg.width,
        "mlp_hidden": cfg.hidden_dim,
        "block": "llm2clip.models.vit.Block",
    }
    row["flops_fwd"] = vit_flops(batch, tokens, cfg.width, cfg.hidden_dim)
    if args.device == "cuda":
        mem = common.PeakMemory("cuda").start()
        bwd(fwd())
        row["peak_extra_mib"] = mem.mib()
    row.update(common.fwd_bwd_ms(fwd, bwd, [x, *block.parameters()], args.device, args, args.repeats))
    row["fwd_bwd_tflops"] = 3 * row["flops_fwd"] / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    row["fwd_tflops"] = row["flops_fwd"] / (row["fwd_ms"] * 1e-3) / 1e12
    return {**row, "pct_matmul": 100 * row["fwd_bwd_tflops"] / rate}


def vit_cases(args, rate):

    from llm2clip.models.attention import available_backends

    dtype = common.torch_dtype(args.dtype)
    for name in args.vit_models:
        for backend in args.backends or available_backends(args.device, dtype):
            for batch in args.vit_batches or VIT_BATCHES[args.device][name]:
                row = {"part": "vit", "model": name, "backend": backend, "batch": batch, "dtype": args.dtype}
                fn = partial(time_vit_block, name, backend, batch, args, rate)
                yield common.Case(row, fn, group=(name, backend), size=(batch,))


def caption_lengths(dist: str, n: int, seed: int, max_len: int) -> list[int]:
    """Token counts of n captions drawn from a named distribution (see the module docstring)."""
    rng = random.Random(seed)
    short = lambda: int(min(77, max(4, round(math.exp(rng.gauss(math.log(18), 0.45))))))
    dense = lambda: int(min(400, max(40, round(rng.gauss(150, 35)))))
    pick = {"short": short, "dense": dense, "mixed": lambda: short() if rng.random() < 0.5 else dense()}[dist]
    return [min(max_len, pick()) for _ in range(n)]


def time_llm(emb, batches, args) -> dict:
    import torch

    out = {}
    with torch.inference_mode():
        emb(batches[0])  # warm-up
        mem = common.PeakMemory(args.device).start() if args.device == "cuda" else None
        ts = common.timings(
            lambda: [emb(b) for b in batches], args.repeats, partial(common.sync, args.device), warm=False
        )
        if mem:
            out["peak_extra_mib"] = mem.mib()
    out["ms"], out["ms_p20"], out["ms_p80"] = common.ms_quantiles(ts)
    return out


def llm_case(emb, layout, lengths, ids, args) -> dict:
    from llm2clip.models.text_embedder import collate

    n, per = len(lengths), args.captions_per_batch
    order = sorted(range(n), key=lambda i: lengths[i]) if layout == "padded-sorted" else range(n)
    order = list(order)
    emb.config.packed_attention = "varlen" if layout == "packed-varlen" else "auto"
    batches = [
        collate([ids[i] for i in order[lo : lo + per]], packed=layout.startswith("packed")).to(args.device)
        for lo in range(0, n, per)
    ]
    real, slots = sum(lengths), sum(b.input_ids.numel() for b in batches)
    row = {
        "real_tokens": real,
        "token_slots": slots,
        "pad_fraction": 1 - real / slots,
        **time_llm(emb, batches, args),
    }
    return {**row, "tokens_per_s": real / (row["ms"] * 1e-3)}


def random_llama(shape: str, device, dtype, **config):
    """A random-weight LlamaModel of a named shape (LLM_SHAPES) on the device, in eval mode, with our
    attention; `config`: more LlamaConfig fields."""
    import torch
    import transformers

    from llm2clip.models.text_embedder import ATTN_IMPLEMENTATION

    cfg = transformers.LlamaConfig(**LLM_SHAPES[shape], attn_implementation=ATTN_IMPLEMENTATION, **config)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaModel._from_config(cfg, dtype=dtype).eval().requires_grad_(False)


def llm_cases(args):
    import torch

    from llm2clip.models.attention import available_backends
    from llm2clip.models.text_embedder import LLMTextEmbedder, TextEmbedderConfig

    dtype = common.torch_dtype(args.dtype)
    for shape in args.llm_models:
        try:
            model = random_llama(shape, args.device, dtype)
        except Exception as e:
            if not common.is_oom(e):
                raise
            yield common.Case({"part": "llm", "model": shape}, status="oom", note="model does not fit")
            continue
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        backends = args.backends or available_backends(args.device, dtype)
        if args.device == "cuda" and not args.backends:  # the selector's choice and SDPA (math: a reference)
            backends = list(dict.fromkeys([backends[0], "sdpa"]))
        for backend in backends:
            emb = LLMTextEmbedder(
                model,
                None,
                TextEmbedderConfig(dtype=common.DTYPES[args.dtype], attn_backend=backend, max_length=512),
            )
            for dist in args.dists:
                n = args.captions_per_batch * args.num_batches
                lengths = caption_lengths(dist, n, args.seed, emb.config.max_length)
                g = torch.Generator().manual_seed(args.seed)
                ids = [torch.randint(1, model.config.vocab_size, (k,), generator=g).tolist() for k in lengths]
                for layout in args.layouts:
                    row = dict(part="llm", model=shape, params_m=params_m, backend=backend, dist=dist,
                               layout=layout, dtype=args.dtype, captions=n, mean_len=sum(lengths) / n,
                               captions_per_batch=args.captions_per_batch, max_len=max(lengths))  # fmt: skip
                    yield common.Case(row, partial(llm_case, emb, layout, lengths, ids, args))
        del model, emb
        common.free_memory(args.device)


def speedups(rows) -> list[dict]:
    """packed (and padded-sorted) tokens/s over padded tokens/s, per model, backend and distribution."""
    by = {
        (r["model"], r["backend"], r["dist"], r["layout"]): r["tokens_per_s"]
        for r in rows
        if r.get("part") == "llm" and r.get("status") == "ok"
    }
    return [
        {"model": m, "backend": be, "dist": d, "layout": lay, "x_padded": tps / by[m, be, d, "padded"]}
        for (m, be, d, lay), tps in by.items()
        if lay != "padded" and by.get((m, be, d, "padded"))
    ]


def main(argv=None) -> int:
    std = ("device", "quick", "repeats", "warmup_ms", "rep_ms", "threads", "seed")
    args = common.parse(common.parser(__doc__, OPTIONS, std, plot=False), argv)
    gpu = args.device == "cuda"
    args.llm_models = args.llm_models or (("llama-3.2-1b", "llama-3-8b") if gpu else ("tiny",))
    args.dists = args.dists or (("short", "dense") if args.quick else DISTS)
    common.check_choices(
        ("--parts", args.parts, ("vit", "llm")), ("--layouts", args.layouts, LAYOUTS),
        ("--vit-models", args.vit_models, VIT_MODELS), ("--llm-models", args.llm_models, LLM_SHAPES),
        ("--dists", args.dists, DISTS),
    )  # fmt: skip
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.captions_per_batch = args.captions_per_batch or (128 if gpu else 16)
    args.num_batches = args.num_batches or (2 if args.quick or not gpu else 4)
    args.repeats = args.repeats or (2 if args.quick else 3)
    import transformers

    run = common.Run(
        "attention_throughput", args, argv, dtype=args.dtype, transformers=transformers.__version__
    )
    run.meta["target"] = f"GPU bf16 short captions: packed >= {TARGET_SPEEDUP}x padded tokens/s"
    run.meta["matmul_rate"] = rate = common.matmul_rate(
        args.device, common.torch_dtype(args.dtype), str(common.torch_dtype(args.dtype))
    )
    print(
        f"{run.meta['device_name']} ({args.device}), torch {run.meta['torch']}, transformers "
        f"{run.meta['transformers']}, git {run.meta['git_sha']}; matmul {rate['tflops']:.1f} TFLOP/s"
    )
    with run:
        if "vit" in args.parts:
            run.sweep(vit_cases(args, rate["tflops"]))
        if "llm" in args.parts:
            run.sweep(llm_cases(args))
    run.write(speedups=speedups(run.rows))
    text = []
    if vit := [r for r in run.rows if r["part"] == "vit"]:
        text += [
            "ViT block forward+backward (one block; TFLOP/s from the analytic count, % of the measured "
            "matmul rate)",
            common.table(vit, COLUMNS["vit"]),
        ]
    if llm := [r for r in run.rows if r["part"] == "llm"]:
        text += [
            f"LLM caption encoding, forward only ({args.captions_per_batch} captions per batch, real "
            "tokens/s)",
            common.table(llm, COLUMNS["llm"]),
        ]
        lines = ["speed-up over padded (tokens/s ratio):"]
        for s in run.doc["speedups"]:
            lines.append(
                f"  {s['model']:13s} {s['backend']:9s} {s['dist']:6s} {s['layout']:14s} {s['x_padded']:6.2f}x"
            )
            if s["layout"] == "packed" and s["dist"] == "short" and gpu:
                run.target(
                    f"packed >= {TARGET_SPEEDUP}x padded tokens/s (short captions, {s['model']}, "
                    f"{s['backend']})",
                    s["x_padded"],
                    s["x_padded"] >= TARGET_SPEEDUP,
                )
        text.append("\n".join(lines))
    return run.finish("\n\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
