"""Long-caption retrieval sets (Urban-1k, DOCCI, ShareGPT4V-1k, DCI style) from image files.

    s = load_long_caption_set("urban1k/captions.json", 224, embedder, max_length=1024)
    s.counts["truncated"]     # distinct captions longer than max_length tokens (template included)

Accepted layouts (``path``):

- a JSON list of records, or a JSON-lines file (``.jsonl``/``.jsonlines``), one record per image:
  the image file under ``image`` / ``image_file`` / ``image_path`` / ``file_name``, the caption
  under ``caption`` / ``description`` / ``text`` / ``captions`` (a string or a list of strings)
  or, ShareGPT4V-style, the first ``{"from": "gpt", "value": ...}`` of ``conversations``. Records
  with a ``split`` field are kept only when it equals `split` (DOCCI's ``test``), when one is given.
- a folder with ``image/`` and ``caption/`` (Urban-1k: ``image/12.jpg`` and ``caption/12.txt``).

Image paths are relative to `images_root` (default: the JSON's folder), then to its ``images/`` and
``image/`` subfolders. A missing or undecodable image is skipped and counted. Captions are embedded
at the LLM's length, not CLIP's 77 tokens: the recipe's max_length, or `max_length`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llm2clip.evaluation.sets import ImageCollector, RetrievalSet, _embed

__all__ = ["CAPTION_KEYS", "IMAGE_KEYS", "load_long_caption_set", "read_long_captions"]

IMAGE_KEYS = ("image", "image_file", "image_path", "file_name")
CAPTION_KEYS = ("caption", "description", "text", "captions")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _caption(record: dict, where: str) -> list[str]:
    for key in CAPTION_KEYS:
        if key in record:
            value = record[key]
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{where}: {key!r} must be a string or a list of strings")
            return [v for v in values if v.strip()]
    for turn in record.get("conversations") or ():
        if isinstance(turn, dict) and turn.get("from") == "gpt" and isinstance(turn.get("value"), str):
            return [turn["value"]]
    raise ValueError(f"{where}: no caption (one of {CAPTION_KEYS} or a ShareGPT4V 'conversations' answer)")


def _records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".jsonl", ".jsonlines"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{image, caption}} records")
    return data


def read_long_captions(path: str | os.PathLike, split: str | None = None) -> list[tuple[str, list[str]]]:
    """[(image path as written, captions)] of a long-caption set (module docstring)."""
    path = Path(path)
    if path.is_dir():
        if not ((path / "image").is_dir() and (path / "caption").is_dir()):
            raise ValueError(f"{path}: a folder set needs image/ and caption/ (Urban-1k layout)")
        out = []
        for img in sorted(p for p in (path / "image").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            cap = path / "caption" / f"{img.stem}.txt"
            if cap.is_file():
                out.append((str(img), [cap.read_text(encoding="utf-8").strip()]))
        return out
    out = []
    for i, record in enumerate(_records(path)):
        where = f"{path}, record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not an object")
        if split is not None and "split" in record and record["split"] != split:
            continue
        image = next((record[k] for k in IMAGE_KEYS if k in record), None)
        if not isinstance(image, str):
            raise ValueError(f"{where}: no image path (one of {IMAGE_KEYS})")
        out.append((image, _caption(record, where)))
    return out


def _image_data(name: str, roots: list[Path]) -> bytes | None:
    for root in roots:
        p = Path(name) if Path(name).is_absolute() else root / name
        if p.is_file():
            return p.read_bytes()
    return None


def load_long_caption_set(
    path: str | os.PathLike,
    image_size: int,
    embedder,
    *,
    images_root: str | os.PathLike | None = None,
    split: str | None = None,
    max_images: int | None = None,
    max_length: int | None = None,
    protocol: str = "clip_benchmark",
) -> RetrievalSet:
    """A RetrievalSet of the long-caption set at `path` (module docstring); its dataset name is
    FOLDER/FILE (e.g. urban1k/captions.json) or the folder's name."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"long-caption set {path}: no such file or folder")
    base = Path(images_root) if images_root is not None else (path if path.is_dir() else path.parent)
    roots = [base, base / "images", base / "image"]
    counts: dict = {"records": 0, "missing_images": 0, "images_without_captions": 0}
    images = ImageCollector(image_size, max_images, counts)
    captions: list[str] = []
    t2i: list[int] = []
    for name, caps in read_long_captions(path, split):
        if images.full():
            break
        counts["records"] += 1
        data = _image_data(name, roots)
        if data is None:
            counts["missing_images"] += 1
            continue
        index = images.add(name, data)
        if index is not None:
            counts["images_without_captions"] += not caps
            captions += caps
            t2i += [index] * len(caps)
    if not images.images:
        raise ValueError(
            f"no image of {path} found under {base} (or its images/, image/): pass the image folder "
            f"(--long-images): {counts}"
        )
    emb = _embed(embedder, captions, max_length, counts)
    counts.update(images=len(images.images), captions=len(captions))
    return RetrievalSet(
        images=images.stacked(str(path)), text_embeddings=emb, counts=counts,
        text_to_image=torch.tensor(t2i, dtype=torch.long), captions=captions, image_keys=images.keys,
        caption_fields=["caption"] * len(captions), protocol=protocol,
        dataset=f"{path.parent.name}/{path.name}" if path.is_file() else path.name, split=split or "",
    )  # fmt: skip
