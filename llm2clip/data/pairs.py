"""Stage-1 data: pairs of captions of the same image, in a resumable global order.

    sources = [("shard", path), ..., ("jsonl", path), ...]
    held, held_idx = held_out_pairs(sources, "txt", "json:dense_caption", eval_pairs=1000)
    stream = PairStream(sources, "txt", "json:dense_caption", seed=0, held=held_idx)
    pairs = stream.take(global_batch)[rank::world]        # every rank reads the same stream

Sources (shards, then jsonl files) are read whole, one at a time; each epoch permutes the source
order and the pairs inside each source from (seed, epoch). ``stream.state`` = (epoch, position in
the epoch's source order, position in that source's pairs) is the same on every rank and resumes
exactly. A pair with a missing, blank or malformed caption is skipped and counted (SKIP_REASONS).
"""

from __future__ import annotations

import hashlib
import json
import random

from llm2clip.data.fields import FieldSpec
from llm2clip.data.shards import iter_samples, shard_name
from llm2clip.data.skips import SkipCounts

__all__ = ["SKIP_REASONS", "PairStream", "held_out_pairs", "read_source", "text_hash"]

SKIP_REASONS = ("empty", "missing", "malformed")
"""A blank caption; a caption field absent from the sample; a caption that can't be read."""


def read_source(
    kind: str, path: str, field_a: str, field_b: str
) -> tuple[list[tuple[int, str, str]], SkipCounts]:
    """Valid pairs of one source as (index in the source, a, b), plus what was skipped (SKIP_REASONS).

    kind 'shard' (captions by field_a / field_b, ``llm2clip.data.fields`` syntax; an unreadable shard
    raises ShardError naming it) or 'jsonl' (keys "a" and "b"; a line that is not JSON raises
    ValueError naming file and line).
    """
    out, skip = [], SkipCounts.of(SKIP_REASONS)
    name = shard_name(path)

    def add(i, a, b):
        if a is None or b is None:
            skip.add("missing", name)
        elif not a.strip() or not b.strip():
            skip.add("empty", name)
        else:
            out.append((i, a.strip(), b.strip()))

    if kind == "shard":
        spec_a, spec_b = FieldSpec.parse(field_a), FieldSpec.parse(field_b)
        for i, sample in enumerate(iter_samples(path)):
            try:
                add(i, spec_a.read_raw(sample), spec_b.read_raw(sample))
            except ValueError:  # undecodable text, invalid JSON, a value that is not a string
                skip.add("malformed", name)
    elif kind == "jsonl":
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot open pairs file {path}: {e}") from e
        with f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
                row = row if isinstance(row, dict) else {}
                a, b = row.get("a"), row.get("b")
                add(i, a if isinstance(a, str) else None, b if isinstance(b, str) else None)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return out, skip


class PairStream:
    """An endless, resumable stream of training pairs over all sources (see the module docstring).

    ``state`` = (epoch, position in the epoch's source order, position in that source's pair order)
    of the next pair; identical on every rank, since every rank reads the same global stream.
    """

    def __init__(self, sources, field_a, field_b, seed=0, shuffle=True, held: dict | None = None):
        self.sources, self.field_a, self.field_b = list(sources), field_a, field_b
        self.seed, self.shuffle, self.held = seed, shuffle, held or {}
        self.skipped: dict[int, SkipCounts] = {}
        self.state = (0, 0, 0)
        self._cache: tuple | None = None  # (epoch, source index, pairs in epoch order)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.sources)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def _pairs(self, epoch: int, src: int) -> list[tuple[str, str]]:
        if self._cache is not None and self._cache[:2] == (epoch, src):
            return self._cache[2]
        rows, skip = read_source(*self.sources[src], self.field_a, self.field_b)
        self.skipped[src] = skip
        held = self.held.get(src, set())
        pairs = [(a, b) for i, a, b in rows if i not in held]
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/{src}").shuffle(pairs)
        self._cache = (epoch, src, pairs)
        return pairs

    def take(self, n: int) -> list[tuple[str, str]]:
        """The next n pairs of the global stream (wrapping into new epochs)."""
        out: list[tuple[str, str]] = []
        epoch, pos, j = self.state
        empty_sweep = 0
        while len(out) < n:
            order = self._order(epoch)
            if pos >= len(order):
                epoch, pos, j = epoch + 1, 0, 0
                if empty_sweep == len(order):
                    raise ValueError("the training data has no valid pairs (all empty, missing or held out)")
                empty_sweep = 0
                continue
            pairs = self._pairs(epoch, order[pos])
            got = pairs[j : j + n - len(out)]
            out.extend(got)
            j += len(got)
            if j >= len(pairs):
                empty_sweep += not pairs
                pos, j = pos + 1, 0
        self.state = (epoch, pos, j)
        return out

    def skip_totals(self) -> dict:
        total = SkipCounts.of(SKIP_REASONS)
        for s in self.skipped.values():
            total.merge(s)
        return total.to_dict()


def held_out_pairs(
    sources, field_a: str, field_b: str, eval_pairs: int = 0, eval_jsonl: str | None = None
) -> tuple[list[tuple[str, str]], dict[int, set[int]]]:
    """(eval pairs, {source index: held-out pair indices}): the first `eval_pairs` valid pairs in
    source order, or every pair of `eval_jsonl` (then nothing is held out of the sources)."""
    if eval_jsonl is not None:
        rows, _ = read_source("jsonl", eval_jsonl, field_a, field_b)
        return [(a, b) for _, a, b in rows], {}
    pairs: list[tuple[str, str]] = []
    held: dict[int, set[int]] = {}
    for s, (kind, path) in enumerate(sources):
        if len(pairs) >= eval_pairs:
            break
        rows, _ = read_source(kind, path, field_a, field_b)
        for i, a, b in rows[: eval_pairs - len(pairs)]:
            pairs.append((a, b))
            held.setdefault(s, set()).add(i)
    return pairs, held


def text_hash(text: str) -> int:
    """A signed 64-bit hash of a caption (group ids: identical captions are not negatives)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
