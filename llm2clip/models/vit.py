"""Vision transformers for LLM2CLIP stage 2: CLIP ViT-B/32 .. L/14-336, SigLIP so400m/14, EVA02-CLIP.

One module, configured by a typed dataclass (``ViTConfig``) with named presets::

    pixels (B, 3, H, W) -> patch_embed (conv, stride = patch) -> (B, N, width), N = (H/p) * (W/p)
      [+ class token]  [+ learned absolute position embedding]  [-> norm_pre (CLIP's "ln_pre")]
      -> depth x pre-LN block:  x += attn(norm1(x));  x += mlp(norm2(x))
           attn: fused qkv projection (EVA02: no k bias), optional 2D RoPE on the patch tokens (EVA02),
                 llm2clip.models.attention.attention (the backend selector), [LayerNorm (EVA02's
                 sub-LN 'inner_attn_ln')], output projection
           mlp:  fc1 -> act (QuickGELU | GELU | tanh-GELU) -> fc2, or SwiGLU (EVA02) with optional sub-LN
      -> norm (CLIP's "ln_post" / SigLIP's "post_layernorm") over every token
      -> pool: class token ("cls", CLIP) | multi-head attention pooling with a learned probe ("map", SigLIP)
               | mean of the patch tokens ("mean")
      -> [proj: Linear(width -> output_dim), CLIP's visual projection (no bias; EVA-CLIP's head has one)]

Parameter names are plain and kernel-independent (``patch_embed``, ``cls_token``, ``pos_embed``,
``norm_pre``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``,
``attn_pool.*``, ``proj``); ``llm2clip.models.weights`` maps transformers, open_clip, timm and
EVA-CLIP checkpoints onto them and back. The forward has no data-dependent Python control flow (only
shapes and config flags are branched on), so it compiles with ``torch.compile(fullgraph=True)``; note that the
attention selector logs its choice on first use, so run one eager forward (or set the backend)
before compiling with ``fullgraph=True``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llm2clip.models.attention import BACKENDS, attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
MLPS = ("mlp", "swiglu")
POOLS = ("cls", "map", "mean")


@dataclass
class ViTConfig:
    """Shape and options of a vision transformer. Use ``ViTConfig.preset(name, **overrides)``."""

    image_size: int = 224
    """Side of the (square) training image; the grid is image_size // patch_size (SigLIP: 384 // 14 = 27).
    Other input sizes run by resizing the position embedding."""
    patch_size: int = 16
    """Side of a square patch; the conv stem has kernel = stride = patch_size."""
    width: int = 768
    """Token (residual stream) dimension."""
    depth: int = 12
    """Number of transformer blocks."""
    heads: int = 12
    """Attention heads; width must be divisible by heads."""
    mlp_dim: int | None = None
    """Hidden size of the MLP (of each SwiGLU branch when mlp='swiglu'); None means 4 * width."""
    in_chans: int = 3
    """Input image channels."""
    output_dim: int | None = 512
    """Output size of the final projection (CLIP's visual projection); None: no projection."""
    proj_bias: bool = False
    """Bias on the final projection (EVA-CLIP's and timm's 'head' have one, CLIP's 'proj' not)."""
    act: str = "quick_gelu"
    """MLP activation: 'quick_gelu' (OpenAI CLIP), 'gelu' (open_clip LAION models), 'gelu_tanh' (SigLIP)."""
    mlp: str = "mlp"
    """'mlp' (fc1 -> act -> fc2) or 'swiglu' (EVA02: fc2(silu(fc1_g x) * fc1_x x), act unused)."""
    mlp_norm: bool = False
    """LayerNorm inside the MLP before fc2 (EVA02's sub-LN 'ffn_ln')."""
    attn_norm: bool = False
    """LayerNorm on the attention output before its projection (EVA02-CLIP's sub-LN 'inner_attn_ln')."""
    class_token: bool = True
    """Prepend a learned class token (CLIP); SigLIP has none."""
    pos_embed: bool = True
    """Learned absolute position embedding (one per token, class token included)."""
    rope: bool = False
    """2D rotary position embedding on the patch grid, applied to q and k of the patch tokens (EVA02)."""
    rope_theta: float = 10000.0
    """RoPE base; each axis uses head_dim / 4 frequencies theta ** (-4i / head_dim)."""
    rope_ref_grid: int | None = None
    """RoPE positions are scaled by rope_ref_grid / grid per axis (EVA-CLIP's pt_hw_seq_len with
    intp_freq, timm's ref_feat_shape: 16 for EVA02-CLIP, so a 24 x 24 grid spans the same angles as the
    16 x 16 grid it was pretrained on); None: integer positions."""
    pre_norm: bool = True
    """LayerNorm after the embeddings, before the first block (CLIP's 'ln_pre'); SigLIP has none."""
    pool: str = "cls"
    """Pooling: 'cls' (class token, CLIP), 'map' (attention pooling with a learned probe, SigLIP), 'mean'."""
    qkv_bias: bool = True
    """Bias on the fused q, k, v projection."""
    k_bias: bool = True
    """With qkv_bias: whether the k part of the bias is used. EVA02 has none (q and v biases only): its
    k part is held at zero (masked in forward, so it gets no gradient); with RoPE a k bias would change
    the attention, so it must stay zero for the tower to remain an EVA02."""
    patch_bias: bool = False
    """Bias on the patch-embedding conv (SigLIP has one, CLIP not)."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon (CLIP 1e-5, SigLIP and EVA02 1e-6)."""
    attn_backend: str | None = None
    """Attention backend override ('flash_attn', 'xformers', 'sdpa', 'math'); None: the selector decides."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False) while training."""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean the pixels are normalised with (for the data pipeline; unused in forward)."""
    image_std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation of the pixel normalisation (for the data pipeline)."""
    name: str = field(default="custom", compare=False)
    """Preset name this config came from (informational)."""
    init_source: str | None = field(default=None, compare=False)
    """Where the tower's starting weights came from ('eva_clip:/path/ckpt.pt', ...); None: random init
    (informational; checkpoints and exports record it)."""

    def __post_init__(self) -> None:
        for key in ("image_size", "patch_size", "width", "depth", "heads", "in_chans"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(f"ViTConfig.{key} must be a positive int, got {getattr(self, key)!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.mlp_dim is not None and self.mlp_dim <= 0:
            raise ValueError(f"mlp_dim must be positive or None, got {self.mlp_dim}")
        if self.output_dim is not None and self.output_dim <= 0:
            raise ValueError(f"output_dim must be positive or None, got {self.output_dim}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} not in {ACTIVATIONS}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp {self.mlp!r} not in {MLPS}")
        if self.pool not in POOLS:
            raise ValueError(f"pool {self.pool!r} not in {POOLS}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if self.rope and self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.rope_ref_grid is not None and self.rope_ref_grid <= 0:
            raise ValueError(f"rope_ref_grid must be positive or None, got {self.rope_ref_grid}")
        if not self.pos_embed and not self.rope:
            raise ValueError("the model needs a position signal: pos_embed=True or rope=True")
        if self.attn_backend not in (None, "auto", *BACKENDS):
            raise ValueError(f"attn_backend {self.attn_backend!r} not in {(None, 'auto', *BACKENDS)}")
        if self.ln_eps <= 0:
            raise ValueError(f"ln_eps must be positive, got {self.ln_eps}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden_dim(self) -> int:
        """The MLP hidden size actually used."""
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.width

    @property
    def grid_size(self) -> int:
        """Patches per side at image_size."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    @property
    def embed_dim(self) -> int:
        """Size of the pooled output: output_dim if projected, else width."""
        return self.output_dim if self.output_dim is not None else self.width

    @classmethod
    def preset(cls, name: str, **overrides) -> ViTConfig:
        """A named shape (see ``PRESETS``) with fields overridden, e.g. preset('B/16', width=64, depth=2)."""
        key = _ALIASES.get(name, name)
        if key not in PRESETS:
            raise KeyError(f"unknown ViT preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# fmt: off
_CLIP = dict(act="quick_gelu", class_token=True, pre_norm=True, pool="cls", patch_bias=False, ln_eps=1e-5)
_EVA02 = dict(
    mlp="swiglu", mlp_norm=True, attn_norm=True, rope=True, rope_ref_grid=16, k_bias=False, class_token=True,
    pre_norm=False, pool="cls", patch_bias=True, proj_bias=True, ln_eps=1e-6,
)
PRESETS: dict[str, ViTConfig] = {
    # OpenAI CLIP (open_clip names ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 with -quickgelu).
    "B/32": ViTConfig(name="B/32", patch_size=32, width=768, depth=12, heads=12, output_dim=512, **_CLIP),
    "B/16": ViTConfig(name="B/16", patch_size=16, width=768, depth=12, heads=12, output_dim=512, **_CLIP),
    "L/14": ViTConfig(name="L/14", patch_size=14, width=1024, depth=24, heads=16, output_dim=768, **_CLIP),
    "L/14-336": ViTConfig(
        name="L/14-336", image_size=336, patch_size=14, width=1024, depth=24, heads=16, output_dim=768,
        **_CLIP,
    ),
    # SigLIP so400m/14 at 384 px (google/siglip-so400m-patch14-384): no class token, no ln_pre, MAP head.
    "so400m/14": ViTConfig(
        name="so400m/14", image_size=384, patch_size=14, width=1152, depth=27, heads=16, mlp_dim=4304,
        output_dim=None, act="gelu_tanh", class_token=False, pre_norm=False, pool="map", patch_bias=True,
        ln_eps=1e-6, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD,
    ),
    # EVA02-CLIP (the LLM2CLIP paper's towers; EVA-CLIP's model configs, timm's eva02_*_clip_*): SwiGLU
    # with sub-LN in the MLP and the attention, 2D RoPE at the 16 x 16 reference grid, no ln_pre, no k bias,
    # a head with a bias.
    "EVA02-B/16": ViTConfig(
        name="EVA02-B/16", patch_size=16, width=768, depth=12, heads=12, mlp_dim=2048, output_dim=512,
        **_EVA02,
    ),
    "EVA02-L/14": ViTConfig(
        name="EVA02-L/14", patch_size=14, width=1024, depth=24, heads=16, mlp_dim=2730, output_dim=768,
        **_EVA02,
    ),
    "EVA02-L/14-336": ViTConfig(
        name="EVA02-L/14-336", image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=2730,
        output_dim=768, **_EVA02,
    ),
}
_ALIASES = {
    "ViT-B/32": "B/32", "ViT-B-32": "B/32", "ViT-B/16": "B/16", "ViT-B-16": "B/16",
    "ViT-L/14": "L/14", "ViT-L-14": "L/14", "ViT-L/14-336": "L/14-336", "ViT-L-14-336": "L/14-336",
    "L/14@336": "L/14-336", "so400m": "so400m/14", "SigLIP-so400m/14": "so400m/14",
    "ViT-SO400M-14-SigLIP-384": "so400m/14", "EVA02-CLIP-L-14": "EVA02-L/14", "EVA02-L-14": "EVA02-L/14",
    "EVA02-CLIP-L-14-336": "EVA02-L/14-336", "EVA02-L-14-336": "EVA02-L/14-336",
    "EVA02-CLIP-B-16": "EVA02-B/16", "EVA02-B-16": "EVA02-B/16",
}
# fmt: on


# ---------------------------------------------------------------------------------------------
# Pieces


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def rope_2d(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    theta: float,
    device,
    ref_grid: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """cos, sin of a 2D axial rotary embedding, each (grid_h * grid_w, head_dim // 2), in `dtype`.

    Pair (i, i + head_dim/2) of each head is rotated by angle pos * theta ** (-4j / head_dim):
    the first head_dim/4 pairs by the row index, the last head_dim/4 by the column index, so
    q . k depends only on the (row, column) offset between two patches (row-major patch order).
    With ref_grid, positions are scaled by ref_grid / grid_h (rows) and ref_grid / grid_w (columns).
    (EVA-CLIP and timm rotate interleaved pairs (2i, 2i + 1) instead; the weight loaders permute
    q and k to this layout, which leaves q . k unchanged.)
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=dtype) / quarter)
    rows = torch.arange(grid_h, device=device, dtype=dtype).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device, dtype=dtype).repeat(grid_h)
    if ref_grid is not None:
        rows, cols = rows * (ref_grid / grid_h), cols * (ref_grid / grid_w)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (batch, seq, heads, head_dim) by angles whose cos/sin are (seq, head_dim // 2).

    Computed in fp32 at least (bf16 / fp16 inputs are upcast) and returned in x's dtype.
    """
    half = x.shape[-1] // 2
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.to(xf.dtype)[None, :, None, :], sin.to(xf.dtype)[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v: open_clip's in_proj).

    k_bias=False keeps the k third of the bias at zero (a constant mask in forward: no gradient reaches
    it); norm=True adds EVA02-CLIP's LayerNorm before the output projection."""

    def __init__(
        self,
        width: int,
        heads: int,
        qkv_bias: bool = True,
        backend: str | None = None,
        norm: bool = False,
        eps: float = 1e-5,
        k_bias: bool = True,
    ):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()
        self.proj = nn.Linear(width, width)
        mask = torch.ones(3 * width).index_fill_(0, torch.arange(width, 2 * width), 0.0)
        self.register_buffer("bias_mask", mask if qkv_bias and not k_bias else None, persistent=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, num_prefix: int = 0) -> Tensor:
        b, n, w = x.shape
        if self.bias_mask is None:
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, self.qkv.weight, self.qkv.bias * self.bias_mask.to(self.qkv.bias.dtype))
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).unbind(2)
        if rope is not None:  # rotate the patch tokens only; prefix (class) tokens stay unrotated
            q = torch.cat([q[:, :num_prefix], apply_rope(q[:, num_prefix:], *rope)], dim=1)
            k = torch.cat([k[:, :num_prefix], apply_rope(k[:, num_prefix:], *rope)], dim=1)
        out = attention(q, k, v, backend=self.backend)
        return self.proj(self.norm(out.reshape(b, n, w)))


class MLP(nn.Module):
    """fc1 -> activation -> [LayerNorm] -> fc2."""

    def __init__(self, width: int, hidden: int, act: str, norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """EVA02's MLP: fc2([norm](silu(fc1_g x) * fc1_x x)); unfused weights (timm's names)."""

    def __init__(self, width: int, hidden: int, norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.fc1_g = nn.Linear(width, hidden)
        self.fc1_x = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


def build_mlp(cfg: ViTConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.width, cfg.hidden_dim, norm=cfg.mlp_norm, eps=cfg.ln_eps)
    return MLP(cfg.width, cfg.hidden_dim, cfg.act, norm=cfg.mlp_norm, eps=cfg.ln_eps)


class Block(nn.Module):
    """Pre-LN residual block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(
            cfg.width, cfg.heads, cfg.qkv_bias, cfg.attn_backend, cfg.attn_norm, cfg.ln_eps, cfg.k_bias
        )
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, num_prefix: int = 0) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, num_prefix)
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """SigLIP's multi-head attention pooling ("MAP"): a learned probe attends over the tokens.

    out = a + mlp(norm(a)),  a = proj(MHA(q = probe, k = v = tokens)); returns (B, width).
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.backend = cfg.heads, cfg.attn_backend
        self.probe = nn.Parameter(torch.zeros(1, cfg.width))
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # nn.MultiheadAttention's in_proj layout
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = build_mlp(cfg)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        hd = w // self.heads
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(self.probe.to(x.dtype), wq, bq).view(1, 1, self.heads, hd).expand(b, 1, self.heads, hd)
        k = F.linear(x, wk, bk).view(b, n, self.heads, hd)
        v = F.linear(x, wv, bv).view(b, n, self.heads, hd)
        a = self.proj(attention(q, k, v, backend=self.backend).reshape(b, w))
        return a + self.mlp(self.norm(a))


# ---------------------------------------------------------------------------------------------
# The model


class ViT(nn.Module):
    """Vision transformer; ``forward(pixels)`` -> pooled features (B, embed_dim) [, tokens (B, L, width)]."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = cfg = dataclasses.replace(config)  # a private copy: presets stay untouched
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_chans, w, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(w)) if cfg.class_token else None
        n_pos = cfg.grid_size**2 + cfg.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(n_pos, w)) if cfg.pos_embed else None
        self.norm_pre = nn.LayerNorm(w, eps=cfg.ln_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w, eps=cfg.ln_eps)
        self.attn_pool = AttentionPoolHead(cfg) if cfg.pool == "map" else None
        self.proj = nn.Linear(w, cfg.output_dim, bias=cfg.proj_bias) if cfg.output_dim is not None else None
        self.init_weights()

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP-style init: N(0, 0.02) weights, zero biases, unit LayerNorms, width^-0.5 projection."""
        w = self.config.width
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed):
            if p is not None:
                nn.init.normal_(p, std=w**-0.5)
        if self.attn_pool is not None:
            nn.init.normal_(self.attn_pool.probe, std=w**-0.5)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=w**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.config.grad_checkpointing = enable

    def set_attn_backend(self, backend: str | None) -> None:
        """Route every attention call of this model (blocks and pooling head) to ``backend``."""
        self.config = dataclasses.replace(self.config, attn_backend=backend)  # validates the name
        for m in self.modules():
            if isinstance(m, (Attention, AttentionPoolHead)):
                m.backend = backend

    def _pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """The position embedding for a grid_h x grid_w patch grid (bicubic resize when it differs)."""
        return resample_pos_embed(self.pos_embed, self.config.num_prefix_tokens, grid_h, grid_w)

    def embed(self, pixels: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Patchify, add class token and positions, ln_pre. Returns tokens (B, L, width) and RoPE cos/sin."""
        cfg = self.config
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(b, 1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self._pos_embed(gh, gw).to(x.dtype)
        rope = None
        if cfg.rope:
            dtype = torch.promote_types(x.dtype, torch.float32)
            rope = rope_2d(gh, gw, cfg.head_dim, cfg.rope_theta, x.device, cfg.rope_ref_grid, dtype)
        return self.norm_pre(x), rope

    def forward_tokens(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> the last block's output (B, L, width), before the final norm.

        L = num_prefix_tokens + (H / patch) * (W / patch); this equals transformers' CLIP
        ``last_hidden_state`` (SigLIP's is after the final norm: ``forward(..., return_tokens=True)``).
        """
        x, rope = self.embed(pixels)
        prefix = self.config.num_prefix_tokens
        ckpt = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                x = checkpoint(block, x, rope, prefix, use_reentrant=False)
            else:
                x = block(x, rope, prefix)
        return x

    def forward_hidden_states(self, pixels: Tensor) -> list[Tensor]:
        """depth + 1 tensors (B, L, width): the embeddings (after norm_pre), then each block's output.

        transformers' ``hidden_states`` (output_hidden_states=True) for CLIP and SigLIP; the last one is
        ``forward_tokens``. For inference (no activation checkpointing)."""
        x, rope = self.embed(pixels)
        states = [x]
        for block in self.blocks:
            x = block(x, rope, self.config.num_prefix_tokens)
            states.append(x)
        return states

    def pool(self, x: Tensor) -> Tensor:
        """Final-normed tokens (B, L, width) -> pooled (B, embed_dim), projection included."""
        mode = self.config.pool
        if mode == "cls":
            pooled = x[:, 0]
        elif mode == "map":
            pooled = self.attn_pool(x)
        else:
            pooled = x[:, self.config.num_prefix_tokens :].mean(dim=1)
        return self.proj(pooled) if self.proj is not None else pooled

    def forward(self, pixels: Tensor, return_tokens: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """pixels (B, in_chans, H, W); the grid is (H // patch, W // patch) (the conv crops a remainder).

        Returns pooled features (B, embed_dim) (embed_dim = output_dim, or width without projection);
        with return_tokens, also the final-normed tokens (B, L, width), class token first if any.
        """
        x = self.norm(self.forward_tokens(pixels))
        pooled = self.pool(x)
        return (pooled, x) if return_tokens else pooled

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: 0 embeddings, i + 1 for blocks.i, depth + 1 head."""
        if param_name.startswith(("patch_embed", "cls_token", "pos_embed", "norm_pre")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.config.depth + 1


def resample_pos_embed(pe: Tensor, prefix: int, grid_h: int, grid_w: int) -> Tensor:
    """A square position embedding (prefix + g * g, width) resized bicubically to grid_h x grid_w
    (unchanged when the grid is already that); the prefix (class token) rows are kept."""
    g = round((pe.shape[0] - prefix) ** 0.5)
    if g * g != pe.shape[0] - prefix:
        raise ValueError(f"position embedding of {pe.shape[0]} rows is not {prefix} + a square grid")
    if grid_h == g and grid_w == g:
        return pe
    grid = (
        pe[prefix:].reshape(1, g, g, -1).permute(0, 3, 1, 2).to(torch.promote_types(pe.dtype, torch.float32))
    )
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1).to(pe.dtype)
    return torch.cat([pe[:prefix], grid], dim=0)


def vit(name: str, **overrides) -> ViT:
    """Build a preset: vit('B/16'), vit('so400m/14', depth=2), vit('B/16', rope=True, mlp='swiglu')."""
    return ViT(ViTConfig.preset(name, **overrides))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ACTIVATIONS",
    "PRESETS",
    "Attention",
    "AttentionPoolHead",
    "Block",
    "MLP",
    "SwiGLU",
    "ViT",
    "ViTConfig",
    "apply_rope",
    "num_params",
    "quick_gelu",
    "resample_pos_embed",
    "rope_2d",
    "vit",
]
