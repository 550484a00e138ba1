"""Cache integrity on the training path: a flipped byte anywhere (rows, scales, text hashes, probe,
index keys, every index row id XOR 1) is caught by verify="lazy" before a bad row is served, by
verify="full" at open and by `python -m llm2clip.cache verify` (exit 2 naming the file and block);
an intact cache passes; a verified block costs nothing the second time; workers (fork and spawn)
check for themselves; format-1 caches are refused "lazy" and upgraded in place."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache_writer import DIM, build, shard_names

from llm2clip.cache import CorruptBlockError, CorruptCacheError, DeviceRows, EmbeddingCache, StaleCacheError
from llm2clip.cache import integrity as integrity_mod
from llm2clip.cache.__main__ import main as cache_cli
from llm2clip.cache.integrity import DIGEST_KEY, manifest_digest
from llm2clip.cache.upgrade import upgrade_cache

BLOCK = 256  # small blocks: int8 rows (stride 128) two to a block, several blocks in every file


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An int8 cache of three shards cut into BLOCK-byte blocks, written once for the module."""
    path = tmp_path_factory.mktemp("cache") / "int8"
    build(path, "int8", n_shards=3, block_bytes=BLOCK)
    return path


@pytest.fixture
def cache_dir(built, tmp_path):
    """A copy that a test may damage."""
    return Path(shutil.copytree(built, tmp_path / "c"))


def _flip(path, file, offset, mask=0x10):
    p = path / file
    data = bytearray(p.read_bytes())
    data[offset] ^= mask
    p.write_bytes(bytes(data))


def _xor_row_ids(path):
    """Every index row id XOR 1 (key hashes untouched): each key points at its neighbour's row."""
    p = path / "index.bin"
    data = bytearray(p.read_bytes())
    m = json.loads((path / "manifest.json").read_text())["index_entries"]
    ids = np.frombuffer(data, "<i8", count=m, offset=4096 + 8 * m).copy() ^ 1
    data[4096 + 8 * m :] = ids.tobytes()
    p.write_bytes(bytes(data))


ROW = 9  # the damaged row (rows 8 and 9 share rows.bin block 4)


def _damage(path, kind) -> None:
    m = json.loads((path / "manifest.json").read_text())
    if kind == "rows":
        _flip(path, "rows.bin", 4096 + ROW * m["row_stride"] + 3)
    elif kind == "scales":
        _flip(path, "scales.bin", 4096 + 4 * ROW + 1)
    elif kind == "texthash":
        _flip(path, "texthash.bin", 16 * ROW + 2)
    elif kind == "probe":
        _flip(path, "probe.bin", 4 * DIM * 3 + 5)
    elif kind == "index_key":
        _flip(path, "index.bin", 4096 + 8 * 20 + 2, 0x01)
    else:
        _xor_row_ids(path)


# kind -> (file, what the error names besides it)
KINDS = {
    "rows": (
        "rows.bin",
        r"block 4 \(bytes 5120\.\.5375, rows 8\.\.9(, asked for row ids 9)?, first stored by shard '",
    ),
    "scales": (
        "scales.bin",
        r"block 0 \(bytes 4096\.\.4271, rows 0\.\.43(, asked for row ids 9.*)?, first stored by shards '",
    ),
    "texthash": (
        "texthash.bin",
        r"block 0 \(bytes 0\.\.255, rows 0\.\.15, first stored by shard 'cc3m-00000",
    ),
    "probe": ("probe.bin", r"block 3 \(bytes 480\.\.639, probe captions 3\.\.3\)"),
    "index_key": ("index.bin", r"block 0 \(bytes 4096\.\.4351, key hashes of entries 0\.\.31\)"),
    "index_row_ids": ("index.bin", r"block \d+ \(bytes \d+\.\.\d+, .*row ids of entries \d+\.\.\d+\)"),
}


def test_intact_cache_passes_every_mode(built, capsys):
    for verify in ("lazy", "full", "off"):
        cache = EmbeddingCache.open(built, verify=verify)
        all_rows = np.arange(cache.num_rows)
        cache.check_rows(all_rows)
        assert cache.gather(all_rows).shape == (cache.num_rows, DIM)
        assert len(cache.text_hashes()) == cache.num_rows
    assert cache_cli(["verify", "--sha256", "--quiet", str(built)]) == 0
    assert cache_cli(["verify", str(built)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"OK {built}: ") and "GB/s" in out.out
    assert "manifest.json" not in out.err and "rows.bin" in out.err  # the progress bar


@pytest.mark.parametrize("kind", list(KINDS))
def test_lazy_catches_before_the_rows_are_served(cache_dir, kind):
    file, named = KINDS[kind]
    _damage(cache_dir, kind)
    EmbeddingCache.open(cache_dir, verify="off")  # the structure is intact
    match = rf"{file}: {named}.* fails its crc32 check"
    if kind.startswith("index") or kind == "probe":  # verified whole at open
        with pytest.raises(CorruptBlockError, match=match):
            EmbeddingCache.open(cache_dir)
        return
    cache = EmbeddingCache.open(cache_dir)
    far = np.array([cache.num_rows - 1, 0]) if kind == "rows" else np.array([], dtype=np.int64)
    cache.gather(far)  # other blocks are served
    if kind == "texthash":
        cache.gather(np.arange(cache.num_rows))  # rows unaffected; the text hashes are refused
        with pytest.raises(CorruptBlockError, match=match):
            cache.text_hashes()
        return
    for serve in (cache.check_rows, cache.gather, DeviceRows(cache, "cpu", dtype=torch.float32).launch):
        with pytest.raises(CorruptBlockError, match=match) as e:
            serve(torch.tensor([ROW, 2 * ROW]) if serve is not cache.check_rows else [ROW])
        assert e.value.path == cache_dir / file and 0 < e.value.end - e.value.start <= BLOCK
        assert ", asked for row ids 9" in str(e.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_full_catches_at_open_and_cli_exits_2(cache_dir, kind, capsys):
    file, named = KINDS[kind]
    _damage(cache_dir, kind)
    with pytest.raises(CorruptBlockError, match=rf"{file}: {named}"):
        EmbeddingCache.open(cache_dir, verify="full")
    assert cache_cli(["verify", str(cache_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    print(err)
    assert err.startswith(f"verify FAILED: {cache_dir / file}: block ") and "(bytes " in err


def test_cli_runs_as_a_module_and_names_the_block(cache_dir, capsys):
    _damage(cache_dir, "rows")
    cmd = [sys.executable, "-m", "llm2clip.cache", "verify", "--quiet", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rows.bin: block 4 (bytes 5120..5375, rows 8..9" in lines[0], lines
    assert cache_cli(["verify", str(cache_dir / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("verify FAILED: ") and "not a cache" in err


def test_lazy_check_costs_nothing_after_first_touch(built, monkeypatch):
    cache = EmbeddingCache.open(built)
    ids = np.random.default_rng(0).integers(0, cache.num_rows, 4096)
    cache.check_rows(ids)
    blocks = cache._verifier.blocks
    assert blocks["rows.bin"].verified() == blocks["rows.bin"].layout.count
    calls = []
    monkeypatch.setattr(integrity_mod.zlib, "crc32", lambda *a: calls.append(a) or 0)
    for _ in range(20):
        cache.check_rows(ids)
        cache.gather(ids[:64])
    assert calls == [], "a verified block is never read again"


def test_row_ids_are_range_checked(built):
    cache = EmbeddingCache.open(built)
    with pytest.raises(
        IndexError, match=rf"row id {cache.num_rows} \(position 1 of the index\) is out of range"
    ):
        cache.check_rows(np.array([0, cache.num_rows]))
    with pytest.raises(IndexError, match="row id -1"):
        DeviceRows(cache, "cpu").launch(torch.tensor([-1]))
    with pytest.raises(TypeError, match="1-D integer"):
        cache.check_rows(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="verify must be one of"):
        EmbeddingCache.open(built, verify="sometimes")


def test_pickled_cache_trusts_what_the_parent_verified(cache_dir, monkeypatch):
    """A worker's copy does not re-read the index (verified at open in the parent) but verifies
    rows for itself, starting from an empty record."""
    _damage(cache_dir, "rows")
    cache = EmbeddingCache.open(cache_dir)
    cache.check_rows([0, 1])
    calls = []
    crc32 = integrity_mod.zlib.crc32
    monkeypatch.setattr(integrity_mod.zlib, "crc32", lambda *a: calls.append(1) or crc32(*a))
    again = pickle.loads(pickle.dumps(cache))
    assert calls == [] and again.verify == "lazy"
    assert again._verifier.blocks["index.bin"].verified() == again._verifier.blocks["index.bin"].layout.count
    assert again._verifier.blocks["rows.bin"].verified() == 0
    with pytest.raises(CorruptBlockError, match="rows.bin: block 4"):
        again.check_rows([ROW])
    off = pickle.loads(pickle.dumps(EmbeddingCache.open(cache_dir, verify="off")))
    assert off.verify == "off" and off._verifier is None


def test_pickled_full_cache_is_not_read_again(built, monkeypatch):
    cache = EmbeddingCache.open(built, verify="full")
    calls = []
    monkeypatch.setattr(integrity_mod.zlib, "crc32", lambda *a: calls.append(1) or 0)
    monkeypatch.setattr(EmbeddingCache, "_verify_index", lambda self: calls.append("index"))
    again = pickle.loads(pickle.dumps(cache))
    again.check_rows(np.arange(again.num_rows))
    again.text_hashes()
    assert calls == [] and again.verify == "full"


class _CheckedRows(torch.utils.data.Dataset):
    """What a data worker does: look rows up (here: given), check them, hand them on."""

    def __init__(self, cache, batches):
        self.cache, self.batches = cache, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        rows = np.asarray(self.batches[i])
        self.cache.check_rows(rows)
        return torch.from_numpy(rows)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_workers_check_rows_and_report_the_block(cache_dir, start):
    _damage(cache_dir, "rows")
    cache = EmbeddingCache.open(cache_dir)
    data = _CheckedRows(cache, [[0, 1], [2, 3], [ROW, 0]])
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=2, multiprocessing_context=start, prefetch_factor=1
    )
    got = []
    with pytest.raises(CorruptBlockError, match=r"rows\.bin: block 4 \(bytes 5120\.\.5375, rows 8\.\.9"):
        for rows in loader:
            got.append(rows.tolist())
    assert [r for r in got if ROW in r] == [], "the bad rows never reached the main process"


# ------------------------------------------------------------------------------------------------
# Format 1 (before block checksums)


def _as_format_1(path):
    """What the merge wrote before block checksums: no checksums.bin, no integrity, no digest."""
    p = path / "manifest.json"
    m = json.loads(p.read_text())
    for key in ("integrity", DIGEST_KEY):
        m.pop(key)
    m["files"].pop("checksums.bin")
    m["format_version"] = 1
    p.write_text(json.dumps(m))
    (path / "checksums.bin").unlink()


def test_format_1_refused_lazy_then_upgraded(cache_dir, capsys):
    _as_format_1(cache_dir)
    before = {f: (cache_dir / f).read_bytes() for f in ("rows.bin", "scales.bin", "index.bin")}
    with pytest.raises(StaleCacheError, match=r"format_version 1 .* `python -m llm2clip\.cache upgrade "):
        EmbeddingCache.open(cache_dir)
    EmbeddingCache.open(cache_dir, verify="full")  # sha256 of every file, as format 1 allows
    EmbeddingCache.open(cache_dir, verify="off")
    assert cache_cli(["verify", "--quiet", str(cache_dir)]) == 0
    assert cache_cli(["upgrade", "--quiet", "--block-bytes", str(BLOCK), str(cache_dir)]) == 0
    assert "upgraded" in capsys.readouterr().out
    cache = EmbeddingCache.open(cache_dir)
    assert cache.manifest["format_version"] == 2
    assert cache.manifest[DIGEST_KEY] == manifest_digest(cache.manifest)
    assert before == {f: (cache_dir / f).read_bytes() for f in before}, "data files untouched"
    _damage(cache_dir, "rows")
    with pytest.raises(CorruptBlockError, match="rows.bin: block 4"):
        EmbeddingCache.open(cache_dir).check_rows([ROW])
    assert cache_cli(["upgrade", str(cache_dir)]) == 0  # format 2 already: nothing to do


def test_upgrade_refuses_a_corrupt_format_1_cache(cache_dir):
    _as_format_1(cache_dir)
    _damage(cache_dir, "rows")
    manifest = (cache_dir / "manifest.json").read_bytes()
    with pytest.raises(CorruptCacheError, match=r"rows\.bin: sha256 .* not upgraded"):
        upgrade_cache(cache_dir)
    assert (cache_dir / "manifest.json").read_bytes() == manifest
    assert not (cache_dir / "checksums.bin").exists()


def test_upgrade_gives_the_merge_checksums(built, cache_dir):
    _as_format_1(cache_dir)
    upgrade_cache(cache_dir, BLOCK)
    merged = json.loads((built / "manifest.json").read_text())
    upgraded = json.loads((cache_dir / "manifest.json").read_text())
    assert upgraded["integrity"] == merged["integrity"]
    assert (cache_dir / "checksums.bin").read_bytes() == (built / "checksums.bin").read_bytes()


def test_block_layout_in_the_manifest(built):
    m = json.loads((built / "manifest.json").read_text())
    blocks = {b["file"]: b for b in m["integrity"]["blocks"]}
    assert blocks["rows.bin"]["block_bytes"] == 256 and blocks["rows.bin"]["offset"] == 4096
    assert blocks["probe.bin"]["block_bytes"] == 4 * DIM  # whole probe rows
    total = sum(-(-b["size"] // b["block_bytes"]) for b in blocks.values())
    assert (built / "checksums.bin").stat().st_size == 4096 + 4 * total
    assert len(shard_names(3)) == len(m["shards"])
