"""Offline caption-embedding extraction: webdataset shards -> frozen LLM -> embedding cache.

    torchrun --nproc_per_node=8 -m llm2clip.extract \\
        --shards 'data/cc3m/{00000..00331}.tar' --fields txt json:dense_caption \\
        --model /models/Llama-3-8B-Instruct --adapter runs/stage1/adapter \\
        --instruction 'Given a caption, retrieve a detailed relevant caption: {caption}' \\
        --out caches/cc3m-llama3-8b-cc
    python -m llm2clip.extract ...          # the same on one process (one GPU, or the CPU)

Shard i goes to rank i % world; each rank runs the overlapped pipeline of ``llm2clip.extraction``
(reader thread, device launches, writer thread writing shards through ``CacheWriter``: atomic parts
and a done marker). A shard with a done marker is skipped, so a killed run resumes where it
stopped. After all ranks finish, rank 0 embeds the probe captions and merges the parts (manifest
last). A summary (rows, dedup ratio, bytes, time, captions/s, tokens/s, missing and truncated
counts, the text recipe) goes to ``<out>/extract_summary.json`` (``--summary`` to change).

Fields (``--fields``): ``llm2clip.data.fields`` (``txt``, ``json:dense_caption``, ``NAME=SOURCE``).
Model identity (CacheSpec): ``--model-revision`` / ``--adapter-revision`` when given (e.g. a hub
commit sha), else ``sha256:`` of the model's (adapter's) files (computed on rank 0, broadcast).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llm2clip.cache import PROBE_CAPTIONS, STORAGES, CacheSpec, CacheWriter
from llm2clip.cache.format import MANIFEST_FILE
from llm2clip.cli import UsageError, require_finite, run, section
from llm2clip.cli import config_field as _f
from llm2clip.cli import parse_config as _parse
from llm2clip.data.fields import FieldSpec
from llm2clip.data.shards import expand_shards, shard_name
from llm2clip.distributed import DEVICES, DistInfo, broadcast_object, distributed_session, gather_object
from llm2clip.extraction import STOP, Background, launch_batches, prefetch, prepare_shard, to_host
from llm2clip.files import atomic_write_json, files_sha256
from llm2clip.models.text_recipe import SUMMARY_FILE, TextRecipe, load_embedder
from llm2clip.progress import Progress

STORAGE_NAMES = tuple(s.name for s in STORAGES)


@dataclass
class ExtractConfig:
    """Everything one extraction run needs (the CLI's flags; written into the summary JSON)."""

    shards: list[str] = _f((), "Shard paths, directories, globs or brace ranges ('a/{000..099}.tar').",
                           required=True)  # fmt: skip
    out: str = _f("", "Cache directory (a killed run is resumed in place).", required=True)
    fields: list[str] = _f(
        ("txt",), "Caption fields: 'txt' (raw member), 'json:key' (key in the json member), 'NAME=SOURCE'."
    )
    text: TextRecipe = section(TextRecipe)
    model_id: str | None = _f(None, "Model identity in the manifest (default: --model).")
    model_revision: str | None = _f(None, "Model revision for the manifest (default: sha256 of its files).")
    adapter_revision: str | None = _f(
        None, "Adapter revision for the manifest (default: sha256 of its files)."
    )
    storage: str = _f("bf16", "Cache storage dtype.", choices=STORAGE_NAMES)
    on_missing: str = _f(
        "skip",
        "Empty or missing caption: skip it (counted) or stop naming shard and key.",
        choices=("skip", "error"),
    )
    device: str = _f("auto", "auto: cuda:LOCAL_RANK when CUDA is available, else cpu.", choices=DEVICES)
    summary: str | None = _f(None, "Summary JSON path (default <out>/extract_summary.json).")
    progress: bool = _f(True, "Progress bar on rank 0 (tqdm on a terminal, else a line every few seconds).")
    dist_timeout_min: float = _f(24 * 60.0, "Minutes the ranks wait for each other at the final barrier.")

    def __post_init__(self) -> None:
        require_finite(self)
        if self.dist_timeout_min <= 0:
            raise ValueError(f"--dist-timeout-min must be positive, got {self.dist_timeout_min}")
        self.shards, self.fields = list(self.shards), list(self.fields)
        if not self.shards:
            raise ValueError("no --shards given")
        if not self.out:
            raise ValueError("--out is required")
        self.field_specs = [FieldSpec.parse(f) for f in self.fields]
        names = [f.name for f in self.field_specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two fields share a name: {names} (use NAME=SOURCE)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_config(argv: Sequence[str] | None = None) -> ExtractConfig:
    return _parse(
        ExtractConfig, argv, prog="python -m llm2clip.extract",
        description="Embed the captions of webdataset shards with a frozen LLM into an embedding cache "
        "(resumable, multi-rank under torchrun).",
    )  # fmt: skip


def make_spec(cfg: ExtractConfig, dim: int, dist: DistInfo) -> CacheSpec:
    """CacheSpec of this run; file hashes are computed on rank 0 and broadcast."""
    text = cfg.text
    ids = None
    if dist.is_main:
        ids = (
            cfg.model_revision or files_sha256(text.model),
            cfg.adapter_revision or (files_sha256(text.adapter) if text.adapter else ""),
        )
    model_rev, adapter_rev = broadcast_object(ids, dist)
    return CacheSpec(
        model_id=cfg.model_id or text.model, model_revision=model_rev, adapter_revision=adapter_rev,
        prompt_template=text.instruction, pooling=text.pooling, max_length=text.max_length,
        normalize=text.normalize, dim=dim,
    )  # fmt: skip


class _Rates:
    """captions/s and tokens/s of this run, shown on the progress line."""

    def __init__(self, progress: Progress):
        self.progress, self.captions, self.tokens, self.t0 = progress, 0, 0, time.perf_counter()

    def __call__(self, captions: int, tokens: int) -> None:
        self.captions += captions
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.progress.note(captions_per_s=self.captions / dt, tokens_per_s=self.tokens / dt)


def _shard_paths(cfg: ExtractConfig) -> tuple[list[str], list[str]]:
    out = Path(cfg.out)
    if (out / MANIFEST_FILE).exists():
        raise UsageError(f"{out} already holds a merged cache; write to a new directory")
    paths = expand_shards(list(cfg.shards))
    names = [shard_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"shard names must be unique (the cache keys on them): {dup[:5]}")
    return paths, names


def _writer_loop(writer: CacheWriter, progress: Progress, on_shard_written) -> Callable[[queue.Queue], None]:
    """The writer thread's body: wait for each shard's embeddings, write its part."""

    def write_all(q: queue.Queue) -> None:
        written = 0
        while (item := q.get()) is not STOP:
            work, host, ev = item
            if ev is not None:
                ev.synchronize()
            rows = host[torch.tensor(work.unique_of, dtype=torch.long)] if work.captions else host[:0]
            with writer.shard(work.name) as s:
                if work.captions:
                    s.add_batch(work.keys, work.fields, work.captions, rows)
            written += 1
            progress.advance()
            if on_shard_written is not None:
                on_shard_written(written)

    return write_all


def _add_stats(stats: dict, work) -> None:
    stats["samples"] += work.samples
    stats["captions"] += len(work.captions)
    stats["unique_in_shards"] += work.num_unique
    stats["tokens"] += work.tokens
    stats["truncated"] += work.truncated
    for k, v in work.missing.items():
        stats["missing"][k] += v


def _run_shards(cfg, embedder, writer, paths, todo, stats, dist, on_shard_written) -> None:
    """The pipeline over this rank's shards (reader thread -> device -> writer thread)."""
    progress = Progress(
        len(todo),
        enabled=cfg.progress and dist.is_main,
        desc=f"extract rank0/{dist.world_size}",
        unit="shard",
    )
    wq: queue.Queue = queue.Queue(maxsize=1)  # one shard being written, one waiting
    wbg = Background(_writer_loop(writer, progress, on_shard_written), wq)
    pin = dist.device.type == "cuda"
    kw = dict(on_missing=cfg.on_missing, packed=cfg.text.packed, pin=pin)
    works = prefetch((prepare_shard(paths[i], embedder, cfg.field_specs, **kw) for i in todo), maxsize=2)
    rates, failed = _Rates(progress), True
    try:
        for work in works:
            host, ev = to_host(launch_batches(embedder, work.batches, work.num_unique, rates))
            work.batches = []  # free the pinned inputs
            wbg.put(wq, (work, host, ev))
            _add_stats(stats, work)
        failed = False
    finally:
        works.close()
        try:  # the writer finishes the shards already handed over, then stops
            wbg.put(wq, STOP)
            wbg.thread.join()
        except BaseException:
            if not failed:
                raise
        progress.close()
    wbg.check()


def extract(cfg: ExtractConfig, on_shard_written: Callable[[int], None] | None = None) -> dict:
    """Run the extraction (every rank) and the merge (rank 0); returns the summary on every rank.
    on_shard_written(n): called after this rank wrote its n-th shard (tests simulate a kill)."""
    t0 = time.perf_counter()
    # gloo on GPUs too: extraction only exchanges small objects and waits at one barrier, and the
    # long timeout covers ranks that finish early.
    with distributed_session(cfg.device, backend="gloo", timeout_s=cfg.dist_timeout_min * 60) as dist:
        paths, names = _shard_paths(cfg)
        embedder = load_embedder(cfg.text, dist.device)
        spec = make_spec(cfg, embedder.hidden_size, dist)
        writer = CacheWriter(cfg.out, spec, cfg.storage, rank=dist.rank, world_size=dist.world_size)
        mine = list(range(len(paths)))[dist.rank :: dist.world_size]  # shard i -> rank i % world
        done = writer.done_shards()
        todo = [i for i in mine if names[i] not in done]
        stats = {
            "rank": dist.rank, "shards": len(todo), "shards_resumed": len(mine) - len(todo), "samples": 0,
            "captions": 0, "unique_in_shards": 0, "tokens": 0, "truncated": 0,
            "missing": {f.name: 0 for f in cfg.field_specs},
        }  # fmt: skip
        _run_shards(cfg, embedder, writer, paths, todo, stats, dist, on_shard_written)
        stats["seconds"] = time.perf_counter() - t0
        all_stats = gather_object(stats, dist)  # also the barrier: every rank's shards are done
        summary = None
        if dist.is_main:
            manifest = writer.merge(embedder.encode(list(PROBE_CAPTIONS)), shards=names)
            summary = _summary(cfg, spec, manifest, all_stats, time.perf_counter() - t0, dist)
            atomic_write_json(Path(cfg.summary) if cfg.summary else Path(cfg.out) / SUMMARY_FILE, summary, 1)
            _print_summary(summary)
        return broadcast_object(summary, dist)


def _summary(cfg, spec, manifest, all_stats, seconds, dist) -> dict:
    total = lambda k: sum(s[k] for s in all_stats)  # noqa: E731
    missing = {f.name: sum(s["missing"][f.name] for s in all_stats) for f in cfg.field_specs}
    embedded_seconds = max(s["seconds"] for s in all_stats)
    return {
        "cache": str(cfg.out),
        "world_size": dist.world_size,
        "shards": len(manifest["shards"]),
        "shards_extracted": total("shards"),
        "shards_resumed": total("shards_resumed"),
        "samples": total("samples"),
        "captions": manifest["index_entries"],
        "captions_this_run": total("captions"),
        "rows": manifest["rows"],
        "dedup_ratio": manifest["dedup"]["ratio"],
        "cross_rank_duplicates": manifest["dedup"]["cross_writer_duplicates"],
        "embedded_this_run": total("unique_in_shards"),
        "tokens_this_run": total("tokens"),
        "missing": missing,
        "truncated": total("truncated"),
        "bytes": sum(f["size"] for f in manifest["files"].values()),
        "storage": manifest["storage"],
        "seconds": seconds,
        "captions_per_s": total("unique_in_shards") / embedded_seconds if embedded_seconds else None,
        "tokens_per_s": total("tokens") / embedded_seconds if embedded_seconds else None,
        "spec": spec.to_dict(),
        "config": cfg.to_dict(),
        "per_rank": all_stats,
    }


def _print_summary(s: dict) -> None:
    gib = s["bytes"] / 2**30
    print(
        f"[extract] {s['cache']}: {s['shards']} shards ({s['shards_resumed']} resumed), "
        f"{s['captions']:,} captions -> {s['rows']:,} rows (dedup ratio {s['dedup_ratio'] or 0:.3f}), "
        f"{gib:.3f} GiB {s['storage']}, {s['seconds']:.1f} s; this run embedded {s['embedded_this_run']:,} "
        f"captions / {s['tokens_this_run']:,} tokens ({s['captions_per_s'] or 0:,.0f} captions/s, "
        f"{s['tokens_per_s'] or 0:,.0f} tokens/s); missing {s['missing']}, truncated {s['truncated']}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the summary (every rank gets rank 0's)."""
    return extract(parse_config(argv))


if __name__ == "__main__":
    run(main, "llm2clip.extract")
