"""Cost of cache integrity checks on the CPU: rows/s gathered through DeviceRows with verify="off"
and "lazy" (first pass, then again), check_rows alone, and the GB/s of a full verification, on a
synthetic page-cached cache (the CPU cost, not the disk's). Details: bench/README.md, docs/cache.md.

    python bench/cache_verify.py                           # bf16, dim 4096 (8 KiB rows), 32768 rows
    python bench/cache_verify.py --rows 4096 --repeats 3   # a quick look
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as bench/cache_verify.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common  # noqa: E402

AGAIN = 3
RATES = ("off_first", "lazy_first", "off_again", "lazy_again", "check_first", "full_gbps", "full_sha256_gbps")
# fmt: off
OPTIONS = [
    ("--rows", int, 32768, "rows of the synthetic cache"),
    ("--dim", int, 4096, "embedding width"),
    ("--storage", str, "bf16", "fp32, bf16, fp16, int8 or fp8_e4m3"),
    ("--batch", int, 4096, "rows per gathered batch"),
    ("--block-bytes", int, None, "checksum block target (default 16 KiB)"),
    ("--workdir", Path, None, "where the cache is written (default: a temp dir)"),
]
COLUMNS = [
    ("rep", "rep", "d"), ("off 1st rows/s", "off_first", ".0f"), ("lazy 1st", "lazy_first", ".0f"),
    ("off again", "off_again", ".0f"), ("lazy again", "lazy_again", ".0f"), ("touched", "touched", ".0%"),
    ("check 1st GB/s", "check_first", ".2f"), ("check again us/batch", "check_again", ".1f"),
    ("full GB/s", "full_gbps", ".2f"), ("+sha256 GB/s", "full_sha256_gbps", ".2f"), ("note", common.note, ""),
]
# fmt: on


def write_cache(path: Path, args) -> None:
    import torch

    from llm2clip.cache import PROBE_CAPTIONS, CacheSpec, CacheWriter

    spec = CacheSpec("bench/random", "0" * 40, "", "{caption}", "mean", 77, True, args.dim)
    writer = CacheWriter(path, spec, args.storage)
    g = torch.Generator().manual_seed(0)
    with writer.shard("bench.tar") as s:
        for lo in range(0, args.rows, 4096):
            keys = [f"{i:09d}" for i in range(lo, min(lo + 4096, args.rows))]
            s.add_batch(
                keys, "short", [f"caption {k}" for k in keys], torch.randn(len(keys), args.dim, generator=g)
            )
    writer.merge(torch.randn(len(PROBE_CAPTIONS), args.dim, generator=g), block_bytes=args.block_bytes)


def gather_rate(rows, batches) -> float:
    """rows/s of DeviceRows.launch + wait over all the batches."""
    t0 = time.perf_counter()
    for ids in batches:
        rows.launch(ids)
        rows.wait()
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def check_rate(cache, batches) -> tuple[float, float]:
    """cache.check_rows alone over all the batches: (GB/s of the rows.bin blocks it newly
    verified, us per batch)."""
    blocks = cache._verifier.blocks["rows.bin"]
    before = blocks.verified()
    t0 = time.perf_counter()
    for ids in batches:
        cache.check_rows(ids)
    dt = time.perf_counter() - t0
    return (blocks.verified() - before) * blocks.layout.block_bytes / dt / 1e9, dt * 1e6 / len(batches)


def full_verify_gbps(path: Path, sha256: bool) -> float:
    from llm2clip.cache import EmbeddingCache

    nbytes = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    t0 = time.perf_counter()
    EmbeddingCache.open(path, verify="full", sha256=sha256)
    return nbytes / (time.perf_counter() - t0) / 1e9


def measure(path: Path, batches, lay) -> dict:
    """One repeat on fresh opens (fresh memory maps and records): the first passes back to back,
    the passes over verified blocks alternating off / lazy (the load of a shared machine hits both)."""
    from llm2clip.cache import DeviceRows, EmbeddingCache

    off = DeviceRows(EmbeddingCache.open(path, verify="off"), "cpu")
    lazy = DeviceRows(EmbeddingCache.open(path), "cpu")
    row = {"off_first": gather_rate(off, batches), "lazy_first": gather_rate(lazy, batches)}
    again = [(gather_rate(off, batches), gather_rate(lazy, batches)) for _ in range(AGAIN)]
    row["off_again"] = statistics.median(a for a, _ in again)
    row["lazy_again"] = statistics.median(b for _, b in again)
    row["touched"] = lazy.cache._verifier.blocks["rows.bin"].verified() / lay.count
    fresh = EmbeddingCache.open(path)
    row["check_first"], _ = check_rate(fresh, batches)
    _, row["check_again"] = check_rate(fresh, batches)
    row.update(full_gbps=full_verify_gbps(path, False), full_sha256_gbps=full_verify_gbps(path, True))
    return {**row, "block_bytes": lay.block_bytes, "batch": len(batches[0]), "batches": len(batches)}


def main(argv=None) -> int:
    args = common.parse(
        common.parser(__doc__, OPTIONS, ("repeats",), plot=False, repeats=(3, "measurements")), argv
    )
    import torch

    from llm2clip.cache import EmbeddingCache

    run = common.Run("cache_verify", args, argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, run:
        path = Path(tmp) / "cache"
        t0 = time.perf_counter()
        write_cache(path, args)
        print(
            f"# {run.meta['device_name']}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"{args.rows} rows of {args.dim} {args.storage}, written in {time.perf_counter() - t0:.1f} s"
        )
        first = EmbeddingCache.open(path)
        lay = first._verifier.blocks["rows.bin"].layout
        g = torch.Generator().manual_seed(1)
        need = max(1, -(-lay.count * 8 // args.batch))  # enough to touch all but ~e^-8 of the blocks
        batches = [torch.randint(0, first.num_rows, (args.batch,), generator=g) for _ in range(need)]
        run.sweep(
            common.Case({"rep": rep}, partial(measure, path, batches, lay)) for rep in range(args.repeats)
        )
    # Best and median over the repeats (on a shared machine the best is the least disturbed);
    # check_again is a time: its best is the lowest.
    ok = [r for r in run.rows if r["status"] == "ok"]
    summary = {}
    for k in (*RATES, "check_again") if ok else ():
        values = [r[k] for r in ok]
        summary[k] = {
            "best": (min if k == "check_again" else max)(values),
            "median": statistics.median(values),
        }
    run.write(summary=summary)
    text = "\n".join(
        f"# {k:>16}: best {v['best']:12.2f}  median {v['median']:12.2f}" for k, v in summary.items()
    )
    return run.finish(common.table(run.rows, COLUMNS) + "\n\n" + text)


if __name__ == "__main__":
    sys.exit(main())
