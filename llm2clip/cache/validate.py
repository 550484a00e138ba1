"""The checks every open runs, reading no data: the manifest against itself, against the file
sizes and headers, and (format 2) its digest and block layout. docs/cache.md ("Integrity").

    manifest = load_manifest(path)                   # CorruptCacheError / StaleCacheError
    layouts = validate(path, manifest, expect)       # {file: BlockLayout}, empty for format 1
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import read_json
from . import format as fmt
from .format import (
    CorruptCacheError,
    Header,
    StaleCacheError,
    checksums_header,
    index_header,
    read_header,
    row_stride,
    rows_header,
    scales_header,
    storage_of,
)
from .integrity import DIGEST_KEY, BlockLayout, manifest_digest
from .manifest import CacheSpec, check_spec

# files that start with a 4096-byte header
HEADED_FILES = (fmt.ROWS_FILE, fmt.SCALES_FILE, fmt.INDEX_FILE, fmt.CHECKSUMS_FILE)

REBUILD = "Rebuild it: re-run `python -m llm2clip.extract ...` into a new directory."
UPGRADE = "python -m llm2clip.cache upgrade"


def load_manifest(path: Path) -> dict:
    """The parsed manifest.json of the cache at `path`, of a format version this code reads."""
    mpath = path / fmt.MANIFEST_FILE
    if not mpath.is_file():
        if (path / fmt.PARTS_DIR).is_dir():
            raise CorruptCacheError(
                f"{path} is not a finished cache: {fmt.PARTS_DIR}/ exists but no {fmt.MANIFEST_FILE} "
                "(extraction unfinished or merge not run / interrupted)"
            )
        raise CorruptCacheError(f"{path} is not a cache: no {fmt.MANIFEST_FILE}")
    try:
        manifest = read_json(mpath)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCacheError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise CorruptCacheError(f"{mpath}: not a {fmt.FORMAT_NAME} manifest")
    if manifest.get("format_version") not in fmt.FORMAT_VERSIONS_READ:
        raise StaleCacheError(
            f"{path}: format_version: expected {fmt.FORMAT_VERSION}, "
            f"found {manifest.get('format_version')!r}. " + REBUILD
        )
    return manifest


def no_block_checksums(path: Path) -> StaleCacheError:
    """The error for verify="lazy" on a format-1 cache, with the two ways out."""
    return StaleCacheError(
        f"{path}: format_version 1 cache (written before block checksums): lazy verification needs "
        f"them. Add them once with `{UPGRADE} {path}` (reads the whole cache, checks it against the "
        "manifest's sha256s, writes checksums.bin and a format-2 manifest; the data files are not "
        "touched), or open it with verify='full' (reads everything at every open) or verify='off'."
    )


def check_digest(path: Path, m: dict, found: str | None = None) -> None:
    """Format 2: the manifest's recorded digest matches its content (found: manifest_digest(m),
    when already computed). Refuses an edited or damaged manifest."""
    found = found or manifest_digest(m)
    if m.get(DIGEST_KEY) != found:
        raise CorruptCacheError(
            f"{path / fmt.MANIFEST_FILE}: {DIGEST_KEY} {m.get(DIGEST_KEY)!r} does not match its content "
            f"({found}): the manifest was edited or damaged. " + REBUILD
        )


def validate(path: Path, m: dict, expect: CacheSpec | None) -> dict[str, BlockLayout]:
    """Check the manifest against itself, the file sizes and headers (no data read).

    Returns the block layout of every checksummed file (format 2), or {} (format 1).
    """
    spec, st = _parse(path, m)
    if expect is not None:
        check_spec(expect, spec, path)
    _check_consistency(path, m, spec, st)
    sizes = expected_sizes(m, st.quantized)
    sealed = m["format_version"] >= 2
    want = set(sizes) | ({fmt.CHECKSUMS_FILE} if sealed else set())
    if set(m["files"]) != want:
        raise CorruptCacheError(
            f"{path / fmt.MANIFEST_FILE}: lists files {sorted(m['files'])}, expected {sorted(want)}"
        )
    _check_sizes(path, m, sizes)
    layouts = _parse_layouts(path, m) if sealed else {}
    if sealed:
        blocks = sum(lay.count for lay in layouts.values())
        _check_sizes(path, m, {fmt.CHECKSUMS_FILE: fmt.HEADER_BYTES + 4 * blocks})
    _check_headers(path, m, st, layouts)
    return layouts


def _parse(path: Path, m: dict):
    try:
        spec = CacheSpec.from_dict(m["spec"])
        st = storage_of(m["storage_code"])
        for name in ("dim", "row_stride", "rows", "index_entries"):
            v = m[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} = {v!r}")
        if not isinstance(m["files"], dict):
            raise TypeError("files is not a mapping")
        int(m["probe"]["count"])
        m["key_index"]["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(
            f"{path / fmt.MANIFEST_FILE}: malformed manifest ({type(e).__name__}: {e})"
        ) from None
    return spec, st


def _check_consistency(path: Path, m: dict, spec: CacheSpec, st) -> None:
    problems = []
    if m.get("storage") != st.name:
        problems.append(f"storage {m.get('storage')!r} vs storage_code {st.code} ({st.name})")
    if m["dim"] != spec.dim:
        problems.append(f"dim {m['dim']} vs spec.dim {spec.dim}")
    if m["row_stride"] != row_stride(m["dim"], st):
        problems.append(
            f"row_stride {m['row_stride']} vs {row_stride(m['dim'], st)} for dim {m['dim']} {st.name}"
        )
    if m["probe"].get("dim") != m["dim"]:
        problems.append(f"probe dim {m['probe'].get('dim')} vs dim {m['dim']}")
    files = m["files"]
    index_entry = files.get(fmt.INDEX_FILE)
    if isinstance(index_entry, dict) and m["key_index"]["sha256"] != index_entry.get("sha256"):
        problems.append(f"key_index.sha256 differs from files[{fmt.INDEX_FILE!r}].sha256")
    if problems:
        raise CorruptCacheError(f"{path / fmt.MANIFEST_FILE}: inconsistent manifest: " + "; ".join(problems))


def _parse_layouts(path: Path, m: dict) -> dict[str, BlockLayout]:
    """manifest["integrity"]["blocks"]: one layout per data file, in checksums.bin order."""
    mpath = path / fmt.MANIFEST_FILE
    try:
        layouts = [BlockLayout.from_dict(d) for d in m["integrity"]["blocks"]]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(f"{mpath}: malformed integrity section ({type(e).__name__}: {e})") from None
    first = 0
    for lay in layouts:
        want_offset = fmt.HEADER_BYTES if lay.file in HEADED_FILES else 0
        listed = m["files"].get(lay.file)
        size = listed.get("size") if isinstance(listed, dict) else None
        if lay.offset != want_offset or size != lay.offset + lay.size or lay.first != first:
            raise CorruptCacheError(
                f"{mpath}: block layout of {lay.file} (offset {lay.offset}, {lay.size} bytes, first "
                f"checksum {lay.first}) does not fit the file ({size} bytes, header {want_offset}, "
                f"first checksum {first})"
            )
        if lay.file == fmt.ROWS_FILE and lay.block_bytes % m["row_stride"]:
            raise CorruptCacheError(f"{mpath}: rows.bin blocks of {lay.block_bytes} bytes split rows")
        first += lay.count
    named = [lay.file for lay in layouts]
    data_files = sorted(set(m["files"]) - {fmt.CHECKSUMS_FILE})
    if sorted(named) != data_files:
        raise CorruptCacheError(f"{mpath}: block layouts for {named}, expected one for each of {data_files}")
    return {lay.file: lay for lay in layouts}


def expected_sizes(m: dict, quantized: bool) -> dict[str, int]:
    """The exact size of every data file the manifest implies (all but checksums.bin)."""
    n, e, dim, stride = m["rows"], m["index_entries"], m["dim"], m["row_stride"]
    sizes = {fmt.ROWS_FILE: fmt.HEADER_BYTES + n * stride}
    if quantized:
        sizes[fmt.SCALES_FILE] = fmt.HEADER_BYTES + 4 * n
    sizes[fmt.INDEX_FILE] = fmt.HEADER_BYTES + 16 * e
    sizes[fmt.TEXTHASH_FILE] = fmt.TEXT_HASH_BYTES * n
    sizes[fmt.PROBE_FILE] = 4 * m["probe"]["count"] * dim
    return sizes


def _check_sizes(path: Path, m: dict, sizes: dict[str, int]) -> None:
    mpath, files = path / fmt.MANIFEST_FILE, m["files"]
    for name, size in sizes.items():
        listed = files[name].get("size") if isinstance(files[name], dict) else None
        if listed != size:
            raise CorruptCacheError(
                f"{mpath}: {name} listed with {listed} bytes, but rows/dim/entries imply {size} "
                "(edited manifest?)"
            )
        fpath = path / name
        try:
            actual = fpath.stat().st_size
        except FileNotFoundError:
            raise CorruptCacheError(f"{fpath}: missing") from None
        if actual < size:
            raise CorruptCacheError(f"{fpath}: truncated ({actual} bytes, the manifest says {size})")
        if actual > size:
            raise CorruptCacheError(f"{fpath}: {actual - size} bytes longer than the manifest says ({size})")


def _check_headers(path: Path, m: dict, st, layouts: dict[str, BlockLayout]) -> None:
    expected: dict[str, Header] = {
        fmt.ROWS_FILE: rows_header(st, m["dim"], m["rows"]),
        fmt.INDEX_FILE: index_header(m["index_entries"]),
    }
    if st.quantized:
        expected[fmt.SCALES_FILE] = scales_header(st, m["rows"])
    if layouts:
        expected[fmt.CHECKSUMS_FILE] = checksums_header(sum(lay.count for lay in layouts.values()))
    for name, want in expected.items():
        got = read_header(path / name)
        if got != want:
            diffs = ", ".join(
                f"{f}: header {getattr(got, f)!r}, manifest {getattr(want, f)!r}"
                for f in ("magic", "version", "code", "dim", "stride", "count")
                if getattr(got, f) != getattr(want, f)
            )
            raise CorruptCacheError(f"{path / name}: header does not match the manifest ({diffs})")
