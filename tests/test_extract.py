"""llm2clip.extract end to end on the CPU: tiny random Llama, a few small webdataset shards.

Reference: the embedder loaded exactly as extraction loads it (extract.load_embedder), `encode`
on each caption; the cache stores fp32, so rows must match up to the difference between batch
compositions (packed, fp32 on a 64-wide model: ~1e-6).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2clip.apps.extract import main, parse_config
from llm2clip.cache import EmbeddingCache
from llm2clip.data.fields import FieldSpec
from llm2clip.data.shards import ShardError, iter_samples, shard_name, write_shard
from llm2clip.models.text_recipe import SUMMARY_FILE, load_embedder
from tests.llm_fixtures import tiny_llm_dir

REPO = Path(__file__).resolve().parent.parent
KILL_AFTER = Path(__file__).with_name("kill_after.py")
WORDS = (
    "a the dog cat man woman child runs sleeps sits on in near red blue green sofa grass sea bike car "
    "street city tree house photo of with two small big old young and under beach park"
).split()
MAX_LEN = 16


def _caption(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _make_shards(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(3):
        samples = []
        for k in range(7):
            sample = {
                "__key__": f"{k:05d}",
                "txt": _caption(rng, 2, 8),
                "json": json.dumps({"dense_caption": _caption(rng, 5, 11)}),
                "jpg": b"\xff\xd8 not an image",
            }
            samples.append(sample)
        samples[1]["txt"] = "a photo of a dog"  # a caption repeated in every shard (dedup)
        samples[2]["json"] = json.dumps({"other": "x"})  # dense caption missing
        samples[3]["txt"] = "   "  # empty
        samples[4]["json"] = json.dumps({"dense_caption": " ".join(["dog"] * 40)})  # truncated
        p = root / f"{s:05d}.tar"
        write_shard(str(p), samples)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = tiny_llm_dir(root / "llm", corpus=[" ".join(WORDS), "retrieve caption :"])
    shards = _make_shards(root)
    return {"root": root, "model": model, "shards": shards}


def _args(env, out, *extra) -> list[str]:
    return [
        "--shards", str(env["root"] / "{00000..00002}.tar"), "--out", str(out),
        "--model", str(env["model"]), "--fields", "txt", "dense=json:dense_caption",
        "--instruction", "retrieve caption : {caption}", "--max-length", str(MAX_LEN),
        "--dtype", "float32", "--storage", "fp32", "--tokens-per-batch", "64", "--no-progress",
        "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(env):
    """One uninterrupted single-rank extraction (shared by the tests below)."""
    out = env["root"] / "cache-ref"
    summary = main(_args(env, out))
    return out, summary


def _triples(env):
    """(shard name, key, field, caption or None) for every sample and field in the shards."""
    specs = [FieldSpec.parse("txt"), FieldSpec.parse("dense=json:dense_caption")]
    out = []
    for p in env["shards"]:
        for sample in iter_samples(str(p)):
            for f in specs:
                out.append((shard_name(str(p)), sample["__key__"], f.name, f.read(sample)))
    return out


def _rows(cache: EmbeddingCache, triples) -> tuple[np.ndarray, torch.Tensor]:
    ids = cache.lookup([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples])
    present = torch.from_numpy(ids[ids >= 0])
    return ids, cache.gather(present, out_dtype=torch.float32)


def _files(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.iterdir()):
        if p.name == SUMMARY_FILE:
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            m = json.loads(data)
            m.pop("created")
            data = json.dumps(m, sort_keys=True).encode()
        out[p.name] = data
    return out


def test_field_spec():
    assert FieldSpec.parse("txt") == FieldSpec("txt", "txt", ())
    assert FieldSpec.parse("json:dense_caption") == FieldSpec("dense_caption", "json", ("dense_caption",))
    assert FieldSpec.parse("d=json:a.b") == FieldSpec("d", "json", ("a", "b"))
    for bad in ("", "json:", "txt:x", "json:a..b"):
        with pytest.raises(ValueError):
            FieldSpec.parse(bad)
    f = FieldSpec.parse("json:a.b")
    assert f.read({"json": b'{"a": {"b": "hi"}}'}) == "hi"
    assert f.read({"json": b'{"a": {"c": "hi"}}'}) is None
    assert f.read({"txt": b"x"}) is None
    with pytest.raises(ValueError, match="not a string"):
        f.read({"json": b'{"a": {"b": 3}}'})


def test_cache_equals_direct_encode(env, reference):
    out, summary = reference
    triples = _triples(env)
    cache = EmbeddingCache.open(out, verify_checksums=True)
    ids, rows = _rows(cache, triples)
    expected_missing = [t for t in triples if t[3] is None]
    assert len(expected_missing) == 6 and all(ids[i] < 0 for i, t in enumerate(triples) if t[3] is None)
    present = [t for t in triples if t[3] is not None]
    assert (ids >= 0).sum() == len(present) == cache.num_entries == summary["captions"]

    cfg = parse_config(_args(env, out))
    embedder = load_embedder(cfg.text, "cpu")
    direct = embedder.encode([t[3] for t in present])
    err = (rows - direct).abs().max().item()
    print(f"max |cache - encode| = {err:.3g}, max |encode| = {direct.abs().max().item():.3g}")
    assert err <= 1e-5 * max(1.0, direct.abs().max().item())
    # probe embeddings: same model, same path
    cos = cache.verify_probe(lambda c: embedder.encode(c))
    assert float(cos.min()) > 0.9999

    assert summary["missing"] == {"txt": 3, "dense": 3}
    assert summary["truncated"] == 3
    assert summary["rows"] == cache.num_rows < summary["captions"]  # "a photo of a dog" stored once
    assert summary["dedup_ratio"] == pytest.approx(summary["captions"] / summary["rows"])
    assert summary["bytes"] > 0 and summary["shards"] == 3 and summary["shards_resumed"] == 0
    assert json.loads((out / SUMMARY_FILE).read_text())["rows"] == summary["rows"]
    assert cache.spec.model_revision.startswith("sha256:") and cache.spec.adapter_revision == ""


def _run(args, extra_env=None, timeout=120, kill_after: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    cmd = ["-m", "llm2clip.extract"] if kill_after is None else [str(KILL_AFTER), "extract", str(kill_after)]
    return subprocess.Popen(
        [sys.executable, *cmd, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_killed_run_resumes_to_same_bytes(env, reference):
    out = env["root"] / "cache-killed"
    proc = _run(_args(env, out), kill_after=1)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, log
    assert len(list((out / "parts").glob("*.done"))) == 1 and not (out / "manifest.json").exists()
    summary = main(_args(env, out))
    assert summary["shards_resumed"] == 1 and summary["shards_extracted"] == 2
    assert _files(out) == _files(reference[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one(env, reference):
    out = env["root"] / "cache-2ranks"
    port = str(_free_port())
    procs = [
        _run(
            _args(env, out),
            {
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the reference's arithmetic
            },
        )  # fmt: skip
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    triples = [t for t in _triples(env) if t[3] is not None]
    one, two = EmbeddingCache.open(reference[0]), EmbeddingCache.open(out)
    assert two.manifest["dedup"]["writers"] == [0, 1]
    assert two.num_entries == one.num_entries and two.num_rows == one.num_rows
    ids1, rows1 = _rows(one, triples)
    ids2, rows2 = _rows(two, triples)
    assert (ids1 >= 0).all() and (ids2 >= 0).all()
    torch.testing.assert_close(rows2, rows1, rtol=0, atol=0)


def test_missing_field_error_names_shard_and_key(env):
    with pytest.raises(ShardError, match=r"00000\.tar.*key '00002'.*'dense'"):
        main(_args(env, env["root"] / "cache-err", "--on-missing", "error"))


def test_unreadable_shard_is_an_error(env, tmp_path):
    bad = tmp_path / "00009.tar"
    bad.write_bytes(env["shards"][0].read_bytes()[:1500])  # cut inside a member
    args = _args(env, tmp_path / "cache")
    args[1] = str(bad)
    with pytest.raises(ShardError, match="00009.tar"):
        main(args)


def test_adapter(env, tmp_path):
    """A stage-1 LoRA adapter (random, non-zero update) is loaded, merged and identified by hash."""
    from llm2clip.models.text_embedder import LLMTextEmbedder, LoraSettings, TextEmbedderConfig

    emb = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(model=str(env["model"]), dtype="float32"))
    emb.add_lora(LoraSettings(r=4))
    with torch.no_grad():
        for name, p in emb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    emb.save_lora(tmp_path / "adapter")
    out = tmp_path / "cache"
    args = _args(env, out, "--adapter", str(tmp_path / "adapter"))
    args[1] = str(env["shards"][0])
    main(args)
    cfg = parse_config(args)
    plain = parse_config(_args(env, out))
    triples = [t for t in _triples(env) if t[3] is not None and t[0] == "00000.tar"]
    cache = EmbeddingCache.open(out)
    _, rows = _rows(cache, triples)
    direct = load_embedder(cfg.text, "cpu").encode([t[3] for t in triples])
    base = load_embedder(plain.text, "cpu").encode([t[3] for t in triples])
    assert (direct - base).abs().max() > 1e-2  # the adapter changes the embeddings
    assert (rows - direct).abs().max() <= 1e-5 * max(1.0, direct.abs().max().item())
    assert cache.spec.adapter_revision.startswith("sha256:")
