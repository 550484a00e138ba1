"""Evaluation: metrics (pure functions of features), evaluation sets, and evaluate(model, ...).

Sets: webdataset shards with a cache or an embedder (``sets``), CLIP_benchmark's wds eval sets
(``benchmark``), long-caption JSON / Urban-1k folders (``long_captions``), XM3600 and any
per-language caption sets over one image set (``multilingual``); ``specs`` loads any of them from
a KIND:PATH string. Metrics: ``metrics`` (the llm2clip and the CLIP_benchmark protocols).
``clip_benchmark`` registers the ``llm2clip`` model type in CLIP_benchmark's own CLI.
docs/evaluation.md describes them all.
"""

from .benchmark import benchmark_layout, load_benchmark_set
from .evaluate import (
    definitions_for,
    encode_images,
    encode_texts,
    evaluate,
    evaluate_multilingual,
    evaluate_set,
    format_language_table,
    format_table,
    image_norm,
    metric_names,
    zeroshot_classifier,
)
from .long_captions import load_long_caption_set, read_long_captions
from .metrics import (
    DEFINITIONS,
    SIM_CHUNK_ELEMENTS,
    benchmark_classification,
    benchmark_retrieval,
    chance_of,
    retrieval_metrics,
    zeroshot_accuracy,
)
from .multilingual import LanguageCaptions, MultilingualSet, build_multilingual_set, load_xm3600
from .sets import (
    PROTOCOLS,
    RetrievalSet,
    ZeroShotSet,
    build_prompts,
    fill_template,
    load_retrieval_set,
    load_zeroshot_set,
    read_names,
)
from .specs import SET_KINDS, SetSpec, load_set, parse_set_spec

__all__ = [
    "DEFINITIONS",
    "PROTOCOLS",
    "SET_KINDS",
    "SIM_CHUNK_ELEMENTS",
    "LanguageCaptions",
    "MultilingualSet",
    "RetrievalSet",
    "SetSpec",
    "ZeroShotSet",
    "benchmark_classification",
    "benchmark_layout",
    "benchmark_retrieval",
    "build_multilingual_set",
    "build_prompts",
    "chance_of",
    "definitions_for",
    "encode_images",
    "encode_texts",
    "evaluate",
    "evaluate_multilingual",
    "evaluate_set",
    "fill_template",
    "format_language_table",
    "format_table",
    "image_norm",
    "load_benchmark_set",
    "load_long_caption_set",
    "load_retrieval_set",
    "load_set",
    "load_xm3600",
    "load_zeroshot_set",
    "metric_names",
    "parse_set_spec",
    "read_long_captions",
    "read_names",
    "retrieval_metrics",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
