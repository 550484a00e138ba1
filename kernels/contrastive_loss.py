"""Fused contrastive losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Math (docs/loss.md, section 1). Image features I (b x D), text features T (B x D), logit scale s
(the multiplier, i.e. open_clip's ``logit_scale.exp()``), optional bias beta:

    S = s * I T^T + beta,   image i pairs with text p(i)   (default p(i) = offset + i)
    InfoNCE  = 1/(2b) sum_i [ lse_j S_ij - S_ip(i) ] + 1/(2b) sum_i [ lse_i' S_i'p(i) - S_ip(i) ]
    sigmoid  = -1/b sum_ij log sigmoid(z_ij S_ij),   z = +1 on (i, p(i)), -1 elsewhere

False negatives (``group_ids``: text j and image i's positive share a group, j != p(i)) are
removed from both softmaxes (InfoNCE) or from the sum (sigmoid). The text-to-image term of image
i is the column of its positive text, with the log-sum-exp over the b images given.

How: one sweep over b x B tiles computes each row's log-sum-exp and per-column partial
statistics together (2bBD FLOPs); the backward recomputes the tiles (6bBD): 8bBD in all, and
the b x B logits are never stored. CUDA tensors run the Triton kernels (``_triton.py``), CPU
tensors the chunked PyTorch path (``_chunked.py``); ``TRITON_INTERPRET=1`` runs the Triton
kernels on CPU tensors. Both are registered as ``torch.library`` custom ops so torch.compile
traces through them; neither calls ``.item()`` or synchronises with the host.
"""

from __future__ import annotations

import numbers
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _chunked

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "LLM2CLIP_LOSS_BACKEND"
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- dispatch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA (or on CPU under TRITON_INTERPRET=1), else 'torch'.

    The environment variable LLM2CLIP_LOSS_BACKEND overrides 'auto'.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = triton_available() and (
            device.type == "cuda" or (device.type == "cpu" and _interpreting())
        )
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; "
                f"got {device.type} tensors"
            )
    return backend


def _impl(backend: str):
    if backend == "triton":
        from . import _triton

        return _triton
    return _chunked


# ----------------------------------------------------------------------------- statistics -> loss


def _column_counts(pos: Tensor, B: int) -> Tensor:
    # Not torch.bincount: on CUDA it reads max(pos) back to the host. Integer adds are exact,
    # so the scatter is deterministic.
    return torch.zeros(B, dtype=pos.dtype, device=pos.device).index_add_(0, pos, torch.ones_like(pos))


def _safe_q(lse: Tensor, lse_neg: Tensor) -> Tensor:
    """1 - P(positive) = exp(lse_neg - lse), 0 where the row/column is empty."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), torch.exp(lse_neg - lse))


def infonce_from_stats(rows: Tensor, cols: Tensor, pos: Tensor, weight: float, count=None, col_coef=None):
    """Loss and the backward's per-row / per-column vectors from one sweep's statistics.

    rows (3, b) [lse, lse over negatives, positive logit]; cols (3, B) combined column
    statistics [max, sum, sum over negatives]; weight: the weight of each image's two terms
    (1/(2b) for the single-device mean). count (B,) / col_coef (B,): how many images pair with
    each text and the sum of their weights; computed from pos unless given (the distributed loss
    sums them over ranks). Returns (loss, row_vecs (4, b), col_vecs (4, B)): the backward reads
    row_vecs [lse, dLoss/dS at the positive, row coefficient, -] and col_vecs [lse, -, column
    coefficient, -] (the '-' rows hold the t2i coefficient, q = 1 - P and the unique-positive flag
    that went into the positive's value; see ``_chunked.block_grad_logits``).
    """
    lse_r, lse_neg_r, x_pos = rows
    lse_c, lse_neg_c = _chunked.stats_to_lse(cols)
    if count is None:
        count = _column_counts(pos, cols.shape[1])
        col_coef = count.to(rows.dtype) * weight
    unique = (count == 1).to(rows.dtype)
    row_weight = torch.full_like(lse_r, weight)
    # softplus(lse_neg - S_pos) == lse - S_pos, without the cancellation when P_pos -> 1.
    row_loss = F.softplus(lse_neg_r - x_pos)
    col_loss = torch.where(unique[pos] > 0, F.softplus(lse_neg_c[pos] - x_pos), lse_c[pos] - x_pos)
    loss = (row_weight * (row_loss + col_loss)).sum()
    # dLoss/dS at each row's positive, with 1 - P from the negatives' sums (exact when P -> 1). A
    # column with several positives needs P_col of each; it uses the positive logit x_pos that
    # went into lse_c, so the column's probabilities sum to one whatever the kernel's rounding.
    q_r, q_c = _safe_q(lse_r, lse_neg_r), _safe_q(lse_c, lse_neg_c)
    col_on = torch.where(
        unique[pos] > 0, -col_coef[pos] * q_c[pos], col_coef[pos] * torch.exp(x_pos - lse_c[pos]) - row_weight
    )
    row_vecs = torch.stack([lse_r, -row_weight * q_r + col_on, row_weight, row_weight])
    col_vecs = torch.stack([lse_c, q_c, col_coef, unique])
    return loss, row_vecs, col_vecs


def sigmoid_from_stats(rows: Tensor, B: int, weight: float):
    loss = rows[0].sum() * weight
    row_vecs = torch.zeros(4, rows.shape[1], dtype=rows.dtype, device=rows.device)
    row_vecs[2] = weight
    return loss, row_vecs, torch.zeros(4, B, dtype=rows.dtype, device=rows.device)


# ----------------------------------------------------------------------------- custom ops


def _check_values(scale: Tensor, bias: Tensor | None, pos: Tensor | None, B: int) -> None:
    """Value checks that need the data: eager on CPU, device-side asserts on CUDA (no sync)."""
    checks = [(torch.isfinite(scale), "logit_scale is NaN or infinite")]
    if pos is not None:
        checks.append(((pos >= 0).all() & (pos < B).all(), f"a positive index is outside [0, {B})"))
    if bias is not None:
        checks.append((torch.isfinite(bias), "logit_bias is NaN or infinite"))
    for ok, message in checks:
        if scale.device.type == "cuda":
            torch._assert_async(ok, message)
        elif not bool(ok):
            raise ValueError(message)


@torch.library.custom_op("llm2clip_kernels::contrastive_forward", mutates_args=())
def _forward_op(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    pos: Tensor,
    groups: Tensor | None,
    sigmoid: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_values(scale, bias, pos, text.shape[0])
    with torch.autocast(image.device.type, enabled=False):
        row_groups = None if groups is None else groups[pos]
        stats = _impl(backend).forward_stats(image, text, scale, bias, pos, row_groups, groups, sigmoid)
        b = image.shape[0]
        if sigmoid:
            loss, row_vecs, col_vecs = sigmoid_from_stats(stats.rows, text.shape[0], 1.0 / b)
        else:
            loss, row_vecs, col_vecs = infonce_from_stats(stats.rows, stats.cols, pos, 0.5 / b)
    return loss, row_vecs, col_vecs


@_forward_op.register_fake
def _forward_fake(image, text, scale, bias, pos, groups, sigmoid, backend):
    f = dict(dtype=_chunked.compute_dtype(image.dtype), device=image.device)
    return (
        image.new_empty((), **f),
        image.new_empty((4, image.shape[0]), **f),
        image.new_empty((4, text.shape[0]), **f),
    )


@torch.library.custom_op("llm2clip_kernels::contrastive_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    pos: Tensor,
    groups: Tensor | None,
    row_vecs: Tensor,
    col_vecs: Tensor,
    sigmoid: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(image.device.type, enabled=False):
        row_groups = None if groups is None else groups[pos]
        dI, dT, dscale, dbias = _impl(backend).backward_grads(
            grad, image, text, scale, bias, pos, row_groups, groups, row_vecs, col_vecs, sigmoid
        )
    return dI, dT, dscale.to(scale.dtype, copy=True), dbias.to(scale.dtype, copy=True)


@_backward_op.register_fake
def _backward_fake(grad, image, text, scale, bias, pos, groups, row_vecs, col_vecs, sigmoid, backend):
    # The real backends return contiguous gradients whatever the inputs' strides.
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(image, memory_format=contiguous),
        torch.empty_like(text, memory_format=contiguous),
        torch.empty_like(scale),
        torch.empty_like(scale),
    )


def _setup_context(ctx, inputs, output):
    image, text, scale, bias, pos, groups, sigmoid, backend = inputs
    _, row_vecs, col_vecs = output
    ctx.save_for_backward(image, text, scale, bias, pos, groups, row_vecs, col_vecs)
    ctx.sigmoid, ctx.backend, ctx.has_bias = sigmoid, backend, bias is not None


def _backward(ctx, grad_loss, _grad_rows, _grad_cols):
    image, text, scale, bias, pos, groups, row_vecs, col_vecs = ctx.saved_tensors
    dI, dT, dscale, dbias = _backward_op(
        grad_loss.to(scale.dtype),
        image,
        text,
        scale,
        bias,
        pos,
        groups,
        row_vecs,
        col_vecs,
        ctx.sigmoid,
        ctx.backend,
    )
    return dI, dT, dscale, (dbias if ctx.has_bias else None), None, None, None, None


torch.library.register_autograd(
    "llm2clip_kernels::contrastive_forward", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------- public API


def _as_scalar(value, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A () tensor in ``dtype`` from a number or a one-element tensor; bools are refused (a flag
    passed by mistake would otherwise become a scale of 1)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, not a {value.dtype} tensor")
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        return value.reshape(()).to(dtype)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a tensor or a number, not a bool ({value})")
    if isinstance(value, numbers.Real):
        return torch.tensor(float(value), dtype=dtype, device=device)
    raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")


def _is_int_tensor(t) -> bool:
    return (
        isinstance(t, Tensor)
        and not t.dtype.is_floating_point
        and not t.is_complex()
        and t.dtype != torch.bool
    )


def _is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _index_tensor(t, name: str, shape: tuple, what: str, device: torch.device) -> Tensor:
    """positive_index / group_ids: an integer tensor of the given shape on the features' device."""
    if not _is_int_tensor(t):
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an integer tensor of shape {shape} ({what}), got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    return t.long()


def _positives(positive_index, positive_offset, b: int, B: int, device, allow_more_images: bool):
    """The (b,) positive text of every image, or None (the distributed loss fills it in)."""
    if not _is_int(positive_offset):
        raise TypeError(
            f"positive_offset must be an int, got {type(positive_offset).__name__} {positive_offset!r}"
        )
    if positive_index is not None:
        if positive_offset != 0:
            raise ValueError("pass positive_index or positive_offset, not both")
        return _index_tensor(positive_index, "positive_index", (b,), "one text index per image", device)
    if allow_more_images:
        return None
    if not 0 <= positive_offset <= B - b:
        raise ValueError(
            f"positive_offset={positive_offset} puts the positives of {b} images outside {B} texts"
        )
    return torch.arange(positive_offset, positive_offset + b, device=device)


def _check_features(image, text) -> None:
    for name, t in (("image_feats", image), ("text_feats", text)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): the loss needs at least one pair")
    if image.device != text.device:
        raise ValueError(f"image_feats is on {image.device} but text_feats is on {text.device}")
    if image.shape[1] != text.shape[1]:
        raise ValueError(
            f"feature dims differ: image_feats has D={image.shape[1]}, text_feats D={text.shape[1]}"
        )
    if image.device.type not in ("cpu", "cuda"):
        raise ValueError(f"features must be on a CPU or CUDA device, got {image.device}")


def _prepare(
    image,
    text,
    logit_scale,
    logit_bias,
    positive_index,
    positive_offset,
    group_ids,
    backend,
    allow_more_images=False,
):
    """Validate and normalise the arguments; returns (image, text, scale, bias, pos, groups, backend).

    allow_more_images (the distributed loss): b may exceed B, and pos is left to the caller.
    """
    _check_features(image, text)
    device = image.device
    if torch.is_autocast_enabled(device.type):
        # Like a matmul under autocast: 16/32-bit float operands run in the autocast dtype.
        dtype = torch.get_autocast_dtype(device.type)
        cast = lambda t: t.to(dtype) if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
        image, text = cast(image), cast(text)
    if image.dtype != text.dtype:
        raise TypeError(f"dtypes differ: image_feats is {image.dtype}, text_feats is {text.dtype}")
    if image.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"features must be bfloat16, float16, float32 or float64, got {image.dtype}")
    b, B = image.shape[0], text.shape[0]
    backend = resolve_backend(backend, device)
    if image.dtype == torch.float64 and backend == "triton":
        raise TypeError("float64 features run on backend='torch' only")
    cdt = _chunked.compute_dtype(image.dtype)
    scale = _as_scalar(logit_scale, "logit_scale", device, cdt)
    bias = None if logit_bias is None else _as_scalar(logit_bias, "logit_bias", device, cdt)
    pos = _positives(positive_index, positive_offset, b, B, device, allow_more_images)
    groups = None
    if group_ids is not None:
        groups = _index_tensor(group_ids, "group_ids", (B,), "one per text", device)
    return image, text, scale, bias, pos, groups, backend


def _loss(
    sigmoid,
    image_feats,
    text_feats,
    logit_scale,
    logit_bias,
    positive_index,
    positive_offset,
    group_ids,
    backend,
):
    image, text, scale, bias, pos, groups, backend = _prepare(
        image_feats, text_feats, logit_scale, logit_bias, positive_index, positive_offset, group_ids, backend
    )
    loss, _, _ = _forward_op(image, text, scale, bias, pos, groups, sigmoid, backend)
    return loss


def infonce_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    positive_index: Tensor | None = None,
    positive_offset: int = 0,
    group_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """CLIP's symmetric InfoNCE loss without materialising the logits.

    Args:
        image_feats: (b, D) image embeddings (normally L2-normalised); bf16, fp16, fp32
            (fp64 on the torch backend).
        text_feats: (B, D) text embeddings, B >= b, same dtype and device.
        logit_scale: () or (1,) float (or integer) tensor, or a number: the multiplier s
            (open_clip passes ``logit_scale.exp()``). Gradients flow to it. Bools are refused.
        logit_bias: optional () tensor or number added to every logit (it cancels in InfoNCE;
            kept for parity with the sigmoid loss).
        positive_index: optional (b,) integer tensor: image i pairs with text positive_index[i].
        positive_offset: an int; without positive_index, image i pairs with text
            positive_offset + i (floats and bools are refused).
        group_ids: optional (B,) integer tensor; texts sharing the group of image i's positive
            (duplicate captions) are not used as its negatives.
        backend: 'auto' (Triton on CUDA, chunked PyTorch on CPU), 'triton' or 'torch'.

    Returns:
        () float32 loss: the mean of the image->text and text->image cross entropies.

    A NaN or infinite scale or bias, or a positive index outside [0, B), raises ValueError (on
    CUDA a device-side assert: no host sync). NaN or infinite *features* are not checked (that
    would cost a pass over them and, on CUDA, a host sync): they give a NaN or infinite loss, so
    a trainer's finite-loss check catches them.
    """
    return _loss(
        False,
        image_feats,
        text_feats,
        logit_scale,
        logit_bias,
        positive_index,
        positive_offset,
        group_ids,
        backend,
    )


def sigmoid_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    *,
    positive_index: Tensor | None = None,
    positive_offset: int = 0,
    group_ids: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss, -(1/b) sum_ij log sigmoid(z_ij (s I_i.T_j + beta)).

    Same arguments, shapes and checks as :func:`infonce_loss` (non-finite features give a
    non-finite loss, unchecked); z = +1 on each image's positive text and -1 elsewhere. Gradients
    flow to both features, the scale and the bias. Returns a () float32.
    """
    return _loss(
        True,
        image_feats,
        text_feats,
        logit_scale,
        logit_bias,
        positive_index,
        positive_offset,
        group_ids,
        backend,
    )


class InfoNCELoss(nn.Module):
    """Module form of :func:`infonce_loss`, same arguments (open_clip's ``ClipLoss`` interface, with
    its keyword names and ``output_dict``, is :class:`llm2clip_kernels.open_clip.ClipLoss`)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, image_feats, text_feats, logit_scale, logit_bias=None, **kwargs):
        return infonce_loss(image_feats, text_feats, logit_scale, logit_bias, backend=self.backend, **kwargs)


class SigmoidLoss(nn.Module):
    """Module form of :func:`sigmoid_loss`, same arguments (open_clip's ``SigLipLoss`` interface is
    :class:`llm2clip_kernels.open_clip.SigLipLoss`)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, image_feats, text_feats, logit_scale, logit_bias=None, **kwargs):
        return sigmoid_loss(image_feats, text_feats, logit_scale, logit_bias, backend=self.backend, **kwargs)
