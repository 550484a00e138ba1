"""LLM2CLIP's text adapter: frozen LLM caption embeddings -> the CLIP embedding space.

    x (B, input_dim), any float dtype
      -> L2-normalise (in fp32)  [-> subtract input_mean, L2-normalise again: center_input=True]
      -> depth x pre-LN residual MLP block:  x = x + fc2(GELU(fc1(LayerNorm(x))))   (d -> ratio*d -> d)
      -> LayerNorm -> Linear(input_dim -> embed_dim)
    kind='linear':  L2-normalise -> Linear(input_dim -> embed_dim)

LLM2CLIP (arXiv 2411.04997) uses depth 4, ratio 2, embed_dim 1280 on 4096-d Llama-3-8B embeddings.
Parameter names are plain (``blocks.N.{norm, fc1, fc2}``, ``norm``, ``proj``) so checkpoints do not
depend on how the blocks are computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_KINDS = ("mlp", "linear")


@dataclass
class AdapterConfig:
    """Shape of the text adapter."""

    input_dim: int = 4096
    """Size of the LLM embedding (the LLM's hidden size)."""
    embed_dim: int = 1280
    """Output size: the shared CLIP embedding dimension."""
    depth: int = 4
    """Number of residual MLP blocks (kind='mlp'); 0 leaves LayerNorm -> Linear."""
    kind: str = "mlp"
    """'mlp' (the LLM2CLIP adapter) or 'linear' (normalise -> Linear only)."""
    mlp_ratio: float = 2.0
    """Hidden size of each block's MLP as a multiple of input_dim (LLM2CLIP: 2)."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon."""
    center_input: bool = False
    """Subtract a fixed mean of the normalised LLM embeddings (the ``input_mean`` buffer, set by the
    trainer's --center-text from the cache) and renormalise. LLM embeddings share a large common
    direction (mean pairwise cosine 0.6-0.9 for SmolLM2); removing it lets the adapter see the
    differences between captions from the first step. Not in the LLM2CLIP recipe: off by default."""

    def __post_init__(self) -> None:
        for key in ("input_dim", "embed_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"AdapterConfig.{key} must be a positive int, got {getattr(self, key)!r}")
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind {self.kind!r} not in {ADAPTER_KINDS}")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"adapter depth must be an int >= 0, got {self.depth!r}")
        if self.mlp_ratio <= 0 or self.ln_eps <= 0:
            raise ValueError("mlp_ratio and ln_eps must be positive")

    @property
    def hidden_dim(self) -> int:
        return int(round(self.mlp_ratio * self.input_dim))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ResidualMLPBlock(nn.Module):
    """x + fc2(GELU(fc1(LayerNorm(x))))."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TextAdapter(nn.Module):
    """``forward(llm_embeddings (B, input_dim))`` -> (B, embed_dim), not normalised (ClipModel does that)."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = cfg = dataclasses.replace(config)
        mlp = cfg.kind == "mlp"
        depth = cfg.depth if mlp else 0
        self.blocks = nn.ModuleList(
            ResidualMLPBlock(cfg.input_dim, cfg.hidden_dim, cfg.ln_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(cfg.input_dim, eps=cfg.ln_eps) if mlp else nn.Identity()
        self.proj = nn.Linear(cfg.input_dim, cfg.embed_dim)
        if cfg.center_input:
            self.register_buffer("input_mean", torch.zeros(cfg.input_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, 0.02) block weights, zero biases, unit LayerNorms; the projection N(0, input_dim^-0.5)
        so that a unit-norm input gives O(1) outputs."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.proj.weight, std=self.config.input_dim**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.proj.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        x = F.normalize(x.float(), dim=-1)
        if self.config.center_input:
            x = F.normalize(x - self.input_mean.float(), dim=-1)
        x = x.to(dtype)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))


@torch.no_grad()
def embedding_mean(embeddings: Tensor) -> Tensor:
    """(input_dim,) fp32 mean of the L2-normalised rows: the value for ``TextAdapter.input_mean``."""
    return F.normalize(embeddings.float(), dim=-1).mean(0)


def adapter(input_dim: int, embed_dim: int, **overrides) -> TextAdapter:
    """A TextAdapter: adapter(4096, 1280), adapter(576, 512, depth=2), adapter(4096, 1280, kind='linear')."""
    return TextAdapter(AdapterConfig(input_dim=input_dim, embed_dim=embed_dim, **overrides))


__all__ = ["ADAPTER_KINDS", "AdapterConfig", "ResidualMLPBlock", "TextAdapter", "adapter", "embedding_mean"]
