"""Command line of the cache (docs/cache.md):

python -m llm2clip.cache verify CACHE     every byte against its checksums, with a progress bar;
                                          exit 0 when intact, 2 with one line naming the file,
                                          block and byte range otherwise
python -m llm2clip.cache upgrade CACHE    add block checksums to a format-1 cache (reads it once)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .format import CacheError
from .integrity import BlockLayout
from .reader import EmbeddingCache
from .upgrade import upgrade_cache

EXIT_BAD = 2


class _Bar:
    """One line on stderr per file, redrawn at most every 0.2 s: file, percent, GB, GB/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.total = 0  # bytes of the files finished
        self._last = 0.0
        self.partial = False  # a line was started and not ended

    def __call__(self, name: str, done: int, size: int) -> None:
        finished, now = done >= size, time.perf_counter()
        if self.enabled and (finished or now - self._last >= 0.2):
            self._last = now
            rate = (self.total + done) / max(now - self.t0, 1e-9) / 1e9
            pct = 100.0 * done / size if size else 100.0
            line = f"\r{name:>14} {pct:5.1f}% {done / 1e9:8.3f} GB  {rate:6.2f} GB/s"
            print(line, end="\n" if finished else "", file=sys.stderr, flush=True)
            self.partial = not finished
        if finished:
            self.total += size

    def rate(self) -> float:
        return self.total / max(time.perf_counter() - self.t0, 1e-9) / 1e9


def _verify(args, bar: _Bar) -> int:
    cache = EmbeddingCache.open(args.cache, verify="full", sha256=args.sha256, progress=bar)
    size = f"{bar.total / 1e9:.2f} GB" if bar.total >= 1e9 else f"{bar.total / 1e6:.2f} MB"
    print(
        f"OK {cache.path}: {cache.num_rows} rows, {cache.num_entries} index entries, "
        f"{size} verified at {bar.rate():.2f} GB/s"
    )
    return 0


def _upgrade(args, bar: _Bar) -> int:
    before = EmbeddingCache.open(args.cache, verify="off").manifest["format_version"]
    manifest = upgrade_cache(args.cache, args.block_bytes, bar)
    if before >= 2:
        print(f"{args.cache} has block checksums already (format {before}); nothing to do")
    else:
        blocks = sum(BlockLayout.from_dict(b).count for b in manifest["integrity"]["blocks"])
        print(f"upgraded {args.cache} to format {manifest['format_version']}: {blocks} block checksums")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llm2clip.cache", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every byte of a cache (exit 0 intact, 2 corrupt)")
    v.add_argument("cache", help="the cache directory (holding manifest.json)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--sha256", action="store_true", help="also each file's sha256 (slower: one core)")
    u = sub.add_parser("upgrade", help="add block checksums to a format-1 cache, in place")
    u.add_argument("cache", help="the cache directory (holding manifest.json)")
    u.add_argument("--block-bytes", type=int, default=None, help="block size target (default 16 KiB)")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    bar = _Bar(not args.quiet)
    try:
        return _verify(args, bar) if args.command == "verify" else _upgrade(args, bar)
    except (CacheError, OSError, ValueError) as e:
        end = "\n" if bar.partial else ""
        print(f"{end}{args.command} FAILED: " + " ".join(str(e).split()), file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    sys.exit(main())
