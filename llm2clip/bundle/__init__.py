"""Bundles: a stage-2 model that carries its text side's recipe, loadable in one call.

    export_bundle("runs/stage2/checkpoints/step_00001000", "bundles/b16")   # python -m llm2clip.export
    model = llm2clip.load("bundles/b16")                                    # = llm2clip.bundle.load
    model.encode_image(images), model.encode_text(["a photo of a cat"])

Layout and fields: ``llm2clip.bundle.format``; the loaded model: ``llm2clip.bundle.model``;
captions to LLM embeddings at a chosen length: ``llm2clip.bundle.text``. The trainer's ``final/``
is a bundle (and still a ``ClipModel.save`` folder).
"""

from .format import BUNDLE_FILE, FORMAT_VERSION, BundleInfo, export_bundle, is_bundle
from .model import LLM2CLIP, VERIFY, check_probe, load
from .text import TokenizedText, embed_captions, embedding_length, tokenize_captions

__all__ = [
    "BUNDLE_FILE",
    "FORMAT_VERSION",
    "LLM2CLIP",
    "VERIFY",
    "BundleInfo",
    "TokenizedText",
    "check_probe",
    "embed_captions",
    "embedding_length",
    "export_bundle",
    "is_bundle",
    "load",
    "tokenize_captions",
]
