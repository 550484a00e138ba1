"""Offline caption-embedding extraction: webdataset shards -> frozen LLM -> embedding cache.

    torchrun --nproc_per_node=8 -m llm2clip.extract \\
        --shards 'data/cc3m/{00000..00331}.tar' --fields txt json:dense_caption \\
        --model /models/Llama-3-8B-Instruct --adapter runs/stage1/adapter \\
        --instruction 'Given a caption, retrieve a detailed relevant caption: {caption}' \\
        --out caches/cc3m-llama3-8b-cc
    python -m llm2clip.extract ...          # the same on one process (one GPU, or the CPU)

Per rank (shard i -> rank i % world, ``llm2clip.cache.shards_for_rank``), three stages overlap:

1. a reader thread: tar -> captions of every field -> missing/empty handling -> dedup by
   normalised text within the shard (the cache stores one row per normalised text anyway) ->
   tokenize (template, truncation to --max-length, counted) -> length-sorted batches within the
   --tokens-per-batch budget -> collated (packed: no pad tokens) CPU tensors, pinned on CUDA;
2. the main thread: copies each batch to the GPU (non-blocking) and launches the LLM forward and
   pooling; no host synchronisation inside a shard, so while the GPU runs batch k the host is
   already collating / launching batch k+1 and the reader is tokenizing the next shard;
3. a writer thread: waits for the shard's embeddings (one device->host copy into pinned memory,
   an event) and writes the shard through ``CacheWriter`` (atomic parts + done marker).

A shard with a done marker is skipped, so a killed run resumes where it stopped. After all ranks
finish (barrier), rank 0 embeds ``PROBE_CAPTIONS`` with the same model and merges the parts into
the final cache (``CacheWriter.merge``: manifest written last). A summary (rows, dedup ratio,
bytes, time, captions/s, tokens/s, missing / truncated counts) is printed and written as JSON to
``<out>/extract_summary.json`` (``--summary`` to change).

Fields (``--fields``): ``txt`` is the raw member ``<key>.txt`` (UTF-8); ``json:dense_caption`` is
the key ``dense_caption`` inside ``<key>.json`` (dots descend: ``json:captions.short``). Each is
stored in the cache index under its name: the member name for raw fields, the last key for JSON
fields, or an explicit ``NAME=SOURCE`` (``short=txt dense=json:dense_caption``).

Model identity (CacheSpec): ``--model-revision`` / ``--adapter-revision`` when given (e.g. a hub
commit sha), else ``sha256:`` of the model's (adapter's) files, names and contents (computed on
rank 0, broadcast).

Test hook (not for production use): the environment variable ``LLM2CLIP_EXTRACT_EXIT_AFTER_SHARDS=N``
makes the process ``os._exit(3)`` right after its N-th shard is written, to simulate a killed run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm2clip.cache import PROBE_CAPTIONS, STORAGES, CacheSpec, CacheWriter, normalize_caption
from llm2clip.cache.format import MANIFEST_FILE
from llm2clip.data.shards import ShardError, expand_shards, iter_samples, shard_name
from llm2clip.models.text_embedder import (
    DTYPES,
    PACKED_ATTENTION,
    POOLING_MODES,
    LLMTextEmbedder,
    TextBatch,
    TextEmbedderConfig,
    collate,
)
from llm2clip.train_utils import DistInfo
from llm2clip.train_utils import init_distributed as _init_distributed

STORAGE_NAMES = tuple(s.name for s in STORAGES)
EXIT_AFTER_ENV = "LLM2CLIP_EXTRACT_EXIT_AFTER_SHARDS"  # test hook, see the module docstring
SUMMARY_FILE = "extract_summary.json"
_STOP = object()


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class FieldSpec:
    """One caption field: where it is read from and the name it is stored under."""

    name: str
    """Field name in the cache index (``EmbeddingCache.lookup(shards, keys, name)``)."""
    member: str
    """Tar member suffix: ``txt`` for ``<key>.txt``, ``json`` for ``<key>.json``."""
    json_path: tuple[str, ...] = ()
    """Keys to descend inside the JSON member; empty for a raw text member."""

    @classmethod
    def parse(cls, text: str) -> FieldSpec:
        """``txt`` | ``json:key[.sub...]`` | ``NAME=SOURCE``."""
        name, eq, source = text.partition("=")
        if not eq:
            name, source = "", text
        member, colon, path = source.partition(":")
        keys = tuple(path.split(".")) if colon else ()
        if not member or (colon and (not path or any(not k for k in keys))):
            raise ValueError(f"bad field {text!r}: use 'txt', 'json:key' or 'NAME=json:key'")
        if colon and member != "json":
            raise ValueError(f"bad field {text!r}: only the json member has keys")
        name = name or (keys[-1] if keys else member)
        if "\x1f" in name or "\n" in name:
            raise ValueError(f"bad field name {name!r}")
        return cls(name=name, member=member, json_path=keys)

    def read(self, sample: dict) -> str | None:
        """The caption of this field in a sample (a dict of member bytes), None if missing or empty.

        Raises ValueError for undecodable bytes, invalid JSON or a non-string value (naming none:
        the caller adds shard and key).
        """
        raw = sample.get(self.member)
        if raw is None:
            return None
        if not self.json_path:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            return text if text.strip() else None
        value = json.loads(raw)
        for k in self.json_path:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"field {self.name!r} is a {type(value).__name__}, not a string")
        return value if value.strip() else None


@dataclass
class ExtractConfig:
    """Everything one extraction run needs (the CLI's flags; written into the summary JSON)."""

    shards: list[str]
    """Shard specs: paths, directories, globs or ``{000..099}`` brace ranges (llm2clip.data.shards)."""
    out: str
    """Cache directory (created; resumed when it holds unfinished parts of the same configuration)."""
    model: str
    """Local transformers model directory or a .gguf file."""
    fields: list[str] = field(default_factory=lambda: ["txt"])
    """Caption fields, see FieldSpec.parse."""
    adapter: str | None = None
    """peft LoRA adapter directory (stage 1 output), merged into the weights after loading."""
    merge_adapter: bool = True
    """Fold the adapter into the weights (faster); False keeps the peft wrapper."""
    model_id: str | None = None
    """Model identity stored in the manifest (default: --model as given)."""
    model_revision: str | None = None
    """Model revision (commit sha) for the manifest; default: sha256 of the model's files."""
    adapter_revision: str | None = None
    """Adapter revision; default: sha256 of the adapter's files ('' without an adapter)."""
    instruction: str = "{caption}"
    """Prompt template with one '{caption}'."""
    pooling: str = "mean"
    """mean | weighted_mean | last_token."""
    max_length: int = 512
    """Token limit per caption (template and special tokens included); longer ones are truncated."""
    add_eos: bool = False
    """Append the tokenizer's EOS token."""
    normalize: bool = False
    """L2-normalise embeddings before storage."""
    dtype: str = "bfloat16"
    """Compute dtype of the LLM: bfloat16 | float16 | float32."""
    storage: str = "bf16"
    """Cache storage: fp32 | bf16 | fp16 | int8 | fp8_e4m3."""
    tokens_per_batch: int = 16384
    """Batch budget: real tokens per packed batch (padded: batch * longest)."""
    packed: bool = True
    """Packed batches (no pad tokens); False pads to the longest caption in the batch."""
    packed_attention: str = "auto"
    """auto | varlen | repad (llm2clip.models.text_embedder)."""
    attn_backend: str | None = None
    """Attention backend override for the selector."""
    on_missing: str = "skip"
    """An empty or missing caption field: 'skip' it (counted) or stop with an 'error' naming it."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when available, else cpu) | cpu | cuda."""
    summary: str | None = None
    """Summary JSON path (default <out>/extract_summary.json)."""
    progress: bool = True
    """Progress bar on rank 0 (tqdm when installed, else a line every few seconds)."""
    dist_timeout_min: float = 24 * 60.0
    """Timeout of the final barrier (ranks with fewer tokens wait there for the others)."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError("no --shards given")
        self.field_specs = [FieldSpec.parse(f) for f in self.fields]
        names = [f.name for f in self.field_specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two fields share a name: {names} (use NAME=SOURCE)")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"--pooling {self.pooling!r} not in {POOLING_MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} not in {tuple(DTYPES)}")
        if self.storage not in STORAGE_NAMES:
            raise ValueError(f"--storage {self.storage!r} not in {STORAGE_NAMES}")
        if self.on_missing not in ("skip", "error"):
            raise ValueError(f"--on-missing must be skip or error, got {self.on_missing!r}")
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"--packed-attention {self.packed_attention!r} not in {PACKED_ATTENTION}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def embedder_config(self) -> TextEmbedderConfig:
        return TextEmbedderConfig(
            model=self.model,
            pooling=self.pooling,
            instruction=self.instruction,
            max_length=self.max_length,
            add_eos=self.add_eos,
            dtype=self.dtype,
            packed=self.packed,
            packed_attention=self.packed_attention,
            attn_backend=self.attn_backend,
            normalize=self.normalize,
            tokens_per_batch=self.tokens_per_batch,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.extract",
        description="Embed the captions of webdataset shards with a frozen LLM into an embedding cache "
        "(resumable, multi-rank under torchrun).",
    )
    p.add_argument(
        "--shards",
        nargs="+",
        required=True,
        help="shard paths, directories, globs or brace ranges ('a/{000..099}.tar')",
    )
    p.add_argument("--out", required=True, help="cache directory (a killed run is resumed in place)")
    p.add_argument("--model", required=True, help="local transformers model directory or .gguf file")
    p.add_argument("--fields", nargs="+", default=["txt"],
                   help="caption fields: 'txt' (raw member), 'json:key' (key in the json member), "
                   "'NAME=SOURCE' to store under NAME (default: txt)")  # fmt: skip
    p.add_argument("--adapter", default=None, help="peft LoRA adapter directory from stage 1")
    p.add_argument(
        "--no-merge-adapter",
        dest="merge_adapter",
        action="store_false",
        help="keep the adapter unmerged (peft wrapper) instead of folding it into the weights",
    )
    p.add_argument("--model-id", default=None, help="model identity in the manifest (default: --model)")
    p.add_argument(
        "--model-revision",
        default=None,
        help="model revision for the manifest (default: sha256 of the model files)",
    )
    p.add_argument(
        "--adapter-revision",
        default=None,
        help="adapter revision for the manifest (default: sha256 of the adapter files)",
    )
    p.add_argument("--instruction", default="{caption}", help="prompt template with one '{caption}'")
    p.add_argument("--pooling", default="mean", choices=POOLING_MODES, help="pooling over caption tokens")
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="tokens per caption, template included; longer captions are truncated and counted",
    )
    p.add_argument("--add-eos", action="store_true", help="append the tokenizer's EOS token")
    p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings before storage")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="LLM compute dtype")
    p.add_argument("--storage", default="bf16", choices=STORAGE_NAMES, help="cache storage dtype")
    p.add_argument(
        "--tokens-per-batch",
        type=int,
        default=16384,
        help="token budget per batch (packed: real tokens; padded: batch x longest)",
    )
    p.add_argument(
        "--padded",
        dest="packed",
        action="store_false",
        help="pad batches to their longest caption instead of packing (slower; for comparison)",
    )
    p.add_argument(
        "--packed-attention",
        default="auto",
        choices=PACKED_ATTENTION,
        help="how packed batches attend (see llm2clip.models.text_embedder)",
    )
    p.add_argument("--attn-backend", default=None, help="attention backend override (flash_attn, sdpa, ...)")
    p.add_argument(
        "--on-missing",
        default="skip",
        choices=("skip", "error"),
        help="empty or missing caption field: skip it (counted) or stop naming shard and key",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu",
    )
    p.add_argument("--summary", default=None, help="summary JSON path (default <out>/extract_summary.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--dist-timeout-min",
        type=float,
        default=24 * 60.0,
        help="minutes the ranks wait for each other at the final barrier",
    )
    return p


def parse_config(argv: Sequence[str] | None = None) -> ExtractConfig:
    args = build_parser().parse_args(argv)
    try:
        return ExtractConfig(**vars(args))
    except ValueError as e:
        raise SystemExit(f"llm2clip.extract: {e}") from None


# ---------------------------------------------------------------------------------------------
# Distributed setup and model identity


def init_distributed(device: str = "auto", timeout_min: float = 24 * 60.0) -> tuple[DistInfo, bool]:
    """torchrun's environment -> (DistInfo, whether a process group was created here).

    Always gloo: extraction only exchanges small objects and waits at one barrier, so gloo
    suffices on GPUs too, and its long timeout covers ranks that finish early.
    """
    import torch.distributed as dist

    was = dist.is_available() and dist.is_initialized()
    info = _init_distributed(device, backend="gloo", timeout_s=timeout_min * 60)
    return info, info.world_size > 1 and not was


def _broadcast_object(obj, info: DistInfo):
    if info.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_objects(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def files_sha256(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` over a file or a directory's files (relative names and contents, sorted;
    names starting with '.' and *.md are left out)."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.suffix != ".md"
    )  # fmt: skip
    if not files:
        raise FileNotFoundError(f"no files to hash under {root}")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def load_embedder(cfg: ExtractConfig, device: torch.device | str) -> LLMTextEmbedder:
    """The frozen embedder exactly as extraction uses it (model, adapter merged or not, eval mode)."""
    emb = LLMTextEmbedder.from_pretrained(cfg.embedder_config(), device=device)
    if cfg.adapter:
        emb.load_lora(cfg.adapter)
        if cfg.merge_adapter:
            emb.merge_lora()
        emb.to(device)
    emb.eval().requires_grad_(False)
    return emb


def make_spec(cfg: ExtractConfig, dim: int, info: DistInfo) -> CacheSpec:
    """CacheSpec of this run; file hashes are computed on rank 0 and broadcast."""
    ids = None
    if info.rank == 0:
        ids = (
            cfg.model_revision or files_sha256(cfg.model),
            cfg.adapter_revision or (files_sha256(cfg.adapter) if cfg.adapter else ""),
        )
    model_rev, adapter_rev = _broadcast_object(ids, info)
    return CacheSpec(
        model_id=cfg.model_id or cfg.model,
        model_revision=model_rev,
        adapter_revision=adapter_rev,
        prompt_template=cfg.instruction,
        pooling=cfg.pooling,
        max_length=cfg.max_length,
        normalize=cfg.normalize,
        dim=dim,
    )


# ---------------------------------------------------------------------------------------------
# Stage 1: read + tokenize + batch (reader thread)


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
    path: str, embedder: LLMTextEmbedder, cfg: ExtractConfig, *, pin: bool = False
) -> ShardWork:
    """Read one shard, pick its captions, dedup, tokenize and batch them."""
    work = ShardWork(path=path, name=shard_name(path), missing={f.name: 0 for f in cfg.field_specs})
    first: dict[str, int] = {}
    unique: list[str] = []
    for sample in iter_samples(path):
        work.samples += 1
        key = sample["__key__"]
        for spec in cfg.field_specs:
            try:
                text = spec.read(sample)
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                raise ShardError(f"shard {path}, key {key!r}, field {spec.name!r}: {e}") from e
            if text is None:
                if cfg.on_missing == "error":
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
        work.batches = plan_batches(embedder, ids, masks, packed=cfg.packed, pin=pin)
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
                q.put(_STOP)

    bg = Background(produce)
    try:
        while (x := q.get()) is not _STOP:
            yield x
        bg.thread.join()
        bg.check()
    finally:
        stop.set()


# ---------------------------------------------------------------------------------------------
# Stage 2: GPU (main thread)


def launch_batches(
    embedder: LLMTextEmbedder, batches: Sequence[tuple[torch.Tensor, TextBatch]], num: int, progress=None
) -> torch.Tensor:
    """Embed the planned batches: (num, dim) fp32 on the model's device, in unique-caption order.

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
            if progress is not None:
                progress.update(batch.num_captions, batch.num_tokens)
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


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """captions/s and tokens/s; tqdm when installed, else a line every `every` seconds."""

    def __init__(self, total: int | None, enabled: bool, desc: str = "extract", every: float = 10.0):
        self.enabled, self.every = enabled, every
        self.captions = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="shard", dynamic_ncols=True)
            except ImportError:
                pass

    def rates(self) -> tuple[float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return self.captions / dt, self.tokens / dt

    def update(self, captions: int, tokens: int) -> None:
        self.captions += captions
        self.tokens += tokens
        if not self.enabled:
            return
        cps, tps = self.rates()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{cps:,.0f} captions/s {tps:,.0f} tokens/s", refresh=False)
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            print(f"[extract] {self.captions:,} captions  {cps:,.0f} captions/s  {tps:,.0f} tokens/s",
                  flush=True)  # fmt: skip

    def shard_done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# The run


def _exit_after() -> int | None:
    v = os.environ.get(EXIT_AFTER_ENV)
    return int(v) if v else None


def extract(cfg: ExtractConfig) -> dict:
    """Run the extraction on this rank (and the merge on rank 0); returns the summary dict."""
    t0 = time.perf_counter()
    info, made_group = init_distributed(cfg.device, cfg.dist_timeout_min)
    try:
        return _extract(cfg, info, t0)
    finally:
        if made_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _extract(cfg: ExtractConfig, info: DistInfo, t0: float) -> dict:
    out = Path(cfg.out)
    if (out / MANIFEST_FILE).exists():
        raise SystemExit(f"llm2clip.extract: {out} already holds a merged cache; write to a new directory")
    paths = expand_shards(list(cfg.shards))
    names = [shard_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SystemExit(f"llm2clip.extract: shard names must be unique (the cache keys on them): {dup[:5]}")
    embedder = load_embedder(cfg, info.device)
    spec = make_spec(cfg, embedder.hidden_size, info)
    writer = CacheWriter(out, spec, cfg.storage, rank=info.rank, world_size=info.world_size)
    mine = list(range(len(paths)))[info.rank :: info.world_size]  # shard i -> rank i % world
    done = writer.done_shards()
    todo = [i for i in mine if names[i] not in done]
    exit_after = _exit_after()
    pin = info.device.type == "cuda"
    progress = Progress(len(todo), cfg.progress and info.rank == 0, desc=f"extract rank0/{info.world_size}")
    stats = {
        "rank": info.rank, "shards": len(todo), "shards_resumed": len(mine) - len(todo), "samples": 0,
        "captions": 0, "unique_in_shards": 0, "tokens": 0, "truncated": 0,
        "missing": {f.name: 0 for f in cfg.field_specs},
    }  # fmt: skip

    def write_all(q: queue.Queue) -> None:
        written = 0
        while (item := q.get()) is not _STOP:
            work, host, ev = item
            if ev is not None:
                ev.synchronize()
            rows = host[torch.tensor(work.unique_of, dtype=torch.long)] if work.captions else host[:0]
            with writer.shard(work.name) as s:
                if work.captions:
                    s.add_batch(work.keys, work.fields, work.captions, rows)
            written += 1
            progress.shard_done()
            if exit_after is not None and written >= exit_after:
                sys.stdout.flush()
                os._exit(3)

    wq: queue.Queue = queue.Queue(maxsize=1)  # one shard being written, one waiting
    wbg = Background(write_all, wq)
    works = prefetch((prepare_shard(paths[i], embedder, cfg, pin=pin) for i in todo), maxsize=2)
    failed = True
    try:
        for work in works:
            emb = launch_batches(embedder, work.batches, work.num_unique, progress)
            host, ev = to_host(emb)
            work.batches = []  # free the pinned inputs
            wbg.put(wq, (work, host, ev))
            stats["samples"] += work.samples
            stats["captions"] += len(work.captions)
            stats["unique_in_shards"] += work.num_unique
            stats["tokens"] += work.tokens
            stats["truncated"] += work.truncated
            for k, v in work.missing.items():
                stats["missing"][k] += v
        failed = False
    finally:
        works.close()
        try:  # the writer finishes the shards already handed over, then stops
            wbg.put(wq, _STOP)
            wbg.thread.join()
        except BaseException:
            if not failed:
                raise
        progress.close()
    wbg.check()
    stats["seconds"] = time.perf_counter() - t0
    all_stats = _gather_objects(stats, info)  # also the barrier: every rank's shards are done

    summary = None
    if info.rank == 0:
        probe = embedder.encode(list(PROBE_CAPTIONS))
        manifest = writer.merge(probe, shards=names)
        summary = _summary(cfg, spec, manifest, all_stats, time.perf_counter() - t0, info)
        path = Path(cfg.summary) if cfg.summary else out / SUMMARY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, path)
        _print_summary(summary)
    return _broadcast_object(summary, info)


def _summary(cfg, spec, manifest, all_stats, seconds, info) -> dict:
    total = lambda k: sum(s[k] for s in all_stats)
    missing = {f.name: sum(s["missing"][f.name] for s in all_stats) for f in cfg.field_specs}
    embedded_seconds = max(s["seconds"] for s in all_stats)
    return {
        "cache": str(cfg.out),
        "world_size": info.world_size,
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
        "config": {k: v for k, v in cfg.to_dict().items()},
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
    cfg = parse_config(argv)
    return extract(cfg)


if __name__ == "__main__":
    main()
