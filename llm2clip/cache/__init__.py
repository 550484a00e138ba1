"""Caption-embedding cache: write once per (model, template, ...), read memory-mapped while training.

docs/cache.md describes the format and the algorithms. Modules: format (files, headers, storage
codes, the parts/ layout), index (key / text hashes), writer + merge (resumable multi-rank
writing), integrity + validate + verifier (block checksums; verify "lazy" / "full" / "off"),
reader (EmbeddingCache), gather (row gather + dequantisation, the side-stream gather; C++/CUDA
extension in _ext with a PyTorch fallback), device (DeviceRows: the device tiers).
`python -m llm2clip.cache verify CACHE` checks every byte of a cache.
"""

from .device import TIERS, DeviceRows
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
from .gather import AsyncGather, available_backends, ext_available, gather_rows
from .index import key_hashes, normalize_caption, shard_name, text_hashes
from .integrity import VERIFY_MODES, CorruptBlockError
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
    "TIERS",
    "VERIFY_MODES",
    "AsyncGather",
    "CacheError",
    "CacheSpec",
    "CacheWriter",
    "CorruptBlockError",
    "CorruptCacheError",
    "DeviceRows",
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
