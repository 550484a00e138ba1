"""One rank of the distributed-loss tests (tests/test_distributed_loss.py starts W of these).

Every rank builds the same global batch from a seed, takes its shard, runs the distributed loss
(and, for equal batches, a literal open_clip-style loss with torch.distributed.nn's all_gather)
and saves its loss and gradients to OUT/rank{r}.pt for the parent to compare.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
import types
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_threads import leave_process_group  # tests/ is this script's sys.path[0]

# Imported before the group exists: torch.distributed.nn.functional keeps group.WORLD as its
# functions' default argument, and a group it keeps outlives destroy_process_group().
from torch.distributed.nn.functional import all_gather

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def global_batch(case: dict):
    """The same (images, texts, scale, bias, groups) on every rank."""
    g = torch.Generator().manual_seed(case.get("seed", 0))
    n, D = sum(case["sizes"]), case["D"]
    text = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    image = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64) + 0.8 * text, dim=1)
    if case.get("duplicates"):
        text[5] = text[1]  # the same caption on rank 0 ...
        text[-1] = text[1]  # ... and on the last rank
    dtype = DTYPES[case["dtype"]]
    groups = None
    if case.get("duplicates"):
        groups = torch.arange(n)
        groups[[5, n - 1]] = 1
    return image.to(dtype), text.to(dtype), groups


def shard(x, sizes, rank):
    lo = sum(sizes[:rank])
    return x[lo : lo + sizes[rank]]


def run_case(case: dict, rank: int, world: int) -> dict:
    from llm2clip_kernels import distributed_infonce_loss, distributed_sigmoid_loss

    image_all, text_all, groups_all = global_batch(case)
    sizes = case["sizes"]
    image = shard(image_all, sizes, rank).clone().requires_grad_()
    text = shard(text_all, sizes, rank).clone().requires_grad_()
    scale = torch.tensor(case["scale"], requires_grad=True)
    bias = torch.tensor(case["bias"], requires_grad=True) if case.get("bias") is not None else None
    fn = distributed_sigmoid_loss if case["loss"] == "sigmoid" else distributed_infonce_loss
    kw = dict(mean_over=case.get("mean_over", "local"), backend=case.get("backend", "torch"))
    if groups_all is not None:
        kw["group_ids"] = shard(groups_all, sizes, rank)
    if case.get("pass_sizes"):
        kw["batch_sizes"] = sizes  # no metadata exchange
    if case.get("shuffle_positives"):
        # Global positives: rank r's images pair with rank r's texts in reverse order.
        lo = sum(sizes[:rank])
        kw["positive_index"] = torch.arange(lo + sizes[rank] - 1, lo - 1, -1)
    loss = fn(image, text, scale, bias, **kw)
    leaves = [image, text, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    out = {"loss": loss.detach(), "d_image": grads[0], "d_text": grads[1], "d_scale": grads[2]}
    if bias is not None:
        out["d_bias"] = grads[3]
    if case.get("literal_open_clip"):
        out["open_clip"] = literal_open_clip(case, image.detach(), text.detach(), rank, world)
    return out


def literal_open_clip(case, image, text, rank, world):
    """open_clip's ClipLoss(local_loss=True, gather_with_grad=True) / SigLipLoss, equal batches."""
    image = image.clone().requires_grad_()
    text = text.clone().requires_grad_()
    scale = torch.tensor(case["scale"], dtype=image.dtype, requires_grad=True)
    b = image.shape[0]
    all_text = torch.cat(all_gather(text))
    labels = torch.arange(b) + b * rank
    if case["loss"] == "sigmoid":
        bias = torch.tensor(case["bias"], dtype=image.dtype, requires_grad=True)
        logits = scale * image @ all_text.T + bias
        z = -torch.ones_like(logits)
        z[torch.arange(b), labels] = 1
        loss = -F.logsigmoid(z * logits).sum() / b
        leaves = [image, text, scale, bias]
    else:
        all_image = torch.cat(all_gather(image))
        logits_per_image = scale * image @ all_text.T
        logits_per_text = scale * text @ all_image.T
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        leaves = [image, text, scale]
    grads = torch.autograd.grad(loss, leaves)
    names = ["d_image", "d_text", "d_scale", "d_bias"]
    return {"loss": loss.detach(), **dict(zip(names, grads))}


def run_mismatch(case: dict, rank: int) -> dict:
    """Inputs that are invalid on one rank, or that the ranks disagree on (rank 1 is the odd one
    unless the case says otherwise); returns the error this rank raised, or its loss."""
    from llm2clip_kernels import distributed_infonce_loss, distributed_sigmoid_loss

    odd = rank == 1
    D = case["D"] + (case.get("bad_D", 0) if odd else 0)
    dtype = DTYPES[case["bad_dtype"] if odd and case.get("bad_dtype") else case["dtype"]]
    b = 0 if (odd and case.get("empty")) else 4
    image, text = torch.randn(b, D, dtype=dtype), torch.randn(b, D, dtype=dtype)
    if odd and case.get("nan_image"):
        image[1, 2] = float("nan")
    scale = case.get("scale", 10.0) + (case.get("bad_scale", 0.0) if odd else 0.0)
    bias = case.get("bias")
    if rank == 0 and case.get("bias_on_rank0"):
        bias = 0.5
    if odd and "bad_bias" in case:
        bias = case["bad_bias"]
    kw = dict(backend="torch", mean_over=case.get("mean_over", "local"))
    if odd and case.get("bad_mean_over"):
        kw["mean_over"] = case["bad_mean_over"]
    if "batch_sizes" in case:
        kw["batch_sizes"] = case["batch_sizes"]
    fn = distributed_sigmoid_loss if case.get("loss") == "sigmoid" else distributed_infonce_loss
    gc.collect()
    gc.disable()  # what reference counting alone frees: a cycle would keep the group alive
    try:
        result = {"error": None, "loss": fn(image, text, scale, bias, **kw).detach()}
    except Exception as e:  # the error each rank raises is what the test checks
        result = {"error": f"{type(e).__name__}: {e}"}
    result["live_frames"] = kernel_frames()
    gc.enable()
    return result


def kernel_frames() -> list[str]:
    """Functions of llm2clip_kernels whose frames are still alive (kept by a reference cycle)."""
    import llm2clip_kernels

    root = os.path.dirname(llm2clip_kernels.__file__)
    frames = [o for o in gc.get_objects() if isinstance(o, types.FrameType)]
    return sorted(f.f_code.co_name for f in frames if f.f_code.co_filename.startswith(root))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True, help="file:// rendezvous")
    p.add_argument("--cases", required=True, help="JSON list of cases")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group(
        "gloo", init_method=args.init, rank=args.rank, world_size=args.world, timeout=timedelta(seconds=60)
    )
    results = []
    for case in json.loads(args.cases):
        try:
            if case.get("mismatch"):
                results.append(run_mismatch(case, args.rank))
            else:
                results.append(run_case(case, args.rank, args.world))
        except Exception:
            results.append({"crash": traceback.format_exc()})
    torch.save(results, os.path.join(args.out, f"rank{args.rank}.pt"))
    leave_process_group()


if __name__ == "__main__":
    main()
