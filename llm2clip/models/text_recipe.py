"""The text side's recipe: how a caption becomes the frozen LLM embedding a cache holds.

    recipe = TextRecipe(model="/models/llama", adapter="runs/stage1/adapter", pooling="mean")
    embedder = load_embedder(recipe, "cuda")                 # LLMTextEmbedder, frozen, eval mode
    embedder = embedder_like("caches/cc3m", "cuda")          # the recipe a cache was filled with

Stage 2 trains an adapter over one particular frozen LLM, so everything embedded later (held-out
captions, zero-shot prompts, a user's text) must be embedded exactly as the training captions
were. ``llm2clip.extract`` writes its recipe into ``<cache>/extract_summary.json`` (under
``config.text``); ``embedder_like`` rebuilds it and re-embeds the cache's probe captions, raising
StaleCacheError before any number is computed if they differ.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from llm2clip.cli import config_field as _f
from llm2clip.models.text_embedder import (
    DTYPES,
    PACKED_ATTENTION,
    POOLING_MODES,
    LLMTextEmbedder,
    TextEmbedderConfig,
)

__all__ = ["SUMMARY_FILE", "TextRecipe", "embedder_like", "load_embedder", "read_recipe"]

SUMMARY_FILE = "extract_summary.json"


@dataclass
class TextRecipe:
    """The frozen LLM text embedder: model, adapter, template, pooling, length, dtype, batching."""

    model: str = _f("", "Local transformers model directory or .gguf file.", required=True)
    adapter: str | None = _f(None, "peft LoRA adapter directory from stage 1.")
    merge_adapter: bool = _f(
        True, "Fold the adapter into the weights (faster; --no-merge-adapter keeps the peft wrapper)."
    )
    instruction: str = _f("{caption}", "Prompt template with one '{caption}'.")
    pooling: str = _f("mean", "Pooling over caption tokens.", choices=POOLING_MODES)
    max_length: int = _f(
        512, "Tokens per caption, template included; longer captions are truncated and counted."
    )
    add_eos: bool = _f(False, "Append the tokenizer's EOS token.")
    normalize: bool = _f(False, "L2-normalise embeddings before storage.")
    dtype: str = _f("bfloat16", "LLM compute dtype.", choices=tuple(DTYPES))
    tokens_per_batch: int = _f(
        16384, "Token budget per batch (packed: real tokens; padded: batch x longest)."
    )
    packed: bool = _f(
        True,
        "Pad batches to their longest caption instead of packing (slower; for comparison).",
        flag="--padded",
        action="store_false",
    )
    packed_attention: str = _f(
        "auto", "How packed batches attend (see llm2clip.models.text_embedder).", choices=PACKED_ATTENTION
    )
    attn_backend: str | None = _f(None, "Attention backend override (flash_attn, sdpa, ...).")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required (a local model directory or .gguf file)")
        for flag, path in (("--model", self.model), ("--adapter", self.adapter)):
            if path and not Path(path).exists():
                raise ValueError(
                    f"{flag} {path}: no such file or directory (a local path: nothing is downloaded)"
                )
        self.embedder_config()  # validates pooling, template, lengths, dtype

    def embedder_config(self) -> TextEmbedderConfig:
        keep = ("model", "pooling", "instruction", "max_length", "add_eos", "dtype", "packed",
                "packed_attention", "attn_backend", "normalize", "tokens_per_batch")  # fmt: skip
        return TextEmbedderConfig(**{k: getattr(self, k) for k in keep})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_embedder(recipe: TextRecipe, device: torch.device | str) -> LLMTextEmbedder:
    """The frozen embedder exactly as extraction uses it (model, adapter merged or not, eval mode)."""
    emb = LLMTextEmbedder.from_pretrained(recipe.embedder_config(), device=device)
    if recipe.adapter:
        emb.load_lora(recipe.adapter)
        if recipe.merge_adapter:
            emb.merge_lora()
        emb.to(device)
    emb.eval().requires_grad_(False)
    return emb


def read_recipe(summary: str | Path) -> TextRecipe:
    """The recipe an extraction summary records; refuses settings this version does not know."""
    path = Path(summary)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: embedding like a cache needs the summary that `python -m llm2clip.extract` "
            "writes beside it (pass summary= if it was written elsewhere with --summary)"
        )
    raw = (json.loads(path.read_text()).get("config") or {}).get("text")
    if not isinstance(raw, dict):
        raise ValueError(f"{path} has no 'config.text' object (not an llm2clip.extract summary?)")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(TextRecipe)})
    if unknown:  # a setting this version does not know could change the embeddings: refuse to guess
        raise ValueError(f"{path}: unknown text settings {unknown} (written by another llm2clip version?)")
    return TextRecipe(**raw)


def embedder_like(
    cache_dir: str | Path, device: str | torch.device = "cpu", *, summary: str | Path | None = None
) -> LLMTextEmbedder:
    """The LLMTextEmbedder that filled the cache at `cache_dir`, rebuilt from its extraction summary
    (``<cache_dir>/extract_summary.json``, or `summary`) and checked against the cache's probe
    embeddings: raises StaleCacheError if it does not reproduce them (different model files,
    adapter, template, pooling, ...), FileNotFoundError without a summary.
    """
    from llm2clip.cache import EmbeddingCache

    cache_dir = Path(cache_dir)
    recipe = read_recipe(summary if summary is not None else cache_dir / SUMMARY_FILE)
    cache = EmbeddingCache.open(cache_dir)  # before loading the LLM: a bad cache fails fast
    embedder = load_embedder(recipe, device)
    with torch.inference_mode():
        cache.verify_probe(embedder.encode)
    return embedder
