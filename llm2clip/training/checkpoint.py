"""Checkpoints of both trainers: ``OUTPUT_DIR/checkpoints/step_XXXXXXXX/`` directories.

    ckpt = CheckpointManager(output_dir, keep_last=2, dist=dist)
    ckpt.save(step, {"optimizer": ..., "scheduler": ...}, write_model=lambda d: model.save(d))
    path = ckpt.resolve("auto")                          # newest complete one (or None)
    state = ckpt.load(path, config=cfg, must_match=("model.vision", ...), seed=cfg.seed)

A checkpoint is written into a temporary directory (model files, then ``trainer_state.pt``) that
is renamed into place, so a directory named ``step_*`` holding ``trainer_state.pt`` is complete;
the newest ``keep_last`` are kept. ``trainer_state.pt`` holds the format, the step, the resolved
config, every rank's RNG state and whatever the trainer adds (optimizer, schedule, data position,
counters). Loading refuses another format or a config that differs in a must-match field, and
restores this rank's RNG (reseeded from (seed, rank, step) when the world size changed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from llm2clip.distributed import DistInfo, gather_object, print0
from llm2clip.files import atomic_save
from llm2clip.training.rng import capture_rng, restore_rng, seed_everything

__all__ = ["CHECKPOINT_FORMAT", "STATE_FILE", "CheckpointManager"]

CHECKPOINT_FORMAT = 2
STATE_FILE = "trainer_state.pt"


def _config_value(config: dict, path: str) -> Any:
    for part in path.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return tuple(config) if isinstance(config, list) else config


class CheckpointManager:
    def __init__(self, output_dir: str | os.PathLike, keep_last: int, dist: DistInfo):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last, self.dist = keep_last, dist

    def dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists()]
        return sorted((p for p in done if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))

    def resolve(self, resume: str | None) -> Path | None:
        """--resume: None (start fresh), "auto" (the newest checkpoint, if any) or a directory."""
        if resume == "auto":
            found = self.dirs()
            return found[-1] if found else None
        return Path(resume) if resume else None

    def save(
        self, step: int, state: dict, config: Any, write_model: Callable[[Path], None] | None = None
    ) -> Path:
        """Write checkpoints/step_N (rank 0; every rank contributes its RNG and waits)."""
        rng = gather_object(capture_rng(), self.dist)
        path = self.root / f"step_{step:08d}"
        if self.dist.is_main:
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if write_model is not None:
                write_model(tmp)
            config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
            trainer = {"format": CHECKPOINT_FORMAT, "step": step, "rng": rng, "config": config, **state}
            atomic_save(tmp / STATE_FILE, trainer)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            for old in self.dirs()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.distributed:
            torch_dist.barrier()
        return path

    def load(self, path: Path, config: Any, must_match: Sequence[str], seed: int) -> dict:
        """The saved trainer state; refuses another format or a differing must-match field (dotted
        paths into the config), and restores this rank's RNG."""
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path}: checkpoint format {state.get('format')} != {CHECKPOINT_FORMAT} (written by "
                "another llm2clip version; start a new run)"
            )
        now = dataclasses.asdict(config)
        for name in must_match:
            old, new = _config_value(state["config"], name), _config_value(now, name)
            if old != new:
                flag = "--" + name.rpartition(".")[2].replace("_", "-")
                raise ValueError(f"{path}: checkpoint has {flag} {old!r}, this run {new!r}; not resumable")
        dist = self.dist
        if len(state["rng"]) == dist.world_size:
            restore_rng(state["rng"][dist.rank])
        else:
            print0(dist, f"world size changed ({len(state['rng'])} -> {dist.world_size}): RNG reseeded")
            seed_everything(seed + dist.rank + 1000 * state["step"])
        return state
