"""Stage 1 (llm2clip.stage1): caption-contrastive LoRA training end to end on a tiny local LLM (CPU).

Toy task: caption a = "a red car", caption b = "one carx colored redish" (each word of b is a renamed
word of a), 10 colors x 8 objects. The random model starts at CRA ~0 on held-out pairs (no word in
common) and must learn the word mapping to retrieve them. Everything runs through ``main(argv)``.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2clip.apps.stage1 import Stage1Config, config_from_args, main, train
from llm2clip.cli import build_parser
from llm2clip.data.fields import FieldSpec
from llm2clip.data.pairs import PairStream, read_source
from llm2clip.data.shards import ShardError, write_shard
from llm2clip.distributed import DistInfo
from llm2clip.models.text_embedder import LLMTextEmbedder, TextEmbedderConfig
from llm2clip.training.caption_contrastive import mask_for_mntp
from llm2clip.training.optim import lr_factor

sys.path.insert(0, str(Path(__file__).parent))
from llm_fixtures import tiny_llm_dir  # noqa: E402

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange"]
OBJECTS = ["car", "dog", "cat", "house", "boat", "chair", "bird", "tree"]
REPO = Path(__file__).resolve().parents[1]


def toy_pairs() -> list[tuple[str, str]]:
    pairs = [(f"a {c} {o}", f"one {o}x colored {c}ish") for o in OBJECTS for c in COLORS]
    random.Random(0).shuffle(pairs)
    return pairs


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread is faster, and much faster on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    pairs = toy_pairs()
    llm = tiny_llm_dir(root / "llm", corpus=[f"{a} {b}" for a, b in pairs])
    shards = root / "shards"
    shards.mkdir()
    for s in range(2):
        samples = [
            {"__key__": f"{s}{i:04d}", "txt": a, "json": json.dumps({"dense_caption": b})}
            for i, (a, b) in enumerate(pairs[s::2])
        ]
        if s == 1:  # bad input: an empty caption, a missing field, a JSON member that does not parse
            samples.append({"__key__": "empty", "txt": "  ", "json": json.dumps({"dense_caption": "x"})})
            samples.append({"__key__": "missing", "txt": "a red car", "json": json.dumps({"short": "x"})})
            samples.append({"__key__": "malformed", "txt": "a red car", "json": "{not json"})
        write_shard(str(shards / f"{s:05d}.tar"), samples)
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in pairs))
    return {"root": root, "llm": str(llm), "shards": str(shards), "jsonl": str(jsonl), "pairs": pairs}


def _args(toy, out, *extra) -> list[str]:
    return [
        "--model", toy["llm"], "--output-dir", str(out), "--batch-size", "16", "--lr", "1e-3",
        "--warmup-steps", "3", "--loss-backend", "torch", "--device", "cpu", *extra,
    ]  # fmt: skip


def test_train_lowers_loss_raises_cra_and_adapter_reloads(toy, tmp_path):
    out = tmp_path / "run"
    argv = _args(toy, out, "--shards", toy["shards"], "--eval-pairs", "20", "--steps", "40")
    metrics, trained = train(config_from_args(argv), DistInfo())  # main() minus the process group
    losses = metrics["losses"]
    print("losses", losses[:3], losses[-3:], "CRA", metrics["cra_before"], "->", metrics["cra_after"])
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert metrics["cra_after"] > metrics["cra_before"] and metrics["cra_after"] >= 0.5
    skipped = metrics["skipped"]
    assert skipped == {"empty": 1, "missing": 1, "malformed": 1, "total": 3, "by_shard": {"00001.tar": 3}}
    assert metrics["eval_pairs"] == 20 and metrics["pairs_per_s"] > 0

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["losses"] == losses and saved["config"]["scale"] == 50.0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # resolved from auto

    # The held-out pairs were never trained on, and the saved adapter reproduces the trained model.
    captions = [c for pair in toy["pairs"][:20] for c in pair]
    expected = trained.encode(captions)
    info = json.loads((out / "embedder_config.json").read_text())
    cfg = TextEmbedderConfig(**{**info["embedder"], "lora": None})
    reloaded = LLMTextEmbedder.from_pretrained(cfg)
    reloaded.load_lora(info["adapter"])
    got = reloaded.encode(captions)
    print("max |reloaded - trained|", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_resume_continues_with_the_same_losses(toy, tmp_path):
    """2N steps in one go == N steps, stop, resume N more (MNTP warm-up, dropout and jsonl data included)."""
    common = ["--pairs-jsonl", toy["jsonl"], "--mntp-steps", "2", "--steps", "6", "--eval-pairs", "8"]
    full = main(_args(toy, tmp_path / "full", *common, "--checkpoint-every", "0"))
    part = main(_args(toy, tmp_path / "part", *common, "--stop-at-step", "4"))
    assert not part["finished"] and not (tmp_path / "part" / "adapter").exists()
    assert (tmp_path / "part" / "checkpoints" / "step_00000004" / "trainer_state.pt").exists()
    resumed = main(_args(toy, tmp_path / "part", *common, "--resume", "--merge"))
    print("full", full["mntp_losses"], full["losses"])
    print("resumed", resumed["mntp_losses"], resumed["losses"])
    assert len(resumed["losses"]) == 6 and len(resumed["mntp_losses"]) == 2
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(torch.tensor(resumed["mntp_losses"]), torch.tensor(full["mntp_losses"]))
    assert resumed["cra_before"] == full["cra_before"] and resumed["cra_after"] == pytest.approx(
        full["cra_after"]
    )
    assert resumed["data_state"] == full["data_state"]

    # --merge: merged full weights embed like base + adapter.
    info = json.loads((tmp_path / "part" / "embedder_config.json").read_text())
    with_adapter = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(**{**info["embedder"], "lora": None}))
    with_adapter.load_lora(info["adapter"])
    merged = LLMTextEmbedder.from_pretrained(
        TextEmbedderConfig(**{**info["embedder"], "lora": None, "model": info["merged"]})
    )
    captions = [c for pair in toy["pairs"][:6] for c in pair]
    torch.testing.assert_close(merged.encode(captions), with_adapter.encode(captions), rtol=1e-4, atol=1e-5)


def test_two_rank_gloo_run(toy, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "llm2clip.stage1", *_args(toy, out, "--shards", toy["shards"], "--steps", "3")]
    cmd += ["--batch-size", "4", "--eval-pairs", "8"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    print("2-rank losses", metrics["losses"])
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 8
    assert len(metrics["losses"]) == 3 and all(math.isfinite(x) for x in metrics["losses"])
    assert (out / "adapter" / "adapter_config.json").exists()


def test_unreadable_shard_raises_naming_it(toy, tmp_path):
    bad = tmp_path / "bad.tar"
    write_shard(str(bad), [{"__key__": f"{i}", "txt": "a red car" * 500, "json": "{}"} for i in range(4)])
    bad.write_bytes(bad.read_bytes()[:7000])
    with pytest.raises(ShardError, match="bad.tar"):
        main(_args(toy, tmp_path / "out", "--shards", f"{toy['shards']}::{bad}", "--steps", "3"))


def test_read_source_skips_and_counts(toy):
    rows, skip = read_source("shard", os.path.join(toy["shards"], "00001.tar"), "txt", "json:dense_caption")
    assert len(rows) == 40 and (skip["empty"], skip["missing"], skip["malformed"]) == (1, 1, 1)
    rows, skip = read_source("jsonl", toy["jsonl"], "txt", "txt")
    assert [(a, b) for _, a, b in rows] == toy["pairs"]
    assert FieldSpec.parse("json:meta.caption") == FieldSpec("caption", "json", ("meta", "caption"))


def test_pair_stream_resumes_from_its_state(toy):
    sources = [("shard", os.path.join(toy["shards"], f"{s:05d}.tar")) for s in range(2)]
    stream = PairStream(sources, "txt", "json:dense_caption", seed=3, held={0: {0, 1}})
    first = stream.take(50)
    state = stream.state
    rest = stream.take(120)  # crosses into the next epochs
    again = PairStream(sources, "txt", "json:dense_caption", seed=3, held={0: {0, 1}})
    again.state = state
    assert again.take(120) == rest
    assert len(set(first)) == 50 and len(set(first + rest[:28])) == 78  # 78 pairs per epoch


def test_mntp_masks_only_caption_tokens():
    ids = [[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]] * 40
    pool = [[False, False] + [True] * 9] * 40  # BOS and one template token are never masked
    gen = torch.Generator().manual_seed(0)
    inputs, where, targets = mask_for_mntp(ids, pool, 0.2, mask_id=0, vocab=20, gen=gen)
    assert all(p >= 2 for _, p in where) and targets == [ids[i][p] for i, p in where]
    assert 0.12 < len(where) / (40 * 9) < 0.28
    masked = sum(inputs[i][p] == 0 for i, p in where) / len(where)
    assert 0.65 < masked < 0.95  # ~80% mask token, the rest random or kept
    assert all(inputs[i][p] == ids[i][p] for i in range(40) for p in range(11) if (i, p) not in set(where))


def test_config_validation_and_help(tmp_path):
    parser = build_parser(Stage1Config, "python -m llm2clip.stage1", "")
    assert all(a.help for a in parser._actions)
    base = dict(model=str(tmp_path), output_dir="o", pairs_jsonl=("p",))
    Stage1Config(**base)
    for bad in (
        {"shards": None, "pairs_jsonl": ()},
        {"field_b": "json:"},
        {"pooling": "max"},
        {"batch_size": 0},
        {"mntp_mask_prob": 1.0},
        {"decay": "step"},
        {"eval_pairs": 5, "eval_jsonl": "x"},
        {"steps": 0, "mntp_steps": 0},
        {"model": str(tmp_path / "missing")},
        {"lr": float("nan")},
        {"min_lr_ratio": -1.0},
        {"lora_dropout": 1.0},
    ):
        with pytest.raises(ValueError):
            Stage1Config(**{**base, **bad})
    args = parser.parse_args(["--model", "m", "--output-dir", "o", "--pairs-jsonl", "a", "b", "--resume"])
    assert args.resume == "auto" and args.pairs_jsonl == ["a", "b"] and args.amp is True


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == 1.0 and lr_factor(10, 10, 100) == 1.0
    assert lr_factor(55, 10, 100) == pytest.approx(0.5) and lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert lr_factor(55, 10, 100, "linear", 0.1) == pytest.approx(0.55)
    assert lr_factor(80, 10, 100, "constant") == 1.0
