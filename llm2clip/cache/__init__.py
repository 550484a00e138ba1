"""Caption-embedding cache: write once per (model, template, ...), read memory-mapped while training.

See DESIGN.md section 3 and the module docstrings: format (files, headers, storage codes),
index (key / text hashes), writer + merge (resumable multi-rank writing), reader (EmbeddingCache),
gather (row gather + dequantisation; C++/CUDA extension with a PyTorch fallback).
"""

from .format import (
    FORMAT_VERSION,
    STORAGES,
    CacheError,
    CorruptCacheError,
    IncompleteCacheError,
    KeyCollisionError,
    StaleCacheError,
    Storage,
    row_stride,
    storage_of,
)
from .gather import available_backends, ext_available, gather_rows
from .index import key_hashes, normalize_caption, shard_name, text_hashes
from .manifest import POOLING_MODES, PROBE_CAPTIONS, PROBE_MIN_COSINE, CacheSpec
from .merge import merge_parts
from .reader import EmbeddingCache
from .writer import CacheWriter, ShardWriter, shards_for_rank

__all__ = [
    "FORMAT_VERSION",
    "POOLING_MODES",
    "PROBE_CAPTIONS",
    "PROBE_MIN_COSINE",
    "STORAGES",
    "CacheError",
    "CacheSpec",
    "CacheWriter",
    "CorruptCacheError",
    "EmbeddingCache",
    "IncompleteCacheError",
    "KeyCollisionError",
    "ShardWriter",
    "StaleCacheError",
    "Storage",
    "available_backends",
    "ext_available",
    "gather_rows",
    "key_hashes",
    "merge_parts",
    "normalize_caption",
    "row_stride",
    "shard_name",
    "shards_for_rank",
    "storage_of",
    "text_hashes",
]
