"""Contrastive losses across ranks: all-gather InfoNCE and sigmoid loss, chunked and overlapped.

Rank r holds b_r image features I_r and t_r text features T_r (normally t_r = b_r, text i of a
rank pairs with its image i). The global batch is B = sum t_r texts; the loss is the contrastive
loss over all of them, computed without any rank ever holding more than its own b_r x B tiles:

Forward. Shapes, dtypes, flags, mean_over and the scale and bias values are exchanged first (one
all-gather of a few ints per rank: the loss's only host sync), so a mismatch raises the same clear
error on every rank instead of hanging or training on silently different losses. With
``batch_sizes=`` the caller vouches for all of it and the exchange is skipped: each rank then
checks only its own inputs (as the single-device loss does). Every rank's T_r is broadcast
asynchronously; each rank sweeps its local chunk first and each remote chunk as it lands, with
the fused single-device kernels (row statistics merged across chunks). InfoNCE then needs the
column log-sum-exp over all B images: the per-column [max, sum, sum over negatives] statistics
(B floats each) are all-reduced, never logits.

Backward. Each rank recomputes its tiles chunk by chunk (the same order on every rank), adds
its images' gradient locally and reduces each chunk's text gradient (fp32) to the rank that owns
it, asynchronously, while it computes the next chunk. Memory per rank: O(B*D + b*D + B).

Gradient convention (what DDP's averaging then produces):
    mean_over="local" (default, open_clip): rank r's loss is the mean over its own b_r pairs,
        L_r = 1/(2 b_r) sum_{i in r} [lse_j S_ij - S_ii + lse_i' S_i'i - S_ii], and the feature
        gradients are those of sum_r L_r, exactly as open_clip's ClipLoss(local_loss=True,
        gather_with_grad=True) (its all_gather backward sums every rank's contribution). The
        logit-scale / bias gradient of each rank is its own tiles' part of d(sum_r L_r)/ds, so
        after DDP divides the sum by W it equals open_clip's averaged scale gradient (not W times
        it, the error Inf-CL makes). For the sigmoid loss the same holds against SigLipLoss:
        L_r = -1/b_r sum_{i in r, all j} log sigmoid(z_ij S_ij).
    mean_over="global": every pair weighs W/(2 sum b_r) (W/sum b_r for sigmoid), so the mean of
        the ranks' losses is the global loss over all pairs and DDP's averaged gradients are its
        gradients, even when the ranks' batch sizes differ. Equal batches: both are the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _chunked
from .contrastive_loss import (
    _check_values,
    _impl,
    _index_tensor,
    _is_int,
    _prepare,
    infonce_from_stats,
    infonce_loss,
    sigmoid_loss,
)

_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
_DEVICE_TYPES = ["cpu", "cuda"]
MEAN_OVER = ("local", "global")


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# Per-rank metadata exchanged before any work: one row of int64 per rank. logit_scale and
# logit_bias travel as the bits of their float64 value (compared as floats after the exchange).
_META = ["error", "b", "t", "feature dim D", "dtype", "device type", "logit_bias given", "group_ids given"]
_META += ["positive_index given", "loss kind", "mean_over", "min positive", "max positive"]
_META += ["finite scale and bias", "logit_scale", "logit_bias"]
_COL = {name: i for i, name in enumerate(_META)}
# Fields every rank must agree on, checked in this order.
_MUST_MATCH = [
    "feature dim D",
    "dtype",
    "device type",
    "logit_bias given",
    "group_ids given",
    "positive_index given",
    "loss kind",
    "mean_over",
]


def _float_bits(x: Tensor | None, device) -> Tensor:
    """(1,) int64 holding the bits of x as float64 (0 for None): no host sync."""
    if x is None:
        return torch.zeros(1, dtype=torch.int64, device=device)
    return x.detach().to(torch.float64).reshape(1).view(torch.int64)


def _local_meta(image, text, scale, bias, pos, groups, sigmoid, mean_over, error) -> Tensor:
    """This rank's metadata row (on the features' device; value checks need no host sync)."""
    if error is not None:
        return torch.tensor([1] + [0] * (len(_META) - 1), dtype=torch.int64)
    fields = [0, image.shape[0], text.shape[0], image.shape[1], _DTYPES.index(image.dtype)]
    fields += [_DEVICE_TYPES.index(image.device.type), int(bias is not None), int(groups is not None)]
    fields += [int(pos is not None), int(sigmoid), MEAN_OVER.index(mean_over)]
    head = torch.tensor(fields, dtype=torch.int64, device=image.device)
    if pos is not None and pos.numel():
        pos_range = torch.stack([pos.min(), pos.max()])
    else:
        pos_range = torch.zeros(2, dtype=torch.int64, device=image.device)
    finite = torch.isfinite(scale) & (torch.isfinite(bias) if bias is not None else True)
    values = [_float_bits(scale, image.device), _float_bits(bias, image.device)]
    return torch.cat([head, pos_range, finite.reshape(1).long(), *values])


def _exchange_meta(local: Tensor, group) -> Tensor:
    """all_gather one metadata row per rank, on the device the group's backend wants."""
    backend = dist.get_backend(group)
    meta_device = (
        torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    )
    mine = local.to(meta_device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def _column(meta: Tensor, name: str) -> list:
    col = meta[:, _COL[name]]
    if name in ("logit_scale", "logit_bias"):
        return col.contiguous().view(torch.float64).tolist()
    values = col.tolist()
    if name == "dtype":
        return [str(_DTYPES[v]) for v in values]
    if name == "device type":
        return [_DEVICE_TYPES[v] for v in values]
    if name == "mean_over":
        return [MEAN_OVER[v] for v in values]
    return values


def _raise_invalid_inputs(meta: Tensor, error: Exception | None, group) -> None:
    """Every rank learns every failed rank's own error (one all_gather_object), then raises."""
    world = meta.shape[0]
    failed = [r for r in range(world) if meta[r, _COL["error"]]]
    if not failed:
        return
    messages = [None] * world
    dist.all_gather_object(
        messages, None if error is None else f"{type(error).__name__}: {error}", group=group
    )
    detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise ValueError(
        f"distributed loss: invalid input on {len(failed)} of {world} ranks ({detail})"
    ) from error


def _check_meta(meta: Tensor, rank: int, error: Exception | None, group) -> None:
    """The same verdict on every rank, so every rank raises (the same error) or none does."""
    _raise_invalid_inputs(meta, error, group)
    world = meta.shape[0]
    for name in _MUST_MATCH:
        values = _column(meta, name)
        if len(set(values)) > 1:
            raise ValueError(
                f"ranks disagree on {name}: {values} by rank (this is rank {rank}); they must match"
            )
    empty = [r for r in range(world) if meta[r, _COL["b"]] == 0 or meta[r, _COL["t"]] == 0]
    if empty:
        raise ValueError(
            f"ranks {empty} have an empty batch (no images or no texts): every rank needs a pair"
        )
    bad = [r for r in range(world) if not meta[r, _COL["finite scale and bias"]]]
    if bad:
        raise ValueError(f"logit_scale or logit_bias is NaN or infinite on ranks {bad}")
    for name in ("logit_scale", "logit_bias"):
        values = _column(meta, name)
        if len(set(values)) > 1:  # as floats: -0.0 == 0.0
            raise ValueError(
                f"ranks disagree on {name}: {values} by rank (this is rank {rank}); every rank must "
                f"pass the same value (a replicated parameter)"
            )
    B = int(meta[:, _COL["t"]].sum())
    if meta[0, _COL["positive_index given"]]:
        lo, hi = meta[:, _COL["min positive"]], meta[:, _COL["max positive"]]
        out = [r for r in range(world) if lo[r] < 0 or hi[r] >= B]
        if out:
            raise ValueError(f"positive_index on ranks {out} points outside the {B} global texts")
    else:
        more = [r for r in range(world) if meta[r, _COL["b"]] > meta[r, _COL["t"]]]
        if more:
            raise ValueError(
                f"ranks {more} have more images than texts: pass positive_index (global text indices)"
            )


def _gather_rows(local: Tensor, sizes: list[int], group, rank: int) -> tuple[Tensor, list]:
    """Start broadcasting every rank's rows into one (sum sizes, ...) tensor; returns it and handles."""
    out = local.new_empty((sum(sizes), *local.shape[1:]))
    handles, offset = [], 0
    for src, n in enumerate(sizes):
        part = out[offset : offset + n]
        if src == rank:
            part.copy_(local)
        handles.append(dist.broadcast(part, dist.get_global_rank(group, src), group=group, async_op=True))
        offset += n
    return out, handles


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    m = torch.maximum(a, b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return m_safe + torch.log(torch.exp(a - m_safe) + torch.exp(b - m_safe))


class _DistributedContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, text, scale, bias, pos, groups, sigmoid, mean_over, backend, group, meta):
        rank, world = _world(group)
        impl = _impl(backend)
        b = image.shape[0]
        images, sizes = meta[:, _COL["b"]].tolist(), meta[:, _COL["t"]].tolist()
        offsets = [sum(sizes[:r]) for r in range(world)]
        B = sum(sizes)
        if pos is None:
            pos = torch.arange(offsets[rank], offsets[rank] + b, device=image.device)
        text_all, handles = _gather_rows(text, sizes, group, rank)
        groups_all, row_groups = None, None
        if groups is not None:
            groups_all, group_handles = _gather_rows(groups, sizes, group, rank)
            for h in group_handles:
                h.wait()
            row_groups = groups_all[pos]

        # Local chunk first, then each remote chunk as its broadcast lands.
        cdt = _chunked.compute_dtype(image.dtype)
        rows = None
        col_stats = torch.zeros(3, B, dtype=cdt, device=image.device)
        col_stats[0] = float("-inf")
        for src in [rank] + [r for r in range(world) if r != rank]:
            # The local chunk reads this rank's own tensor: it never waits for a broadcast (on
            # NCCL the broadcasts run in rank order, so waiting would serialise rank W-1 behind all).
            chunk = text if src == rank else text_all[offsets[src] : offsets[src] + sizes[src]]
            if src != rank:
                handles[src].wait()
            lo, hi = offsets[src], offsets[src] + sizes[src]
            col_groups = None if groups_all is None else groups_all[lo:hi]
            stats = impl.forward_stats(image, chunk, scale, bias, pos - lo, row_groups, col_groups, sigmoid)
            if rows is None:
                rows = stats.rows.clone()
            elif sigmoid:
                rows[0] += stats.rows[0]
            else:
                rows[0] = _logaddexp(rows[0], stats.rows[0])
                rows[1] = _logaddexp(rows[1], stats.rows[1])
                rows[2] += stats.rows[2]
            if not sigmoid:
                col_stats[:, lo:hi] = stats.cols.to(cdt)
        handles[rank].wait()  # this rank's own broadcast, before text_all is saved

        n_images = sum(images)
        if mean_over == "local":
            weight = (1.0 if sigmoid else 0.5) / b
        else:
            weight = (1.0 if sigmoid else 0.5) * world / n_images
        if sigmoid:
            loss = rows[0].sum() * weight
            row_vecs = torch.zeros(4, b, dtype=cdt, device=image.device)
            row_vecs[2] = weight
            col_vecs = torch.zeros(4, B, dtype=cdt, device=image.device)
        else:
            # Column statistics over every rank's images: max first, then the rescaled sums,
            # and with them how many images pair with each text and their weights.
            m_local = col_stats[0].clone()
            dist.all_reduce(col_stats[0], op=dist.ReduceOp.MAX, group=group)
            m = col_stats[0]
            m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            rescale = torch.exp(m_local - m_safe)
            sums = torch.zeros(4, B, dtype=cdt, device=image.device)
            sums[:2] = col_stats[1:] * rescale
            sums[2].index_add_(0, pos, torch.ones(b, dtype=cdt, device=image.device))
            sums[3] = sums[2] * weight
            dist.all_reduce(sums, group=group)
            col_stats[1:] = sums[:2]
            loss, row_vecs, col_vecs = infonce_from_stats(
                rows, col_stats, pos, weight, sums[2].round(), sums[3]
            )
        ctx.save_for_backward(image, text_all, scale, bias, pos, row_groups, groups_all, row_vecs, col_vecs)
        ctx.meta = (sigmoid, backend, group, rank, world, sizes, offsets, text.dtype, bias is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        image, text_all, scale, bias, pos, row_groups, groups_all, row_vecs, col_vecs = ctx.saved_tensors
        sigmoid, backend, group, rank, world, sizes, offsets, text_dtype, has_bias = ctx.meta
        impl = _impl(backend)
        cdt = _chunked.compute_dtype(image.dtype)
        grad = grad_loss.to(cdt)
        d_image = torch.zeros(image.shape, dtype=cdt, device=image.device)
        d_scale = torch.zeros((), dtype=torch.float64, device=image.device)
        d_bias = torch.zeros((), dtype=torch.float64, device=image.device)
        d_text, pending = None, []
        # Same chunk order on every rank: the reduces are collectives.
        for src in range(world):
            lo, hi = offsets[src], offsets[src] + sizes[src]
            col_groups = None if groups_all is None else groups_all[lo:hi]
            di, dt, ds, db = impl.backward_grads(
                grad, image, text_all[lo:hi], scale, bias, pos - lo, row_groups, col_groups,
                row_vecs, col_vecs[:, lo:hi], sigmoid, grad_dtype=cdt,
            )  # fmt: skip
            d_image += di
            d_scale += ds
            d_bias += db
            pending.append(dist.reduce(dt, dist.get_global_rank(group, src), group=group, async_op=True))
            if src == rank:
                d_text = dt
            if len(pending) >= 2:  # at most two chunks' gradients in flight
                pending.pop(0).wait()
        for work in pending:
            work.wait()
        d_scale = d_scale.to(scale.dtype)
        d_bias = d_bias.to(scale.dtype) if has_bias else None
        d_image, d_text = d_image.to(image.dtype), d_text.to(text_dtype)
        # One gradient per forward input: image, text, scale, bias, then 7 non-tensor arguments.
        return (d_image, d_text, d_scale, d_bias) + (None,) * 7


def _prepare_local(image, text, logit_scale, logit_bias, positive_index, group_ids, backend, defer):
    """The single-device checks of this rank's inputs; returns (error, prepared inputs).

    defer: catch the error (returned, None if all is well) instead of raising it: nothing may
    raise on one rank alone before every rank has seen every verdict. The error is returned
    without its traceback: that traceback holds this frame, whose f_back is the caller's, so a
    caller keeping the error in a local would form a reference cycle -- its frame, the process
    group and the tensors would outlive the call until the cycle collector runs (at interpreter
    exit, after destroy_process_group, gloo's group is then torn down during finalisation).
    """
    scale = bias = None
    try:
        image, text, scale, bias, _, _, backend = _prepare(
            image, text, logit_scale, logit_bias, None, 0, None, backend, allow_more_images=True
        )
        to = lambda t: t.to(image.device) if isinstance(t, Tensor) else t
        if positive_index is not None:
            shape, what = (image.shape[0],), "global text indices, one per image"
            positive_index = _index_tensor(to(positive_index), "positive_index", shape, what, image.device)
        if group_ids is not None:
            shape = (text.shape[0],)
            group_ids = _index_tensor(to(group_ids), "group_ids", shape, "one per text", image.device)
    except (ValueError, TypeError, RuntimeError) as e:
        if not defer:
            raise
        return e.with_traceback(None), (image, text, None, None, positive_index, group_ids, backend)
    return None, (image, text, scale, bias, positive_index, group_ids, backend)


def _meta_from_sizes(batch_sizes, rank: int, world: int, image, text, scale, bias, pos) -> Tensor:
    """batch_sizes given: no exchange. Only this rank's own values are checked (as the
    single-device loss checks them, without a host sync on CUDA); what the ranks must agree on
    (the sizes themselves, D, dtype, flags, scale, bias, mean_over) is the caller's to ensure."""
    if not isinstance(batch_sizes, (list, tuple)) or not all(_is_int(n) for n in batch_sizes):
        raise TypeError(f"batch_sizes must be a list of ints (one pair count per rank), got {batch_sizes!r}")
    n = image.shape[0]
    if len(batch_sizes) != world or batch_sizes[rank] != n or text.shape[0] != n or min(batch_sizes) < 1:
        raise ValueError(
            f"batch_sizes={list(batch_sizes)} must list the {world} ranks' pair counts (each >= 1); rank "
            f"{rank} has {n} images and {text.shape[0]} texts"
        )
    _check_values(scale, bias, pos, sum(batch_sizes))
    meta = torch.zeros(world, len(_META), dtype=torch.int64)
    meta[:, _COL["b"]] = meta[:, _COL["t"]] = torch.tensor(list(batch_sizes))
    return meta


def _distributed(
    sigmoid,
    image,
    text,
    logit_scale,
    logit_bias,
    positive_index,
    group_ids,
    mean_over,
    backend,
    group,
    batch_sizes,
):
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
    rank, world = _world(group)
    if world > 1 and group is None:
        group = dist.group.WORLD
    if world == 1:
        single = sigmoid_loss if sigmoid else infonce_loss
        kw = dict(positive_index=positive_index, group_ids=group_ids, backend=backend)
        return single(image, text, logit_scale, logit_bias, **kw)
    # Local checks with the single-device rules, but nothing may raise on one rank alone: every
    # rank first learns every other rank's verdict and metadata, then all raise or none does.
    # With batch_sizes the caller vouches for the ranks' agreement and a local error raises here.
    defer = batch_sizes is None
    args = (image, text, logit_scale, logit_bias, positive_index, group_ids, backend, defer)
    error, (image, text, scale, bias, positive_index, group_ids, backend) = _prepare_local(*args)
    if defer:
        local = _local_meta(image, text, scale, bias, positive_index, group_ids, sigmoid, mean_over, error)
        meta = _exchange_meta(local, group)
        _check_meta(meta, rank, error, group)
    else:
        meta = _meta_from_sizes(batch_sizes, rank, world, image, text, scale, bias, positive_index)
    return _DistributedContrastive.apply(
        image, text, scale, bias, positive_index, group_ids, sigmoid, mean_over, backend, group, meta
    )


def distributed_infonce_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    positive_index: Tensor | None = None,
    group_ids: Tensor | None = None,
    mean_over: str = "local",
    backend: str = "auto",
    batch_sizes: list[int] | None = None,
) -> Tensor:
    """Symmetric InfoNCE over the texts of every rank in ``group`` (default: the world).

    Args:
        image_feats: (b_r, D) this rank's image features.
        text_feats: (t_r, D) this rank's text features (t_r may differ across ranks).
        logit_scale, logit_bias: as in :func:`infonce_loss`; every rank must pass the same
            value (checked, in the metadata exchange).
        positive_index: optional (b_r,) global text indices (ranks' texts concatenated in rank
            order); default: image i pairs with this rank's text i.
        group_ids: optional (t_r,) group ids of this rank's texts (duplicates across ranks too).
        mean_over: 'local' (open_clip's convention) or 'global', the same on every rank
            (checked); see the module docstring.
        batch_sizes: optional list of every rank's pair count (ints; b_r = t_r). Given, the ranks
            skip the per-step metadata exchange (its small all-gather is the loss's only host
            sync) and with it every cross-rank check (sizes, D, dtype, flags, scale, bias,
            mean_over): a mismatch is then the caller's to avoid. Each rank still checks its
            own inputs as :func:`infonce_loss` does (a finite scale and bias, positive_index
            inside the global texts; device-side asserts on CUDA).
    Returns:
        () this rank's loss. Without an initialised process group (or with one rank) this is
        :func:`infonce_loss`. Uses any torch.distributed backend (NCCL, gloo). Invalid input on
        any rank, or ranks that disagree, make every rank raise the same ValueError. NaN or
        infinite features are not checked: InfoNCE shares column statistics, so every rank's
        loss becomes non-finite; with the sigmoid loss, a non-finite image feature makes its own
        rank's loss non-finite and a non-finite text feature every rank's.
    """
    return _distributed(
        False,
        image_feats,
        text_feats,
        logit_scale,
        logit_bias,
        positive_index,
        group_ids,
        mean_over,
        backend,
        group,
        batch_sizes,
    )


def distributed_sigmoid_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    positive_index: Tensor | None = None,
    group_ids: Tensor | None = None,
    mean_over: str = "local",
    backend: str = "auto",
    batch_sizes: list[int] | None = None,
) -> Tensor:
    """SigLIP's sigmoid loss of this rank's images against every rank's texts (open_clip's
    SigLipLoss convention with mean_over='local'). Arguments as :func:`distributed_infonce_loss`."""
    return _distributed(
        True,
        image_feats,
        text_feats,
        logit_scale,
        logit_bias,
        positive_index,
        group_ids,
        mean_over,
        backend,
        group,
        batch_sizes,
    )


class DistributedInfoNCELoss(nn.Module):
    """Module form of :func:`distributed_infonce_loss`."""

    def __init__(self, group=None, mean_over: str = "local", backend: str = "auto"):
        super().__init__()
        self.group, self.mean_over, self.backend = group, mean_over, backend

    def forward(self, image_feats, text_feats, logit_scale, logit_bias=None, **kwargs):
        return distributed_infonce_loss(
            image_feats, text_feats, logit_scale, logit_bias, group=self.group, mean_over=self.mean_over,
            backend=self.backend, **kwargs,
        )  # fmt: skip


class DistributedSigmoidLoss(nn.Module):
    """Module form of :func:`distributed_sigmoid_loss`."""

    def __init__(self, group=None, mean_over: str = "local", backend: str = "auto"):
        super().__init__()
        self.group, self.mean_over, self.backend = group, mean_over, backend

    def forward(self, image_feats, text_feats, logit_scale, logit_bias=None, **kwargs):
        return distributed_sigmoid_loss(
            image_feats, text_feats, logit_scale, logit_bias, group=self.group, mean_over=self.mean_over,
            backend=self.backend, **kwargs,
        )  # fmt: skip


__all__ = [
    "DistributedInfoNCELoss",
    "DistributedSigmoidLoss",
    "distributed_infonce_loss",
    "distributed_sigmoid_loss",
]
