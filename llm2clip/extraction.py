"""The extraction pipeline's stages: captions of a shard -> batches -> LLM embeddings on the host.

    works = prefetch(prepare_shard(p, embedder, fields) for p in paths)    # reader thread
    for work in works:
        emb = launch_batches(embedder, work.batches, work.num_unique)     # device, no host sync
        host, event = to_host(emb)                                        # then a writer thread

1. ``prepare_shard`` (a reader thread): tar -> captions of every field -> missing/blank handling
   -> dedup by normalised text within the shard (the cache stores one row per normalised text) ->
   tokenize (template, truncation to max_length, counted) -> length-sorted batches within the
   token budget -> collated (packed: no pad tokens) CPU tensors, pinned on CUDA;
2. ``launch_batches`` (the main thread): each batch goes to the device (non-blocking) and through
   the LLM and pooling; no host synchronisation inside a shard, so while the GPU runs batch k the
   host already launches batch k+1 and the reader tokenizes the next shard;
3. ``to_host``: one device -> host copy into pinned memory and an event the writer waits on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llm2clip.cache import normalize_caption
from llm2clip.data.fields import FieldSpec
from llm2clip.data.shards import ShardError, iter_samples, shard_name
from llm2clip.models.text_embedder import LLMTextEmbedder, TextBatch, collate

__all__ = [
    "Background",
    "ShardWork",
    "launch_batches",
    "plan_batches",
    "prefetch",
    "prepare_shard",
    "to_host",
    "tokenize_counting",
]

STOP = object()
"""End-of-stream marker of the pipeline's queues."""


@dataclass
class ShardWork:
    """One shard, ready for the GPU."""

    path: str
    name: str
    keys: list[str] = field(default_factory=list)
    """Per entry: sample key, field name, caption, index into the unique captions."""
    fields: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    unique_of: list[int] = field(default_factory=list)
    num_unique: int = 0
    batches: list[tuple[torch.Tensor, TextBatch]] = field(default_factory=list)
    """(unique-caption indices, collated batch) in launch order."""
    samples: int = 0
    tokens: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def tokenize_counting(embedder: LLMTextEmbedder, captions: Sequence[str]):
    """embedder.tokenize plus the number of captions that were truncated to max_length."""
    ids, masks = embedder.tokenize(captions)
    cfg = embedder.config
    room = cfg.max_length - int(cfg.add_eos)
    full = [i for i, row in enumerate(ids) if len(row) - int(cfg.add_eos) >= room]
    truncated = 0
    if full:  # only captions that reached the limit are re-tokenized without truncation
        prefix, _, suffix = cfg.instruction.partition("{caption}")
        enc = embedder.tokenizer([prefix + captions[i] + suffix for i in full], add_special_tokens=True)
        truncated = sum(len(r) > room for r in enc["input_ids"])
    return ids, masks, truncated


def plan_batches(
    embedder: LLMTextEmbedder, ids, masks, *, packed: bool, pin: bool
) -> list[tuple[torch.Tensor, TextBatch]]:
    """Length-sorted batches within the token budget, collated on the CPU (pinned when asked)."""
    out = []
    for chunk in embedder.batches([len(x) for x in ids], packed):
        batch = collate(
            [ids[i] for i in chunk], [masks[i] for i in chunk],
            pooling=embedder.config.pooling, packed=packed, pad_id=embedder.pad_id,
        )  # fmt: skip
        if pin:
            batch = TextBatch(**{
                f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                for f in dataclasses.fields(batch) for v in [getattr(batch, f.name)]
            })  # fmt: skip
        index = torch.tensor(chunk, dtype=torch.long)
        out.append((index.pin_memory() if pin else index, batch))
    return out


def prepare_shard(
    path: str,
    embedder: LLMTextEmbedder,
    fields: Sequence[FieldSpec],
    *,
    on_missing: str = "skip",
    packed: bool = True,
    pin: bool = False,
) -> ShardWork:
    """Read one shard, pick its captions (missing or blank ones skipped and counted, or ShardError
    with on_missing="error"), dedup them by normalised text, tokenize and batch them."""
    work = ShardWork(path=path, name=shard_name(path), missing={f.name: 0 for f in fields})
    first: dict[str, int] = {}
    unique: list[str] = []
    for sample in iter_samples(path):
        work.samples += 1
        key = sample["__key__"]
        for spec in fields:
            try:
                text = spec.read(sample)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise ShardError(f"shard {path}, key {key!r}, field {spec.name!r}: {e}") from e
            if text is None:
                if on_missing == "error":
                    raise ShardError(
                        f"shard {path}, key {key!r}: caption field {spec.name!r} is missing or empty "
                        "(--on-missing skip to skip such captions)"
                    )
                work.missing[spec.name] += 1
                continue
            norm = normalize_caption(text)
            u = first.get(norm)
            if u is None:
                u = first[norm] = len(unique)
                unique.append(text)
            work.keys.append(key)
            work.fields.append(spec.name)
            work.captions.append(text)
            work.unique_of.append(u)
    work.num_unique = len(unique)
    if unique:
        ids, masks, work.truncated = tokenize_counting(embedder, unique)
        work.tokens = sum(len(x) for x in ids)
        work.batches = plan_batches(embedder, ids, masks, packed=packed, pin=pin)
    return work


class Background:
    """Run fn(*args) in a daemon thread; an exception is kept and re-raised by check()."""

    def __init__(self, fn, *args):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # handed to the main thread
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, q: queue.Queue, item) -> None:
        """q.put(item), raising this thread's error instead of blocking forever if it died."""
        while True:
            self.check()
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def prefetch(items: Iterator, maxsize: int = 2) -> Iterator:
    """Iterate `items` in a background thread, up to `maxsize` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    stop = threading.Event()

    def produce():
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        finally:
            if not stop.is_set():
                q.put(STOP)

    bg = Background(produce)
    try:
        while (x := q.get()) is not STOP:
            yield x
        bg.thread.join()
        bg.check()
    finally:
        stop.set()


def launch_batches(
    embedder: LLMTextEmbedder,
    batches: Sequence[tuple[torch.Tensor, TextBatch]],
    num: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Embed the planned batches: (num, dim) fp32 on the model's device, in unique-caption order;
    ``on_batch(captions, tokens)`` after each launch.

    No host synchronisation: the copies are non-blocking and the result is written by index.
    """
    device = embedder.device
    out = None
    with torch.inference_mode():
        for index, batch in batches:
            emb = embedder(batch.to(device))
            if out is None:
                out = emb.new_empty(num, emb.shape[1])
            out.index_copy_(0, index.to(device, non_blocking=True), emb)
            if on_batch is not None:
                on_batch(batch.num_captions, batch.num_tokens)
    if out is None:
        out = torch.empty(0, embedder.hidden_size, device=device)
    return out


def to_host(x: torch.Tensor):
    """Start the device->host copy; returns (host tensor, event or None). Wait on the event."""
    if x.device.type != "cuda":
        return x, None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return host, ev
