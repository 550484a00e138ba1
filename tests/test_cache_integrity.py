"""EmbeddingCache.open refuses stale caches (field by field) and structurally broken ones
(truncation, edited manifests, missing files, bad headers), never returning garbage rows.
Flipped bytes in the data, the verify modes and the verify CLI: test_cache_verify.py."""

import json
import shutil
from dataclasses import fields

import pytest
from test_cache_writer import build, make_spec

from llm2clip.cache import FORMAT_VERSION, CacheSpec, CorruptCacheError, EmbeddingCache, StaleCacheError
from llm2clip.cache.integrity import DIGEST_KEY, manifest_digest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "int8"
    build(path, "int8", n_shards=2)
    return path


@pytest.fixture
def cache_dir(built, tmp_path):
    """A fresh copy of the built cache that a test may damage."""
    dst = tmp_path / "c"
    shutil.copytree(built, dst)
    return dst


def _edit_manifest(path, fn, reseal=True):
    """Apply fn to the manifest; reseal: update its digest too (an edit the digest cannot see, so
    the checks behind it are what refuses the cache)."""
    p = path / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    if reseal:
        m[DIGEST_KEY] = manifest_digest(m)
    p.write_text(json.dumps(m))


def _consistent_dim_edit(m):
    """dim 40 -> 48 everywhere in the manifest (int8 rows keep their 128-byte stride)."""
    m["spec"]["dim"] = m["dim"] = m["probe"]["dim"] = 48
    m["files"]["probe.bin"]["size"] = 4 * 16 * 48


CHANGED = {
    "model_id": "some/other-model",
    "model_revision": "fedcba",
    "adapter_revision": "",
    "prompt_template": "{caption}",
    "pooling": "eos_token",
    "max_length": 512,
    "normalize": False,
    "dim": 4096,
}


def test_every_spec_field_is_checked():
    assert set(CHANGED) == {f.name for f in fields(CacheSpec)}


@pytest.mark.parametrize("field", list(CHANGED))
def test_stale_cache_names_the_field(built, field):
    expect = make_spec(**{field: CHANGED[field]})
    with pytest.raises(StaleCacheError) as e:
        EmbeddingCache.open(built, expect=expect)
    msg = str(e.value)
    found = getattr(make_spec(), field)
    print(msg)
    assert f"{field}: expected {CHANGED[field]!r}, found {found!r}" in msg
    assert msg.count(": expected") == 1, "only the differing field is listed"
    assert "python -m llm2clip.extract" in msg and "new" in msg.lower()


def test_fresh_cache_opens_and_verifies(built):
    cache = EmbeddingCache.open(built, expect=make_spec(), verify_checksums=True)
    assert cache.num_rows > 0 and cache.storage.name == "int8"


@pytest.mark.parametrize("file", ["rows.bin", "scales.bin", "index.bin", "texthash.bin", "probe.bin"])
def test_flipped_byte_found_by_checksum(cache_dir, file):
    p = cache_dir / file
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x10  # in the data, not the header
    p.write_bytes(bytes(data))
    EmbeddingCache.open(cache_dir, verify="off")  # sizes and headers still agree: only a checksum can tell
    with pytest.raises(CorruptCacheError, match=rf"{file}: block \d+ \(bytes \d+\.\.\d+.* fails its crc32"):
        EmbeddingCache.open(cache_dir, verify_checksums=True)


@pytest.mark.parametrize("cut", [1, 128, 5000])
def test_truncated_rows_always_refused(cache_dir, cut):
    p = cache_dir / "rows.bin"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - cut])
    with pytest.raises(CorruptCacheError, match=r"rows\.bin: (truncated|header)"):
        EmbeddingCache.open(cache_dir)


def test_appended_bytes_refused(cache_dir):
    with open(cache_dir / "index.bin", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(CorruptCacheError, match=r"index\.bin: 16 bytes longer"):
        EmbeddingCache.open(cache_dir)


@pytest.mark.parametrize("file", ["scales.bin", "texthash.bin", "manifest.json"])
def test_missing_file_refused(cache_dir, file):
    (cache_dir / file).unlink()
    with pytest.raises(CorruptCacheError, match=file.replace(".", r"\.") + "|manifest"):
        EmbeddingCache.open(cache_dir)


def test_bad_header_refused(cache_dir):
    p = cache_dir / "rows.bin"
    data = bytearray(p.read_bytes())
    data[16] += 1  # header dim
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"rows\.bin: header .*dim: header 41, manifest 40"):
        EmbeddingCache.open(cache_dir)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(dim=m["dim"] + 1), "inconsistent manifest: dim 41 vs spec.dim 40"),
        (
            lambda m: m["spec"].update(dim=48) or m.update(dim=48) or m["probe"].update(dim=48),
            "probe.bin listed",
        ),
        (_consistent_dim_edit, r"probe\.bin: truncated \(2560 bytes, the manifest says 3072\)"),
        (lambda m: m.update(rows=m["rows"] - 1), "listed with .* bytes, but rows/dim/entries imply"),
        (lambda m: m.update(index_entries=m["index_entries"] + 1), "index.bin listed with"),
        (lambda m: m.update(storage_code=1, storage="bf16"), "lists files"),
        (
            lambda m: m.update(storage_code=4, storage="fp8_e4m3"),
            r"rows\.bin: header .*\(code: header 3, manifest 4\)",
        ),
        (lambda m: m.update(row_stride=256), "row_stride 256 vs 128"),
        (lambda m: m.update(rows="12"), "malformed manifest"),
        (lambda m: m.update(format_version=99), None),
        (lambda m: m["key_index"].update(sha256="0" * 64), "key_index.sha256"),
    ],
)
def test_edited_manifest_refused(cache_dir, edit, match):
    _edit_manifest(cache_dir, edit)
    if match is None:
        with pytest.raises(StaleCacheError, match=f"format_version: expected {FORMAT_VERSION}, found 99"):
            EmbeddingCache.open(cache_dir)
    else:
        with pytest.raises(CorruptCacheError, match=match):
            EmbeddingCache.open(cache_dir)


def test_edited_checksum_found_on_verify(cache_dir):
    _edit_manifest(cache_dir, lambda m: m["files"]["rows.bin"].update(sha256="ab" * 32))
    EmbeddingCache.open(cache_dir)  # a resealed edit: lazy checks cannot see it
    EmbeddingCache.open(cache_dir, verify="full")  # every block matches its crc32
    with pytest.raises(CorruptCacheError, match=r"rows\.bin: sha256 .* does not match"):
        EmbeddingCache.open(cache_dir, verify="full", sha256=True)


def test_edit_without_reseal_found_by_the_digest(cache_dir):
    _edit_manifest(cache_dir, lambda m: m["spec"].update(prompt_template="{caption}!"), reseal=False)
    EmbeddingCache.open(cache_dir, verify="off")
    for verify in ("lazy", "full"):
        with pytest.raises(CorruptCacheError, match="manifest.json: manifest_sha256 .* does not match"):
            EmbeddingCache.open(cache_dir, verify=verify)


def test_unmerged_or_garbled_directory_refused(cache_dir, tmp_path):
    (cache_dir / "manifest.json").write_text("{ not json")
    with pytest.raises(CorruptCacheError, match="unreadable manifest"):
        EmbeddingCache.open(cache_dir)
    (tmp_path / "w" / "parts").mkdir(parents=True)
    with pytest.raises(CorruptCacheError, match="merge not run"):
        EmbeddingCache.open(tmp_path / "w")
    with pytest.raises(CorruptCacheError, match="not a cache"):
        EmbeddingCache.open(tmp_path)
