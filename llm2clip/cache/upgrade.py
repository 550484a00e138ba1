"""Give a format-1 cache (written before block checksums) its checksums.bin and a format-2 manifest.

Every file is read once: its sha256 must equal the one the merge recorded (so only the bytes the
merge wrote are blessed), and its block crc32s are computed on the way. Then checksums.bin and the
new manifest are written atomically, in that order; the data files are not touched, so a reader
sees the old cache or the upgraded one. `python -m llm2clip.cache upgrade CACHE` runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes, atomic_write_json
from .format import (
    CHECKSUMS_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    CorruptCacheError,
    checksums_header,
    record_bytes,
)
from .integrity import (
    BLOCK_BYTES,
    DIGEST_KEY,
    BlockLayout,
    Progress,
    block_bytes_for,
    check_target,
    integrity_section,
    manifest_digest,
    scan_file,
)
from .validate import HEADED_FILES, load_manifest, validate


def upgrade_cache(
    path: str | os.PathLike, block_bytes: int | None = None, progress: Progress | None = None
) -> dict:
    """Upgrade the format-1 cache at `path` in place; returns the new manifest (the old one if
    the cache has block checksums already). Raises CorruptCacheError, naming the file, when a
    file's sha256 differs from the manifest's: a corrupt cache is not upgraded."""
    path = Path(path)
    manifest = load_manifest(path)
    if manifest["format_version"] >= 2:
        return manifest
    validate(path, manifest, None)
    target = check_target(BLOCK_BYTES if block_bytes is None else block_bytes)
    layouts, crcs, first = [], [], 0
    for name, entry in manifest["files"].items():
        offset = 4096 if name in HEADED_FILES else 0
        unit = record_bytes(name, manifest["dim"], manifest["row_stride"])
        layout = BlockLayout(name, offset, entry["size"] - offset, block_bytes_for(unit, target), first)
        digest, sums = scan_file(path / name, layout, None, progress)
        if digest != entry["sha256"]:
            raise CorruptCacheError(
                f"{path / name}: sha256 {digest} does not match the manifest's {entry['sha256']}: "
                "the cache is corrupt and was not upgraded; rebuild it into a new directory"
            )
        layouts.append(layout)
        crcs.append(sums)
        first += layout.count
    table = np.concatenate(crcs).astype("<u4", copy=False)
    data = checksums_header(len(table)).pack() + table.tobytes()
    atomic_write_bytes(path / CHECKSUMS_FILE, data)
    digest, _ = scan_file(path / CHECKSUMS_FILE)
    new = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    new["format_version"] = FORMAT_VERSION
    new["files"] = {**manifest["files"], CHECKSUMS_FILE: {"size": len(data), "sha256": digest}}
    new["integrity"] = integrity_section(layouts, target, CHECKSUMS_FILE)
    new[DIGEST_KEY] = manifest_digest(new)
    atomic_write_json(path / MANIFEST_FILE, new)
    return new
