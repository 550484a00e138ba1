"""Extraction throughput: captions/s and tokens/s of llm2clip.extraction's pipeline, packed vs padded.

The extraction pipeline's own functions on synthetic captions: per "shard" a background thread
plans length-sorted batches within --tokens-per-batch and collates them (pinned on CUDA), the main
thread copies each batch to the GPU and launches forward + pooling with no host sync, one
device->host copy per shard. Random weights: Llama-3.2-1B / Llama-3-8B shapes (bf16) on a GPU, a
tiny shape on the CPU. Caption lengths: half short (~18 tokens, CC3M-like), half dense (~120,
ShareGPT4V-like), plus the template. Modes (same token budget): ``packed`` (extraction's default:
no pad tokens), ``padded-sorted`` (its --padded), ``padded-unsorted`` (the official LLM2CLIP
extraction: data order, a fixed number of captions per batch, padded).

Columns: captions/s and tokens/s (real tokens; wall time over --shards shards after a warm-up
shard), slots/tok (padded slots per real token), TFLOP/s (2 * non-embedding params * tokens /
time), busy (GPU-only time of the same batches / pipeline time), packed x (packed captions/s over
this mode's). Targets (GPU): packed >= 1.5x padded-unsorted captions/s; busy >= 0.95. Not
measured here: tar reading, tokenization (synthetic ids) and the cache write.

    python bench/extract_throughput.py                    # GPU: 1B and 8B shapes, ~3 minutes
    python bench/extract_throughput.py --quick            # GPU: 1B only; CPU: tiny shape, ~30 s
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/extract_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402
from bench.attention_throughput import LLM_SHAPES, random_llama  # noqa: E402

MODES = ("packed", "padded-sorted", "padded-unsorted")
TARGET_X, TARGET_BUSY = 1.5, 0.95
# fmt: off
OPTIONS = [
    ("--shapes", common.str_list, None, f"shapes from {tuple(LLM_SHAPES)} (default GPU 1B and 8B, CPU tiny)"),
    ("--captions", int, None, "captions per shard (default 8192 GPU (quick 4096), 256 CPU (quick 64))"),
    ("--shards", int, None, "timed shards, plus one warm-up (default 4; 2 --quick)"),
    ("--tokens-per-batch", int, None, "batch budget (default 32768 GPU, 2048 CPU)"),
    ("--max-length", int, 512, "longest caption in tokens"),
    ("--dtype", str, None, "bfloat16 (GPU default) or float32 (CPU default)"),
]
COLUMNS = [
    ("shape", "shape", ""), ("mode", "mode", ""), ("captions/s", "captions_per_s", ",.0f"),
    ("tokens/s", "tokens_per_s", ",.0f"), ("slots/tok", lambda r: r["slots"] / r["tokens"], ".2f"),
    ("TFLOP/s", "tflops", ".2f"), ("busy", "busy", ".2f"), ("packed x", "packed_x", ".2f"),
    ("note", common.note, ""),
]
# fmt: on


def make_embedder(shape: str, device: str, dtype: str, tokens_per_batch: int, max_length: int):
    """A random-weight Llama of the named shape wrapped as the extraction's LLMTextEmbedder."""
    from llm2clip.models.text_embedder import LLMTextEmbedder, TextEmbedderConfig

    cfg = TextEmbedderConfig(dtype=dtype, tokens_per_batch=tokens_per_batch, max_length=max_length)
    model = random_llama(shape, device, cfg.torch_dtype, max_position_embeddings=8192, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return LLMTextEmbedder(model, None, cfg), n_params, model.config.vocab_size


def synthetic_captions(n: int, vocab: int, max_length: int, seed: int):
    """Token id lists: half short (~18 tokens), half dense (~120), plus an 8-token template."""
    import numpy as np

    rng = np.random.default_rng(seed)
    short = np.clip(rng.normal(18, 6, n // 2), 5, 77)
    dense = np.clip(rng.normal(120, 40, n - n // 2), 20, max_length - 9)
    lengths = rng.permutation(np.concatenate([short, dense]).astype(int) + 9)  # BOS + template
    ids = [[1, *rng.integers(10, vocab, size=int(k) - 1).tolist()] for k in lengths]
    return ids, [[False] * 9 + [True] * (len(x) - 9) for x in ids]


def plan_unsorted(embedder, ids, masks, per_batch: int, pin: bool):
    """The official LLM2CLIP baseline's batches: data order, a fixed number of captions, padded."""
    import torch

    from llm2clip.models.text_embedder import collate

    out = []
    for lo in range(0, len(ids), per_batch):
        chunk = list(range(lo, min(lo + per_batch, len(ids))))
        b = collate([ids[i] for i in chunk], [masks[i] for i in chunk], packed=False, pad_id=embedder.pad_id)
        index = torch.tensor(chunk, dtype=torch.long)
        if pin:
            b.input_ids, b.attention_mask = b.input_ids.pin_memory(), b.attention_mask.pin_memory()
            b.weights, index = b.weights.pin_memory(), index.pin_memory()
        out.append((index, b))
    return out


def run_mode(embedder, shards, mode: str, device: str, rows: list) -> dict:
    """Pipeline wall time over the shards (after one warm-up) and GPU-only time of the same batches.
    padded-unsorted takes the packed mode's mean captions per batch (about as many forward calls)."""
    from llm2clip.extraction import launch_batches, plan_batches, prefetch, to_host

    pin = device == "cuda"
    packed = [r for r in rows if r["mode"] == "packed" and r.get("batches")]
    per_batch = max(1, round(packed[-1]["captions"] / packed[-1]["batches"])) if packed else 64

    def plan(ids, masks):
        if mode == "padded-unsorted":
            return plan_unsorted(embedder, ids, masks, per_batch, pin)
        return plan_batches(embedder, ids, masks, packed=mode == "packed", pin=pin)

    def pipeline(shard_list):
        pending = None
        for n, batches in prefetch(((len(ids), plan(ids, m)) for ids, m in shard_list), maxsize=2):
            host, ev = to_host(launch_batches(embedder, batches, n))
            if pending is not None and pending[1] is not None:
                pending[1].synchronize()  # the writer thread's wait, one shard behind
            pending = (host, ev)
        if pending is not None and pending[1] is not None:
            pending[1].synchronize()

    pipeline(shards[:1])  # warm-up (kernels, allocator)
    common.sync(device)
    t0 = time.perf_counter()
    pipeline(shards[1:])
    common.sync(device)
    wall = time.perf_counter() - t0
    plans = [(len(ids), plan(ids, masks)) for ids, masks in shards[1:]]
    on_device = [(n, [(i.to(device), b.to(device)) for i, b in bs]) for n, bs in plans]
    common.sync(device)
    t0 = time.perf_counter()
    for n, bs in on_device:
        launch_batches(embedder, bs, n)
    common.sync(device)
    gpu = time.perf_counter() - t0
    captions, tokens = sum(n for n, _ in plans), sum(b.num_tokens for _, bs in plans for _, b in bs)
    slots, batches = (
        sum(b.input_ids.numel() for _, bs in plans for _, b in bs),
        sum(len(bs) for _, bs in plans),
    )
    rates = dict(captions_per_s=captions / wall, tokens_per_s=tokens / wall, busy=min(1.0, gpu / wall))
    return dict(
        captions=captions, tokens=tokens, slots=slots, batches=batches, seconds=wall, gpu_seconds=gpu, **rates
    )


def cases(run, args, n, budget):
    for shape in args.shapes:
        embedder, n_params, vocab = make_embedder(shape, args.device, args.dtype, budget, args.max_length)
        shards = [synthetic_captions(n, vocab, args.max_length, seed) for seed in range(args.shards + 1)]
        for mode in MODES:
            row = {
                "shape": shape,
                "mode": mode,
                "dtype": args.dtype,
                "params": n_params,
                "tokens_per_batch": budget,
            }
            yield common.Case(row, partial(run_mode, embedder, shards, mode, args.device, run.rows))
        del embedder
        common.free_memory(args.device)


def main(argv=None) -> int:
    args = common.parse(common.parser(__doc__, OPTIONS, ("device", "quick"), plot=False), argv)
    gpu = args.device == "cuda"
    large = ("llama-3.2-1b",) if args.quick else ("llama-3.2-1b", "llama-3-8b")
    args.shapes = args.shapes or (large if gpu else ("tiny",))
    n = args.captions or ((4096 if args.quick else 8192) if gpu else (64 if args.quick else 256))
    budget = args.tokens_per_batch or (32768 if gpu else 2048)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.shards = args.shards or (2 if args.quick else 4)
    run = common.Run("extract_throughput", args, argv)
    with run:
        run.sweep(cases(run, args, n, budget))
    for r in run.rows:
        if r["status"] == "ok":
            r["tflops"] = 2 * r["params"] * r["tokens"] / r["seconds"] / 1e12
            packed = next(p for p in run.rows if (p["shape"], p["mode"]) == (r["shape"], "packed"))
            if r["mode"] != "packed" and packed["status"] == "ok":
                r["packed_x"] = packed["captions_per_s"] / r["captions_per_s"]
    for r in run.rows if gpu else ():
        if r["mode"] == "padded-unsorted" and r.get("packed_x") is not None:
            run.target(
                f"packed >= {TARGET_X}x padded-unsorted captions/s ({r['shape']})",
                r["packed_x"],
                r["packed_x"] >= TARGET_X,
            )
        if r["mode"] == "packed" and r["status"] == "ok":
            run.target(f"busy >= {TARGET_BUSY} ({r['shape']}, packed)", r["busy"], r["busy"] >= TARGET_BUSY)
    head = (
        f"extraction throughput ({args.dtype}, {n} captions x {args.shards} shards, budget {budget} tokens)"
    )
    return run.finish(head + "\n" + common.table(run.rows, COLUMNS))


if __name__ == "__main__":
    sys.exit(main())
