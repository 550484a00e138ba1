"""Key hashes, caption text hashes and the sorted key index.

Key -> row goes through a sorted array of 64-bit key hashes and np.searchsorted, never a Python
dict: a DataLoader worker forked from the main process touches only the pages it reads (a dict of
millions of entries would be copied page by page as refcounts change; docs/cache.md).

Key hash: blake2b with digest_size=8 of the UTF-8 of f"{shard}\\x1f{key}\\x1f{field}", read as a
little-endian uint64. The shard is part of the key because webdataset's ``__key__`` is unique only
within a shard; the field is part of it because a sample has several captions (short, dense, ...).
The loader must therefore keep ``__key__`` and ``__url__`` (open_clip's ``rename(keep=False)``
drops them) and derive the same shard name as the extraction did: use ``shard_name(url)``.
The separator \\x1f may not occur in a shard, key or field (it would make the hash input ambiguous),
nor may a newline (the writer stores the keys as lines).

A 64-bit hash over M entries collides somewhere with probability about M^2 / 2^65: 3e-6 for
CC3M x 2 captions, 0.005 % for CC12M x 2, 1.7 % for LAION-400M x 2. The merge detects a collision
and fails loudly (KeyCollisionError) rather than silently sharing a row. A lookup of a key that
is NOT in the cache returns a wrong row only if its hash equals a stored one: M / 2^64 per query.

Text hash (dedup): blake2b with digest_size=16 of the UTF-8 of the normalised caption (unicode
NFKC, strip, collapse whitespace runs to one space, lowercase). Captions that normalise equally
share one stored row, even if the raw texts differ in case or spacing.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from .format import TEXT_HASH_DTYPE

KEY_HASH_NAME = "blake2b-64(utf8(shard \\x1f key \\x1f field)), little-endian uint64"
TEXT_HASH_NAME = "blake2b-128(utf8(normalize_caption(text)))"
TEXT_NORMALIZATION = "unicode NFKC, strip, collapse whitespace, lowercase"

SEP = "\x1f"


_TAR_NAME = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$", re.IGNORECASE)


def shard_name(url: str) -> str:
    """The shard's name in cache keys: the file name of its path or URL.

    "/data/cc3m/00042.tar", "file:///data/cc3m/00042.tar", "https://host/cc3m/00042.tar?sig=..." and
    "pipe:aws s3 cp s3://bucket/cc3m/00042.tar -" all give "00042.tar". For ``pipe:`` the name is
    that of the command's last argument with a tar suffix (ValueError when there is none). Moving a
    dataset (local disk -> a URL) therefore keeps its cache valid; extraction and loading both use
    this function (docs/data.md, "Shard names").
    """
    u = str(url)
    if u.startswith("pipe:"):
        try:
            words = shlex.split(u[5:])
        except ValueError:
            words = u[5:].split()
        named = [w for w in words if _TAR_NAME.search(w.split("?", 1)[0])]
        if not named:
            raise ValueError(
                f"cannot tell the shard name of {url!r}: no argument of the command ends in .tar "
                "(the cache keys samples by the shard's file name)"
            )
        u = named[-1]
    if "://" in u:
        u = u.split("#", 1)[0].split("?", 1)[0]
    return u.rstrip("/").rsplit("/", 1)[-1]


def check_name(kind: str, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, got {type(value).__name__}")
    if SEP in value or "\n" in value:
        raise ValueError(f"{kind} {value!r} contains a \\x1f or newline character")


def _broadcast(x: str | Sequence[str], n: int, what: str) -> Sequence[str]:
    if isinstance(x, str):
        return [x] * n
    if len(x) != n:
        raise ValueError(f"got {len(x)} {what} for {n} keys")
    return x


def key_hashes(shards: str | Sequence[str], keys: Sequence[str], fields: str | Sequence[str]) -> np.ndarray:
    """64-bit key hashes of (shard, key, field) triples; shards/fields may be one str for all.

    Returns (n,) uint64. The loop does the hashing only (about 0.5 us per key).
    """
    n = len(keys)
    shards = _broadcast(shards, n, "shards")
    fields = _broadcast(fields, n, "fields")
    b2 = hashlib.blake2b
    buf = b"".join(
        b2(f"{s}{SEP}{k}{SEP}{f}".encode(), digest_size=8).digest() for s, k, f in zip(shards, keys, fields)
    )
    return np.frombuffer(buf, dtype="<u8").astype(np.uint64, copy=False)


def normalize_caption(text: str) -> str:
    """NFKC, strip, collapse whitespace runs into one space, lowercase."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def text_hashes(captions: Iterable[str]) -> np.ndarray:
    """128-bit hashes of the normalised captions: (n,) array of dtype S16."""
    b2 = hashlib.blake2b
    buf = b"".join(b2(normalize_caption(c).encode(), digest_size=16).digest() for c in captions)
    return np.frombuffer(buf, dtype=TEXT_HASH_DTYPE)


def sorted_lookup(sorted_keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where sorted_keys[i] == query, else -1. Vectorised (searchsorted)."""
    queries = np.asarray(queries, dtype=sorted_keys.dtype)
    out = np.full(queries.shape, -1, dtype=np.int64)
    if len(sorted_keys) == 0 or queries.size == 0:
        return out
    pos = np.searchsorted(sorted_keys, queries)
    pos_c = np.minimum(pos, len(sorted_keys) - 1)
    found = np.asarray(sorted_keys[pos_c] == queries)
    out[found] = np.asarray(values[pos_c[found]], dtype=np.int64)
    return out


class HashSet128:
    """A set of 16-byte hashes kept as a few sorted numpy runs (16 bytes per entry).

    A Python set of bytes costs ~100 bytes per entry; a writer on LAION-scale data sees tens of
    millions of unique captions. Runs are merged so their sizes at least double along the list,
    which keeps O(log n) runs to search.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def contains(self, h: np.ndarray) -> np.ndarray:
        h = np.asarray(h, dtype=TEXT_HASH_DTYPE)
        out = np.zeros(h.shape, dtype=bool)
        for run in self._runs:
            pos = np.minimum(np.searchsorted(run, h), len(run) - 1)
            out |= run[pos] == h
        return out

    def update(self, other: HashSet128) -> None:
        """Add all hashes of another set (disjoint from this one)."""
        for run in other._runs:
            self.add(run)

    def add(self, h: np.ndarray) -> None:
        """Add hashes (which must not be in the set yet; duplicates within h are dropped)."""
        h = np.unique(np.asarray(h, dtype=TEXT_HASH_DTYPE))
        if len(h) == 0:
            return
        self._runs.append(h)
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            b = self._runs.pop()
            a = self._runs.pop()
            self._runs.append(np.sort(np.concatenate([a, b]), kind="stable"))


def first_unseen(h: np.ndarray, *seen: HashSet128) -> np.ndarray:
    """Mask of the entries of h that are in none of the `seen` sets and are the first of their
    value within h."""
    h = np.asarray(h, dtype=TEXT_HASH_DTYPE)
    mask = np.zeros(len(h), dtype=bool)
    if len(h) == 0:
        return mask
    _, first = np.unique(h, return_index=True)
    mask[first] = True
    for s in seen:
        mask &= ~s.contains(h)
    return mask
