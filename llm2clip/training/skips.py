"""The run's skipped samples: totals equal on every rank, and the policy that stops a run.

    tracker = SkipTracker(SKIP_REASONS, max_fraction=0.05, grace=1000, dist=dist)
    kept = tracker.update(step, batch_size=n, skipped=batch["skipped"])  # one small all-reduce
    metrics["skipped"] = tracker.totals.to_dict()

``update`` adds every rank's counts (one all-reduce of a few numbers, before any other collective
of the step, so all ranks stop together) and raises on every rank when a rank's batch is empty or,
once ``grace`` samples were seen, more than ``max_fraction`` of them were skipped; the error names
the shards with the most skipped samples over all ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as torch_dist

from llm2clip.data.skips import SkipCounts, SkipLimitError
from llm2clip.distributed import DistInfo, gather_object

__all__ = ["SkipTracker"]


class SkipTracker:
    def __init__(
        self,
        reasons: Sequence[str],
        max_fraction: float,
        grace: int,
        dist: DistInfo,
        hint: Callable[[SkipCounts], str] | None = None,
    ):
        self.reasons, self.max_fraction, self.grace, self.dist = tuple(reasons), max_fraction, grace, dist
        self.hint = hint
        self.totals = SkipCounts.of(self.reasons)
        """Skips over all ranks by reason; by_shard holds this rank's shards only."""
        self.samples = 0
        """Samples seen over all ranks (kept + skipped)."""

    def update(self, step: int, kept: int, skipped: SkipCounts) -> int:
        """Add one step's counts of every rank; returns the samples kept over all ranks."""
        values = [kept, *(skipped[r] for r in self.reasons), kept == 0]
        counts = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        if self.dist.distributed:
            torch_dist.all_reduce(counts)
        kept_all, *per_reason, empty = (int(v) for v in counts.tolist())
        for reason, n in zip(self.reasons, per_reason):
            self.totals.add(reason, n=n)
        for shard, n in skipped.by_shard.items():
            self.totals.by_shard[shard] = self.totals.by_shard.get(shard, 0) + n
        self.samples += kept_all + sum(per_reason)
        too_many = self.samples >= self.grace and self.totals.total > self.max_fraction * self.samples
        if empty or too_many:
            self._stop(step, bool(empty))
        return kept_all

    def _stop(self, step: int, empty: bool) -> None:
        everywhere = SkipCounts()
        for part in gather_object(self.totals.by_shard, self.dist):
            everywhere.merge(SkipCounts(by_shard=part))
        worst = ", ".join(f"{s} ({c})" for s, c in everywhere.worst_shards())
        t = self.totals
        why = "a rank's batch has no usable sample" if empty else f"more than {self.max_fraction:.1%} skipped"
        detail = ", ".join(f"{r.replace('_', ' ')} {t[r]}" for r in self.reasons)
        hint = self.hint(t) if self.hint is not None else ""
        raise SkipLimitError(
            f"step {step + 1}: {why}: {t.total} of {self.samples} samples skipped ({detail}); "
            f"shards: {worst}.{hint}"
        )

    def state_dict(self) -> dict:
        return {"samples": self.samples, "skipped": self.totals.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = state["samples"]
        saved = dict(state["skipped"])
        by_shard = saved.pop("by_shard", {})
        saved.pop("total", None)
        self.totals = SkipCounts(reasons={**dict.fromkeys(self.reasons, 0), **saved}, by_shard=by_shard)
