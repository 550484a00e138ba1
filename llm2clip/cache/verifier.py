"""The integrity checks of one opened cache: what "lazy" and "full" verify, and when.

    lazy  at open: checksums.bin (sha256), then every block of index.bin and probe.bin (crc32);
          later, on first touch in this process: the rows.bin and scales.bin blocks holding the
          rows asked for (check_rows), all of texthash.bin (text_hashes()).
    full  at open: every byte of every file (block crc32s, on several threads; with sha256=True
          also each file's sha256 against the manifest, one core's speed), the key index sorted
          and its row ids in range; nothing later. Format 1 (no block checksums): the sha256s.
    off   the structural checks of validate.py only (no data read).

Errors name the file, block, byte range and, for rows, the row ids asked for, the rows in the
block and the shard that first stored them. docs/cache.md ("Integrity") has the design and costs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format import (
    CHECKSUMS_FILE,
    HEADER_BYTES,
    INDEX_FILE,
    PROBE_FILE,
    ROWS_FILE,
    SCALES_FILE,
    CorruptCacheError,
    memmap,
    record_bytes,
)
from .integrity import BlockLayout, LazyBlocks, Progress, scan_file

AT_OPEN = {"lazy": (INDEX_FILE, PROBE_FILE), "full": None}  # what open verifies; None: every file


class CacheVerifier:
    """Block checks of a cache opened with verify "lazy" or "full" (format 2; format 1: "full" only,
    by sha256). Holds one LazyBlocks per checksummed file and the names of the files verified whole."""

    def __init__(
        self, path: Path, manifest: dict, layouts: dict[str, BlockLayout], mode: str, sha256: bool = False
    ) -> None:
        self.path, self.manifest, self.layouts, self.mode, self.sha256 = path, manifest, layouts, mode, sha256
        self.whole: set[str] = set()  # files verified (or trusted) in full by this process
        self.blocks: dict[str, LazyBlocks] = {}
        shards = manifest.get("shards", [])
        self._shard_ends = np.cumsum([s.get("rows_added", 0) for s in shards], dtype=np.int64)
        self._shard_names = [s.get("name", "?") for s in shards]

    # ---------------------------------------------------------------------------------------
    def verify_open(self, trusted: frozenset[str] = frozenset(), progress: Progress | None = None) -> None:
        """The checks due at open; files in `trusted` were verified whole by the parent process."""
        if self.layouts:
            if CHECKSUMS_FILE not in trusted:
                self._compare_sha(CHECKSUMS_FILE, scan_file(self.path / CHECKSUMS_FILE, progress=progress)[0])
            self.whole.add(CHECKSUMS_FILE)
            self._map_blocks()
        for name in trusted & set(self.manifest["files"]):
            self.trust(name)
        at_open = AT_OPEN[self.mode]
        names = [n for n in self.manifest["files"] if n != CHECKSUMS_FILE]
        for name in names if at_open is None else at_open:
            if name not in self.whole:
                self.verify_file(name, progress, sha=self.sha256)

    def _map_blocks(self) -> None:
        total = sum(lay.count for lay in self.layouts.values())
        crcs = memmap(self.path / CHECKSUMS_FILE, "<u4", HEADER_BYTES, (total,))
        for name, lay in self.layouts.items():
            data = memmap(self.path / name, np.uint8, lay.offset, (lay.size,))
            self.blocks[name] = LazyBlocks(
                self.path / name, lay, data, crcs[lay.first : lay.first + lay.count]
            )

    def trust(self, name: str) -> None:
        self.whole.add(name)
        if name in self.blocks:
            self.blocks[name].mark_all()

    def verify_file(self, name: str, progress: Progress | None = None, sha: bool = False) -> None:
        """Verify one file whole: every block's crc32 (format 2) and, with sha (always for format 1,
        which has nothing else), its sha256 against the manifest's."""
        path, lay, blocks = self.path / name, self.layouts.get(name), self.blocks.get(name)
        expected = blocks.crcs if blocks is not None else None
        sha = sha or blocks is None
        digest, _ = scan_file(path, lay, expected, progress, self.describer(name), sha=sha)
        if sha:
            self._compare_sha(name, digest)
        self.trust(name)

    def _compare_sha(self, name: str, digest: str) -> None:
        want = self.manifest["files"][name].get("sha256")
        if digest != want:
            raise CorruptCacheError(
                f"{self.path / name}: sha256 {digest} does not match the manifest's {want} (corrupt file)"
            )

    # ---------------------------------------------------------------------------------------
    def check_rows(self, ids: np.ndarray) -> None:
        """Verify (once per process) the rows.bin and scales.bin blocks holding rows `ids`."""
        for name in (ROWS_FILE, SCALES_FILE):
            blocks = self.blocks.get(name)
            if blocks is not None:
                unit = record_bytes(name, self.manifest["dim"], self.manifest["row_stride"])
                blocks.check(ids * unit // blocks.layout.block_bytes, self.describer(name, ids))

    def describer(self, name: str, asked: np.ndarray | None = None):
        """block -> what an error says after its byte range: the rows, entries or probes in it."""
        lay = self.layouts.get(name)
        if lay is None:
            return None
        unit = record_bytes(name, self.manifest["dim"], self.manifest["row_stride"])

        def describe(block: int) -> str:
            lo, hi = (x - lay.offset for x in lay.span(block))
            if name == INDEX_FILE:
                return self._index_entries(lo, hi)
            first, end = lo // unit, -(-hi // unit)
            if name == PROBE_FILE:
                return f", probe captions {first}..{end - 1}"
            return self._rows_words(first, end, asked)

        return describe

    def _rows_words(self, first: int, end: int, asked: np.ndarray | None) -> str:
        words = f", rows {first}..{end - 1}"
        if asked is not None:
            hit = np.unique(asked[(asked >= first) & (asked < end)])
            words += f", asked for row ids {', '.join(str(int(r)) for r in hit[:8])}"
        if len(self._shard_ends):
            a = int(np.searchsorted(self._shard_ends, first, side="right"))
            b = int(np.searchsorted(self._shard_ends, end - 1, side="right"))
            names = self._shard_names[a : min(b, len(self._shard_names) - 1) + 1]
            words += f", first stored by shard{'s' if len(names) > 1 else ''} " + ", ".join(map(repr, names))
        return words

    def _index_entries(self, lo: int, hi: int) -> str:
        m = self.manifest["index_entries"]
        parts = []
        if lo < 8 * m:
            parts.append(f"key hashes of entries {lo // 8}..{(min(hi, 8 * m) - 1) // 8}")
        if hi > 8 * m:
            a, b = max(lo, 8 * m) - 8 * m, hi - 8 * m
            parts.append(f"row ids of entries {a // 8}..{(b - 1) // 8}")
        return ", " + " and ".join(parts)
