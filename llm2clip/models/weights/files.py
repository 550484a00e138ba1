"""Reading checkpoints from local files only (no hub downloads): state dicts, weight folders, JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "OPENCLIP_FILES",
    "WEIGHT_FILES",
    "find_weights",
    "read_json",
    "read_safetensors_folder",
    "read_state_dict",
]

# Preferred weight files inside a model folder (transformers, open_clip, timm hub layouts), first found wins.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors",
    "open_clip_visual.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin",
    "open_clip_pytorch_model.pth", "pytorch_model.pth",
)  # fmt: skip


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def read_safetensors_folder(path: str | Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(path / shard)))
        return sd
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


# open_clip's files first: a hub folder may hold both open_clip's weights and timm's model.safetensors.
OPENCLIP_FILES = (
    "open_clip_model.safetensors", "open_clip_visual.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", *WEIGHT_FILES,
)  # fmt: skip


def find_weights(folder: str | Path, what: str, prefer: tuple[str, ...] = WEIGHT_FILES) -> Path:
    """The weight file of a model folder (the first of `prefer` found)."""
    folder = Path(folder)
    for name in prefer:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what}: no weights in {folder} (looked for {', '.join(prefer)})")


def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping, a .safetensors / torch.save file or a model folder; training
    checkpoints are unwrapped ('state_dict', 'model', 'module' entries; a 'module.' prefix on every key)."""
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = find_weights(path, str(source))
        if path.name.endswith(".index.json"):
            return read_safetensors_folder(path.parent)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = dict(sd[wrapper])
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}
