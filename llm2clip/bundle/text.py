"""Captions -> frozen LLM embeddings at a chosen length, with the truncation count.

    emb, truncated = embed_captions(embedder, captions, max_length=1024)   # (n, d) fp32 on the CPU
    with embedding_length(embedder, 1024): ...                            # a temporary max_length

Long-caption evaluation embeds captions far beyond CLIP's 77 tokens: at the recipe's max_length
by default, or at another length for the occasion (``embedding_length``; the LLM's position limit
is checked). Identical captions are embedded once. ``truncated`` counts the distinct captions that
did not fit (template and special tokens included), as ``llm2clip.extract`` counts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llm2clip.extraction import tokenize_counting

__all__ = ["TokenizedText", "embed_captions", "embedding_length", "tokenize_captions"]


@contextlib.contextmanager
def embedding_length(embedder, max_length: int | None) -> Iterator[None]:
    """Run the block with ``embedder.config.max_length = max_length`` (None: unchanged).

    Raises ValueError when the LLM has fewer positions than max_length (it would be asked for
    positions it never learned)."""
    config = getattr(embedder, "config", None)
    if max_length is None or config is None or max_length == config.max_length:
        yield
        return
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    limit = getattr(getattr(embedder.base_model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(
            f"max_length {max_length} exceeds the LLM's {limit} positions (max_position_embeddings)"
        )
    embedder.config = dataclasses.replace(
        config, max_length=max_length, tokens_per_batch=max(config.tokens_per_batch, max_length)
    )
    try:
        yield
    finally:
        embedder.config = config


@dataclass
class TokenizedText:
    """Captions tokenized for the recorded LLM (what ``LLM2CLIP.tokenize`` returns).

    ``.to(device)`` returns self: the LLM runs on its own device (clip_benchmark moves its tokens)."""

    texts: list[str]
    ids: list[list[int]] | None = None
    """Token ids with the template and special tokens; None: the captions are looked up in a cache."""
    pool_masks: list[list[bool]] | None = None
    truncated: int = 0
    """Captions cut at max_length."""

    def to(self, *args, **kwargs) -> TokenizedText:
        return self

    def __len__(self) -> int:
        return len(self.texts)


def tokenize_captions(embedder, texts: Sequence[str], max_length: int | None = None) -> TokenizedText:
    """The captions tokenized as ``embedder.encode`` would, with the truncation count."""
    texts = [str(t) for t in texts]
    with embedding_length(embedder, max_length):
        ids, masks, truncated = tokenize_counting(embedder, texts)
    return TokenizedText(texts, ids, masks, truncated)


def embed_captions(
    embedder, texts: Sequence[str], max_length: int | None = None
) -> tuple[Tensor, int | None]:
    """(len(texts), d) fp32 CPU embeddings of the captions and the number of distinct captions
    truncated at max_length (None when the embedder has no tokenizer to count with).

    embedder: an ``LLMTextEmbedder`` (or any object with ``encode(list[str]) -> (n, d)``). Each
    distinct caption is embedded once, in the embedder's own batches, with autocast off (the
    recipe's dtype, as extraction ran it)."""
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("no captions to embed")
    first: dict[str, int] = {}
    index = [first.setdefault(t, len(first)) for t in texts]
    unique = list(first)
    truncated = None
    with torch.inference_mode(), _no_autocast(embedder), embedding_length(embedder, max_length):
        if getattr(embedder, "tokenizer", None) is not None and hasattr(embedder, "config"):
            tok = tokenize_captions(embedder, unique)
            emb = embedder.encode(ids=tok.ids, pool_masks=tok.pool_masks)
            truncated = tok.truncated
        else:
            emb = embedder.encode(unique)
    emb = torch.as_tensor(emb).to("cpu", torch.float32)
    return emb[torch.tensor(index, dtype=torch.long)].clone(), truncated


def _no_autocast(embedder):
    """Autocast off on the embedder's device: the recipe's dtype decides the LLM's numerics."""
    device = getattr(embedder, "device", None)
    kind = device.type if isinstance(device, torch.device) else "cpu"
    return torch.autocast(kind, enabled=False)
