"""The stage-2 trainer (llm2clip/train.py) end to end on the CPU: tiny shards, a tiny cache
(tests/train_fixtures.py), a tiny ViT.

Single-process runs go through ``main(argv)`` in this process; multi-rank runs and the SIGKILL
test start ``torch.distributed.run`` / ``python -m llm2clip.train`` subprocesses (gloo).
Loss-curve comparisons (fused vs plain, gradient cache vs one pass, resumed vs uninterrupted) use
a float32 tolerance scaled by the loss: the runs differ only in summation order, which after a few
AdamW steps moves the loss by ~1e-6 relative; 1e-4 leaves room and still fails on any real
difference (a wrong gradient changes the second step's loss at the 1e-2 level).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2clip.apps.train import main, parse_config
from llm2clip.cache import EmbeddingCache, StaleCacheError
from llm2clip.distributed import DistInfo
from llm2clip.models.clip_model import ClipModel
from llm2clip.training.checkpoint import CheckpointManager
from tests.train_fixtures import TINY_VIT, make_data, spec

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    shards, cache = make_data(root / "data")
    held, held_cache = make_data(root / "held", shards=1, per_shard=8, prefix="held", seed=1)
    return {"root": root, "shards": str(root / "data" / "train-{0000..0003}.tar"), "cache": str(cache),
            "held": held[0], "held_cache": str(held_cache)}  # fmt: skip


def args(data, out, *extra) -> list[str]:
    return [
        "--train-shards", data["shards"], "--cache", data["cache"], "--vision", "B/16",
        "--vision-overrides", TINY_VIT, "--embed-dim", "16", "--adapter-depth", "1", "--batch-size", "8",
        "--steps", "4", "--workers", "0", "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3",
        "--warmup-steps", "1", "--log-every", "1", "--loss-backend", "torch", *extra,
    ]  # fmt: skip


def checkpoint_dirs(out: Path) -> list[Path]:
    return CheckpointManager(out, 1, DistInfo()).dirs()


def losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def assert_same_curve(a: list[float], b: list[float]) -> None:
    print("curves", a, b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= RTOL * abs(y), (a, b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, argv: list[str], env_extra: dict | None = None, timeout: int = 300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "-m", "llm2clip.train", *argv]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------------------------------------


def test_single_process_run_outputs(data, tmp_path):
    out = tmp_path / "run"
    extra = ["--fused-loss", "--checkpoint-every", "1", "--keep-last", "2", "--eval-shards", data["held"],
             "--eval-fields", "short=txt", "--eval-cache", data["held_cache"]]  # fmt: skip
    metrics = main(args(data, out, *extra))
    assert metrics["finished"] and metrics["step"] == 4 and len(metrics["losses"]) == 4
    config = json.loads((out / "config.json").read_text())
    assert config["loss"]["fused_loss"] and config["cache_spec"]["model_id"] == "test/tiny-llm"
    assert config["data"]["fields"] == ["short", "dense"]  # from the cache's extract_summary.json
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"lr", "logit_scale", "samples_per_s", "epoch", "grad_norm"} <= set(r)
        assert 0 < r["logit_scale"] <= 100
    assert steps[0]["lr"] == pytest.approx(1e-3) and steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    evals = [r for r in log if "eval" in r]
    assert len(evals) == 1 and evals[0]["eval"]["retrieval"]["N"] == 8
    assert metrics["eval"]["retrieval"]["i2t_R@1"] >= 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000003", "step_00000004"]  # keep-last 2
    model = ClipModel.load(out / "final")
    assert model.config.text_spec == config["cache_spec"]  # the training cache's spec is recorded
    last = ClipModel.load(out / "checkpoints" / "step_00000004")
    for (n, a), (_, b) in zip(model.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), n
    assert 0.0 <= float(model.logit_scale.detach()) <= model.config.max_logit_scale
    try:
        import tensorboard  # noqa: F401  (in the test extra; the trainer only warns without it)
    except ImportError:
        return
    assert any((out / "tensorboard").glob("events.*")), "no TensorBoard event file"


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_fused_and_plain_loss_give_the_same_curve(data, tmp_path, loss):
    main(args(data, tmp_path / "fused", "--fused-loss", "--loss", loss))
    main(args(data, tmp_path / "plain", "--no-fused-loss", "--loss", loss))
    assert_same_curve(losses(tmp_path / "fused"), losses(tmp_path / "plain"))


def test_gradient_cache_gives_the_same_curve(data, tmp_path):
    main(args(data, tmp_path / "one", "--fused-loss"))
    main(args(data, tmp_path / "chunked", "--fused-loss", "--chunk-size", "3", "--grad-checkpointing"))
    assert_same_curve(losses(tmp_path / "chunked"), losses(tmp_path / "one"))


def test_worker_count_does_not_change_the_run(data, tmp_path):
    main(args(data, tmp_path / "w0", "--fused-loss", "--steps", "3"))
    main(args(data, tmp_path / "w2", "--fused-loss", "--steps", "3", "--workers", "2"))
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


def test_resume_after_sigkill_continues_with_the_same_losses(data, tmp_path):
    common = ["--fused-loss", "--steps", "5", "--checkpoint-every", "2"]
    main(args(data, tmp_path / "ref", *common))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kill = [sys.executable, str(REPO / "tests" / "kill_after.py"), "train", "3"]
    proc = subprocess.run([*kill, *args(data, out, *common)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000002"]
    assert not (out / "final").exists()
    metrics = main(args(data, out, *common, "--resume"))
    assert metrics["finished"]
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert losses(out) == losses(tmp_path / "ref")  # same data, RNG and state: bitwise on the CPU


@pytest.fixture(scope="module")
def two_rank_runs(data, tmp_path_factory):
    """Three 2-rank gloo runs of the same 4 steps: DDP fused (with evaluation), DDP plain, FSDP2."""
    root = tmp_path_factory.mktemp("two_rank")
    held = ["--eval-shards", data["held"], "--eval-fields", "short=txt", "--eval-cache", data["held_cache"]]
    # The plain and FSDP2 runs also take the gradient-cache path (DDP no_sync / FSDP2 deferred sync).
    chunked = ["--chunk-size", "3"]
    runs = {
        "fused": ["--fused-loss", *held],
        "plain": ["--no-fused-loss", *chunked],
        "fsdp": ["--fused-loss", "--fsdp", *chunked],
    }
    for name, extra in runs.items():
        proc = torchrun(2, args(data, root / name, "--batch-size", "4", *extra))
        assert proc.returncode == 0, f"{name}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_two_rank_gloo_run_fused_equals_plain(two_rank_runs):
    metrics = json.loads((two_rank_runs / "fused" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 8 and metrics["finished"]
    assert metrics["eval"]["retrieval"]["N"] == 8
    assert_same_curve(losses(two_rank_runs / "fused"), losses(two_rank_runs / "plain"))


def test_two_rank_fsdp_equals_ddp(two_rank_runs):
    assert_same_curve(losses(two_rank_runs / "fsdp"), losses(two_rank_runs / "fused"))
    fsdp = ClipModel.load(two_rank_runs / "fsdp" / "final").state_dict()
    ddp = ClipModel.load(two_rank_runs / "fused" / "final").state_dict()
    assert fsdp.keys() == ddp.keys()
    for name in fsdp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Bad input and faults


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shards, cache = make_data(tmp_path / "data", corrupt=2, missing_rows=1)
    data = {"shards": str(tmp_path / "data" / "train-{0000..0003}.tar"), "cache": str(cache)}
    metrics = main(args(data, tmp_path / "ok", "--fused-loss", "--max-skipped-fraction", "0.5"))
    skipped = metrics["skipped"]
    assert (skipped["corrupt_image"], skipped["missing_row"], skipped["total"]) == (2, 1, 3)
    assert skipped["by_shard"] == {"train-0000.tar": 3}
    saved = json.loads((tmp_path / "ok" / "metrics.json").read_text())["skipped"]
    assert saved == skipped  # the summary on disk carries the true counts (total included)
    with pytest.raises(RuntimeError, match=r"3 of \d+ samples skipped.*train-0000.tar \(3\)"):
        strict = ["--max-skipped-fraction", "0.01", "--skip-grace", "1"]
        main(args(data, tmp_path / "strict", "--fused-loss", *strict))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import llm2clip.apps.train as train_mod

    real = train_mod.make_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        fn = real(*a, **kw)

        def loss_fn(*x):
            calls["n"] += 1
            value = fn(*x)
            return value * float("nan") if calls["n"] == 3 else value

        return loss_fn

    monkeypatch.setattr(train_mod, "make_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="step 3: loss nan"):
        main(args(data, out, "--fused-loss", "--checkpoint-every", "1"))
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000001", "step_00000002"]
    assert not (out / "final").exists()
    assert ClipModel.load(out / "checkpoints" / "step_00000002") is not None


def test_non_finite_parameters_stop_before_any_write(data, tmp_path, monkeypatch):
    """An optimizer step that leaves a parameter NaN stops the run naming the step and the
    parameter, before that step's checkpoint: every checkpoint on disk is finite."""
    from safetensors.torch import load_file

    from llm2clip.training.step import NonFiniteParameters

    real, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "nan-params"
    with pytest.raises(NonFiniteParameters, match=r"step 3: the optimizer step left parameter \S+ NaN") as e:
        main(args(data, out, "--fused-loss", "--checkpoint-every", "1", "--keep-last", "5"))
    assert "last good checkpoint is" in str(e.value) and "step_00000002" in str(e.value)
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000001", "step_00000002"]
    for name, t in load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors")).items():
        assert torch.isfinite(t).all(), name
    assert not (out / "final").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "not a finite number"),
        ("--adapter-lr", "inf", "not a finite number"),
        ("--weight-decay", "nan", "not a finite number"),
        ("--min-lr-ratio", "-1", r"--min-lr-ratio must be in \[0, 1\]"),
        ("--min-lr-ratio", "1.5", r"--min-lr-ratio must be in \[0, 1\]"),
        ("--beta2", "1", r"--beta2 must be in \[0, 1\)"),
        ("--eps", "0", "--eps must be positive"),
        ("--adapter-lr", "-1e-3", "--adapter-lr must be positive"),
        ("--max-skipped-fraction", "nan", "not a finite number"),
    ],
)
def test_float_options_are_finite_and_in_range(data, tmp_path, capsys, flag, value, message):
    from llm2clip.cli import UsageError

    with pytest.raises((SystemExit, UsageError)) as e:
        parse_config(args(data, tmp_path, f"{flag}={value}"))
    text = str(e.value) if isinstance(e.value, UsageError) else capsys.readouterr().err
    assert re.search(message, text), text
    if isinstance(e.value, SystemExit):
        assert e.value.code == 2


@pytest.mark.parametrize("where", ["rows", "index row id"])
def test_a_flipped_cache_byte_stops_training_before_it_is_used(data, tmp_path, where):
    """One flipped byte in rows.bin is caught when a data worker first reads its block; a corrupted
    index row id at open (lazy verification, the default)."""
    import shutil

    from llm2clip.cache import CorruptCacheError

    cache = tmp_path / "cache"
    shutil.copytree(data["cache"], cache)
    if where == "rows":
        path, offset = cache / "rows.bin", 4096 + 100  # inside the first row, past the header
    else:
        entries = EmbeddingCache.open(cache).num_entries
        path, offset = cache / "index.bin", 4096 + 8 * entries  # the first row id
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match=r"(rows|index)\.bin.*block"):
        main(args({**data, "cache": str(cache)}, tmp_path / "run", "--fused-loss", "--steps", "8"))
    assert not (tmp_path / "run" / "final").exists()


def test_mismatched_cache_is_refused_before_the_first_step(data, tmp_path):
    out = tmp_path / "run"
    main(args(data, out, "--fused-loss", "--steps", "2"))
    _, other = make_data(tmp_path / "other", model_id="test/another-llm")
    with pytest.raises(StaleCacheError, match="model_id"):
        main(args({**data, "cache": str(other)}, out, "--fused-loss", "--steps", "4", "--resume"))
    with pytest.raises(StaleCacheError, match="model_id"):
        main(args(data, tmp_path / "e", "--eval-shards", data["held"], "--eval-cache", str(other)))
    with pytest.raises(ValueError, match="center_input=False; pass --no-center-text"):
        main(args(data, tmp_path / "init2", "--init-from", str(out / "final"), "--center-text"))
    wider = {**data, "cache": _wider_cache(tmp_path)}
    with pytest.raises(StaleCacheError, match="takes 24-d LLM embeddings, the cache .* holds 32-d"):
        main(args(wider, tmp_path / "init", "--init-from", str(out / "final"), "--fields", "short"))


def _wider_cache(tmp_path: Path) -> str:
    from llm2clip.cache import PROBE_CAPTIONS, CacheWriter
    from tests.train_fixtures import spec

    path = tmp_path / "wider"
    writer = CacheWriter(path, spec(dim=32), "fp32")
    with writer.shard("train-0000.tar") as w:
        w.add_batch(["00000"], "short", ["x"], torch.ones(1, 32))
    writer.merge(torch.ones(len(PROBE_CAPTIONS), 32))
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vision", "X/99"], "not a ViT preset"),
        (["--loss", "clip"], "--loss 'clip'"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--vision-overrides", "[1]"], "must be a JSON object"),
        (["--zeroshot-shards", "x.tar"], "needs --classnames"),
        (["--pretrained"], "apply to mobilenet_v2"),
    ],
)
def test_bad_config_is_refused_with_a_message(data, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(args(data, tmp_path, *extra))


def test_too_large_batch_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="do not fill one global batch"):
        main(args(data, tmp_path, "--batch-size", "64"))


def test_param_groups_layer_decay_and_no_weight_decay(data, tmp_path):
    from llm2clip.training.model import build_model
    from llm2clip.training.optim import param_groups

    cfg = parse_config(
        args(data, tmp_path, "--layer-decay", "0.5", "--adapter-lr", "7e-3", "--weight-decay", "0.1")
    )
    model = build_model(cfg.model, cfg.loss.kind, spec())
    o = cfg.optim
    groups = param_groups(
        model, lr=o.lr, adapter_lr=o.peak_adapter_lr, weight_decay=o.weight_decay, layer_decay=o.layer_decay
    )
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(where) == len(named)  # every trainable parameter exactly once
    top = model.visual.config.depth + 1  # ViT.layer_id of the head
    assert where[id(named["visual.blocks.1.attn.qkv.weight"])] == (1e-3 * 0.5 ** (top - 2), 0.1)
    assert where[id(named["visual.blocks.0.attn.qkv.weight"])] == (1e-3 * 0.5 ** (top - 1), 0.1)
    assert where[id(named["visual.patch_embed.weight"])][0] == 1e-3 * 0.5**top
    assert where[id(named["visual.pos_embed"])][1] == 0.0  # embeddings: no weight decay
    assert where[id(named["visual.blocks.0.attn.qkv.bias"])][1] == 0.0  # biases
    assert where[id(named["visual_proj.weight"])] == (1e-3, 0.1)
    assert where[id(named["logit_scale"])] == (1e-3, 0.0)
    adapter = [n for n in named if n.startswith("adapter.") and named[n].ndim == 2]
    assert adapter and all(where[id(named[n])] == (7e-3, 0.1) for n in adapter)


def test_center_text_sets_the_adapter_mean_from_the_cache(data, tmp_path):
    from llm2clip.cache import EmbeddingCache
    from llm2clip.training.model import cache_mean

    out = tmp_path / "centered"
    main(args(data, out, "--fused-loss", "--steps", "2", "--center-text", "--channels-last"))
    cache = EmbeddingCache.open(data["cache"])
    rows = torch.nn.functional.normalize(cache.gather(torch.arange(cache.num_rows), torch.float32), dim=-1)
    torch.testing.assert_close(cache_mean(cache), rows.mean(0))
    model = ClipModel.load(out / "final")
    assert model.config.adapter.center_input
    torch.testing.assert_close(model.adapter.input_mean, rows.mean(0))  # a buffer: not trained


def test_shard_sizes_are_counted_once_and_recounted_when_a_shard_changes(data, tmp_path, monkeypatch):
    import llm2clip.data.sizes as sizes_mod
    from llm2clip.data.shards import expand_shards

    shards = expand_shards(data["shards"])
    counted = []
    real = sizes_mod.count_samples
    monkeypatch.setattr(sizes_mod, "count_samples", lambda s: counted.append(list(s)) or real(s))
    path = tmp_path / "shard_sizes.json"
    assert sizes_mod.shard_sizes(shards, path) == [8, 8, 8, 8]
    assert sizes_mod.shard_sizes(shards, path) == [8, 8, 8, 8]
    assert counted == [shards]  # the second call reused shard_sizes.json
    os.utime(shards[1], ns=(0, 0))  # a changed file is counted again, alone
    assert sizes_mod.shard_sizes(shards, path) == [8, 8, 8, 8]
    assert counted[1:] == [[shards[1]]]
