"""LLM text embedder: a local transformers decoder LM made bidirectional (LLM2Vec style), pooled to fp32.

    captions -> instruction template ("Given a caption, retrieve ...: {caption}")
      -> tokens (the template's own tokens are excluded from pooling)
      -> decoder LM (Llama, Qwen2, Mistral, Gemma, ...; a directory or a GGUF file) with every attention
         call routed to ``llm2clip.models.attention.attention``: no causal mask, padding masked, or
         packed captions (no pad tokens, positions restarting per caption, cu_seqlens)
      -> last_hidden_state -> pooling (mean | weighted_mean | last_token) in fp32 -> (captions, hidden)

How attention is hooked into transformers (5.x; checked on 5.17 and 5.24):

* ``AttentionInterface.register("llm2clip", hf_attention_forward)`` makes "llm2clip" a valid
  ``attn_implementation`` (``from_pretrained(..., attn_implementation="llm2clip")`` or
  ``model.set_attn_implementation("llm2clip")``). Every attention module of these families calls
  ``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with
  q (B, heads, S, hd), k, v (B, kv_heads, S, hd), ``attention_mask``, ``scaling``, ``dropout`` and
  the model forward's extra ``**kwargs`` (``position_ids``, ``cu_seq_lens_q``, ``max_length_q``, ...).
* ``AttentionMaskInterface.register("llm2clip", _padding_mask_passthrough)``: ``create_causal_mask``
  (and the sliding-window variant) call the registered mask function of the implementation; ours
  returns the caller's 2D padding mask (already converted to bool by transformers) unchanged, so no
  causal (or sliding-window) mask is ever built and the attention function receives
  ``attention_mask`` = (B, S) bool, True = a real token -> ``key_padding_mask``. (Without a
  registered mask function transformers would drop the padding mask altogether.)
* Packed batches call the model with ``input_ids`` (1, T), ``position_ids`` (1, T) restarting at 0
  per caption, and transformers' own varlen kwarg names ``cu_seq_lens_q`` / ``cu_seq_lens_k``
  (n + 1,) int32 and ``max_length_q`` / ``max_length_k`` (int), which reach the attention function
  untouched. Without them, a batch-of-one input whose ``position_ids`` restart is detected and
  unpacked the same way (one host sync per forward).
* ``"llm2clip_causal"`` is the same hook with the causal mask on (for parity tests against
  transformers' own attention).

Packed attention runs the selector's varlen path (``cu_seqlens``) when the selected backend has a
varlen kernel (flash-attn, xformers). Otherwise (SDPA / math) it re-pads q, k, v inside the
attention call to (n, longest, heads, hd) with a key padding mask: the projections and MLPs still
see only real tokens, and no (T, T) block-diagonal mask is built (the selector's SDPA varlen
fallback costs O(T^2) per layer). ``packed_attention="varlen"`` forces the selector's varlen path.

Not supported (raises): attention-logit soft-capping (Gemma-2's ``attn_logit_softcapping``; set it
to None), attention sinks, and sequences longer than a layer's sliding window.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm2clip.models.attention import BACKENDS, attention, pad_packed, repad_index, unpad_packed

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "llm2clip"
CAUSAL_ATTN_IMPLEMENTATION = "llm2clip_causal"
POOLING_MODES = ("mean", "weighted_mean", "last_token")
PACKED_ATTENTION = ("auto", "varlen", "repad")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------
# The transformers hook


def _padding_mask_passthrough(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers mask interface: return the (B, kv_length) bool padding mask as it came (or None).

    The causal / sliding-window ``mask_function`` is ignored on purpose: the attention function
    applies causality itself when asked to, and padding is all that is left to mask.
    """
    return attention_mask


_positions_memo: dict = {"ref": None, "value": None}


def _cu_seqlens_from_positions(position_ids: Tensor) -> tuple[Tensor, int] | None:
    """(1, T) position ids restarting at each packed sequence -> (cu_seqlens, max_seqlen), or None.

    One host sync per distinct position_ids tensor (memoised, since the same tensor reaches every
    layer of one forward).
    """
    ref = _positions_memo["ref"]
    if ref is not None and ref() is position_ids:
        return _positions_memo["value"]
    pos = position_ids[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = starts.nonzero().squeeze(1).to(torch.int32)
    value = None
    if idx.numel() > 1:
        cu = torch.cat([idx, idx.new_tensor([pos.numel()])])
        value = (cu, int((cu[1:] - cu[:-1]).max()))
    _positions_memo["ref"], _positions_memo["value"] = weakref.ref(position_ids), value
    return value


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    mode: str = "auto",
) -> Tensor:
    """Attention within each packed sequence: q (T, heads, hd), k, v (T, kv_heads, hd) -> (T, heads, hd).

    mode 'varlen' / 'auto': the selector's packed layout (cu_seqlens): flash-attn's or xformers'
    varlen kernel where present, else the selector re-pads. 'repad': always re-pad here to
    (n, max_seqlen, heads, hd) and run the selector's padded layout with a key padding mask.
    """
    if mode not in PACKED_ATTENTION:
        raise ValueError(f"packed attention mode {mode!r} not in {PACKED_ATTENTION}")
    kw = dict(causal=causal, scale=scale, dropout_p=dropout_p, backend=backend)
    if mode != "repad":
        return attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)
    index, mask = repad_index(cu_seqlens, q.shape[0], max_seqlen)
    out = attention(*(pad_packed(x, index, mask.shape) for x in (q, k, v)), key_padding_mask=mask, **kw)
    return unpad_packed(out, index)


def _hf_attention(module, query, key, value, attention_mask, *, causal, scaling, dropout, kwargs):
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} passes {unsupported}={kwargs[unsupported]!r}, which "
                "llm2clip.models.attention does not implement "
                "(for Gemma-2 set config.attn_logit_softcapping=None)"
            )
    backend = kwargs.get("llm2clip_attn_backend")
    mode = kwargs.get("llm2clip_packed_attention") or "auto"
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is not None and kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu:
        if not torch.equal(kwargs["cu_seq_lens_k"], cu):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
    batch, _, q_len, _ = query.shape
    if cu is None and attention_mask is None and batch == 1 and q_len > 1:
        pos = kwargs.get("position_ids")
        if pos is not None and not torch.compiler.is_compiling():
            found = _cu_seqlens_from_positions(pos)
            if found is not None:
                cu, max_len = found
    window = kwargs.get("sliding_window")
    q = query.transpose(1, 2)  # (B, S, heads, hd): the selector's layout (a view)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if cu is not None:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seq_lens_q) need batch size 1, got {batch}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("packed sequences (cu_seq_lens_q) take no padding mask")
        cu = cu.to(device=query.device, dtype=torch.int32)
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        max_len = int(max_len)
        if window is not None and max_len > window:
            raise NotImplementedError(
                f"a packed sequence of {max_len} tokens exceeds the sliding window {window}"
            )
        out = packed_attention(
            q[0], k[0], v[0], cu, max_len, causal=causal, scale=scaling, dropout_p=dropout,
            backend=backend, mode=mode,
        )[None]  # fmt: skip
    else:
        if window is not None and key.shape[2] > window:
            raise NotImplementedError(f"{key.shape[2]} keys exceed the sliding window {window}")
        mask = attention_mask
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"the {ATTN_IMPLEMENTATION} attention takes a (batch, seq) padding mask, got shape "
                    f"{tuple(mask.shape)}; pass a 2D attention_mask to the model"
                )
            mask = mask.to(device=query.device, dtype=torch.bool)
        out = attention(
            q, k, v, causal=causal, key_padding_mask=mask, scale=scaling, dropout_p=dropout, backend=backend
        )
    return out, None


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "llm2clip": bidirectional, padding masked, packing aware.

    query (B, heads, S, hd), key/value (B, kv_heads, S, hd) as transformers passes them;
    attention_mask None or (B, S) bool (True = real token); packed when ``cu_seq_lens_q`` /
    ``max_length_q`` are passed to the model (B = 1). Extra kwargs read: ``llm2clip_attn_backend``
    (a selector backend name) and ``llm2clip_packed_attention`` ('auto' | 'varlen' | 'repad').
    Returns (output (B, S, heads, hd), None).
    """
    return _hf_attention(
        module,
        query,
        key,
        value,
        attention_mask,
        causal=False,
        scaling=scaling,
        dropout=dropout,
        kwargs=kwargs,
    )


def hf_causal_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """transformers attention function "llm2clip_causal": as ``hf_attention_forward`` with the causal mask."""
    return _hf_attention(
        module,
        query,
        key,
        value,
        attention_mask,
        causal=True,
        scaling=scaling,
        dropout=dropout,
        kwargs=kwargs,
    )


def register_hf_attention() -> None:
    """Register "llm2clip" and "llm2clip_causal" with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
    AttentionInterface.register(CAUSAL_ATTN_IMPLEMENTATION, hf_causal_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask_passthrough)
    AttentionMaskInterface.register(CAUSAL_ATTN_IMPLEMENTATION, _padding_mask_passthrough)


register_hf_attention()


def make_bidirectional(model: nn.Module, causal: bool = False) -> nn.Module:
    """Switch a loaded transformers model to the llm2clip attention (bidirectional unless causal=True)."""
    name = CAUSAL_ATTN_IMPLEMENTATION if causal else ATTN_IMPLEMENTATION
    model.set_attn_implementation(name)
    got = model.config._attn_implementation
    if got != name:
        raise RuntimeError(
            f"{type(model).__name__} kept attn_implementation={got!r}: it does not route attention through "
            "transformers' AttentionInterface, so it cannot be made bidirectional here"
        )
    return model


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft). Defaults are LLM2CLIP stage 1's."""

    r: int = 16
    """Rank of the update B @ A."""
    alpha: float = 32.0
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.05
    """Dropout on the LoRA branch's input while training."""
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Names of the linear layers that get an adapter (all attention and MLP projections)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")


@dataclass
class TextEmbedderConfig:
    """How captions become embeddings. Everything that changes an embedding is a field here."""

    model: str = ""
    """Local model directory, or a .gguf file (its directory is the model path). Unused when a model
    object is passed to ``LLMTextEmbedder`` directly."""
    gguf_file: str | None = None
    """GGUF file name inside ``model`` (transformers' ``gguf_file=``); set automatically for a .gguf path."""
    pooling: str = "mean"
    """'mean' over the caption's tokens, 'weighted_mean' (weights 1..n over them, LLM2Vec), or
    'last_token' (the sequence's last token, the template suffix and an added EOS included)."""
    instruction: str = "{caption}"
    """Template with one '{caption}' placeholder, e.g. 'Given a caption, retrieve a detailed relevant
    caption: {caption}'. Its tokens are attended to but excluded from (weighted) mean pooling."""
    max_length: int = 512
    """Token limit per caption, template and special tokens included (longer ones are truncated)."""
    add_eos: bool = False
    """Append the tokenizer's EOS token (usual with last_token pooling)."""
    dtype: str = "bfloat16"
    """Weights and activations: 'bfloat16', 'float16' or 'float32'. Pooling always runs in fp32."""
    packed: bool = True
    """Run batches packed (no pad tokens, cu_seqlens) rather than padded."""
    packed_attention: str = "auto"
    """'auto' | 'varlen' | 'repad': how packed batches attend (see the module docstring)."""
    attn_backend: str | None = None
    """Attention backend override for the selector ('flash_attn', 'xformers', 'sdpa', 'math')."""
    normalize: bool = False
    """L2-normalise the pooled embeddings."""
    tokens_per_batch: int = 16384
    """``encode`` batch budget: real tokens per packed batch, padded slots (n * longest) per padded batch."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in backward (stage 1 training)."""
    local_files_only: bool = True
    """Never reach the Hugging Face hub when loading."""
    lora: LoraSettings | None = None
    """Attach a fresh LoRA adapter at load time (None: no adapter)."""

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLING_MODES}")
        if self.instruction.count("{caption}") != 1:
            raise ValueError(f"instruction must contain '{{caption}}' exactly once, got {self.instruction!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {tuple(DTYPES)}")
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(f"packed_attention {self.packed_attention!r} not in {PACKED_ATTENTION}")
        if self.attn_backend not in (None, "auto", *BACKENDS):
            raise ValueError(f"attn_backend {self.attn_backend!r} not in {(None, 'auto', *BACKENDS)}")
        if self.tokens_per_batch < self.max_length:
            raise ValueError(f"tokens_per_batch {self.tokens_per_batch} < max_length {self.max_length}")
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.model.endswith(".gguf") and self.gguf_file is None:
            self.gguf_file = Path(self.model).name
            self.model = str(Path(self.model).parent)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class TextBatch:
    """Model inputs for n captions plus the fp32 pooling weights (packed or padded layout).

    Packed: input_ids / position_ids (1, T), cu_seqlens (n + 1,) int32, max_seqlen, and
    ``pool_index`` (T,) = the token's row in an (n * max_seqlen) padded layout. Padded: input_ids
    and attention_mask (n, S). ``weights`` (tokens,) fp32: each token's pooling weight (rows sum to 1).
    """

    input_ids: Tensor
    weights: Tensor
    num_captions: int
    max_seqlen: int
    num_tokens: int
    """Real (non-pad) tokens."""
    packed: bool
    attention_mask: Tensor | None = None
    position_ids: Tensor | None = None
    cu_seqlens: Tensor | None = None
    pool_index: Tensor | None = None

    def to(self, device) -> TextBatch:
        moved = {
            f.name: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return TextBatch(**moved)

    def model_inputs(self) -> dict:
        """Keyword arguments for the transformers model's forward."""
        if not self.packed:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }


def pooling_weights(pool_mask: Sequence[bool], pooling: str) -> list[float]:
    """Per-token fp32 weights of one caption. An empty pool mask falls back to every token."""
    n = len(pool_mask)
    if pooling == "last_token":
        return [0.0] * (n - 1) + [1.0]
    mask = list(pool_mask) if any(pool_mask) else [True] * n
    if pooling == "mean":
        k = sum(mask)
        return [1.0 / k if m else 0.0 for m in mask]
    ranks, r = [], 0  # weighted_mean: the i-th pooled token weighs i
    for m in mask:
        r += bool(m)
        ranks.append(float(r) if m else 0.0)
    total = sum(ranks)
    return [x / total for x in ranks]


def collate(
    ids: Sequence[Sequence[int]],
    pool_masks: Sequence[Sequence[bool]] | None = None,
    *,
    pooling: str = "mean",
    packed: bool = True,
    pad_id: int = 0,
) -> TextBatch:
    """Token id lists (one per caption, special tokens included) -> a TextBatch on the CPU.

    pool_masks: per token, True where it is pooled (the caption, not the template); None = all.
    """
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling {pooling!r} not in {POOLING_MODES}")
    if not ids or any(len(x) == 0 for x in ids):
        raise ValueError("collate needs at least one caption and no empty token lists")
    if pool_masks is None:
        pool_masks = [[True] * len(x) for x in ids]
    lengths = [len(x) for x in ids]
    if [len(m) for m in pool_masks] != lengths:
        raise ValueError("every pool mask must have its caption's length")
    n, longest, total = len(ids), max(lengths), sum(lengths)
    weights = [pooling_weights(m, pooling) for m in pool_masks]
    if packed:
        flat = [t for x in ids for t in x]
        positions = [p for length in lengths for p in range(length)]
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        pool_index = [i * longest + p for i, length in enumerate(lengths) for p in range(length)]
        return TextBatch(
            input_ids=torch.tensor([flat], dtype=torch.long),
            weights=torch.tensor([w for row in weights for w in row], dtype=torch.float32),
            num_captions=n,
            max_seqlen=longest,
            num_tokens=total,
            packed=True,
            position_ids=torch.tensor([positions], dtype=torch.long),
            cu_seqlens=cu,
            pool_index=torch.tensor(pool_index, dtype=torch.long),
        )
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros(n, longest, dtype=torch.bool)
    w = torch.zeros(n, longest, dtype=torch.float32)
    for i, (x, row) in enumerate(zip(ids, weights)):
        input_ids[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[i, : len(x)] = True
        w[i, : len(x)] = torch.tensor(row)
    return TextBatch(
        input_ids=input_ids,
        weights=w.view(-1),
        num_captions=n,
        max_seqlen=longest,
        num_tokens=total,
        packed=False,
        attention_mask=mask,
    )


def pool(hidden: Tensor, batch: TextBatch) -> Tensor:
    """last_hidden_state ((1, T, d) packed or (n, S, d) padded) -> (n, d) fp32 weighted sums.

    Both layouts reduce the same (n, longest, d) fp32 tensor along its token axis, so packed and
    padded pooling add in the same order; no atomics (deterministic).
    """
    n, d = batch.num_captions, hidden.shape[-1]
    weighted = hidden.reshape(-1, d).float() * batch.weights[:, None]
    if batch.packed:
        rows = weighted.new_zeros(n * batch.max_seqlen, d).index_copy(0, batch.pool_index, weighted)
        return rows.view(n, batch.max_seqlen, d).sum(1)
    return weighted.view(n, -1, d).sum(1)


# ---------------------------------------------------------------------------------------------
# The embedder


class LLMTextEmbedder(nn.Module):
    """A bidirectional decoder LM with pooling: ``encode(captions)`` -> (n, hidden) fp32.

    Build from a loaded transformers model (``LLMTextEmbedder(model, tokenizer, config)``; a
    ``*ForCausalLM`` is reduced to its base model) or from disk (``LLMTextEmbedder.from_pretrained``).
    ``forward(batch)`` is differentiable (stage 1); ``encode`` runs without gradients in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer=None, config: TextEmbedderConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TextEmbedderConfig()
        base = getattr(model, "base_model", model)
        self.model = make_bidirectional(base)
        self.tokenizer = tokenizer
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.lora is not None:
            self.add_lora(self.config.lora)

    # ---- loading

    @classmethod
    def from_pretrained(cls, config: TextEmbedderConfig, device: torch.device | str | None = None):
        """Load tokenizer and base model from ``config.model`` (a directory or a GGUF file), no hub access."""
        from transformers import AutoModel, AutoTokenizer

        if not config.model:
            raise ValueError("TextEmbedderConfig.model is empty: give a local directory or a .gguf file")
        kw = {"local_files_only": config.local_files_only}
        if config.gguf_file is not None:
            kw["gguf_file"] = config.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(config.model, **kw)
        model = AutoModel.from_pretrained(
            config.model, attn_implementation=ATTN_IMPLEMENTATION, dtype=config.torch_dtype, **kw
        )
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, config)

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.hidden_size

    @property
    def base_model(self) -> nn.Module:
        """The transformers model under any LoRA wrapper."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(tok, name, None) if tok is not None else None
            if value is not None:
                return int(value)
        pad = getattr(self.base_model.config, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # ---- tokenization

    def tokenize(self, captions: Sequence[str]) -> tuple[list[list[int]], list[list[bool]]]:
        """Captions -> (token ids with special tokens, pool masks: True on tokens that overlap the caption).

        The caption's characters are located in the templated text and mapped to tokens through the
        fast tokenizer's offsets, so tokens that merge across the template boundary count as caption.
        """
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("this embedder has no tokenizer: pass token ids to collate() instead")
        prefix, _, suffix = self.config.instruction.partition("{caption}")
        texts = [prefix + c + suffix for c in captions]
        room = self.config.max_length - int(self.config.add_eos)
        enc = tok(
            texts, truncation=True, max_length=room, return_offsets_mapping=True, add_special_tokens=True
        )
        eos = getattr(tok, "eos_token_id", None)
        if self.config.add_eos and eos is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        ids, masks = [], []
        for caption, row, offsets in zip(captions, enc["input_ids"], enc["offset_mapping"]):
            lo, hi = len(prefix), len(prefix) + len(caption)
            mask = [bool(e > lo and s < hi and e > s) for s, e in offsets]
            row = list(row)
            if self.config.add_eos and (not row or row[-1] != eos):
                row.append(eos)
                mask.append(False)
            ids.append(row)
            masks.append(mask)
        return ids, masks

    def collate(self, captions: Sequence[str], packed: bool | None = None) -> TextBatch:
        ids, masks = self.tokenize(captions)
        packed = self.config.packed if packed is None else packed
        return collate(ids, masks, pooling=self.config.pooling, packed=packed, pad_id=self.pad_id)

    # ---- forward

    def hidden_states(self, batch: TextBatch) -> Tensor:
        """The model's last_hidden_state for a batch on the model's device."""
        kwargs = batch.model_inputs()
        if self.config.attn_backend is not None:
            kwargs["llm2clip_attn_backend"] = self.config.attn_backend
        if batch.packed and self.config.packed_attention != "auto":
            kwargs["llm2clip_packed_attention"] = self.config.packed_attention
        return self.model(**kwargs, use_cache=False).last_hidden_state

    def forward(self, batch: TextBatch) -> Tensor:
        """(n, hidden) fp32 embeddings (L2-normalised if config.normalize), differentiable."""
        out = pool(self.hidden_states(batch), batch)
        return F.normalize(out, dim=-1) if self.config.normalize else out

    def batches(self, lengths: Sequence[int], packed: bool) -> list[list[int]]:
        """Split caption indices (sorted by length) into batches within config.tokens_per_batch."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        budget, out, cur, cur_tokens = self.config.tokens_per_batch, [], [], 0
        for i in order:
            # sorted ascending: in a padded batch the newest caption is the longest
            need = lengths[i] + cur_tokens if packed else lengths[i] * (len(cur) + 1)
            if cur and need > budget:
                out.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens += lengths[i]
        if cur:
            out.append(cur)
        return out

    @torch.no_grad()
    def encode(
        self,
        captions: Sequence[str] | None = None,
        *,
        ids: Sequence[Sequence[int]] | None = None,
        pool_masks: Sequence[Sequence[bool]] | None = None,
        packed: bool | None = None,
    ) -> Tensor:
        """Embeddings (n, hidden) fp32 on the model's device, in the input order, in eval mode.

        Give captions (tokenized with the template) or pre-tokenized ``ids`` (+ optional pool masks).
        Batches are length-sorted and sized by config.tokens_per_batch.
        """
        if (captions is None) == (ids is None):
            raise ValueError("give exactly one of captions or ids")
        if captions is not None:
            ids, pool_masks = self.tokenize(captions)
        if pool_masks is None:
            pool_masks = [[True] * len(x) for x in ids]
        packed = self.config.packed if packed is None else packed
        out = None
        was_training = self.training
        self.eval()
        try:
            for chunk in self.batches([len(x) for x in ids], packed):
                batch = collate(
                    [ids[i] for i in chunk], [pool_masks[i] for i in chunk],
                    pooling=self.config.pooling, packed=packed, pad_id=self.pad_id,
                ).to(self.device)  # fmt: skip
                emb = self(batch)
                if out is None:
                    out = emb.new_empty(len(ids), emb.shape[1])
                out[torch.tensor(chunk, device=emb.device)] = emb
        finally:
            self.train(was_training)
        return out

    # ---- LoRA (peft)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def add_lora(self, settings: LoraSettings | None = None) -> None:
        """Wrap the model with a fresh, trainable LoRA adapter; the base weights are frozen."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise RuntimeError("a LoRA adapter is already attached")
        s = settings or LoraSettings()
        cfg = LoraConfig(
            r=s.r,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=list(s.target_modules),
            bias="none",
        )
        self.model = get_peft_model(self.model, cfg)

    def save_lora(self, path: str | os.PathLike) -> None:
        """Write the adapter (adapter_config.json + adapter_model.safetensors) to a directory."""
        if not self.has_lora:
            raise RuntimeError("no LoRA adapter is attached")
        self.model.save_pretrained(str(path))

    def load_lora(self, path: str | os.PathLike, trainable: bool = False) -> None:
        """Attach a saved adapter to the (adapter-free) base model."""
        from peft import PeftModel

        if self.has_lora:
            raise RuntimeError("a LoRA adapter is already attached; merge_lora() or rebuild first")
        self.model = PeftModel.from_pretrained(self.model, str(path), is_trainable=trainable)

    def merge_lora(self) -> None:
        """Fold the adapter into the base weights and drop the peft wrapper."""
        if not self.has_lora:
            raise RuntimeError("no LoRA adapter is attached")
        self.model = self.model.merge_and_unload()
        make_bidirectional(self.model)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "CAUSAL_ATTN_IMPLEMENTATION",
    "DEFAULT_LORA_TARGETS",
    "LLMTextEmbedder",
    "LoraSettings",
    "POOLING_MODES",
    "TextBatch",
    "TextEmbedderConfig",
    "collate",
    "hf_attention_forward",
    "hf_causal_attention_forward",
    "make_bidirectional",
    "packed_attention",
    "pool",
    "pooling_weights",
    "register_hf_attention",
]
