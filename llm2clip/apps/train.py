"""Stage 2 of LLM2CLIP: train the vision tower + adapter against cached LLM caption embeddings.

    torchrun --nproc_per_node=8 -m llm2clip.train --fused-loss \\
        --train-shards 'data/cc3m/{00000..00331}.tar' --cache caches/cc3m --fields short dense \\
        --vision B/16 --batch-size 16384 --chunk-size 1024 --epochs 4 --output-dir runs/stage2
    python -m llm2clip.train ...            # one process (one GPU, or the CPU)

This module only assembles the trainer's components (``llm2clip.training``: config sections,
TrainStep, CheckpointManager, MetricsLogger, SkipTracker, PeriodicEval; ``llm2clip.data.stream``;
``llm2clip.cache.DeviceRows``) and runs the loop. What a step does, the outputs of a run and how
resuming works: docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llm2clip.cache import CacheError, EmbeddingCache
from llm2clip.cache.device import DeviceRows
from llm2clip.cli import UsageError, build_parser, run
from llm2clip.cli import parse_config as _parse
from llm2clip.data.device_decode import finish_batch, resolve_decode
from llm2clip.data.fields import FieldSpec
from llm2clip.data.images import normalize_images
from llm2clip.data.shards import ReadPolicy, expand_shards
from llm2clip.data.sizes import nominal_sizes, shard_sizes
from llm2clip.data.stream import SKIP_REASONS, ShardImageDataset
from llm2clip.distributed import DistInfo, broadcast_object, distributed_session, print0
from llm2clip.files import atomic_write_json
from llm2clip.models.clip_model import ClipModel
from llm2clip.models.text_recipe import SUMMARY_FILE
from llm2clip.progress import Progress
from llm2clip.training.checkpoint import CheckpointManager
from llm2clip.training.config import TrainConfig
from llm2clip.training.evaluator import PeriodicEval
from llm2clip.training.losses import make_loss
from llm2clip.training.metrics import MetricsLogger, StepFlops, forward_flops, peak_bf16_flops
from llm2clip.training.model import build_model, cache_mean, fresh_like
from llm2clip.training.optim import lr_schedule, param_groups
from llm2clip.training.parallel import full_state, scalar_value, wrap_model
from llm2clip.training.recipes import RECIPES, check_cache, describe, given_dests, record, resolve_batch
from llm2clip.training.rng import seed_everything
from llm2clip.training.skips import SkipTracker
from llm2clip.training.step import NonFiniteParameters, StepStats, TrainStep

# Config fields that a resumed run must share with its checkpoint (they change what is trained).
RESUME_MUST_MATCH = (
    "model.vision", "model.vision_overrides", "model.image_size", "model.embed_dim", "model.adapter_depth",
    "model.center_text", "loss.kind", "data.batch_size", "seed", "model.init_vision",
    "model.init_vision_proj",
)  # fmt: skip
SHOWN = ("loss", "lr", "logit_scale", "samples_per_s", "max_mem_gib", "mfu")  # on the progress line


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The run's config; --recipe NAME replaces the defaults of the flags it sets (training/recipes.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "python -m llm2clip.train"
    recipe = vars(build_parser(TrainConfig, prog, "").parse_args(argv))["recipe.recipe"]
    defaults = {dest: s.value for dest, s in RECIPES[recipe].items()} if recipe else None
    cfg = _parse(
        TrainConfig, argv, prog=prog, defaults=defaults,
        description="Stage 2 of LLM2CLIP: train a CLIP vision tower and text adapter against cached LLM "
        "caption embeddings (torchrun for several processes).",
    )  # fmt: skip
    try:
        return record(cfg, given_dests(TrainConfig, argv))
    except ValueError as e:
        raise UsageError(str(e)) from e


def cache_fields(cache_dir: str) -> tuple[str, ...]:
    """The caption fields an extraction stored (its summary beside the cache)."""
    summary = Path(cache_dir) / SUMMARY_FILE
    if not summary.exists():
        raise ValueError(f"give --fields: {summary} (written by llm2clip.extract) is missing")
    return tuple(FieldSpec.parse(f).name for f in json.loads(summary.read_text())["config"]["fields"])


@dataclass
class Stage2:
    """The components of a run, assembled by :func:`setup`; the loop only sequences them."""

    cfg: TrainConfig
    dist: DistInfo
    cache: EmbeddingCache
    clip_model: ClipModel
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataset: ShardImageDataset
    total: int
    ckpt: CheckpointManager
    skips: SkipTracker
    start: int = 0
    train_time_s: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    log: MetricsLogger | None = None
    evaluator: PeriodicEval | None = None
    step_fn: TrainStep | None = None
    rows: DeviceRows | None = None
    flops: StepFlops | None = None

    @property
    def end(self) -> int:
        stop = self.cfg.checkpoint.stop_at_step
        return min(self.total, stop) if stop else self.total

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.checkpoint_every
        return step == self.end or bool(every and step % every == 0)

    def save(self, step: int) -> None:
        state = {
            "optimizer": None, "scheduler": self.scheduler.state_dict(),
            "cache_spec": self.cache.spec.to_dict(), "train_time_s": self.train_time_s,
            "losses": self.losses, "skips": self.skips.state_dict(),
        }  # fmt: skip
        weights, state["optimizer"] = full_state(self.model, self.optimizer)
        self.ckpt.save(
            step, state, self.cfg, write_model=lambda d: self.clip_model.save(d, state_dict=weights)
        )


def _model(cfg: TrainConfig, dist: DistInfo, cache: EmbeddingCache):
    """(ClipModel, wrapped model, optimizer): the same init on every rank, per-rank RNG after."""
    seed_everything(cfg.seed)
    check_cache(cfg, cache.spec, cfg.data.cache)
    clip_model = build_model(
        cfg.model, cfg.loss.kind, cache.spec, cfg.data.cache, log=lambda s: print0(dist, s)
    )
    if cfg.model.center_text and not cfg.model.init_from:  # a resume overwrites it with the checkpoint's
        clip_model.adapter.input_mean.copy_(cache_mean(cache, seed=cfg.seed))
    if cfg.model.channels_last:
        clip_model.visual.to(memory_format=torch.channels_last)
    clip_model = clip_model.to(dist.device)
    model = wrap_model(clip_model, cfg.parallel.fsdp, dist)
    o = cfg.optim
    groups = param_groups(  # after wrapping: FSDP2 swaps in DTensor parameters
        clip_model,
        lr=o.lr,
        adapter_lr=o.peak_adapter_lr,
        weight_decay=o.weight_decay,
        layer_decay=o.layer_decay,
    )
    fused = {"fused": True} if dist.device.type == "cuda" and not cfg.parallel.fsdp else {}
    optimizer = torch.optim.AdamW(groups, betas=(o.beta1, o.beta2), eps=o.eps, **fused)
    seed_everything(cfg.seed + 1 + dist.rank)
    return clip_model, model, optimizer


def _resume(run: Stage2) -> None:
    """Model, optimizer, schedule, RNG and counters from --resume; refuses another cache."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from llm2clip.cache.manifest import CacheSpec, check_spec

    path = run.ckpt.resolve(run.cfg.checkpoint.resume)
    if path is None:
        return
    state = run.ckpt.load(path, run.cfg, RESUME_MUST_MATCH, run.cfg.seed)
    check_spec(CacheSpec.from_dict(state["cache_spec"]), run.cache.spec, run.cfg.data.cache)
    set_state_dict(
        run.model, run.optimizer, model_state_dict=load_file(str(path / "model.safetensors")),
        optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip
    run.scheduler.load_state_dict(state["scheduler"])
    run.skips.load_state_dict(state["skips"])
    run.start, run.train_time_s, run.losses = state["step"], state["train_time_s"], state["losses"]
    print0(run.dist, f"resumed from {path} at step {run.start}")


def setup(cfg: TrainConfig, dist: DistInfo) -> Stage2:
    """Every component of the run, resumed when asked; config.json written."""
    out = Path(cfg.output_dir)
    cache = EmbeddingCache.open(cfg.data.cache, verify=cfg.data.verify_cache)  # refuses corrupt caches
    if not cfg.data.fields:
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, fields=cache_fields(cfg.data.cache))
        )
    d = cfg.data
    shards = expand_shards(d.train_shards)
    policy = ReadPolicy.from_env(retries=d.shard_retries, timeout_s=d.shard_timeout_s)
    if d.train_num_samples:
        sizes = nominal_sizes(len(shards), d.train_num_samples)
    else:
        count = lambda: shard_sizes(shards, out / "shard_sizes.json", d.shard_sizes_file, policy)  # noqa: E731
        sizes = broadcast_object(count() if dist.is_main else None, dist)
    clip_model, model, optimizer = _model(cfg, dist, cache)
    # One measurement (rank 0's, for --decode auto) and one decode path on every rank.
    image_size = clip_model.visual.image_size
    choice = resolve_decode(d.decode, dist.device, d.workers, image_size) if dist.is_main else None
    decode, why = broadcast_object(choice, dist)
    dataset = ShardImageDataset(
        shards, cache, d.fields, d.batch_size, image_size,
        rank=dist.rank, world_size=dist.world_size, seed=cfg.seed, shard_sizes=sizes,
        exact_sizes=not d.train_num_samples, on_shard_error=d.on_shard_error, policy=policy,
        decode=decode,
    )  # fmt: skip
    total = cfg.optim.steps or cfg.optim.epochs * dataset.batches_per_epoch()
    o = cfg.optim
    scheduler = lr_schedule(optimizer, o.warmup_steps, total, o.decay, o.min_lr_ratio)
    hint = lambda t: (  # noqa: E731
        f" Most lack a cache row: check that --fields {list(d.fields)} name fields of the extraction "
        f"and that {d.cache} was extracted from these shards."
        if t["missing_row"] > t.total / 2
        else ""
    )
    run = Stage2(
        cfg, dist, cache, clip_model, model, optimizer, scheduler, dataset, total,
        CheckpointManager(out, cfg.checkpoint.keep_last, dist),
        SkipTracker(SKIP_REASONS, d.max_skipped_fraction, d.skip_grace, dist, hint),
    )  # fmt: skip
    _resume(run)
    if dist.is_main:
        resolved = {
            **dataclasses.asdict(cfg),
            "cache_spec": cache.spec.to_dict(),
            "world_size": dist.world_size,
        }
        resolved.update(batches_per_epoch=dataset.batches_per_epoch(), total_steps=total)
        resolved["decode"] = {"used": decode, "why": why}  # --decode auto resolved on this machine
        atomic_write_json(out / "config.json", resolved)
    _attach_step_parts(run)
    return run


def _attach_step_parts(run: Stage2) -> None:
    """The logger, the evaluator, the step function, the device rows and the FLOP count."""
    cfg, dist, dev = run.cfg, run.dist, run.dist.device
    progress = Progress(
        run.total, initial=run.start, enabled=dist.is_main, every=cfg.logging.log_every, desc="stage2"
    )
    resumed = run.start if cfg.checkpoint.resume and run.start else None
    run.log = MetricsLogger(cfg.output_dir, dist, resumed, cfg.logging.tensorboard, progress)
    autocast = cfg.parallel.autocast(dev)
    image_size = run.clip_model.visual.image_size
    fresh = lambda: fresh_like(run.clip_model)  # noqa: E731
    run.evaluator = PeriodicEval(cfg.eval, run.cache, image_size, dist, autocast, fresh)
    vis = run.clip_model.visual.config
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    prepare = lambda x: normalize_images(  # noqa: E731
        x.to(dev, non_blocking=True), vis.image_mean, vis.image_std
    ).contiguous(memory_format=fmt)
    run.step_fn = TrainStep(
        run.model, run.clip_model, run.optimizer, run.scheduler,
        make_loss(cfg.loss.kind, cfg.loss.fused_loss, cfg.loss.loss_backend), dist,
        chunk_size=cfg.parallel.chunk_size, grad_clip=cfg.optim.grad_clip, autocast=autocast,
        prepare_images=prepare, fsdp=cfg.parallel.fsdp,
    )  # fmt: skip
    text_dtype = torch.bfloat16 if isinstance(autocast, torch.autocast) else torch.float32
    # check=False: the data workers verified the rows' cache blocks (ShardImageDataset)
    run.rows = DeviceRows(run.cache, dev, cfg.data.cache_tier, text_dtype, check=False)
    if dev.type == "cuda":
        fwd = forward_flops(run.clip_model, image_size, run.cache.dim, dev)
        run.flops = StepFlops(fwd, run.clip_model.config.embed_dim) if fwd else None


def _record(run: Stage2, step: int, stats: StepStats, kept: int) -> dict:
    """The log.jsonl line of a step."""
    cfg, dev = run.cfg, run.dist.device
    sched = run.scheduler
    record = {
        "step": step, "epoch": (step - 1) // run.dataset.batches_per_epoch(), "loss": stats.loss,
        "grad_norm": stats.grad_norm, "lr": cfg.optim.lr * sched.get_last_lr()[0] / sched.base_lrs[0],
        "logit_scale": scalar_value(run.clip_model.logit_scale).exp().item(),
        "samples_per_s": kept / stats.seconds, "batch": kept, "skipped": run.skips.totals.total,
    }  # fmt: skip
    if dev.type == "cuda":
        record["max_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if run.flops is not None:
            b = kept / run.dist.world_size  # per rank
            extra = 1 if stats.chunks > 1 else 0  # the gradient cache's second forward
            record["tflops_per_gpu"] = run.flops.executed(b, kept, extra) / stats.seconds / 1e12
            peak = peak_bf16_flops(dev)
            if peak:
                record["mfu"] = StepFlops.mfu(run.flops.useful(b, kept), stats.seconds, peak)
    return record


def train(cfg: TrainConfig, dist: DistInfo, on_step: Callable[[int], None] | None = None) -> dict:
    """Run stage 2 on an already set-up process; returns the metrics (also OUTPUT_DIR/metrics.json).
    on_step(step): called after every step and its checkpoint (tests use it to simulate a kill)."""
    cfg = resolve_batch(cfg, dist.world_size)
    if cfg.recipe.provenance:
        print0(dist, describe(cfg))
    run = setup(cfg, dist)
    cfg, t_start, step = run.cfg, time.perf_counter(), run.start
    print0(dist, _banner(run))
    run.dataset.start_batch = step
    loader = torch.utils.data.DataLoader(
        run.dataset, batch_size=None,
        num_workers=cfg.data.workers, pin_memory=dist.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if cfg.data.workers else None,
    )  # fmt: skip
    batches = iter(loader)
    run.model.train()
    while step < run.end:
        batch = finish_batch(next(batches), dist.device)  # decode="device": its JPEGs decoded here
        if batch["index"] != step:  # the data position must be the step: a resume relies on it
            raise RuntimeError(f"data loader returned batch {batch['index']} at step {step}")
        kept = run.skips.update(step, batch["rows"].shape[0], batch["skipped"])
        with _stops(run, step):
            stats = run.step_fn(batch["images"], batch["rows"], run.rows)
        step += 1
        run.train_time_s += stats.seconds
        run.losses.append(stats.loss)
        run.log.step(_record(run, step, stats, kept), show=SHOWN)
        save, evaluate = run.checkpoint_due(step), run.evaluator.due(step, run.total)
        if save or evaluate:
            with _stops(run, step):
                run.step_fn.check_parameters()  # never write or evaluate non-finite weights
        if save:
            run.save(step)
        if evaluate:
            run.evaluator.run(step, run.model, run.clip_model, run.log)
        if on_step is not None:
            on_step(step)
    del batches
    return _finish(run, step, time.perf_counter() - t_start)


@contextlib.contextmanager
def _stops(run: Stage2, done: int):
    """Re-raise a non-finite step naming the step and what is on disk (`done` steps completed)."""
    try:
        yield
    except NonFiniteParameters as e:  # found after step `done`, before anything was written
        raise NonFiniteParameters(
            f"step {done}: {e}; stopped before writing anything. {_on_disk(run)}"
        ) from e
    except FloatingPointError as e:
        raise FloatingPointError(f"step {done + 1}: {e}. {_on_disk(run)}") from e


def _on_disk(run: Stage2) -> str:
    found = run.ckpt.dirs()
    if not found:
        return "No checkpoint was written (lower --lr or raise --warmup-steps and start again)."
    return (
        f"The last good checkpoint is {found[-1]} (resume with --resume, perhaps with a lower --lr or "
        "more --warmup-steps)."
    )


def _banner(run: Stage2) -> str:
    cfg, dist = run.cfg, run.dist
    return (
        f"stage2: {len(run.dataset.shards)} shards ({sum(run.dataset.shard_sizes)} samples), "
        f"{run.dataset.batches_per_epoch()} steps/epoch, {run.total} steps, global batch "
        f"{cfg.data.batch_size * dist.world_size}, chunk {cfg.parallel.chunk_size or 'off'}, "
        f"{'fused' if cfg.loss.fused_loss else 'plain'} {cfg.loss.kind} loss, cache {run.cache.dim}-d on "
        f"{run.rows.tier}, device {dist.device}, world {dist.world_size}, decode {run.dataset.decode}"
        f"{', FSDP2' if cfg.parallel.fsdp else ''}"
    )


def _finish(run: Stage2, step: int, wall_time_s: float) -> dict:
    """Final evaluation, final/ weights and metrics.json of the run."""
    cfg, dist = run.cfg, run.dist
    run.log.progress.close()
    finished = step >= run.total
    if finished:
        with _stops(run, step):
            run.step_fn.check_parameters()
        run.evaluator.run(step, run.model, run.clip_model, run.log)
    metrics = {
        "step": step, "total_steps": run.total, "finished": finished, "world_size": dist.world_size,
        "global_batch": cfg.data.batch_size * dist.world_size, "samples": run.skips.samples,
        "skipped": run.skips.totals.to_dict(), "final_loss": run.losses[-1] if run.losses else None,
        "losses": run.losses, "train_time_s": run.train_time_s, "wall_time_s": wall_time_s,
        "samples_per_s": run.skips.samples / run.train_time_s if run.train_time_s else None,
        "eval": run.evaluator.results,
    }  # fmt: skip
    weights = full_state(run.model)[0] if finished else None
    if dist.is_main:
        if finished:
            final = Path(cfg.output_dir) / "final"
            run.clip_model.save(final, state_dict=weights)
            metrics["bundle"] = _make_bundle(final, run.cache)
        atomic_write_json(
            Path(cfg.output_dir) / "metrics.json", {"config": dataclasses.asdict(cfg), **metrics}
        )
    run.log.close()
    return metrics


def _make_bundle(final: Path, cache: EmbeddingCache) -> bool:
    """Make final/ a bundle (llm2clip.bundle: the text side's recipe and probe beside the weights).
    A failure is reported, not raised: the weights are saved and can be exported later."""
    from llm2clip.bundle import export_bundle

    try:
        export_bundle(final, final, cache_dir=cache)
    except (ValueError, OSError, CacheError) as e:
        print(f"warning: {final} is not a bundle ({e}); its weights are saved: export it later with "
              f"`python -m llm2clip.export --format bundle`", flush=True)  # fmt: skip
        return False
    return True


def main(argv: Sequence[str] | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """Run stage 2; returns the metrics dict (also written to OUTPUT_DIR/metrics.json)."""
    cfg = parse_config(argv)
    with distributed_session(cfg.parallel.device) as dist:
        return train(cfg, dist, on_step)


if __name__ == "__main__":
    run(main, "llm2clip.train")
