"""Extraction throughput: captions/s and tokens/s of llm2clip.extraction's pipeline, packed vs padded.

What runs: the extraction pipeline's own functions (llm2clip.extraction) on synthetic captions, i.e.
per "shard" a background thread plans length-sorted batches within --tokens-per-batch and collates
them (pinned on CUDA) -> the main thread copies each batch to the GPU and launches the forward +
pooling with no host sync -> one device->host copy per shard (pinned, an event). Weights are
random (no downloads): Llama-3.2-1B and Llama-3-8B shapes (bf16) on a GPU, a tiny shape on the
CPU (--quick or --device cpu). Tokens are random ids; caption lengths mix short captions
(~18 tokens, CC3M-like) and dense ones (~120 tokens, ShareGPT4V-like), half each, plus the template.

Modes (same --tokens-per-batch budget):
    packed            extraction's default: length-sorted, no pad tokens (varlen / repad attention)
    padded-sorted     extraction's --padded: length-sorted, padded to each batch's longest caption
    padded-unsorted   the official LLM2CLIP extraction: data order, a fixed number of captions per
                      batch (the packed mode's mean, so about as many forward calls), padded

Columns:
    captions/s, tokens/s   real (non-pad) tokens; the pipeline's wall time over --shards shards
                           after one warm-up shard
    slots/tok              padded slots computed per real token (1.00 packed)
    TFLOP/s                2 * (non-embedding params) * real tokens / time (attention not counted)
    busy                   time of the same batches already on the GPU, synchronised once /
                           pipeline time: the fraction of the wall time the GPU had work queued
    packed x               packed captions/s over this mode's, same shape

Target: packed >= 1.5x padded-unsorted captions/s at the default length mix (short and dense
captions in one batch pad to ~2x the real tokens), and busy >= 0.95 on a GPU. Against
padded-sorted the gain is bounded by its slots/tok (length sorting already removes most padding:
~1.1-1.2 here), so expect ~1.1x there. What overlaps: tar reading, tokenization, batch planning, collation and
pinning of shard k+1 (reader thread) with the GPU work of shard k; the collation of batch j+1
and its launch with batch j on the GPU (non-blocking copies, no sync inside a shard); the
device->host copy and the cache write of shard k (writer thread) with shard k+1. Not measured
here: tar reading and tokenization (synthetic ids), and the cache write.

    python bench/extract_throughput.py                    # GPU: 1B and 8B shapes, ~3 minutes
    python bench/extract_throughput.py --quick            # GPU: 1B only; CPU: tiny shape, ~30 s
    python bench/extract_throughput.py --device cpu --quick

Writes a table to stdout and extract_throughput-<device>-<card>-<time>.json into --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as bench/extract_throughput.py
    sys.path.append(str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

SHAPES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256),
    "llama-3-8b": (4096, 32, 32, 8, 14336, 128256),
    "tiny": (128, 2, 4, 2, 256, 1000),
}


def make_embedder(shape: str, device: str, dtype: str, tokens_per_batch: int, max_length: int):
    """A random-weight Llama of the named shape wrapped as the extraction's LLMTextEmbedder."""
    import torch
    import transformers

    from llm2clip.models.text_embedder import ATTN_IMPLEMENTATION, LLMTextEmbedder, TextEmbedderConfig

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    cfg = TextEmbedderConfig(dtype=dtype, tokens_per_batch=tokens_per_batch, max_length=max_length)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModel.from_config(
            config, dtype=cfg.torch_dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return LLMTextEmbedder(model, None, cfg), n_params, vocab


def synthetic_captions(n: int, vocab: int, max_length: int, seed: int):
    """Token id lists: half short (~18 tokens), half dense (~120), plus an 8-token template."""
    import numpy as np

    rng = np.random.default_rng(seed)
    short = np.clip(rng.normal(18, 6, n // 2), 5, 77)
    dense = np.clip(rng.normal(120, 40, n - n // 2), 20, max_length - 9)
    lengths = rng.permutation(np.concatenate([short, dense]).astype(int) + 9)  # BOS + template
    ids = [[1, *rng.integers(10, vocab, size=int(k) - 1).tolist()] for k in lengths]
    masks = [[False] * 9 + [True] * (len(x) - 9) for x in ids]
    return ids, masks


MODES = ("packed", "padded-sorted", "padded-unsorted")


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
            b.input_ids = b.input_ids.pin_memory()
            b.attention_mask = b.attention_mask.pin_memory()
            b.weights = b.weights.pin_memory()
            index = index.pin_memory()
        out.append((index, b))
    return out


def run_mode(embedder, shards, mode: str, device: str, per_batch: int) -> dict:
    """Pipeline wall time over the shards (after one warm-up) and GPU-only time of the same batches.

    per_batch: captions per batch of padded-unsorted (the packed mode's mean, so both make about
    as many forward calls).
    """
    from llm2clip.extraction import launch_batches, plan_batches, prefetch, to_host

    pin = device == "cuda"

    def plan(ids, masks):
        if mode == "padded-unsorted":
            return plan_unsorted(embedder, ids, masks, per_batch, pin)
        return plan_batches(embedder, ids, masks, packed=mode == "packed", pin=pin)

    def planned(shard_list):
        for ids, masks in shard_list:
            yield len(ids), plan(ids, masks)

    def pipeline(shard_list):
        pending = None
        for n, batches in prefetch(planned(shard_list), maxsize=2):
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
    captions = sum(n for n, _ in plans)
    tokens = sum(b.num_tokens for _, bs in plans for _, b in bs)
    slots = sum(b.input_ids.numel() for _, bs in plans for _, b in bs)
    return {
        "mode": mode,
        "captions": captions,
        "tokens": tokens,
        "slots": slots,
        "batches": sum(len(bs) for _, bs in plans),
        "seconds": wall,
        "gpu_seconds": gpu,
        "captions_per_s": captions / wall,
        "tokens_per_s": tokens / wall,
        "busy": min(1.0, gpu / wall),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_device_arg(p)
    p.add_argument(
        "--shapes",
        type=common.str_list,
        default=None,
        help=f"model shapes from {tuple(SHAPES)} (default: 1B and 8B on GPU, tiny on CPU)",
    )
    p.add_argument("--quick", action="store_true", help="GPU: 1B only, fewer captions; CPU: a few seconds")
    p.add_argument(
        "--captions", type=int, default=None, help="captions per shard (default 8192 GPU, 256 CPU)"
    )
    p.add_argument(
        "--shards", type=int, default=None, help="timed shards, plus one warm-up (default 4; 2 --quick)"
    )
    p.add_argument(
        "--tokens-per-batch", type=int, default=None, help="batch budget (default 32768 GPU, 2048 CPU)"
    )
    p.add_argument("--max-length", type=int, default=512, help="longest caption in tokens")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    common.add_output_args(p, "output directory for the JSON", plot=False)
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    gpu = device == "cuda"
    shapes = args.shapes or (
        ("llama-3.2-1b",) if gpu and args.quick else ("llama-3.2-1b", "llama-3-8b") if gpu else ("tiny",)
    )
    n = args.captions or (8192 if gpu and not args.quick else 4096 if gpu else 64 if args.quick else 256)
    budget = args.tokens_per_batch or (32768 if gpu else 2048)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.shards = args.shards or (2 if args.quick else 4)
    rows = []
    for shape in shapes:
        embedder, n_params, vocab = make_embedder(shape, device, dtype, budget, args.max_length)
        shards = [synthetic_captions(n, vocab, args.max_length, seed) for seed in range(args.shards + 1)]
        by_mode = {}
        per_batch = 64
        for mode in MODES:
            try:
                r = run_mode(embedder, shards, mode, device, per_batch)
            except Exception as e:
                if not common.is_oom(e):
                    raise
                r = {"mode": mode, "error": "OOM"}
            if mode == "packed" and "error" not in r:
                per_batch = max(1, round(r["captions"] / r["batches"]))
            r.update(shape=shape, dtype=dtype, params=n_params, tokens_per_batch=budget)
            if "error" not in r:
                r["tflops"] = 2 * n_params * r["tokens"] / r["seconds"] / 1e12
            by_mode[r["mode"]] = r
            rows.append(r)
            common.free_memory(device)
        for mode in MODES[1:]:
            a, b = by_mode["packed"], by_mode[mode]
            if "error" not in a and "error" not in b:
                b["packed_x"] = a["captions_per_s"] / b["captions_per_s"]
        del embedder
        common.free_memory(device)

    meta = common.device_meta(device)
    print(f"\nextraction throughput on {meta['device_name']} ({dtype}, {n} captions x {args.shards} shards, "
          f"budget {budget} tokens)")  # fmt: skip
    print(f"{'shape':>14} {'mode':>15} {'captions/s':>11} {'tokens/s':>11} {'slots/tok':>9} {'TFLOP/s':>8} "
          f"{'busy':>5} {'packed x':>8}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>14} {r['mode']:>15} {r['error']:>11}")
            continue
        print(
            f"{r['shape']:>14} {r['mode']:>15} {r['captions_per_s']:>11,.0f} {r['tokens_per_s']:>11,.0f} "
            f"{r['slots'] / r['tokens']:>9.2f} {r['tflops']:>8.2f} {r['busy']:>5.2f} "
            f"{common.fmt(r.get('packed_x'), '>8.2f')}"
        )
    import torch

    doc = {
        "benchmark": "extract_throughput",
        "timestamp": common.utc_timestamp(),
        "device": device,
        **meta,
        "torch": torch.__version__,
        **common.git_meta(),
        "loadavg": common.loadavg(),
        "config": common.config_of(args),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = common.result_stem(
        "extract_throughput",
        device,
        common.card_tag(meta["device_name"], device),
        args.tag,
        common.file_stamp(),
    )
    path = args.out / f"{stem}.json"
    common.write_json_atomic(path, doc)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
