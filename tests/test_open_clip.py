"""llm2clip_kernels.open_clip against open_clip itself (open-clip-torch: open_clip and open_clip_train).

- The module imports without open_clip, and no other kernels module imports it.
- One device: ClipLoss / SigLipLoss against open_clip's classes (value and every gradient).
- The refused modes and patch_open_clip's create_loss (CoCa and distillation refused).
- open_clip's own trainer (open_clip_train.main, tests/open_clip_run.py) on a tiny model and a small
  synthetic image-caption CSV, 1 and 2 gloo ranks, CLIP (each distributed mode) and SigLIP: with
  open_clip's loss in fp32, in fp64 (the reference) and patched. Per-step losses and logit scales,
  and on every loss call the value, the feature gradients and the DDP-averaged scale / bias
  gradients.
Tolerances (CONTRIBUTING.md): max|ours - ref| <= 2 max|open_clip fp32 - ref| + 1e-6 max(1, |ref|),
ref being open_clip's own loss in float64.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
HAS_TRAINER = HAS_OPEN_CLIP and all(importlib.util.find_spec(m) for m in ("open_clip_train", "pandas"))
requires_open_clip = pytest.mark.skipif(
    not HAS_OPEN_CLIP, reason="open_clip (open-clip-torch) is not installed"
)
requires_trainer = pytest.mark.skipif(
    not HAS_TRAINER, reason="open_clip_train (open-clip-torch) or its dependency pandas is not installed"
)
RUNNER = Path(__file__).with_name("open_clip_run.py")
TINY = 1e-6  # relative floor added to the 2 x open_clip bound (about 8 fp32 ulps)


def assert_within(what: str, err: float, pt_err: float, magnitude: float) -> None:
    """err = max|ours - ref| against pt_err = max|open_clip fp32 - ref| (ref: open_clip in fp64)."""
    tiny = TINY * max(1.0, magnitude)
    print(f"{what}: ours {err:.3e}, open_clip fp32 {pt_err:.3e} (|ref| {magnitude:.3g})")
    assert err <= 2 * pt_err + tiny, f"{what}: {err:.3e} > 2 x {pt_err:.3e} + {tiny:.1e}"


# ----------------------------------------------------------------------------- imports


def test_imports_without_open_clip():
    """The kernels never import open_clip; llm2clip_kernels.open_clip works without it installed."""
    code = """
import importlib, sys
import llm2clip_kernels
mods = ["contrastive_loss", "distributed_loss", "reference", "_chunked"]
if importlib.util.find_spec("triton"):
    mods.append("_triton")
for m in mods:
    importlib.import_module("llm2clip_kernels." + m)
assert "open_clip" not in sys.modules, "a kernels module imported open_clip"
sys.modules["open_clip"] = None  # as if not installed: importing it raises ImportError
sys.modules["open_clip_train"] = None
import torch
from llm2clip_kernels.open_clip import ClipLoss, SigLipLoss, patch_open_clip
x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
assert ClipLoss(backend="torch")(x, x, 10.0, output_dict=True)["contrastive_loss"].shape == ()
assert SigLipLoss(backend="torch")(x, x, 10.0, -5.0).shape == ()
try:
    patch_open_clip()
except ImportError as e:
    assert "needs open_clip (pip install open-clip-torch)" in str(e), e
else:
    raise AssertionError("patch_open_clip() without open_clip did not raise")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- one device


def _loss_and_grads(module, inputs: dict, dtype, output_dict: bool):
    leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    bias = {} if "logit_bias" in leaves else {"logit_bias": None}  # open_clip's SigLipLoss needs it
    out = module(**leaves, **bias, output_dict=output_dict)
    loss = out["contrastive_loss"] if output_dict else out
    assert isinstance(out, dict) == output_dict and loss.shape == ()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [loss.detach().double()] + [g.double() for g in grads]


@requires_open_clip
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("output_dict", [False, True])
def test_single_device_matches_open_clip(kind, with_bias, output_dict):
    import open_clip.loss

    from llm2clip_kernels import open_clip as ours

    b, D = 13, 24
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(b, D, generator=gen), dim=-1)
    image = F.normalize(torch.randn(b, D, generator=gen) + text, dim=-1)
    inputs = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(20.0)}
    if with_bias:
        inputs["logit_bias"] = torch.tensor(-4.0)
    theirs = open_clip.loss.ClipLoss() if kind == "clip" else open_clip.loss.SigLipLoss()
    fused = ours.ClipLoss(backend="auto") if kind == "clip" else ours.SigLipLoss(backend="auto")
    got = _loss_and_grads(fused, inputs, torch.float32, output_dict)
    pt = _loss_and_grads(theirs, inputs, torch.float32, output_dict)
    ref = _loss_and_grads(theirs, inputs, torch.float64, output_dict)
    for name, o, p, r in zip(["loss", *[f"d_{k}" for k in inputs]], got, pt, ref):
        err_o, err_p = ((a - r).abs().max().item() for a in (o, p))
        assert_within(name, err_o, err_p, r.abs().max().item())


@requires_open_clip
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_autocast_ours_accurate_open_clip_off(backend):
    """The README's bf16 note: under bf16 autocast open_clip's logits are bf16, so its loss is off the
    fp64 loss of the same bf16 features by ~1e-3 (8 mantissa bits on logits of size ~scale), while the
    fused kernels accumulate in fp32 and stay within ~1e-6."""
    import open_clip.loss

    from llm2clip_kernels.open_clip import ClipLoss

    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(256, 64, generator=gen), dim=-1)
    image = F.normalize(0.5 * torch.randn(256, 64, generator=gen) + text, dim=-1)
    image, text, scale = image.bfloat16(), text.bfloat16(), torch.tensor(100.0)
    ref = open_clip.loss.ClipLoss()(image.double(), text.double(), scale.double()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = open_clip.loss.ClipLoss()(image, text, scale).item()
        ours = ClipLoss(backend=backend)(image, text, scale).item()
    print(f"|loss - fp64|: open_clip {abs(theirs - ref):.2e}, ours {abs(ours - ref):.2e} (loss {ref:.3f})")
    assert abs(ours - ref) <= 1e-5 * abs(ref)
    assert abs(theirs - ref) >= 1e-4 * abs(ref)


# ----------------------------------------------------------------------------- refused modes, create_loss


def test_refused_modes():
    from llm2clip_kernels.open_clip import ClipLoss, SigLipLoss

    with pytest.raises(ValueError, match=r"local_loss=True, gather_with_grad=False\) is not reproduced"):
        ClipLoss(local_loss=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"use_horovod=True is not supported"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match=r"dist_impl must be None or one of"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=2, world_size=2"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(TypeError, match=r"world_size must be an int, got float 2.0"):
        SigLipLoss(world_size=2.0)
    # With one rank open_clip ignores the distributed flags, and so does this.
    ClipLoss(local_loss=True)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"world_size=2 but torch.distributed is not initialised"):
        SigLipLoss(rank=1, world_size=2)(x, x, 10.0, -5.0)


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, horovod=False, local_loss=False)
    base.update(gather_with_grad=False, rank=0, world_size=1, loss_dist_impl=None)
    return argparse.Namespace(**{**base, **kw})


@requires_open_clip
def test_patch_open_clip_create_loss():
    import open_clip
    import open_clip.factory

    from llm2clip_kernels.open_clip import ClipLoss, SigLipLoss, patch_open_clip

    trainer = None
    if HAS_TRAINER:
        import open_clip_train.main as trainer
    originals = open_clip.create_loss, open_clip.factory.create_loss, trainer and trainer.create_loss
    restore = patch_open_clip(backend="torch")
    try:
        create = open_clip.create_loss
        assert open_clip.factory.create_loss is create and (trainer is None or trainer.create_loss is create)
        clip = create(_args(local_loss=True, gather_with_grad=True))
        assert (
            type(clip) is ClipLoss and clip.local_loss and clip.gather_with_grad and clip.backend == "torch"
        )
        siglip = create(_args(siglip=True, loss_dist_impl="shift"))
        assert type(siglip) is SigLipLoss and siglip.dist_impl == "shift"
        with pytest.raises(ValueError, match=r"distillation .* is not supported .* without patch_open_clip"):
            create(_args(distill=True))
        with pytest.raises(ValueError, match=r"CoCa models \(coca_ViT-B-32: open_clip's CoCaLoss\)"):
            create(_args(model="coca_ViT-B-32"))
        with pytest.raises(ValueError, match=r"horovod is not supported"):
            create(_args(siglip=True, horovod=True))
    finally:
        restore()
    assert (
        open_clip.create_loss,
        open_clip.factory.create_loss,
        trainer and trainer.create_loss,
    ) == originals


# ----------------------------------------------------------------------------- open_clip's trainer


def write_dataset(folder: Path, n: int = 64) -> None:
    """n random 16 x 16 PNGs with 4-word captions (train.csv) and a tiny model config."""
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "red green blue cat dog bird car tree house boat sun moon".split()
    rows = ["filepath\ttitle"]
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        rows.append(f"{path}\t{' '.join(rng.choice(words, 4))}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    vision = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    config = {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}
    (folder / "llm2clip-tiny.json").write_text(json.dumps(config))


CONFIGS = {
    1: [dict(name="clip"), dict(name="siglip", flags=["--siglip"])],
    2: [
        dict(name="clip-default"),  # open_clip's default: global loss, gathered features without grad
        dict(name="clip-gather-with-grad", flags=["--gather-with-grad"]),
        dict(name="clip-local", flags=["--local-loss", "--gather-with-grad"], accum_freq=2),
        dict(name="siglip", flags=["--siglip"]),
    ],
}


def run_trainers(tmp_path: Path) -> dict:
    """The 1-rank and 2-rank runs concurrently; returns {world: [per-rank results]}."""
    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data)
    procs = []
    for world, configs in CONFIGS.items():
        for rank in range(world):
            cmd = [sys.executable, str(RUNNER), "--rank", str(rank), "--world", str(world)]
            cmd += ["--init", f"file://{tmp_path / 'rendezvous'}", "--data", str(data)]
            cmd += ["--configs", json.dumps(configs), "--out", str(tmp_path)]
            log = open(tmp_path / f"log{world}_{rank}.txt", "w")  # a file: a full pipe cannot block
            procs.append((world, rank, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
    for world, rank, log, p in procs:
        try:
            p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            for *_, q in procs:
                q.kill()
            pytest.fail(f"open_clip_train did not finish within 600 s (world {world}, rank {rank})")
        finally:
            log.close()
    for world, rank, _, p in procs:
        text = (tmp_path / f"log{world}_{rank}.txt").read_text()
        assert p.returncode == 0, f"world {world} rank {rank} failed:\n{text[-4000:]}"
    load = lambda w, r: json.loads((tmp_path / f"results{w}_rank{r}.json").read_text())
    return {w: [load(w, r) for r in range(w)] for w in CONFIGS}


def check_run(what: str, runs: dict) -> None:
    """One rank's runs of one config: trajectories, then the per-call gradient checks."""
    ref, pt, out = runs["open_clip_fp64"], runs["open_clip"], runs["fused"]
    assert len(out) == len(ref) == len(pt) > 0
    for key in ("loss", "scale"):
        r, p, o = (np.array([c[key] for c in calls]) for calls in (ref, pt, out))
        assert_within(f"{what} per-step {key}", np.abs(o - r).max(), np.abs(p - r).max(), np.abs(r).max())
    losses = [c["loss"] for c in ref]
    assert max(losses) - min(losses) > 1e-2, f"{what}: the loss did not move ({losses})"
    for q in out[0]["check"]:
        err, pt_err, mag = (max(c["check"][q][i] for c in out) for i in range(3))
        assert_within(f"{what} {q}", err, pt_err, mag)


@requires_trainer
def test_open_clip_trainer(tmp_path):
    """open_clip_train.main with and without patch_open_clip(): same losses, scales and gradients."""
    results = run_trainers(tmp_path)
    for world, configs in CONFIGS.items():
        for config in configs:
            for rank in range(world):
                check_run(f"{config['name']} (rank {rank} of {world})", results[world][rank][config["name"]])
    # open_clip's default mode returns the global loss on every rank, the local mode each rank's.
    two = results[2]
    default = [np.array([c["loss"] for c in two[r]["clip-default"]["fused"]]) for r in range(2)]
    local = [np.array([c["loss"] for c in two[r]["clip-local"]["fused"]]) for r in range(2)]
    assert np.abs(default[0] - default[1]).max() < 1e-6 and np.abs(local[0] - local[1]).max() > 1e-3
    # report_global_loss: the ranks' mean as the value (not the rank's own), the same gradients.
    for rank in range(2):
        for name, r in two[rank]["report_global_loss"].items():
            assert r["value_minus_mean"] < 1e-6 < r["own_minus_mean"], (name, rank, r)
            assert r["grad_diff"] == 0.0, (name, rank, r)
