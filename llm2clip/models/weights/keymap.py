"""Key maps between another library's vision-tower state dict and ``llm2clip.models.vit.ViT``'s.

One ``KeyMap`` per source naming (transformers, open_clip, timm Eva / ViT, EVA-CLIP), used both ways:
``to_ours`` when loading a checkpoint, ``to_theirs`` when exporting. A ``Rule`` names our key, their
key(s) and an invertible ``Op`` between them; ``{i}`` in both names stands for the block index, and a
rule may apply only to some configs (``when``). Loading reports every key that was not used and every
parameter left unset (``LoadReport``); ``load_into`` refuses both unless partial loads are allowed,
and always refuses a shape mismatch.

RoPE layout: timm and EVA-CLIP rotate interleaved pairs (2i, 2i + 1) of each head, ViT rotates
(i, i + head_dim / 2). Permuting the q and k rows of every head from one layout to the other
(``rope_perm``) leaves every q . k, hence the attention, unchanged; the ``*_rope`` ops apply it to the
q and k thirds of a fused projection when the config has RoPE.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llm2clip.models.vit import ViT, ViTConfig, resample_pos_embed

__all__ = [
    "ExportError",
    "IncompleteLoadError",
    "KeyMap",
    "LoadReport",
    "OPS",
    "Plan",
    "Rule",
    "load_into",
    "mlp_ratio",
    "rope_perm",
    "strip_prefix",
    "wb",
]


class ExportError(ValueError):
    """A tower (or one of its options) that the target format cannot express."""


class IncompleteLoadError(ValueError):
    """A checkpoint that leaves tower parameters unset or has weights the tower cannot use."""


def rope_perm(head_dim: int) -> Tensor:
    """Index order taking interleaved pairs (2i, 2i + 1) to split halves (i, i + head_dim / 2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(t: Tensor, cfg: ViTConfig, inverse: bool) -> Tensor:
    """Permute the rows of one q or k projection (width rows, heads x head_dim) head by head."""
    perm = rope_perm(cfg.head_dim)
    if inverse:
        perm = torch.argsort(perm)
    return t.reshape(cfg.heads, cfg.head_dim, *t.shape[1:])[:, perm].reshape(t.shape)


def _qk_rope(t: Tensor, cfg: ViTConfig, inverse: bool) -> Tensor:
    """Apply the head permutation to the q and k thirds of a fused (3 * width, ...) tensor (RoPE only)."""
    if not cfg.rope:
        return t
    q, k, v = t.chunk(3)
    return torch.cat([_permute_heads(q, cfg, inverse), _permute_heads(k, cfg, inverse), v])


def _split_qv_bias(t: Tensor, cfg: ViTConfig, rope: bool) -> list[Tensor]:
    q, k, v = (_qk_rope(t, cfg, inverse=True) if rope else t).chunk(3)
    if cfg.k_bias and torch.count_nonzero(k):  # with k_bias=False the k third is masked out: unused
        raise ExportError(
            "the tower's attention has a nonzero k bias (ViTConfig.k_bias=True), which this format "
            "cannot hold (q and v biases only)"
        )
    return [q, v]


@dataclass(frozen=True)
class Op:
    """An invertible map between their tensors and ours (lists; cfg: our ViTConfig, for shapes and RoPE)."""

    to_ours: Callable[[list[Tensor], ViTConfig], list[Tensor]]
    to_theirs: Callable[[list[Tensor], ViTConfig], list[Tensor]]


def _one(fn):
    """An Op side for one tensor -> one tensor."""
    return lambda ts, c: [fn(ts[0], c)]


OPS: dict[str, Op] = {
    "copy": Op(_one(lambda t, c: t), _one(lambda t, c: t)),
    # open_clip's proj is (width, out); ours is a Linear weight (out, width)
    "t": Op(_one(lambda t, c: t.t().contiguous()), _one(lambda t, c: t.t().contiguous())),
    # their tensor has 1 / 2 leading singleton dims (timm's pos_embed (1, N, D), cls_token (1, 1, D))
    "lead1": Op(_one(lambda t, c: t[0]), _one(lambda t, c: t[None])),
    "lead2": Op(_one(lambda t, c: t.reshape(t.shape[2:])), _one(lambda t, c: t[None, None])),
    # separate q, k, v (rows) <-> fused qkv; *_rope: q and k rows permuted head by head (RoPE only)
    "qkv": Op(lambda ts, c: [torch.cat(ts)], lambda ts, c: list(ts[0].chunk(3))),
    "qkv_rope": Op(
        lambda ts, c: [_qk_rope(torch.cat(ts), c, inverse=False)],
        lambda ts, c: list(_qk_rope(ts[0], c, inverse=True).chunk(3)),
    ),
    "fused_rope": Op(_one(lambda t, c: _qk_rope(t, c, False)), _one(lambda t, c: _qk_rope(t, c, True))),
    # q and v biases only (EVA): the k third is zero
    "qv_bias": Op(
        lambda ts, c: [torch.cat([ts[0], torch.zeros_like(ts[0]), ts[1]])],
        lambda ts, c: _split_qv_bias(ts[0], c, rope=False),
    ),
    "qv_bias_rope": Op(
        lambda ts, c: [_qk_rope(torch.cat([ts[0], torch.zeros_like(ts[0]), ts[1]]), c, inverse=False)],
        lambda ts, c: _split_qv_bias(ts[0], c, rope=True),
    ),
    # a query projection and a fused key-value projection (timm's attention pool) <-> fused qkv
    "q_kv": Op(lambda ts, c: [torch.cat(ts)], lambda ts, c: [ts[0][: c.width], ts[0][c.width :]]),
    # one packed (2 * hidden) SwiGLU input projection, gate first (timm's GluMlp) <-> fc1_g, fc1_x
    "split2": Op(lambda ts, c: list(ts[0].chunk(2)), lambda ts, c: [torch.cat(ts)]),
    # SigLIP2's patch embedding: Linear over patches flattened (row, column, channel) <-> a conv weight
    "patch_linear": Op(
        _one(lambda t, c: t.reshape(t.shape[0], c.patch_size, c.patch_size, -1).permute(0, 3, 1, 2)),
        _one(lambda t, c: t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)),
    ),
}


@dataclass(frozen=True)
class Rule:
    """ours <-> theirs (one key each, or several: fused / split tensors) through OPS[op], when when(cfg)."""

    ours: str | tuple[str, ...]
    theirs: str | tuple[str, ...]
    op: str = "copy"
    when: Callable[[ViTConfig], bool] | None = None

    def expand(self, cfg: ViTConfig) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """(our keys, their keys) for this config: one pair, or one per block for '{i}' rules."""
        if self.when is not None and not self.when(cfg):
            return []
        ours = (self.ours,) if isinstance(self.ours, str) else self.ours
        theirs = (self.theirs,) if isinstance(self.theirs, str) else self.theirs
        if "{i}" not in ours[0]:
            return [(ours, theirs)]
        return [
            (tuple(k.format(i=i) for k in ours), tuple(k.format(i=i) for k in theirs))
            for i in range(cfg.depth)
        ]


@dataclass
class LoadReport:
    """What a load used, dropped, ignored, and could not fill."""

    source: str
    unused: list[str] = field(default_factory=list)
    """Their vision keys that no rule consumed (unsupported weights)."""
    missing: list[str] = field(default_factory=list)
    """Our parameters left at their random init (with the keys they would have come from)."""
    dropped: list[str] = field(default_factory=list)
    """Their keys read but deliberately not loaded (a replaced projection)."""
    ignored: int = 0
    """Keys outside the vision tower (text tower, logit scale) or fixed buffers, skipped by design."""
    notes: list[str] = field(default_factory=list)
    """Conversions applied (a resized position embedding, a verified RoPE table, ...)."""

    @property
    def complete(self) -> bool:
        return not self.unused and not self.missing

    def summary(self) -> str:
        parts = ["all weights loaded" if self.complete else "PARTIAL load"]
        if self.missing:
            parts.append(f"{len(self.missing)} parameters left at random init: {_short(self.missing)}")
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint keys unused: {_short(self.unused)}")
        if self.dropped:
            parts.append(f"dropped: {_short(self.dropped)}")
        if self.ignored:
            parts.append(f"{self.ignored} non-vision keys ignored")
        return "; ".join(parts + self.notes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _short(keys: Sequence[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


class KeyMap:
    """A source naming: rules, plus their keys to skip silently (fixed buffers such as position ids)."""

    def __init__(self, name: str, rules: Sequence[Rule], ignore: Sequence[str] = ()):
        self.name, self.rules = name, tuple(rules)
        self.ignore = [re.compile(p) for p in ignore]

    def pairs(self, cfg: ViTConfig) -> list[tuple[Rule, tuple[str, ...], tuple[str, ...]]]:
        return [(rule, ours, theirs) for rule in self.rules for ours, theirs in rule.expand(cfg)]

    def _ignored(self, key: str) -> bool:
        return any(p.fullmatch(key) for p in self.ignore)

    def to_ours(self, sd: Mapping[str, Tensor], cfg: ViTConfig, report: LoadReport) -> dict[str, Tensor]:
        """Their (prefix-stripped) vision state dict -> ours; fills report.unused / report.missing."""
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for rule, ours, theirs in self.pairs(cfg):
            if all(k in sd for k in theirs):
                out.update(zip(ours, OPS[rule.op].to_ours([sd[k] for k in theirs], cfg)))
                used.update(theirs)
            else:
                absent = ", ".join(k for k in theirs if k not in sd)
                report.missing += [f"{k} (from {absent})" for k in ours]
        report.unused += sorted(k for k in sd if k not in used and not self._ignored(k))
        report.ignored += sum(1 for k in sd if k not in used and self._ignored(k))
        return out

    def to_theirs(self, sd: Mapping[str, Tensor], cfg: ViTConfig) -> dict[str, Tensor]:
        """Our state dict -> theirs (every rule that applies to cfg must find its tensors)."""
        out: dict[str, Tensor] = {}
        consumed: set[str] = set()
        for rule, ours, theirs in self.pairs(cfg):
            absent = [k for k in ours if k not in sd]
            if absent:
                raise ExportError(
                    f"{self.name}: the tower has no {', '.join(absent)} for {', '.join(theirs)}"
                )
            values = OPS[rule.op].to_theirs([sd[k] for k in ours], cfg)
            out.update((k, v.contiguous()) for k, v in zip(theirs, values))
            consumed.update(ours)
        left = sorted(k for k in sd if k not in consumed)
        if left:
            raise ExportError(f"{self.name} has no place for the tower's {_short(left)}")
        return out


@dataclass
class Plan:
    """A checkpoint read and understood: our config, their vision keys (prefix removed), the key map."""

    config: ViTConfig
    state_dict: dict[str, Tensor]
    keymap: KeyMap
    report: LoadReport
    proj_keys: tuple[str, ...] = ()
    """Their keys of the tower's own projection (dropped by --init-vision-proj replace)."""


def mlp_ratio(width: int, hidden: int) -> float:
    """An mlp_ratio r with int(width * r) == hidden (how open_clip and timm size their MLPs)."""
    for r in (hidden / width, (hidden + 0.5) / width):
        if int(width * r) == hidden:
            return r
    raise ExportError(f"no mlp_ratio gives an MLP of {hidden} for width {width}")


def wb(ours: str, theirs: str, when: Callable[[ViTConfig], bool] | None = None) -> list[Rule]:
    """The weight and bias rules of one module (a Linear or LayerNorm) renamed."""
    return [Rule(f"{ours}.{k}", f"{theirs}.{k}", when=when) for k in ("weight", "bias")]


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], int]:
    """(keys under prefix with it removed, how many keys were outside it)."""
    inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return inside, len(sd) - len(inside)


def load_into(model: ViT, ours: dict[str, Tensor], report: LoadReport, allow_partial: bool, flag: str) -> ViT:
    """Load mapped weights into model: shapes must match; unused or missing keys are refused unless
    allow_partial. A position embedding for another grid is resized (bicubic, as ViT does at run time)."""
    own = model.state_dict()
    cfg = model.config
    if "pos_embed" in ours and "pos_embed" in own and ours["pos_embed"].shape != own["pos_embed"].shape:
        old = ours["pos_embed"].shape[0]
        ours["pos_embed"] = resample_pos_embed(
            ours["pos_embed"], cfg.num_prefix_tokens, cfg.grid_size, cfg.grid_size
        )
        report.notes.append(f"position embedding resized from {old} to {ours['pos_embed'].shape[0]} rows")
    extra = sorted(set(ours) - set(own))
    report.unused += [f"{k} (no such parameter in the tower)" for k in extra]
    report.missing += sorted(
        k for k in own if k not in ours and not any(m.startswith(k + " ") for m in report.missing)
    )
    bad = [
        f"{k}: {tuple(ours[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in ours and ours[k].shape != own[k].shape
    ]
    if bad:
        raise ValueError(
            f"{flag}: the checkpoint does not fit the tower its config describes: " + "; ".join(bad)
        )
    if not report.complete and not allow_partial:
        raise IncompleteLoadError(f"{flag}: {report.summary()} (pass --allow-partial-init to start anyway)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in ours.items() if k in own}, strict=False)
    return model
