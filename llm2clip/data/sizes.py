"""Samples per shard, counted once: the data stream's positions depend on them.

    sizes = shard_sizes(shards, Path("runs/stage2/shard_sizes.json"))

Counting walks every tar header (minutes at LAION scale), so the counts are kept in a JSON file
(keyed by path, with each file's size and mtime) and reused for files that did not change: a
resumed or restarted run counts nothing again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llm2clip.data.shards import count_samples
from llm2clip.files import atomic_write_json

__all__ = ["shard_sizes"]


def shard_sizes(shards: list[str], path: Path) -> list[int]:
    """Samples of each shard, from `path` where its record is current, else counted (and saved)."""
    known = json.loads(path.read_text()) if path.is_file() else {}
    stamp = {s: [st.st_size, st.st_mtime_ns] for s in shards for st in [os.stat(s)]}
    todo = [s for s in shards if known.get(s, [None])[:2] != stamp[s]]
    for s, n in zip(todo, count_samples(todo) if todo else []):
        known[s] = [*stamp[s], n]
    if todo:
        atomic_write_json(path, known)
    return [known[s][2] for s in shards]
