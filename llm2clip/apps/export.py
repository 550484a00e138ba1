"""Export a stage-2 model: its vision tower for transformers, open_clip or timm, or the model as a bundle.

    python -m llm2clip.export --checkpoint runs/stage2/final --format hf --out exports/hf
    python -m llm2clip.export --checkpoint runs/stage2/checkpoints/step_00001000 --format timm --out exp/t

The checkpoint is a ClipModel.save folder (a run's final/ or checkpoints/step_N/). hf, open_clip and timm
write the vision tower with the model's whole projection into the shared space (what each holds and
refuses: llm2clip/models/weights/export.py; how to load each: README, "Export"); bundle writes the
self-describing folder ``llm2clip.load(dir)`` reads (tower, adapter, the text side's recipe). Beside the
weights, llm2clip_export.json records the checkpoint, where the tower's starting weights came from
(--init-vision), the training cache's spec and the image preprocessing. The folder is written under a
temporary name and renamed into place: an interrupted export leaves no half folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llm2clip.cli import config_field as _f
from llm2clip.cli import parse_config, run
from llm2clip.models.weights.export import FORMATS

__all__ = ["ExportConfig", "main"]

EXPORT_INFO = "llm2clip_export.json"
HAS_BUNDLE = importlib.util.find_spec("llm2clip.bundle") is not None
CHOICES = (*FORMATS, "bundle") if HAS_BUNDLE else FORMATS


@dataclass
class ExportConfig:
    """What to export, in which format, where."""

    checkpoint: str = _f("", "A stage-2 checkpoint: a run's final/ or checkpoints/step_N/.", required=True)
    format: str = _f(
        "hf", "hf, open_clip, timm (the vision tower) or bundle (the whole model).", choices=CHOICES
    )
    out: str = _f("", "Output folder (new or empty).", required=True)
    cache: str | None = _f(
        None, "--format bundle: the training cache (default: the one the run's config names)."
    )

    def __post_init__(self) -> None:
        if self.cache and self.format != "bundle":
            raise ValueError("--cache applies to --format bundle")


def _info(cfg: ExportConfig, model, written: str) -> dict:
    vision = (model.config.vision or {}).get("config", {})
    return {
        "format": cfg.format, "written": written, "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "init_source": vision.get("init_source"), "embed_dim": model.config.embed_dim,
        "image_size": vision.get("image_size"), "image_mean": vision.get("image_mean"),
        "image_std": vision.get("image_std"), "text_spec": model.config.text_spec,
        "note": "image features = the exported tower's projected output; captions: the LLM + adapter "
        "(--format bundle), with the LLM recorded in text_spec",
    }  # fmt: skip


def _target(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: give a new folder")
    return out.parent / f".{out.name}.tmp-{os.getpid()}"


def export(cfg: ExportConfig) -> Path:
    """Write the export; returns the output folder."""
    out = Path(cfg.out)
    if cfg.format == "bundle":
        from llm2clip.bundle import export_bundle

        return export_bundle(cfg.checkpoint, out, cache_dir=cfg.cache)
    from llm2clip.models.clip_model import ClipModel
    from llm2clip.models.weights.export import export_tower

    model = ClipModel.load(cfg.checkpoint).eval()
    tmp = _target(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = export_tower(model, cfg.format, tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(_info(cfg, model, written), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{cfg.checkpoint} -> {out}: {written}")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    cfg = parse_config(
        ExportConfig, argv, prog="python -m llm2clip.export",
        description="Export a stage-2 model: its vision tower (transformers, open_clip, timm) or a bundle.",
    )  # fmt: skip
    return export(cfg)


if __name__ == "__main__":
    run(main, "llm2clip.export")
