"""Samples per shard, known before the first batch: the data stream's positions depend on them.

    sizes = shard_sizes(shards, Path("runs/stage2/shard_sizes.json"))            # exact counts
    sizes = shard_sizes(shards, out, sizes_file="sizes.json")                    # given by the user
    sizes = nominal_sizes(len(shards), 3_000_000)                                # --train-num-samples

Where an exact count comes from, per shard (docs/data.md):

1. ``sizes_file`` (``--shard-sizes-file``): a JSON object {shard URL, path or name: samples}.
2. ``OUTPUT_DIR/shard_sizes.json``: counts of an earlier start of the run, reused for local files
   whose size and mtime did not change and for URLs (a remote shard that changed since is caught
   when it is read: its count differs and the run stops naming it).
3. URLs: img2dataset's ``<shard>_stats.json`` beside the shard (``successes``: the samples its
   tar holds), else its ``<shard>.parquet`` (rows with status "success"; needs pyarrow), else the
   shard is streamed through once (headers and payloads travel, nothing is kept; logged).
4. Local files: the tar headers (no payload read; 0.7x of a full read, bench/data_throughput.py).

The counts are written to ``shard_sizes.json`` so a resumed or restarted run counts nothing again.
``nominal_sizes`` is for corpora whose counts nobody knows (open_clip's ``--train-num-samples``):
the total split evenly over the shards, read with ``exact_sizes=False``.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm2clip.data.remote import ReadPolicy, RemoteStream, ShardError, is_local, local_path
from llm2clip.data.shards import count_samples, shard_name
from llm2clip.files import atomic_write_json

__all__ = ["img2dataset_count", "nominal_sizes", "shard_sizes"]

log = logging.getLogger(__name__)


def nominal_sizes(shards: int, total: int) -> list[int]:
    """`total` samples split over `shards` shards (the first total % shards get one more)."""
    if shards < 1 or total < 1:
        raise ValueError(f"need shards >= 1 and a total >= 1, got {shards} shards and {total} samples")
    q, r = divmod(total, shards)
    return [q + (i < r) for i in range(shards)]


def _sibling(url: str, suffix: str) -> str:
    """The URL of a file beside the shard: '.../00042.tar' -> '.../00042' + suffix."""
    base, q, query = url.partition("?")
    stem = base[: -len(".tar")] if base.endswith(".tar") else base.rsplit(".", 1)[0]
    return stem + suffix + (q + query if q else "")


def _read_small(url: str, policy: ReadPolicy) -> bytes | None:
    """The bytes of a small file at `url`, None when it is not there (after the policy's tries)."""
    if is_local(url):
        path = local_path(url)
        return Path(path).read_bytes() if os.path.isfile(path) else None
    quick = ReadPolicy(retries=min(policy.retries, 1), timeout_s=policy.timeout_s, backoff_s=policy.backoff_s)
    try:
        with RemoteStream(url, quick) as f:
            return f.read()
    except ShardError:
        return None


def img2dataset_count(url: str, policy: ReadPolicy | None = None) -> int | None:
    """Samples of an img2dataset shard from its _stats.json or .parquet beside it; None if neither."""
    policy = policy or ReadPolicy.from_env()
    stats = _read_small(_sibling(url, "_stats.json"), policy)
    if stats is not None:
        try:
            n = json.loads(stats)["successes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{_sibling(url, '_stats.json')} has no 'successes' count: {e}") from e
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ShardError(f"{_sibling(url, '_stats.json')}: 'successes' is {n!r}, not a count")
        return n
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    data = _read_small(_sibling(url, ".parquet"), policy)
    if data is None:
        return None
    import io

    table = pq.read_table(io.BytesIO(data), columns=["status"])
    return sum(1 for s in table.column("status").to_pylist() if s == "success")


def _from_file(shards: list[str], sizes_file: str) -> dict[str, int]:
    try:
        given = json.loads(Path(sizes_file).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--shard-sizes-file {sizes_file}: {e}") from e
    if not isinstance(given, dict):
        raise ValueError(f"--shard-sizes-file {sizes_file} must hold a JSON object {{shard: samples}}")
    out, missing = {}, []
    for s in shards:
        n = given.get(s, given.get(shard_name(s)))
        if n is None:
            missing.append(s)
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"--shard-sizes-file {sizes_file}: {s}: {n!r} is not a sample count")
        else:
            out[s] = n
    if missing:
        raise ValueError(
            f"--shard-sizes-file {sizes_file} has no count for {len(missing)} shards: {missing[:3]}"
        )
    return out


def shard_sizes(
    shards: list[str], path: Path, sizes_file: str | None = None, policy: ReadPolicy | None = None
) -> list[int]:
    """Samples of each shard (module docstring); the counts are saved to `path` (shard_sizes.json)."""
    if sizes_file:
        given = _from_file(shards, sizes_file)
        return [given[s] for s in shards]
    known = json.loads(path.read_text()) if path.is_file() else {}
    local = [s for s in shards if is_local(s)]
    stamp = {s: [st.st_size, st.st_mtime_ns] for s in local for st in [os.stat(local_path(s))]}
    stamp.update({s: [None, None] for s in shards if s not in stamp})
    current = lambda s: len(known.get(s, ())) == 3 and known[s][:2] == stamp[s]  # noqa: E731
    todo = [s for s in shards if not current(s)]
    todo_local = [s for s in todo if is_local(s)]
    for s, n in zip(todo_local, count_samples(todo_local) if todo_local else []):
        known[s] = [*stamp[s], n]
    todo_remote = [s for s in todo if not is_local(s)]
    if todo_remote:
        policy = policy or ReadPolicy.from_env()
        with ThreadPoolExecutor(max_workers=min(16, len(todo_remote))) as pool:
            stats = list(pool.map(lambda u: img2dataset_count(u, policy), todo_remote))
        unknown = [u for u, n in zip(todo_remote, stats) if n is None]
        if unknown:
            log.warning(
                "counting %d remote shards by reading them through (no _stats.json / .parquet beside them; "
                "--shard-sizes-file or --train-num-samples avoid it), first: %s",
                len(unknown),
                unknown[0],
            )
        counted = dict(zip(unknown, count_samples(unknown, policy=policy) if unknown else []))
        for u, n in zip(todo_remote, stats):
            known[u] = [None, None, n if n is not None else counted[u]]
    if todo:
        atomic_write_json(path, known)
    return [known[s][2] for s in shards]
