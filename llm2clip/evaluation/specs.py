"""Evaluation sets named by one string, for the trainer's --eval-sets and llm2clip.eval.

    spec = parse_set_spec("clip_benchmark:data/wds_flickr30k")     # KIND:PATH
    name, s = load_set(spec, 224, embedder, max_length=1024)       # "wds_flickr30k/test", RetrievalSet
    # names: FOLDER/SPLIT (clip_benchmark), long/FOLDER/FILE or long/FOLDER, multilingual/FOLDER

Kinds: ``clip_benchmark`` (a local CLIP_benchmark wds eval set, ``benchmark``), ``long`` (a
long-caption JSON / JSON-lines file or Urban-1k folder, ``long_captions``), ``xm3600`` (a
Crossmodal-3600 folder, ``multilingual``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm2clip.evaluation.benchmark import load_benchmark_set
from llm2clip.evaluation.long_captions import load_long_caption_set
from llm2clip.evaluation.multilingual import load_xm3600

__all__ = ["SET_KINDS", "SetSpec", "load_set", "parse_set_spec"]

SET_KINDS = ("clip_benchmark", "long", "xm3600")


@dataclass(frozen=True)
class SetSpec:
    kind: str
    path: str


def parse_set_spec(text: str) -> SetSpec:
    """'KIND:PATH' -> SetSpec; ValueError naming the kinds for anything else."""
    kind, colon, path = str(text).partition(":")
    if not colon or kind not in SET_KINDS or not path:
        raise ValueError(f"evaluation set {text!r}: expected KIND:PATH with KIND one of {SET_KINDS}")
    return SetSpec(kind, path)


def load_set(
    spec: SetSpec | str,
    image_size: int,
    embedder,
    *,
    split: str | None = None,
    languages: Sequence[str] | None = None,
    xm3600_captions: str = "first",
    images_root: str | None = None,
    max_images: int | None = None,
    max_length: int | None = None,
):
    """(name, set) of a spec. split: the CLIP_benchmark split (default 'test') or a long-caption
    set's split filter; languages, xm3600_captions: XM3600; images_root: a long-caption set's images."""
    spec = parse_set_spec(spec) if isinstance(spec, str) else spec
    common = dict(max_images=max_images, max_length=max_length)
    stem = Path(spec.path).resolve()
    if spec.kind == "clip_benchmark":
        s = load_benchmark_set(spec.path, split or "test", image_size, embedder, **common)
        return f"{stem.name}/{s.split}", s
    if spec.kind == "long":
        s = load_long_caption_set(
            spec.path, image_size, embedder, images_root=images_root, split=split, **common
        )
        return f"long/{s.dataset}", s
    s = load_xm3600(spec.path, image_size, embedder, languages=languages, captions=xm3600_captions, **common)
    return f"multilingual/{stem.name}", s
