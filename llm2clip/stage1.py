"""Stage 1: caption-contrastive (supervised SimCSE) LoRA fine-tuning of a bidirectional LLM.

    torchrun --nproc_per_node 8 -m llm2clip.stage1 --model /models/llama --shards 'data/{00000..00099}.tar' \
        --field-a txt --field-b json:dense_caption --eval-pairs 1000 --output-dir runs/stage1

Pairs (a, b) are two captions of the same image: two fields of a webdataset shard sample (``txt``: the
raw ``.txt`` member; ``json:dense_caption``: a key of the ``.json`` member, dots for nesting) and/or
the ``{"a": ..., "b": ...}`` lines of ``--pairs-jsonl`` files. Each caption goes through the
instruction template, the bidirectional LLM with a LoRA adapter (r 16, alpha 32, dropout 0.05 on
every projection) and mean pooling, then L2 normalisation; a and b of one rank's batch run as one
packed forward. Loss: symmetric InfoNCE a <-> b at a fixed scale (50 = 1 / tau 0.02) with in-batch
negatives gathered from every rank by the fused ``llm2clip_kernels.distributed_infonce_loss``;
identical b captions in the global batch are not each other's negatives (``--dedup-negatives``).
The adapter's gradients are averaged over ranks (one flat all-reduce; no DDP wrapper).

Optional MNTP warm-up (LLM2Vec): the first ``--mntp-steps`` steps train the same adapter with masked
next-token prediction: ~20% of caption tokens are masked (80% -> the mask token, 10% random, 10%
kept) and token i is predicted from the bidirectional model's hidden state at i - 1 through the
(frozen) LM head; the ``*ForCausalLM`` model is loaded only then.

Data order: sources (shards, then jsonl files) are read whole, one at a time; each epoch permutes
the source order and the pairs inside each source from (seed, epoch). Every rank reads the same
global stream and keeps pairs r, r + W, ... of each global batch, so the data position (epoch,
source, pair) is the same on every rank and resumes exactly. A pair with an empty or missing
caption is skipped and counted; an unreadable shard raises ``ShardError`` naming it. Held-out
pairs for CRA (caption a -> its b, top-1 cosine over all held-out b captions) are the first
``--eval-pairs`` valid pairs in file order (never trained on) or the ``--eval-jsonl`` file.

Outputs (``--output-dir``): ``config.json`` (the resolved config, written first),
``checkpoint.pt`` (adapter weights, optimizer, scheduler, step, data position, every rank's RNG,
metrics so far; written atomically every ``--checkpoint-every`` steps and at the end),
``adapter/`` (peft adapter), ``embedder_config.json`` (how to embed with it), ``merged/`` with
``--merge`` (full weights + tokenizer), ``metrics.json`` (losses, CRA before/after, pairs/s, time).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2clip.data.shards import expand_shards, iter_samples
from llm2clip.files import atomic_save, atomic_write_json
from llm2clip.models.text_embedder import (
    ATTN_IMPLEMENTATION,
    DEFAULT_LORA_TARGETS,
    DTYPES,
    POOLING_MODES,
    LLMTextEmbedder,
    LoraSettings,
    TextEmbedderConfig,
    collate,
)
from llm2clip.train_utils import (
    DECAYS,
    DistInfo,
    Progress,
    all_reduce_grads,
    all_reduce_mean,
    capture_rng,
    config_field,
    init_distributed,
    lr_schedule,
    print0,
    restore_rng,
    seed_everything,
)
from llm2clip.train_utils import build_parser as build_parser_from

CHECKPOINT_FORMAT = 1
LOSS_BACKENDS = ("auto", "triton", "torch")
# Config fields that must match when resuming (they change what the adapter means).
_RESUME_MUST_MATCH = ("model", "instruction", "pooling", "max_length", "lora_r", "lora_alpha", "lora_targets")


_f = config_field


@dataclass
class Stage1Config:
    """Everything a stage-1 run depends on; built from the CLI (one flag per field) and validated."""

    # ---- model
    model: str = _f("", "Local model directory or .gguf file (the base LLM; no hub downloads).")
    output_dir: str = _f("", "Run directory: config, checkpoint, adapter, merged weights, metrics.")
    instruction: str = _f(
        "{caption}", "Instruction template with one '{caption}'; its tokens are not pooled."
    )
    pooling: str = _f("mean", f"Pooling of the caption's hidden states: one of {POOLING_MODES}.")
    max_length: int = _f(512, "Token limit per caption (template and special tokens included).")
    dtype: str = _f(
        "auto", "Base weights: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32."
    )
    amp: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU).")
    packed: bool = _f(True, "Packed batches (no pad tokens) instead of padded ones.")
    gradient_checkpointing: bool = _f(
        False, "Recompute each decoder layer in backward (activation checkpointing)."
    )
    attn_backend: str | None = _f(None, "Attention backend override: flash_attn, xformers, sdpa, math.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: float = _f(32.0, "LoRA alpha (update scale alpha / r).")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch while training.")
    lora_targets: tuple[str, ...] = _f(DEFAULT_LORA_TARGETS, "Linear layers that get LoRA adapters.")
    # ---- data
    shards: str | None = _f(None, "webdataset shards: a directory, glob, brace pattern, '::'-joined specs.")
    field_a: str = _f("txt", "Caption a of a shard sample: a member ('txt') or a JSON key ('json:key.sub').")
    field_b: str = _f("json:dense_caption", "Caption b of a shard sample (same syntax as --field-a).")
    pairs_jsonl: tuple[str, ...] = _f((), 'Text-pair files with one {"a": ..., "b": ...} per line.')
    eval_pairs: int = _f(0, "Hold out the first N valid pairs (file order) for CRA; never trained on.")
    eval_jsonl: str | None = _f(None, "Held-out pairs for CRA from this jsonl instead of --eval-pairs.")
    shuffle: bool = _f(True, "Permute sources and the pairs inside each source every epoch.")
    # ---- optimisation
    batch_size: int = _f(64, "Pairs per rank per step (global batch = batch_size x world size).")
    steps: int = _f(1000, "SimCSE (contrastive) optimizer steps, after the MNTP steps.")
    mntp_steps: int = _f(0, "MNTP warm-up steps before the contrastive ones (0: none).")
    mntp_mask_prob: float = _f(0.2, "MNTP: fraction of caption tokens masked.")
    lr: float = _f(2e-4, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(300, "Linear warmup steps.")
    decay: str = _f("cosine", f"LR decay after warmup: one of {DECAYS}.")
    min_lr_ratio: float = _f(0.0, "Final lr as a fraction of the peak.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    scale: float = _f(50.0, "Fixed logit scale (1 / temperature; 50 = tau 0.02).")
    dedup_negatives: bool = _f(True, "Identical b captions in the global batch are not negatives.")
    loss_backend: str = _f("auto", f"Fused loss backend: one of {LOSS_BACKENDS}.")
    seed: int = _f(0, "Seed for the adapter init, data order, dropout and MNTP masks.")
    # ---- run
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available), cpu or cuda.")
    checkpoint_every: int = _f(
        500, "Write checkpoint.pt every N steps (and always at the end; 0: only at the end)."
    )
    resume: str | None = _f(
        None, "Resume from a checkpoint: a path, or bare --resume for OUTPUT_DIR/checkpoint.pt if present.",
        nargs="?", const="auto",
    )  # fmt: skip
    stop_at_step: int = _f(0, "Stop after this global step with a checkpoint (time-limited jobs; 0: off).")
    merge: bool = _f(False, "Also write merged full weights (base + adapter) to OUTPUT_DIR/merged.")
    log_every: int = _f(10, "Progress line every N steps when no tqdm bar is shown.")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        if isinstance(self.pairs_jsonl, str):
            self.pairs_jsonl = (self.pairs_jsonl,)
        self.pairs_jsonl = tuple(self.pairs_jsonl)
        if not self.model:
            raise ValueError("--model is required (a local model directory or .gguf file)")
        if not self.output_dir:
            raise ValueError("--output-dir is required")
        if self.shards is None and not self.pairs_jsonl:
            raise ValueError("no training data: give --shards and/or --pairs-jsonl")
        for name in ("field_a", "field_b"):
            parse_field(getattr(self, name))
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLING_MODES}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {('auto', *DTYPES)}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay {self.decay!r} not in {DECAYS}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend {self.loss_backend!r} not in {LOSS_BACKENDS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} not in ('auto', 'cpu', 'cuda')")
        positive = {"batch_size": self.batch_size, "lr": self.lr, "scale": self.scale, "lora_r": self.lora_r}
        positive["max_length"] = self.max_length - 1
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("steps", "mntp_steps", "warmup_steps", "eval_pairs", "checkpoint_every", "stop_at_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps + self.mntp_steps == 0:
            raise ValueError("nothing to train: --steps and --mntp-steps are both 0")
        if not 0.0 < self.mntp_mask_prob < 1.0:
            raise ValueError(f"mntp_mask_prob must be in (0, 1), got {self.mntp_mask_prob}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.eval_jsonl is not None and self.eval_pairs:
            raise ValueError("give --eval-pairs or --eval-jsonl, not both")
        self.lora_settings()  # validates r / dropout / targets

    @property
    def total_steps(self) -> int:
        return self.mntp_steps + self.steps

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=self.lora_targets
        )

    def embedder_config(self, dtype: str) -> TextEmbedderConfig:
        return TextEmbedderConfig(
            model=self.model, pooling=self.pooling, instruction=self.instruction, max_length=self.max_length,
            dtype=dtype, packed=self.packed, attn_backend=self.attn_backend, normalize=True,
            gradient_checkpointing=self.gradient_checkpointing, lora=self.lora_settings(),
            tokens_per_batch=max(16384, self.max_length),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# CLI (generated from the config's fields)


def build_parser() -> argparse.ArgumentParser:
    return build_parser_from(
        Stage1Config,
        prog="python -m llm2clip.stage1",
        description="Stage 1 of LLM2CLIP: caption-contrastive LoRA fine-tuning of a bidirectional LLM.",
    )


def config_from_args(argv: Sequence[str] | None = None) -> Stage1Config:
    args = build_parser().parse_args(argv)
    return Stage1Config(**vars(args))


# ---------------------------------------------------------------------------------------------
# Data


def parse_field(spec: str) -> tuple[str, tuple[str, ...]]:
    """'txt' -> ('txt', ()); 'json:dense_caption' -> ('json', ('dense_caption',)); 'json:a.b' nests."""
    member, _, key = spec.partition(":")
    if not member or (":" in spec and not key):
        raise ValueError(
            f"caption field {spec!r}: expected MEMBER or MEMBER:KEY (e.g. txt, json:dense_caption)"
        )
    return member, tuple(key.split(".")) if key else ()


def _caption(sample: dict, member: str, keys: tuple[str, ...], decoded: dict) -> str | None:
    """A caption from a shard sample, or None when missing / not a string. Raises on invalid JSON."""
    raw = sample.get(member)
    if raw is None:
        return None
    if not keys:
        return raw.decode("utf-8", errors="replace")
    if member not in decoded:
        decoded[member] = json.loads(raw)
    value = decoded[member]
    for k in keys:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return value if isinstance(value, str) else None


@dataclass
class SkipCounts:
    empty: int = 0
    """A caption that is empty (or whitespace only)."""
    missing: int = 0
    """A caption field absent from the sample, or not a string."""
    malformed: int = 0
    """A sample whose JSON member does not parse."""


def read_source(
    kind: str, path: str, field_a: str, field_b: str
) -> tuple[list[tuple[int, str, str]], SkipCounts]:
    """Valid pairs of one source as (index in the source, a, b), plus what was skipped.

    kind 'shard' (captions by --field-a / --field-b; an unreadable shard raises ShardError naming it)
    or 'jsonl' (keys "a" and "b"; a line that is not JSON raises ValueError naming file and line).
    """
    out, skip = [], SkipCounts()

    def add(i, a, b):
        if a is None or b is None:
            skip.missing += 1
        elif not a.strip() or not b.strip():
            skip.empty += 1
        else:
            out.append((i, a.strip(), b.strip()))

    if kind == "shard":
        (ma, ka), (mb, kb) = parse_field(field_a), parse_field(field_b)
        for i, sample in enumerate(iter_samples(path)):
            decoded: dict = {}
            try:
                add(i, _caption(sample, ma, ka, decoded), _caption(sample, mb, kb, decoded))
            except (ValueError, UnicodeDecodeError):
                skip.malformed += 1
    elif kind == "jsonl":
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot open pairs file {path}: {e}") from e
        with f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
                row = row if isinstance(row, dict) else {}
                a, b = row.get("a"), row.get("b")
                add(i, a if isinstance(a, str) else None, b if isinstance(b, str) else None)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return out, skip


class PairStream:
    """An endless, resumable stream of training pairs over all sources (see the module docstring).

    ``state`` = (epoch, position in the epoch's source order, position in that source's pair order)
    of the next pair; identical on every rank, since every rank reads the same global stream.
    """

    def __init__(self, sources, field_a, field_b, seed=0, shuffle=True, held: dict | None = None):
        self.sources, self.field_a, self.field_b = list(sources), field_a, field_b
        self.seed, self.shuffle, self.held = seed, shuffle, held or {}
        self.skipped: dict[int, SkipCounts] = {}
        self.state = (0, 0, 0)
        self._cache: tuple | None = None  # (epoch, source index, pairs in epoch order)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sources)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def _pairs(self, epoch: int, src: int) -> list[tuple[str, str]]:
        if self._cache is not None and self._cache[:2] == (epoch, src):
            return self._cache[2]
        rows, skip = read_source(*self.sources[src], self.field_a, self.field_b)
        self.skipped[src] = skip
        held = self.held.get(src, set())
        pairs = [(a, b) for i, a, b in rows if i not in held]
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/{src}").shuffle(pairs)
        self._cache = (epoch, src, pairs)
        return pairs

    def take(self, n: int) -> list[tuple[str, str]]:
        """The next n pairs of the global stream (wrapping into new epochs)."""
        out: list[tuple[str, str]] = []
        epoch, pos, j = self.state
        empty_sweep = 0
        while len(out) < n:
            order = self._order(epoch)
            if pos >= len(order):
                epoch, pos, j = epoch + 1, 0, 0
                if empty_sweep == len(order):
                    raise ValueError("the training data has no valid pairs (all empty, missing or held out)")
                empty_sweep = 0
                continue
            pairs = self._pairs(epoch, order[pos])
            got = pairs[j : j + n - len(out)]
            out.extend(got)
            j += len(got)
            if j >= len(pairs):
                empty_sweep += not pairs
                pos, j = pos + 1, 0
        self.state = (epoch, pos, j)
        return out

    def skip_totals(self) -> dict:
        total = SkipCounts()
        for s in self.skipped.values():
            total.empty, total.missing, total.malformed = (
                total.empty + s.empty, total.missing + s.missing, total.malformed + s.malformed
            )  # fmt: skip
        return dataclasses.asdict(total)


def make_sources(cfg: Stage1Config) -> list[tuple[str, str]]:
    sources = [("shard", p) for p in expand_shards(cfg.shards)] if cfg.shards else []
    return sources + [("jsonl", p) for p in cfg.pairs_jsonl]


def held_out_pairs(cfg: Stage1Config, sources) -> tuple[list[tuple[str, str]], dict[int, set[int]]]:
    """(eval pairs, {source index: held-out pair indices}) per --eval-pairs / --eval-jsonl."""
    if cfg.eval_jsonl is not None:
        rows, _ = read_source("jsonl", cfg.eval_jsonl, cfg.field_a, cfg.field_b)
        return [(a, b) for _, a, b in rows], {}
    pairs: list[tuple[str, str]] = []
    held: dict[int, set[int]] = {}
    for s, (kind, path) in enumerate(sources):
        if len(pairs) >= cfg.eval_pairs:
            break
        rows, _ = read_source(kind, path, cfg.field_a, cfg.field_b)
        for i, a, b in rows[: cfg.eval_pairs - len(pairs)]:
            pairs.append((a, b))
            held.setdefault(s, set()).add(i)
    return pairs, held


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


# ---------------------------------------------------------------------------------------------
# Model, losses, metrics


def build_model(cfg: Stage1Config, dtype: str, device: torch.device):
    """(embedder with a fresh trainable LoRA adapter, frozen LM head or None). The *ForCausalLM
    model (for its LM head) is loaded only when MNTP steps are asked for."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    ecfg = cfg.embedder_config(dtype)
    kw = {"local_files_only": True}
    if ecfg.gguf_file is not None:
        kw["gguf_file"] = ecfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(ecfg.model, **kw)
    cls = AutoModelForCausalLM if cfg.mntp_steps > 0 else AutoModel
    model = cls.from_pretrained(
        ecfg.model, attn_implementation=ATTN_IMPLEMENTATION, dtype=ecfg.torch_dtype, **kw
    )
    model = model.to(device)
    lm_head = model.get_output_embeddings() if cfg.mntp_steps > 0 else None
    if lm_head is not None:
        lm_head.requires_grad_(False)
    return LLMTextEmbedder(model, tokenizer, ecfg), lm_head


def contrastive_loss(embedder: LLMTextEmbedder, pairs, cfg: Stage1Config, device) -> Tensor:
    """Symmetric InfoNCE a <-> b with negatives from every rank (fused, fixed scale)."""
    from llm2clip_kernels import distributed_infonce_loss

    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    emb = embedder(embedder.collate(a + b).to(device))  # one packed forward, (2n, d) fp32, normalised
    groups = None
    if cfg.dedup_negatives:
        groups = torch.tensor([_text_hash(t) for t in b], dtype=torch.long, device=device)
    return distributed_infonce_loss(
        emb[: len(a)], emb[len(a) :], cfg.scale, group_ids=groups, backend=cfg.loss_backend
    )


def mask_for_mntp(ids, pool_masks, prob: float, mask_id: int, vocab: int, gen: torch.Generator):
    """BERT-style masking of caption tokens (never a caption's first token). Returns
    (input ids, [(caption, position)] of the masked tokens, their original ids)."""
    inputs, where, targets = [list(x) for x in ids], [], []
    candidates = [(i, p) for i, m in enumerate(pool_masks) for p in range(1, len(m)) if m[p]]
    if not candidates:
        return inputs, where, targets
    draw = torch.rand(len(candidates), generator=gen)
    chosen = [c for c, u in zip(candidates, draw.tolist()) if u < prob]
    if not chosen:
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=gen))]]
    kinds = torch.rand(len(chosen), generator=gen).tolist()
    randoms = torch.randint(vocab, (len(chosen),), generator=gen).tolist()
    for (i, p), u, r in zip(chosen, kinds, randoms):
        where.append((i, p))
        targets.append(ids[i][p])
        inputs[i][p] = mask_id if u < 0.8 else (r if u < 0.9 else ids[i][p])
    return inputs, where, targets


def mntp_loss(embedder: LLMTextEmbedder, lm_head, pairs, cfg: Stage1Config, device, gen) -> Tensor:
    """Masked next-token prediction: token i predicted from the hidden state at i - 1 (LLM2Vec)."""
    texts = [t for p in pairs for t in p]
    ids, masks = embedder.tokenize(texts)
    tok = embedder.tokenizer
    mask_id = getattr(tok, "mask_token_id", None)
    mask_id = embedder.pad_id if mask_id is None else mask_id
    inputs, where, targets = mask_for_mntp(
        ids, masks, cfg.mntp_mask_prob, mask_id, lm_head.weight.shape[0], gen
    )
    batch = collate(inputs, masks, pooling=cfg.pooling, packed=cfg.packed, pad_id=embedder.pad_id).to(device)
    hidden = embedder.hidden_states(batch)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if not where:
        return hidden.sum() * 0.0
    if batch.packed:
        starts = [0]
        for x in inputs[:-1]:
            starts.append(starts[-1] + len(x))
        rows = [starts[i] + p - 1 for i, p in where]
    else:
        rows = [i * batch.max_seqlen + p - 1 for i, p in where]
    logits = lm_head(hidden[torch.tensor(rows, device=device)]).float()
    return F.cross_entropy(logits, torch.tensor(targets, device=device))


@torch.no_grad()
def caption_retrieval_accuracy(embedder: LLMTextEmbedder, pairs, autocast) -> float:
    """Top-1 accuracy of caption a -> its own b among all b captions (cosine). A hit on a different
    pair with the identical b caption counts as correct."""
    if not pairs:
        return float("nan")
    with autocast:
        ea = embedder.encode([p[0] for p in pairs])
        eb = embedder.encode([p[1] for p in pairs])
    top = (F.normalize(ea.float(), dim=-1) @ F.normalize(eb.float(), dim=-1).T).argmax(1).tolist()
    return sum(pairs[j][1] == pairs[i][1] for i, j in enumerate(top)) / len(pairs)


def train_step(loss_fn, params, optimizer, scheduler, cfg: Stage1Config, dist: DistInfo, autocast):
    """One optimizer step: loss_fn() under autocast -> backward -> average grads over ranks -> clip ->
    step. Returns (the loss averaged over ranks, the gradient norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_fn()
    loss.backward()
    all_reduce_grads(params, dist.world_size)
    grads = [p.grad for p in params if p.grad is not None]
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    optimizer.step()
    scheduler.step()
    return float(all_reduce_mean(loss.detach().float(), dist.world_size)), float(norm)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def trainable(embedder: LLMTextEmbedder) -> dict[str, Tensor]:
    return {n: p for n, p in embedder.model.named_parameters() if p.requires_grad}


def save_checkpoint(path, embedder, optimizer, scheduler, step, stream, metrics, cfg, dist) -> None:
    """Every rank's RNG is gathered; rank 0 writes the file atomically; all ranks wait for it."""
    rng = capture_rng()
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    else:
        rng = [rng]
    if dist.is_main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "adapter": {n: p.detach().cpu() for n, p in trainable(embedder).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": stream.state,
            "rng": rng,
            "metrics": metrics,
            "config": dataclasses.asdict(cfg),
        }
        atomic_save(path, state)
    if dist.distributed:
        torch.distributed.barrier()


def load_checkpoint(path, embedder, optimizer, scheduler, stream, cfg, dist) -> tuple[int, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} != {CHECKPOINT_FORMAT}")
    for name in _RESUME_MUST_MATCH:
        old, new = state["config"].get(name), getattr(cfg, name)
        if (tuple(old) if isinstance(old, list) else old) != new:
            raise ValueError(f"{path}: checkpoint has {name}={old!r}, this run {new!r}; not resumable")
    params = trainable(embedder)
    if set(params) != set(state["adapter"]):
        raise ValueError(f"{path}: adapter parameters differ from this model's")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["adapter"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.state = tuple(state["data"])
    if len(state["rng"]) == dist.world_size:
        restore_rng(state["rng"][dist.rank])
    else:
        print0(dist, f"world size changed ({len(state['rng'])} -> {dist.world_size}): RNG reseeded")
        seed_everything(cfg.seed + dist.rank + 1000 * state["step"])
    return int(state["step"]), state["metrics"]


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> dict:
    """Run stage 1; returns the metrics dict (also written to OUTPUT_DIR/metrics.json)."""
    cfg = config_from_args(argv)
    dist = init_distributed(cfg.device)
    try:
        return train(cfg, dist)[0]
    finally:
        if dist.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def train(cfg: Stage1Config, dist: DistInfo) -> tuple[dict, LLMTextEmbedder]:
    """The whole run for an already set-up process; returns (metrics, the trained embedder)."""
    dev = dist.device
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    cfg = dataclasses.replace(cfg, dtype=dtype)
    out = cfg.output_dir
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if dist.is_main:
        atomic_write_json(os.path.join(out, "config.json"), dataclasses.asdict(cfg))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and dev.type == "cuda" else nullcontext()
    )

    sources = make_sources(cfg)
    eval_set, held = held_out_pairs(cfg, sources)
    stream = PairStream(sources, cfg.field_a, cfg.field_b, cfg.seed, cfg.shuffle, held)
    seed_everything(cfg.seed)  # the same adapter init on every rank
    embedder, lm_head = build_model(cfg, dtype, dev)
    seed_everything(cfg.seed + dist.rank)  # per-rank dropout
    params = list(trainable(embedder).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, cfg.warmup_steps, cfg.total_steps, cfg.decay, cfg.min_lr_ratio)
    n_params = sum(p.numel() for p in params)
    print0(dist, f"stage1: {len(sources)} sources, {len(eval_set)} eval pairs, world {dist.world_size}, "
                 f"{n_params / 1e6:.2f}M trainable params, device {dev}, dtype {dtype}")  # fmt: skip

    t_start = time.perf_counter()
    step, metrics = 0, {"losses": [], "mntp_losses": [], "train_time_s": 0.0, "contrastive_time_s": 0.0}
    metrics["wall_time_s"] = 0.0  # over every invocation of the run (resumes add theirs)
    resume = ckpt_path if cfg.resume == "auto" else cfg.resume
    if resume is not None and (cfg.resume != "auto" or os.path.exists(resume)):
        step, metrics = load_checkpoint(resume, embedder, optimizer, scheduler, stream, cfg, dist)
        print0(dist, f"resumed from {resume} at step {step}")
    wall_before = metrics["wall_time_s"]
    if "cra_before" not in metrics:
        metrics["cra_before"] = caption_retrieval_accuracy(embedder, eval_set, autocast)
        print0(dist, f"CRA before: {metrics['cra_before']:.4f} on {len(eval_set)} pairs")

    end = min(cfg.total_steps, cfg.stop_at_step) if cfg.stop_at_step else cfg.total_steps
    global_batch = cfg.batch_size * dist.world_size
    progress = Progress(cfg.total_steps, step, enabled=dist.is_main, every=cfg.log_every, desc="stage1")
    while step < end:
        pairs = stream.take(global_batch)[dist.rank :: dist.world_size]
        mntp = step < cfg.mntp_steps
        if mntp:  # masks drawn from (seed, step, rank): reproducible after a resume
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.rank)
            loss_fn = partial(mntp_loss, embedder, lm_head, pairs, cfg, dev, gen)
        else:
            loss_fn = partial(contrastive_loss, embedder, pairs, cfg, dev)
        t0 = time.perf_counter()
        loss, norm = train_step(loss_fn, params, optimizer, scheduler, cfg, dist, autocast)
        dt = time.perf_counter() - t0
        step += 1
        metrics["mntp_losses" if mntp else "losses"].append(loss)
        metrics["train_time_s"] += dt
        metrics["contrastive_time_s"] += 0.0 if mntp else dt
        lr = scheduler.get_last_lr()[0]
        progress.update(
            loss=loss, lr=lr, gnorm=norm, pairs_per_s=global_batch / dt, phase="mntp" if mntp else "cc"
        )
        if step == end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            metrics["wall_time_s"] = wall_before + time.perf_counter() - t_start
            save_checkpoint(ckpt_path, embedder, optimizer, scheduler, step, stream, metrics, cfg, dist)
    progress.close()

    n_cc = len(metrics["losses"])
    metrics.update(
        step=step, world_size=dist.world_size, global_batch=global_batch, data_state=list(stream.state),
        pairs_per_s=n_cc * global_batch / metrics["contrastive_time_s"] if n_cc else None,
        skipped=stream.skip_totals(), eval_pairs=len(eval_set), finished=step >= cfg.total_steps,
    )  # fmt: skip
    if metrics["finished"]:
        metrics["cra_after"] = caption_retrieval_accuracy(embedder, eval_set, autocast)
        print0(dist, f"CRA after: {metrics['cra_after']:.4f} (before {metrics['cra_before']:.4f})")
    metrics["wall_time_s"] = wall_before + time.perf_counter() - t_start
    if dist.is_main:
        if metrics["finished"]:
            write_outputs(cfg, embedder, out)
        atomic_write_json(os.path.join(out, "metrics.json"), {"config": dataclasses.asdict(cfg), **metrics})
    if dist.distributed:
        torch.distributed.barrier()
    return metrics, embedder


def write_outputs(cfg: Stage1Config, embedder: LLMTextEmbedder, out: str) -> None:
    """adapter/ (peft), embedder_config.json, and merged/ (full weights + tokenizer) with --merge."""
    embedder.save_lora(os.path.join(out, "adapter"))
    ecfg = dataclasses.replace(embedder.config, lora=None, gradient_checkpointing=False)
    info = {"embedder": ecfg.to_dict(), "adapter": os.path.join(out, "adapter")}
    if cfg.merge:
        merged = os.path.join(out, "merged")
        embedder.merge_lora()
        embedder.model.save_pretrained(merged)
        embedder.tokenizer.save_pretrained(merged)
        info["merged"] = merged
    atomic_write_json(os.path.join(out, "embedder_config.json"), info)


if __name__ == "__main__":
    main(sys.argv[1:])
