"""llm2clip: the LLM2CLIP training pipeline (stage 1, extraction, stage 2, evaluation).

model = llm2clip.load("runs/stage2/final")        # a bundle: tower + adapter + the recorded LLM
model.encode_image(images), model.encode_text(["a photo of a cat"])
"""

from __future__ import annotations

__all__ = ["load"]


def load(path, device="cpu", **kwargs):
    """Load a bundle (a trainer's ``final/`` or ``python -m llm2clip.export --format bundle``):
    ``llm2clip.bundle.load`` (keywords: llm, text_cache, load_llm, verify)."""
    from llm2clip.bundle import load as _load

    return _load(path, device, **kwargs)
