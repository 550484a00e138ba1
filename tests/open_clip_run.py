"""One rank of tests/test_open_clip.py: open_clip's own trainer (open_clip_train.main) on a tiny model.

For every config it trains three times from the same initialisation on the same batches:
- "open_clip": open_clip's own loss (the plain PyTorch computation, fp32);
- "open_clip_fp64": open_clip's own loss computed in float64 (the reference);
- "fused": after llm2clip_kernels.open_clip.patch_open_clip().
Each loss call records the value and the logit scale. In the fused run each call also compares,
on that call's inputs, the fused loss and open_clip's fp32 loss with open_clip's loss in float64:
the value, this rank's feature gradients and the scale / bias gradients averaged over the ranks
(what DDP's averaging gives). Results go to OUT/results_rank{r}.json.

Test-only shims (not in the library): DDP gets device_ids=None on CPU (open_clip passes
device_ids=[cpu], which DDP refuses), and the process group is created once here so that one
process can run open_clip_train.main several times (its init_process_group becomes a no-op).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

# Imported before the group exists (open_clip's loss imports it): torch.distributed.nn.functional
# keeps group.WORLD as its functions' default argument, and a group it keeps outlives
# destroy_process_group().
import torch.distributed.nn.functional  # noqa: F401
from gloo_threads import leave_process_group  # tests/ is this script's sys.path[0]
from torch import nn

RUNS = ("open_clip", "open_clip_fp64", "fused")


class _CpuDDP(nn.parallel.DistributedDataParallel):
    """open_clip passes device_ids=[device]; for a CPU module DDP needs device_ids=None."""

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


def setup_distributed(rank: int, world: int, init: str) -> None:
    if world == 1:
        return
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    real_init = dist.init_process_group
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else real_init(*a, **k)
    torch.nn.parallel.DistributedDataParallel = _CpuDDP


class Fp64(nn.Module):
    """open_clip's loss computed in float64 from the fp32 features (the value returned in fp32)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, output_dict=False, **kw):
        kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
        loss = self.inner(**kw, output_dict=True)["contrastive_loss"].float()
        return {"contrastive_loss": loss} if output_dict else loss


def _loss_and_grads(module, kw, dtype, world):
    """The loss and its gradients w.r.t. every tensor input (scale / bias averaged over ranks)."""
    leaves = {k: v.detach().to(dtype).requires_grad_() for k, v in kw.items() if torch.is_tensor(v)}
    loss = module(**leaves, output_dict=True)["contrastive_loss"]
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    out = {"loss": loss.detach().double()}
    for name, g in grads.items():
        g = g.double()
        if name in ("logit_scale", "logit_bias") and world > 1:
            dist.all_reduce(g)
            g = g / world
        out[f"d_{name}"] = g
    return out


def gradient_check(ours, make_reference, kw, world) -> dict:
    """{quantity: [max|ours - ref|, max|open_clip fp32 - ref|, max|ref|]} on this call's inputs."""
    got = _loss_and_grads(ours, kw, torch.float32, world)
    pt = _loss_and_grads(make_reference(), kw, torch.float32, world)
    ref = _loss_and_grads(make_reference(), kw, torch.float64, world)
    err = lambda a, b: (a - b).abs().max().item()
    return {q: [err(got[q], ref[q]), err(pt[q], ref[q]), ref[q].abs().max().item()] for q in ref}


class Recorder(nn.Module):
    """Wraps the loss open_clip_train built: records every call (and, given a reference, checks it)."""

    def __init__(self, inner, calls, world, make_reference=None):
        super().__init__()
        self.inner, self.calls, self.world, self.make_reference = inner, calls, world, make_reference

    def forward(self, output_dict=False, **kw):
        out = self.inner(**kw, output_dict=True)
        record = {"loss": out["contrastive_loss"].item(), "scale": float(kw["logit_scale"])}
        if self.make_reference is not None:
            record["check"] = gradient_check(self.inner, self.make_reference, kw, self.world)
        self.calls.append(record)
        return out if output_dict else out["contrastive_loss"]


def train_args(config: dict, data: str, name: str) -> list[str]:
    argv = [
        "--model", "llm2clip-tiny", "--train-data", os.path.join(data, "train.csv"), "--dataset-type", "csv",
        "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32",
        # eps >> |gradient|: Adam's steps are then ~lr x gradient, so a gradient of the wrong size
        # (by a factor, or for one parameter) changes the next losses instead of cancelling out.
        "--lr", "0.05", "--eps", "1.0", "--wd", "0.1", "--warmup", "1", "--lr-scheduler", "const",
        "--logs", "none", "--name", name, "--report-to", "", "--seed", "0", "--log-every-n-steps", "1000",
        "--accum-freq", str(config.get("accum_freq", 1)),
    ]  # fmt: skip
    return argv + config.get("flags", [])


def train(config: dict, run: str, data: str, world: int) -> list[dict]:
    import open_clip_train.main as ocm

    from llm2clip_kernels.open_clip import patch_open_clip

    original = ocm.create_loss
    restore = None
    if run == "fused":
        restore = patch_open_clip(backend="torch")
        assert getattr(ocm.create_loss, "llm2clip_fused", False), "patch_open_clip left open_clip_train alone"
    make = ocm.create_loss
    calls: list[dict] = []

    def recording_create_loss(args):
        inner = make(args)
        if run == "open_clip_fp64":
            inner = Fp64(inner)
        reference = (lambda: original(args)) if run == "fused" else None
        return Recorder(inner, calls, world, reference)

    ocm.create_loss = recording_create_loss
    try:
        status = ocm.main(train_args(config, data, f"{config['name']}-{run}"))
    finally:
        ocm.create_loss = make
        if restore is not None:
            restore()
        for handler in logging.root.handlers[:]:  # open_clip adds two per call
            logging.root.removeHandler(handler)
            handler.close()
    assert status is None, f"open_clip_train.main returned {status}"
    return calls


def report_global_check(rank: int, world: int) -> dict:
    """report_global_loss=True on this rank's own features: the value is the mean of the ranks'
    losses, the gradients those of the rank's own loss (as without the option)."""
    import torch.nn.functional as F

    from llm2clip_kernels.open_clip import ClipLoss, SigLipLoss

    gen = torch.Generator().manual_seed(100 + rank)
    feats = [F.normalize(torch.randn(6, 8, generator=gen), dim=-1) for _ in range(2)]
    out = {}
    for name, make in (
        ("clip-local", lambda **kw: ClipLoss(True, True, rank=rank, world_size=world, backend="torch", **kw)),
        ("siglip", lambda **kw: SigLipLoss(rank=rank, world_size=world, backend="torch", **kw)),
    ):
        runs = []
        for report in (False, True):
            image, text = (f.clone().requires_grad_() for f in feats)
            loss = make(report_global_loss=report)(image, text, 10.0, -2.0 if name == "siglip" else None)
            loss.backward()
            runs.append((loss.detach(), image.grad, text.grad))
        mean = runs[0][0].clone()
        dist.all_reduce(mean)
        mean /= world
        out[name] = {
            "value_minus_mean": abs(runs[1][0] - mean).item(),
            "own_minus_mean": abs(runs[0][0] - mean).item(),
            "grad_diff": max((a - b).abs().max().item() for a, b in zip(runs[0][1:], runs[1][1:])),
        }
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--init", default=None, help="file:// rendezvous (world > 1)")
    p.add_argument("--data", required=True, help="folder with train.csv and llm2clip-tiny.json")
    p.add_argument("--configs", required=True, help="JSON list of {name, flags, accum_freq}")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    setup_distributed(args.rank, args.world, args.init)
    import open_clip

    open_clip.add_model_config(os.path.join(args.data, "llm2clip-tiny.json"))
    workdir = os.path.join(args.out, f"work{args.world}_{args.rank}")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)  # open_clip writes its logs under ./none/NAME
    results = {}
    for config in json.loads(args.configs):
        results[config["name"]] = {run: train(config, run, args.data, args.world) for run in RUNS}
    if args.world > 1:
        results["report_global_loss"] = report_global_check(args.rank, args.world)
    with open(os.path.join(args.out, f"results{args.world}_rank{args.rank}.json"), "w") as f:
        json.dump(results, f)
    if args.world > 1:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
