"""Evaluation: metrics (pure functions of features), evaluation sets, and evaluate(model, ...)."""

from .evaluate import encode_images, encode_texts, evaluate, format_table, image_norm, zeroshot_classifier
from .metrics import SIM_CHUNK_ELEMENTS, retrieval_metrics, zeroshot_accuracy
from .sets import (
    RetrievalSet,
    ZeroShotSet,
    build_prompts,
    fill_template,
    load_retrieval_set,
    load_zeroshot_set,
    read_names,
)

__all__ = [
    "SIM_CHUNK_ELEMENTS",
    "RetrievalSet",
    "ZeroShotSet",
    "build_prompts",
    "encode_images",
    "encode_texts",
    "evaluate",
    "fill_template",
    "format_table",
    "image_norm",
    "load_retrieval_set",
    "load_zeroshot_set",
    "read_names",
    "retrieval_metrics",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
