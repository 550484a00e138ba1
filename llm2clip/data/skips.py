"""Samples the data pipelines drop, counted by reason and by shard: one type for every pipeline.

    skipped = SkipCounts()
    skipped.add("corrupt_image", shard="train-0003.tar")
    skipped.merge(other)                      # e.g. a batch's counts into the run's totals
    skipped.total, skipped.to_dict()          # {"corrupt_image": 1, ..., "total": 1, "by_shard": {...}}

The reasons a pipeline reports are its own (stage 2: corrupt_image, missing_image, missing_row;
stage 1: empty, missing, malformed); declaring them up front makes them appear as zeros in logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["SkipCounts", "SkipLimitError"]


class SkipLimitError(RuntimeError):
    """A run stopped because too many samples were skipped (the message names the worst shards)."""


@dataclass
class SkipCounts:
    """Dropped samples by reason (``reasons``) and by shard name (``by_shard``, all reasons)."""

    reasons: dict[str, int] = field(default_factory=dict)
    by_shard: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, reasons: Iterable[str]) -> SkipCounts:
        """Counts with every reason in `reasons` present (at zero)."""
        return cls(reasons=dict.fromkeys(reasons, 0))

    def add(self, reason: str, shard: str | None = None, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n
        if shard is not None:
            self.by_shard[shard] = self.by_shard.get(shard, 0) + n

    def merge(self, other: SkipCounts) -> SkipCounts:
        """Add `other` into self (in place); returns self."""
        for reason, n in other.reasons.items():
            self.add(reason, n=n)
        for shard, n in other.by_shard.items():
            self.by_shard[shard] = self.by_shard.get(shard, 0) + n
        return self

    def __getitem__(self, reason: str) -> int:
        return self.reasons.get(reason, 0)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def worst_shards(self, n: int = 8) -> list[tuple[str, int]]:
        """The n shards with the most dropped samples, most first."""
        return sorted(self.by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def to_dict(self) -> dict:
        """Plain dict for logs and JSON: every reason, the total, and the per-shard counts."""
        return {**self.reasons, "total": self.total, "by_shard": dict(self.by_shard)}
