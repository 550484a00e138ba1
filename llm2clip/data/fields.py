"""Caption fields of a webdataset sample: one syntax, one reading rule, for every entry point.

    spec = FieldSpec.parse("dense=json:captions.dense")   # name 'dense', member .json, keys
    text = spec.read(sample)                              # str, or None when missing or blank

Syntax: ``txt`` is the raw member ``<key>.txt`` (UTF-8); ``json:dense_caption`` is the key
``dense_caption`` inside ``<key>.json`` (dots descend: ``json:captions.short``); ``NAME=SOURCE``
stores / looks the field up under NAME (default: the member name for raw fields, the last key for
JSON fields). The name is the field's key in the embedding cache.

Reading: a missing member or key (or a JSON null) is *missing*; a caption of only whitespace is
*blank*; bytes that are not UTF-8, a JSON member that does not parse and a value that is not a
string are *malformed* and raise ValueError (the caller names shard and key, and decides whether
to stop or to skip and count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["FieldSpec"]


@dataclass(frozen=True)
class FieldSpec:
    """One caption field: where it is read from and the name it is stored under."""

    name: str
    """Field name in the cache index (``EmbeddingCache.lookup(shards, keys, name)``)."""
    member: str
    """Tar member suffix: ``txt`` for ``<key>.txt``, ``json`` for ``<key>.json``."""
    json_path: tuple[str, ...] = ()
    """Keys to descend inside the JSON member; empty for a raw text member."""

    @classmethod
    def parse(cls, text: str) -> FieldSpec:
        """``txt`` | ``json:key[.sub...]`` | ``NAME=SOURCE``."""
        name, eq, source = text.partition("=")
        if not eq:
            name, source = "", text
        member, colon, path = source.partition(":")
        keys = tuple(path.split(".")) if colon else ()
        if not member or (eq and not name) or (colon and (not path or any(not k for k in keys))):
            raise ValueError(f"bad caption field {text!r}: use 'txt', 'json:key' or 'NAME=json:key'")
        if colon and member != "json":
            raise ValueError(f"bad caption field {text!r}: only the json member has keys")
        name = name or (keys[-1] if keys else member)
        if "\x1f" in name or "\n" in name:
            raise ValueError(f"bad caption field name {name!r}")
        return cls(name=name, member=member, json_path=keys)

    def read_raw(self, sample: dict) -> str | None:
        """The field's text as stored (blank included), None when missing; ValueError when malformed."""
        raw = sample.get(self.member)
        if raw is None:
            return None
        if not self.json_path:
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        value = json.loads(raw)
        for k in self.json_path:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"field {self.name!r} is a {type(value).__name__}, not a string")
        return value

    def read(self, sample: dict) -> str | None:
        """The caption, or None when missing or blank; ValueError when malformed (module docstring)."""
        text = self.read_raw(sample)
        return text if text is not None and text.strip() else None
