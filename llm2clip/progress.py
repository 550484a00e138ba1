"""One progress display for every entry point: a tqdm bar on a terminal, plain lines in a log.

    progress = Progress(total=1000, initial=step, desc="stage2", enabled=dist.is_main)
    progress.advance(loss=0.61, lr=1e-5)          # one unit done (a step, a shard), with its numbers
    progress.note(captions_per_s=1.2e4)           # new numbers, no unit done (rate-limited lines)
    progress.close()

Without a terminal (or without tqdm) a line is printed every `every` units, and ``note`` prints
at most every `every_s` seconds, so a log file stays readable. Disabled on other ranks.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _fmt(stats: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())


class Progress:
    def __init__(
        self,
        total: int | None,
        *,
        initial: int = 0,
        enabled: bool = True,
        desc: str = "",
        unit: str = "step",
        every: int = 10,
        every_s: float = 10.0,
    ):
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.every, self.every_s, self.enabled = max(1, every), every_s, enabled
        self._bar = None
        self._t0 = self._last_note = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
            except ImportError:
                pass

    def _line(self, stats: dict) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        elapsed = time.perf_counter() - self._t0
        print(f"{self.desc} {self.unit} {self.done}{of} {_fmt(stats)} ({elapsed:.1f}s)", flush=True)

    def advance(self, n: int = 1, **stats) -> None:
        """`n` units done; `stats` are shown beside the count."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if stats:
                self._bar.set_postfix_str(_fmt(stats), refresh=False)
        elif self.done % self.every == 0 or self.done == self.total:
            self._line(stats)

    def note(self, **stats) -> None:
        """Show new numbers without a unit done (at most one plain line every `every_s` seconds)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(_fmt(stats), refresh=False)
        elif time.perf_counter() - self._last_note >= self.every_s:
            self._last_note = time.perf_counter()
            self._line(stats)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
