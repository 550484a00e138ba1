"""Evaluation of a stage-2 model: image-text retrieval and zero-shot classification on our shards,
CLIP_benchmark's wds eval sets, long-caption sets and multilingual (XM3600) retrieval.

    python -m llm2clip.eval --checkpoint runs/stage2/final \\
        --retrieval-shards 'data/heldout/{00000..00004}.tar' --retrieval-fields txt \\
        --clip-benchmark data/wds_flickr30k data/wds_imagenet1k \\
        --long-captions data/urban1k/captions.json --max-length 1024 \\
        --xm3600 data/xm3600 --languages en de zh --out results.json

The checkpoint is a bundle (a run's ``final/``, or ``python -m llm2clip.export --format bundle``):
its recorded LLM (probe-checked) embeds captions and prompts on the fly, or a plain
ClipModel.save() folder with ``--embed-like CACHE``: the exact LLM that filled that training cache
(``llm2clip.models.text_recipe.embedder_like``). Held-out shard captions may also come from
``--eval-cache`` (precomputed). Every set's result names its dataset, split, image and caption
counts, the metric definitions and chance levels; docs/evaluation.md has the layouts and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm2clip.bundle import is_bundle
from llm2clip.bundle import load as load_bundle
from llm2clip.cache import VERIFY_MODES, CacheSpec, EmbeddingCache
from llm2clip.cache.manifest import check_spec
from llm2clip.cli import UsageError, parse_config, run
from llm2clip.cli import config_field as _f
from llm2clip.distributed import DEVICES
from llm2clip.evaluation import (
    evaluate,
    format_table,
    load_retrieval_set,
    load_set,
    load_zeroshot_set,
    read_names,
)
from llm2clip.evaluation.multilingual import CAPTION_CHOICES
from llm2clip.evaluation.specs import SetSpec
from llm2clip.files import atomic_write_json
from llm2clip.models.clip_model import CONFIG_NAME, ClipModel
from llm2clip.models.text_recipe import embedder_like

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalCliConfig:
    """What to evaluate, on which data, and how."""

    checkpoint: str = _f(
        "", "A bundle (a run's final/) or a ClipModel.save() folder (then give --embed-like).", required=True
    )
    llm: str | None = _f(None, "Where the bundle's LLM is on this machine (default: the path it records).")
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
        "filled it (probe-checked); default with a bundle: its recorded LLM.",
    )
    zeroshot_shards: list[str] | None = _f(
        None, "Labelled image shards: an image and a <key>.cls member (0-based class index).", nargs="+"
    )
    classnames: str | None = _f(None, "Class names: JSON list or one per line.")
    templates: str | None = _f(
        None, "Prompt templates with '{}' or '{c}' for the class name: JSON list or one per line."
    )
    label_field: str = _f("cls", "Tar member holding the label.")
    clip_benchmark: list[str] | None = _f(
        None,
        "Local CLIP_benchmark wds eval sets (ROOT/SPLIT/nshards.txt, N.tar, classnames.txt, ...).",
        nargs="+",
    )
    split: str = _f("test", "Split of the --clip-benchmark sets.")
    recall_k: tuple[int, ...] = _f((1, 5, 10), "Recall cut-offs k of every retrieval set.", type=int)
    long_captions: list[str] | None = _f(
        None, "Long-caption sets: JSON / JSON-lines of {image, caption} or Urban-1k folders.", nargs="+"
    )
    long_images: str | None = _f(None, "Image folder of the --long-captions JSON (default: its folder).")
    long_split: str | None = _f(None, "Keep only records whose 'split' is this (DOCCI: test).")
    xm3600: str | None = _f(None, "An XM3600 folder (captions.jsonl, images/): retrieval per language.")
    languages: list[str] | None = _f(None, "XM3600 languages (default: all).", nargs="+")
    xm3600_captions: str = _f(
        "first", "XM3600 captions per language (first: CLIP_benchmark's).", choices=CAPTION_CHOICES
    )
    max_length: int | None = _f(
        None, "Tokens per caption when embedding on the fly (default: the recipe's); truncations are counted."
    )
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

    @property
    def extra_sets(self) -> list[SetSpec]:
        specs = [SetSpec("clip_benchmark", p) for p in self.clip_benchmark or ()]
        specs += [SetSpec("long", p) for p in self.long_captions or ()]
        return specs + ([SetSpec("xm3600", self.xm3600)] if self.xm3600 else [])


def _fail(msg: str) -> UsageError:
    return UsageError(msg)


def _needs_embedder(args: EvalCliConfig) -> bool:
    return bool(args.zeroshot_shards or args.extra_sets or (args.retrieval_shards and not args.eval_cache))


def _check(args: EvalCliConfig) -> None:
    if not (args.retrieval_shards or args.zeroshot_shards or args.extra_sets):
        raise _fail(
            "no evaluation data: give --retrieval-shards, --zeroshot-shards, --clip-benchmark, "
            "--long-captions and/or --xm3600"
        )
    if not (Path(args.checkpoint) / CONFIG_NAME).is_file():
        raise _fail(
            f"{args.checkpoint} is not a checkpoint directory: no {CONFIG_NAME} "
            "(expected a bundle or ClipModel.save() output)"
        )
    bundle = is_bundle(args.checkpoint)
    if args.llm and not bundle:
        raise _fail(f"--llm applies to bundles; {args.checkpoint} is a plain ClipModel folder")
    if _needs_embedder(args) and not (args.embed_like or bundle):
        what = "--retrieval-shards without --eval-cache" if not args.zeroshot_shards else "zero-shot prompts"
        if args.extra_sets:
            what = "--clip-benchmark / --long-captions / --xm3600 captions"
        raise _fail(
            f"{what} are embedded on the fly: give --embed-like CACHE_DIR (or evaluate a bundle, "
            "which records its LLM)"
        )
    if args.zeroshot_shards and not (args.classnames and args.templates):
        raise _fail("--zeroshot-shards needs --classnames and --templates")
    for flag in ("batch_size", "image_size", "max_images", "max_length"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise _fail(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if any(k < 1 for k in args.recall_k):
        raise _fail(f"--recall-k values must be >= 1, got {list(args.recall_k)}")


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


def _model_and_text(args: EvalCliConfig, device: torch.device, seconds: dict):
    """(ClipModel, embedder or None, eval cache or None), all of the LLM the model was trained against."""
    t0 = time.perf_counter()
    embedder = eval_cache = None
    if is_bundle(args.checkpoint) and not args.embed_like and _needs_embedder(args):
        bundle = load_bundle(args.checkpoint, device, llm=args.llm)  # the recorded LLM, probe-checked
        model, embedder = bundle.clip, bundle.embedder
    else:
        model = ClipModel.load(args.checkpoint, map_location=device)
        if args.embed_like:
            _open_cache("--embed-like", args.embed_like, model, args.verify_cache)
            embedder = embedder_like(args.embed_like, device)
    seconds["load_model"] = time.perf_counter() - t0
    if args.eval_cache:
        eval_cache = _open_cache("--eval-cache", args.eval_cache, model, args.verify_cache)
        if embedder is not None:
            with torch.inference_mode():
                eval_cache.verify_probe(embedder.encode)
    return model, embedder, eval_cache


def _load_sets(args: EvalCliConfig, image_size: int, embedder, eval_cache, seconds: dict) -> dict:
    """{name: set} of every set asked for ('retrieval' and 'zeroshot' for our shards)."""
    sets: dict = {}
    common = dict(max_images=args.max_images, max_length=args.max_length)
    try:
        if args.retrieval_shards:
            t0 = time.perf_counter()
            sets["retrieval"] = load_retrieval_set(
                args.retrieval_shards, args.retrieval_fields, image_size, cache=eval_cache,
                embedder=None if eval_cache is not None else embedder, **common,
            )  # fmt: skip
            seconds["load_retrieval"] = time.perf_counter() - t0
        if args.zeroshot_shards:
            t0 = time.perf_counter()
            classnames, templates = read_names(args.classnames), read_names(args.templates)
            sets["zeroshot"] = load_zeroshot_set(
                args.zeroshot_shards, image_size, classnames, templates, embedder,
                label_field=args.label_field, **common,
            )  # fmt: skip
            seconds["load_zeroshot"] = time.perf_counter() - t0
        for spec in args.extra_sets:
            t0 = time.perf_counter()
            split = args.split if spec.kind == "clip_benchmark" else args.long_split
            name, s = load_set(
                spec, image_size, embedder, split=split, languages=args.languages,
                xm3600_captions=args.xm3600_captions, images_root=args.long_images, **common,
            )  # fmt: skip
            if name in sets:
                raise ValueError(f"two evaluation sets are named {name!r}")
            sets[name] = s
            seconds[f"load {name}"] = time.perf_counter() - t0
    except ValueError as e:
        raise _fail(str(e)) from e
    return sets


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the dict written to --out."""
    args = parse_config(
        EvalCliConfig, argv, prog="python -m llm2clip.eval",
        description="Evaluate a stage-2 model: retrieval and zero-shot classification on held-out shards, "
        "CLIP_benchmark wds sets, long-caption sets and multilingual (XM3600) retrieval.",
    )  # fmt: skip
    t_start = time.perf_counter()
    _check(args)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else None

    seconds: dict[str, float] = {}
    model, embedder, eval_cache = _model_and_text(args, device, seconds)
    image_size = args.image_size or getattr(getattr(model.visual, "config", None), "image_size", None)
    if image_size is None:
        raise _fail("the vision tower has no config.image_size: give --image-size")
    sets = _load_sets(args, image_size, embedder, eval_cache, seconds)
    del embedder  # the sets hold the caption embeddings: free the LLM before the vision forward

    t0 = time.perf_counter()
    results = evaluate(
        model, sets=sets, device=device, batch_size=args.batch_size, autocast=autocast,
        retrieval_ks=args.recall_k,
    )  # fmt: skip
    seconds["evaluate"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    print(format_table(results), flush=True)
    out = {"args": asdict(args), "device": str(device), "image_size": image_size, "results": results,
           "counts": {name: s.counts for name, s in sets.items()}, "seconds": seconds}  # fmt: skip
    if args.out:
        atomic_write_json(args.out, out)
    return out


if __name__ == "__main__":
    run(main, "llm2clip.eval")
