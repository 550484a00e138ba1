"""CacheWriter + merge + EmbeddingCache: round trips, lookups, dedup, resume after a kill, several
writers, done markers, key collisions, probes.

The helpers at the top are also imported by the subprocess of the kill/resume test.
"""

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import llm2clip.cache.writer as writer_mod
from llm2clip.cache import (
    PROBE_CAPTIONS,
    CacheSpec,
    CacheWriter,
    EmbeddingCache,
    IncompleteCacheError,
    KeyCollisionError,
    StaleCacheError,
    normalize_caption,
    shards_for_rank,
)
from llm2clip.cache import format as fmt
from llm2clip.cache.gather import gather_rows_torch

DIM = 40
FIELDS = ("short", "dense")
STORAGE_NAMES = [s.name for s in fmt.STORAGES]
FINAL_FILES = ("rows.bin", "scales.bin", "index.bin", "texthash.bin", "probe.bin")


def make_spec(dim: int = DIM, **changes) -> CacheSpec:
    spec = CacheSpec(
        model_id="microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned",
        model_revision="0123456789abcdef0123456789abcdef01234567",
        adapter_revision="adapter-sha-42",
        prompt_template="Given a caption, retrieve a relevant image: {caption}",
        pooling="mean",
        max_length=77,
        normalize=True,
        dim=dim,
    )
    return replace(spec, **changes)


def embed(captions, dim: int = DIM) -> torch.Tensor:
    """Deterministic stand-in for the text model: a function of the normalised caption."""
    out = torch.empty(len(captions), dim)
    for i, c in enumerate(captions):
        seed = int.from_bytes(
            hashlib.blake2b(normalize_caption(c).encode(), digest_size=7).digest(), "little"
        )
        out[i] = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(out, dim=1)


def shard_data(i: int, n: int = 12):
    """Keys and captions of shard i. Short captions repeat within and across shards (some only
    differ in case / spacing); dense captions are unique except one shared by every shard."""
    keys = [f"{i:04d}{j:04d}" for j in range(n)]
    short = []
    for j in range(n):
        c = f"a photo of object {(3 * i + j) % 10}"
        short.append(c.upper().replace(" ", "   ") if j % 4 == 0 else c)
    dense = [f"dense caption {i}.{j}: a detailed description" for j in range(n)]
    dense[-1] = "The same dense caption in every shard."
    return keys, {"short": short, "dense": dense}


def shard_names(n: int):
    return [f"cc3m-{i:05d}.tar" for i in range(n)]


def write_shard(writer: CacheWriter, name: str, i: int, batch: int = 5) -> None:
    keys, caps = shard_data(i)
    with writer.shard(name) as s:
        for field in FIELDS:
            c = caps[field]
            for lo in range(0, len(keys), batch):
                s.add_batch(keys[lo : lo + batch], field, c[lo : lo + batch], embed(c[lo : lo + batch]))


def probe_embeddings(dim: int = DIM) -> torch.Tensor:
    return embed(list(PROBE_CAPTIONS), dim)


def build(path, storage="bf16", n_shards=3, world=1, block_bytes=None) -> dict:
    names = shard_names(n_shards)
    writers = [CacheWriter(path, make_spec(), storage, rank=r, world_size=world) for r in range(world)]
    for r, w in enumerate(writers):
        for name in shards_for_rank(names, r, world):
            write_shard(w, name, names.index(name))
    return writers[0].merge(probe_embeddings(), shards=names, block_bytes=block_bytes)


def expected_rows(captions, storage) -> torch.Tensor:
    """What the cache must return for these captions: encode, then the reference decode."""
    payload, scales = fmt.encode_rows(embed(captions), storage)
    st = fmt.storage_of(storage)
    sc = torch.from_numpy(scales) if scales is not None else None
    return gather_rows_torch(
        torch.from_numpy(payload), sc, torch.arange(len(captions)), DIM, st.code, torch.float32
    )


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGE_NAMES)
def test_roundtrip_every_storage(tmp_path, storage):
    manifest = build(tmp_path, storage)
    cache = EmbeddingCache.open(tmp_path, expect=make_spec(), verify_checksums=True)
    assert cache.storage.name == storage and cache.dim == DIM
    assert cache.num_entries == 3 * 12 * len(FIELDS) == manifest["index_entries"]
    assert (cache.scales_tensor() is not None) == fmt.storage_of(storage).quantized
    for i, name in enumerate(shard_names(3)):
        keys, caps = shard_data(i)
        for field in FIELDS:
            rows = cache.lookup(name, keys, field, strict=True)
            assert rows.dtype == np.int64 and (rows >= 0).all()
            got = cache.gather(torch.from_numpy(rows), torch.float32)
            assert torch.equal(got, expected_rows(caps[field], storage))
    assert not (tmp_path / "parts").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["manifest.json", *manifest["files"]])


def test_layout_header_and_alignment(tmp_path):
    m = build(tmp_path, "int8")
    n, stride = m["rows"], m["row_stride"]
    assert stride == fmt.row_stride(DIM, "int8") == 128
    raw = (tmp_path / "rows.bin").read_bytes()
    assert len(raw) == 4096 + n * stride
    assert fmt.Header.unpack(raw[:4096]) == fmt.Header(b"L2CROWS\0", fmt.FILE_VERSION, 3, DIM, stride, n)
    rows = np.frombuffer(raw, np.uint8, offset=4096).reshape(n, stride)
    assert not rows[:, DIM:].any(), "padding is zero"
    assert (tmp_path / "scales.bin").stat().st_size == 4096 + 4 * n
    idx = (tmp_path / "index.bin").read_bytes()
    hdr = fmt.Header.unpack(idx[:4096])
    assert hdr.magic == b"L2CINDX\0" and hdr.count == m["index_entries"]
    keys = np.frombuffer(idx, "<u8", count=hdr.count, offset=4096)
    assert (np.diff(keys.astype(np.float64)) > 0).all() and (keys[1:] > keys[:-1]).all()
    cache = EmbeddingCache.open(tmp_path)
    t = cache.rows_tensor()
    assert t.dtype == torch.uint8 and t.shape == (n, stride)
    assert t.data_ptr() % 4096 == 0, "data start is page aligned"
    assert np.shares_memory(t.numpy(), cache._rows), "no copy of the memory map"


def test_lookup_missing_keys(tmp_path):
    build(tmp_path)
    cache = EmbeddingCache.open(tmp_path)
    keys, _ = shard_data(1)
    rows = cache.lookup("cc3m-00001.tar", [keys[0], "nope", keys[3]], "short")
    assert rows[1] == -1 and rows[0] >= 0 and rows[2] >= 0
    assert (cache.lookup("cc3m-00009.tar", keys[:2], "short") == -1).all()  # unknown shard
    assert (cache.lookup("cc3m-00001.tar", keys[:2], "long") == -1).all()  # unknown field
    # per-entry shards and fields
    r = cache.lookup(["cc3m-00000.tar", "cc3m-00001.tar"], [shard_data(0)[0][0], keys[0]], ["dense", "short"])
    assert (r >= 0).all()
    with pytest.raises(KeyError, match=r"2 of 3 .*'nope'.*'nope2'"):
        cache.lookup("cc3m-00001.tar", [keys[0], "nope", "nope2"], "short", strict=True)
    assert cache.lookup("cc3m-00001.tar", [], "short").shape == (0,)
    with pytest.raises(IndexError, match="-1 .*out of range"):  # either backend names the bad id
        cache.gather(rows)


def test_dedup_identical_normalised_captions(tmp_path):
    w = CacheWriter(tmp_path, make_spec(), "fp32")
    caps = ["A dog on a sofa.", "  a DOG   on a sofa.\n", "a cat", "A dog on a sofa."]
    with w.shard("s.tar") as s:
        s.add_batch(["k0", "k1", "k2"], "short", caps[:3], embed(caps[:3]))
        s.add("k3", "short", caps[3], embed(caps[3:])[0])
        s.add("k0", "dense", "a cat", embed(["a cat"])[0])
    m = w.merge(probe_embeddings())
    assert m["rows"] == 2 and m["index_entries"] == 5
    assert m["dedup"]["captions"] == 5 and m["dedup"]["unique_rows"] == 2 and m["dedup"]["ratio"] == 2.5
    assert m["shards"] == [
        {"name": "s.tar", "samples": 4, "captions": 5, "rows_written": 2, "rows_added": 2, "rank": 0}
    ]
    cache = EmbeddingCache.open(tmp_path)
    r = cache.lookup("s.tar", ["k0", "k1", "k2", "k3"], "short")
    assert r[0] == r[1] == r[3] != r[2]
    assert cache.lookup("s.tar", ["k0"], "dense")[0] == r[2]
    assert len(set(cache.text_hashes().tolist())) == 2


def test_dedup_across_shards_and_writers(tmp_path):
    """Two ranks write alternate shards; merge drops the rows both stored. The result equals a
    single writer's, byte for byte (each rank walks its shards in merge order)."""
    m2 = build(tmp_path / "two", "int8", n_shards=4, world=2)
    m1 = build(tmp_path / "one", "int8", n_shards=4, world=1)
    all_caps = {normalize_caption(c) for i in range(4) for f in FIELDS for c in shard_data(i)[1][f]}
    assert m1["rows"] == m2["rows"] == len(all_caps)
    assert m1["dedup"]["cross_writer_duplicates"] == 0
    assert m2["dedup"]["cross_writer_duplicates"] > 0
    assert m2["dedup"]["rows_written_by_writers"] == m2["rows"] + m2["dedup"]["cross_writer_duplicates"]
    assert [s["rank"] for s in m2["shards"]] == [0, 1, 0, 1]
    for name in FINAL_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import test_cache_writer as t
from llm2clip.cache import CacheWriter

w = CacheWriter({path!r}, t.make_spec(), {storage!r})
t.write_shard(w, "cc3m-00000.tar", 0)
keys, caps = t.shard_data(1)
with w.shard("cc3m-00001.tar") as s:
    s.add_batch(keys[:6], "short", caps["short"][:6], t.embed(caps["short"][:6]))
    for f in s._files.values():
        f.flush()
    os._exit(17)  # killed mid-shard: no cleanup, no done marker
"""


@pytest.mark.parametrize("storage", ["int8"])
def test_resume_after_kill_matches_uninterrupted(tmp_path, storage):
    names = shard_names(3)
    killed = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), path=str(killed), storage=storage)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    leftovers = sorted(p.name for p in (killed / "parts").iterdir())
    assert any(p.startswith("cc3m-00001.tar") and p.endswith(".tmp") for p in leftovers), leftovers
    assert not any(p.startswith("cc3m-00001.tar") and p.endswith(".done") for p in leftovers)

    w = CacheWriter(killed, make_spec(), storage)
    assert w.done_shards() == {"cc3m-00000.tar"}
    with pytest.raises(IncompleteCacheError, match="cc3m-00001.tar"):
        w.merge(probe_embeddings(), shards=names)
    with pytest.raises(IncompleteCacheError, match="no done marker"):
        w.merge(probe_embeddings())  # no list: the started shard still blocks the merge
    for i, name in enumerate(names):
        if name not in w.done_shards():
            write_shard(w, name, i)
    assert not [p for p in (killed / "parts").iterdir() if p.name.endswith(".tmp")]
    m_resumed = w.merge(probe_embeddings(), shards=names)

    m_clean = build(tmp_path / "clean", storage, n_shards=3)
    for name in FINAL_FILES:
        assert (killed / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    for k in ("rows", "index_entries", "shards", "dedup", "files", "key_index"):
        assert m_resumed[k] == m_clean[k], k


def test_merge_refuses_missing_done_marker(tmp_path):
    w = CacheWriter(tmp_path, make_spec(), "bf16")
    write_shard(w, "a.tar", 0)
    with pytest.raises(IncompleteCacheError, match=r"1 of 2 listed shards .*'b.tar'"):
        w.merge(probe_embeddings(), shards=["a.tar", "b.tar"])
    with pytest.raises(IncompleteCacheError, match="no shards"):
        CacheWriter(tmp_path / "empty", make_spec()).merge(probe_embeddings())
    write_shard(w, "b.tar", 1)
    with pytest.raises(ValueError, match="not in the list.*b.tar"):
        w.merge(probe_embeddings(), shards=["a.tar"])
    with pytest.raises(ValueError, match="probe_embeddings"):
        w.merge(probe_embeddings()[:3])
    w.merge(probe_embeddings())  # all present shards, sorted by name
    assert not (tmp_path / "parts").exists()
    with pytest.raises(FileExistsError):
        w.merge(probe_embeddings())
    with pytest.raises(FileExistsError):
        CacheWriter(tmp_path, make_spec(), "bf16")


def test_exception_in_shard_discards_it(tmp_path):
    w = CacheWriter(tmp_path, make_spec(), "fp16")
    with pytest.raises(RuntimeError, match="boom"):
        with w.shard("a.tar") as s:
            s.add_batch(["k"], "short", ["a dog"], embed(["a dog"]))
            raise RuntimeError("boom")
    assert w.done_shards() == set()
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["config.json"]
    write_shard(w, "a.tar", 0)  # redone; its rows were not kept in the dedup set
    w.merge(probe_embeddings())
    cache = EmbeddingCache.open(tmp_path, verify_checksums=True)
    assert (cache.lookup("a.tar", shard_data(0)[0], "short") >= 0).all()


def test_shard_input_errors(tmp_path):
    w = CacheWriter(tmp_path, make_spec(), "bf16")
    write_shard(w, "a.tar", 0)
    with pytest.raises(ValueError, match="already done"):
        with w.shard("a.tar"):
            pass
    with pytest.raises(ValueError, match="added twice"):
        with w.shard("b.tar") as s:
            s.add_batch(["k1", "k2"], "short", ["x", "y"], embed(["x", "y"]))
            s.add("k1", "short", "z", embed(["z"])[0])
    assert "b.tar" not in w.done_shards()
    with w.shard("b.tar") as s:
        with pytest.raises(ValueError, match=r"\\x1f"):
            s.add("bad\x1fkey", "short", "x", embed(["x"])[0])
        with pytest.raises(ValueError, match="embeddings must be"):
            s.add_batch(["k"], "short", ["x"], torch.zeros(1, DIM + 1))
        with pytest.raises(ValueError, match="non-finite"):
            s.add_batch(["k"], "short", ["x"], torch.full((1, DIM), float("inf")))
        with pytest.raises(ValueError, match="captions"):
            s.add_batch(["k", "l"], "short", ["x"], embed(["x", "y"]))
        s.add("k", "short", "x", embed(["x"])[0])
    assert w.done_shards() == {"a.tar", "b.tar"}


def test_writer_config_must_match(tmp_path):
    CacheWriter(tmp_path, make_spec(), "bf16")
    with pytest.raises(StaleCacheError, match="pooling: expected 'eos_token', found 'mean'"):
        CacheWriter(tmp_path, make_spec(pooling="eos_token"), "bf16", rank=1, world_size=2)
    with pytest.raises(StaleCacheError, match="storage"):
        CacheWriter(tmp_path, make_spec(), "int8", rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        CacheWriter(tmp_path, make_spec(), "bf16", rank=2, world_size=2)


def test_key_hash_collisions_fail_loudly(tmp_path, monkeypatch):
    zero = lambda shards, keys, fields: np.zeros(len(keys), dtype=np.uint64)
    monkeypatch.setattr(writer_mod, "key_hashes", zero)
    w = CacheWriter(tmp_path, make_spec(), "bf16")
    with pytest.raises(KeyCollisionError, match="same 64-bit key hash"):
        with w.shard("a.tar") as s:
            s.add_batch(["k1", "k2"], "short", ["x", "y"], embed(["x", "y"]))
    with w.shard("a.tar") as s:
        s.add("k1", "short", "x", embed(["x"])[0])
    with w.shard("b.tar") as s:
        s.add("k9", "dense", "y", embed(["y"])[0])
    with pytest.raises(KeyCollisionError, match=r"\('a.tar', 'k1', 'short'\) and \('b.tar', 'k9', 'dense'\)"):
        w.merge(probe_embeddings())
    assert not (tmp_path / "manifest.json").exists()


def test_probe_verification(tmp_path):
    m = build(tmp_path, "fp8_e4m3", n_shards=1)
    assert m["probe"]["captions"] == list(PROBE_CAPTIONS) and len(PROBE_CAPTIONS) == 16
    cache = EmbeddingCache.open(tmp_path)
    assert torch.equal(cache.probe_embeddings(), probe_embeddings())
    seen = []

    def same_model(captions):
        seen.append(captions)
        return probe_embeddings().to(torch.bfloat16)  # bf16 numerics: cosine still > 0.999

    cos = cache.verify_probe(same_model)
    assert seen == [list(PROBE_CAPTIONS)] and float(cos.min()) > 0.999
    other = lambda captions: embed([c + " (other template)" for c in captions])
    with pytest.raises(StaleCacheError, match="probe check failed.*16 of 16"):
        cache.verify_probe(other)
    with pytest.raises(StaleCacheError, match="shape"):
        cache.verify_probe(lambda c: probe_embeddings()[:, :10])


def test_pickle_reopens_instead_of_copying(tmp_path):
    build(tmp_path, "bf16")
    cache = EmbeddingCache.open(tmp_path, expect=make_spec())
    blob = pickle.dumps(cache)
    assert len(blob) < 2000, "the memory maps must not be pickled"
    again = pickle.loads(blob)
    keys = shard_data(2)[0]
    assert (
        again.lookup("cc3m-00002.tar", keys, "dense") == cache.lookup("cc3m-00002.tar", keys, "dense")
    ).all()
    assert torch.equal(again.rows_tensor(), cache.rows_tensor())


def test_spec_validation():
    with pytest.raises(ValueError, match="caption"):
        make_spec(prompt_template="no placeholder")
    with pytest.raises(ValueError, match="pooling"):
        make_spec(pooling="max")
    with pytest.raises(ValueError, match="dim"):
        make_spec(dim=0)
    with pytest.raises(ValueError, match="max_length"):
        make_spec(max_length=True)
    with pytest.raises(ValueError, match="model_revision"):
        make_spec(model_revision="")
    with pytest.raises(TypeError, match="normalize"):
        make_spec(normalize=1)
    assert CacheSpec.from_dict(make_spec().to_dict()) == make_spec()
