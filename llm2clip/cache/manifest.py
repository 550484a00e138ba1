"""The cache's configuration (CacheSpec), the manifest, probe captions and atomic file writes.

The manifest is written last, atomically (temp file, fsync, os.replace, fsync of the directory):
a directory without manifest.json is not a cache. A loader compares the manifest's CacheSpec with
the configuration it expects and refuses a stale cache field by field (StaleCacheError).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from .format import StaleCacheError

# Pooling modes of LLM2Vec-style encoders (llm2vec's `pooling_mode`), plus "cls".
POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token", "latent_attention", "cls")

# Fixed probe captions: their embeddings are stored in probe.bin (fp32) so that a later run with the
# model at hand can re-embed them and check cosine >= PROBE_MIN_COSINE (same model, template,
# pooling, numerics). Never edit this list: old caches would then fail verify_probe (the list is
# also stored in the manifest, and verification uses the manifest's copy).
PROBE_CAPTIONS: tuple[str, ...] = (
    "a photo of a dog",
    "A red double-decker bus driving down a busy street in London.",
    "two cats sleeping on a sofa next to a remote control",
    "an aerial view of a city at night with lights",
    "a bowl of ramen with an egg, green onions and slices of pork",
    "A man riding a wave on top of a surfboard.",
    "a diagram of the human heart with labels",
    "close-up of a hand holding a smartphone showing a map",
    "snow-covered mountains reflected in a calm lake at sunrise",
    "a child's drawing of a house, a tree and the sun",
    "The Eiffel Tower seen from below on a cloudy day",
    "a plate of sushi on a wooden table",
    "black and white portrait of an elderly woman smiling",
    "a screenshot of a spreadsheet with a bar chart",
    "Ein Fahrrad lehnt an einer blauen Wand.",
    "一只猫坐在窗台上",
)
PROBE_MIN_COSINE = 0.999


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines the embeddings; a cache built with another spec is stale."""

    model_id: str  # Hugging Face id or local path of the text encoder (e.g. an LLM2Vec model)
    model_revision: str  # commit sha of the model, or a hash of its weight files (never "main")
    adapter_revision: str  # revision / file hash of the adapter (LoRA, LLM2CLIP head); "" if none
    prompt_template: str  # text fed to the model; must contain "{caption}"
    pooling: str  # one of POOLING_MODES
    max_length: int  # tokenizer max length (tokens); captions are truncated to it
    normalize: bool  # embeddings L2-normalised before storage
    dim: int  # embedding width

    def __post_init__(self) -> None:
        for name in ("model_id", "model_revision", "adapter_revision", "prompt_template", "pooling"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"CacheSpec.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not self.model_id:
            raise ValueError("CacheSpec.model_id is empty")
        if not self.model_revision:
            raise ValueError("CacheSpec.model_revision is empty: pin a commit sha or a hash of the weights")
        if "{caption}" not in self.prompt_template:
            raise ValueError(f"CacheSpec.prompt_template {self.prompt_template!r} lacks '{{caption}}'")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"CacheSpec.pooling {self.pooling!r} is not one of {POOLING_MODES}")
        for name in ("max_length", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"CacheSpec.{name} must be a positive int, got {v!r}")
        if not isinstance(self.normalize, bool):
            raise TypeError(f"CacheSpec.normalize must be a bool, got {self.normalize!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"spec lacks fields {missing}")
        return cls(**{n: d[n] for n in names})

    def differences(self, found: CacheSpec) -> list[tuple[str, Any, Any]]:
        """(field, expected=self, found) for every field that differs."""
        return [
            (f.name, getattr(self, f.name), getattr(found, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(found, f.name)
        ]


def check_spec(expected: CacheSpec, found: CacheSpec, path: str | os.PathLike) -> None:
    """Raise StaleCacheError naming every differing field (expected vs found) and how to rebuild."""
    diffs = expected.differences(found)
    if not diffs:
        return
    lines = "\n".join(f"  {name}: expected {exp!r}, found {got!r}" for name, exp, got in diffs)
    raise StaleCacheError(
        f"stale embedding cache at {os.fspath(path)}: built with a different configuration\n{lines}\n"
        "Rebuild it: re-run `python -m llm2clip.extract ...` with the expected configuration into a NEW "
        "directory (never reuse or overwrite this one)."
    )
