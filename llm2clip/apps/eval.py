"""Evaluation of a stage-2 model: image-text retrieval and zero-shot classification.

    python -m llm2clip.eval --checkpoint runs/stage2/final \\
        --retrieval-shards 'data/heldout/{00000..00004}.tar' --retrieval-fields txt \\
        --embed-like caches/cc3m-llama3-8b-cc \\
        --zeroshot-shards data/fashion-mnist-test --classnames classes.txt --templates templates.json \\
        --out results.json

Held-out captions come from ``--eval-cache`` (precomputed, probe-checked against the training LLM
when ``--embed-like`` is given too) or are embedded on the fly by ``--embed-like CACHE``: the exact
LLM that filled that training cache (``llm2clip.models.text_recipe.embedder_like``). Metrics and
their definitions: ``llm2clip.evaluation``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm2clip.cache import VERIFY_MODES, CacheSpec, EmbeddingCache
from llm2clip.cache.manifest import check_spec
from llm2clip.cli import UsageError, parse_config, run
from llm2clip.cli import config_field as _f
from llm2clip.distributed import DEVICES
from llm2clip.evaluation import evaluate, format_table, load_retrieval_set, load_zeroshot_set, read_names
from llm2clip.files import atomic_write_json
from llm2clip.models.clip_model import CONFIG_NAME, ClipModel
from llm2clip.models.text_recipe import embedder_like

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalCliConfig:
    """What to evaluate, on which data, and how."""

    checkpoint: str = _f("", "A ClipModel.save() directory (config.json + weights).", required=True)
    retrieval_shards: list[str] | None = _f(
        None, "Held-out image-caption shards (paths, directories, globs, brace ranges).", nargs="+"
    )
    retrieval_fields: list[str] = _f(
        ("txt",), "Caption fields as for llm2clip.extract ('txt', 'json:key', 'NAME=SOURCE')."
    )
    eval_cache: str | None = _f(
        None, "Embedding cache of the held-out captions (llm2clip.extract run on the retrieval shards)."
    )
    embed_like: str | None = _f(
        None,
        "A training cache directory: embed captions and prompts on the fly with exactly the LLM that "
        "filled it (probe-checked); needed for zero-shot.",
    )
    zeroshot_shards: list[str] | None = _f(
        None, "Labelled image shards: an image and a <key>.cls member (0-based class index).", nargs="+"
    )
    classnames: str | None = _f(None, "Class names: JSON list or one per line.")
    templates: str | None = _f(
        None, "Prompt templates with '{}' or '{c}' for the class name: JSON list or one per line."
    )
    label_field: str = _f("cls", "Tar member holding the label.")
    image_size: int | None = _f(None, "Image side (default: the vision tower config's image_size).")
    batch_size: int = _f(256, "Images (and captions) per forward.")
    max_images: int | None = _f(None, "Use at most this many images of each evaluation set (shard order).")
    device: str = _f("auto", "auto: cuda when available, else cpu.", choices=DEVICES)
    precision: str = _f(
        "fp32", "Autocast dtype of the model's forward (fp32: no autocast).", choices=tuple(PRECISIONS)
    )
    verify_cache: str = _f(
        "lazy",
        "Cache integrity checks: lazy (index and probe at open, each block of rows when first read), "
        "full (every byte at open), off.",
        choices=VERIFY_MODES,
    )
    out: str | None = _f(None, "Write the results, arguments, counts and timing as JSON here.")


def _fail(msg: str) -> UsageError:
    return UsageError(msg)


def _check(args: EvalCliConfig) -> None:
    if not args.retrieval_shards and not args.zeroshot_shards:
        raise _fail("no evaluation data: give --retrieval-shards and/or --zeroshot-shards")
    if args.retrieval_shards and not (args.eval_cache or args.embed_like):
        raise _fail(
            "--retrieval-shards needs --eval-cache (precomputed) and/or --embed-like (embed on the fly)"
        )
    if args.zeroshot_shards and not (args.classnames and args.templates):
        raise _fail("--zeroshot-shards needs --classnames and --templates")
    if args.zeroshot_shards and not args.embed_like:
        raise _fail("zero-shot prompts are embedded on the fly: give --embed-like CACHE_DIR")
    for flag in ("batch_size", "image_size", "max_images"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise _fail(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not (Path(args.checkpoint) / CONFIG_NAME).is_file():
        raise _fail(
            f"{args.checkpoint} is not a checkpoint directory: no {CONFIG_NAME} "
            "(expected ClipModel.save() output)"
        )


def _open_cache(flag: str, path: str, model: ClipModel, verify: str) -> EmbeddingCache:
    """A cache the model's adapter can read: its width, and (when the checkpoint records it) the
    spec of the training cache, must match; the error names both sides."""
    cache = EmbeddingCache.open(path, verify=verify)
    width = model.config.adapter.input_dim
    if cache.dim != width:
        raise UsageError(
            f"{flag} {path} holds {cache.dim}-d LLM embeddings, but the model's adapter takes {width}-d "
            "ones: it was trained on another LLM's cache"
        )
    if model.config.text_spec is not None:
        check_spec(CacheSpec.from_dict(model.config.text_spec), cache.spec, path)
    return cache


def _text_sources(args: EvalCliConfig, model: ClipModel, device: torch.device):
    """(embedder or None, eval cache or None): both from the LLM the model was trained against."""
    embedder = eval_cache = None
    if args.embed_like:
        _open_cache("--embed-like", args.embed_like, model, args.verify_cache)
        embedder = embedder_like(args.embed_like, device)
    if args.eval_cache:
        eval_cache = _open_cache("--eval-cache", args.eval_cache, model, args.verify_cache)
        if embedder is not None:
            with torch.inference_mode():
                eval_cache.verify_probe(embedder.encode)
    return embedder, eval_cache


def _load_sets(args: EvalCliConfig, image_size: int, embedder, eval_cache, seconds: dict):
    retrieval = zeroshot = None
    try:
        if args.retrieval_shards:
            t0 = time.perf_counter()
            retrieval = load_retrieval_set(
                args.retrieval_shards, args.retrieval_fields, image_size,
                cache=eval_cache, embedder=embedder, max_images=args.max_images,
            )  # fmt: skip
            seconds["load_retrieval"] = time.perf_counter() - t0
        if args.zeroshot_shards:
            t0 = time.perf_counter()
            classnames, templates = read_names(args.classnames), read_names(args.templates)
            zeroshot = load_zeroshot_set(
                args.zeroshot_shards, image_size, classnames, templates, embedder,
                label_field=args.label_field, max_images=args.max_images,
            )  # fmt: skip
            seconds["load_zeroshot"] = time.perf_counter() - t0
    except ValueError as e:
        raise _fail(str(e)) from e
    return retrieval, zeroshot


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the dict written to --out."""
    args = parse_config(
        EvalCliConfig, argv, prog="python -m llm2clip.eval",
        description="Evaluate a stage-2 checkpoint: image-text retrieval on held-out captioned shards "
        "and/or zero-shot classification on labelled shards.",
    )  # fmt: skip
    t_start = time.perf_counter()
    _check(args)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else None

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = ClipModel.load(args.checkpoint, map_location=device)
    seconds["load_model"] = time.perf_counter() - t0
    image_size = args.image_size or getattr(getattr(model.visual, "config", None), "image_size", None)
    if image_size is None:
        raise _fail("the vision tower has no config.image_size: give --image-size")
    t0 = time.perf_counter()
    embedder, eval_cache = _text_sources(args, model, device)
    seconds["load_embedder"] = time.perf_counter() - t0
    retrieval, zeroshot = _load_sets(args, image_size, embedder, eval_cache, seconds)

    t0 = time.perf_counter()
    results = evaluate(
        model, retrieval, zeroshot, device=device, batch_size=args.batch_size, autocast=autocast
    )
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    print(format_table(results), flush=True)
    counts = {
        name: s.counts for name, s in (("retrieval", retrieval), ("zeroshot", zeroshot)) if s is not None
    }
    out = {"args": asdict(args), "device": str(device), "image_size": image_size, "results": results,
           "counts": counts, "seconds": seconds}  # fmt: skip
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    run(main, "llm2clip.eval")
