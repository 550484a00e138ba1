"""Stage 1's objectives: caption-contrastive (supervised SimCSE) InfoNCE, the MNTP warm-up, and
caption retrieval accuracy (CRA), over a bidirectional LLM with a LoRA adapter.

    embedder, lm_head = build_model(embedder_config, mntp=True, device=dev)
    loss = contrastive_loss(embedder, pairs, dev, scale=50.0)       # negatives from every rank
    loss = mntp_loss(embedder, lm_head, pairs, dev, generator)      # LLM2Vec's warm-up
    cra = caption_retrieval_accuracy(embedder, held_out_pairs, autocast)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llm2clip.data.pairs import text_hash
from llm2clip.models.text_embedder import ATTN_IMPLEMENTATION, LLMTextEmbedder, TextEmbedderConfig, collate

__all__ = ["build_model", "caption_retrieval_accuracy", "contrastive_loss", "mask_for_mntp", "mntp_loss"]


def build_model(ecfg: TextEmbedderConfig, mntp: bool, device: torch.device):
    """(embedder with a fresh trainable LoRA adapter (``ecfg.lora``), frozen LM head or None). The
    *ForCausalLM model (for its LM head) is loaded only when MNTP steps are asked for."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw = {"local_files_only": True}
    if ecfg.gguf_file is not None:
        kw["gguf_file"] = ecfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(ecfg.model, **kw)
    cls = AutoModelForCausalLM if mntp else AutoModel
    model = cls.from_pretrained(
        ecfg.model, attn_implementation=ATTN_IMPLEMENTATION, dtype=ecfg.torch_dtype, **kw
    )
    model = model.to(device)
    lm_head = model.get_output_embeddings() if mntp else None
    if lm_head is not None:
        lm_head.requires_grad_(False)
    return LLMTextEmbedder(model, tokenizer, ecfg), lm_head


def contrastive_loss(
    embedder: LLMTextEmbedder,
    pairs,
    device,
    *,
    scale: float,
    dedup_negatives: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Symmetric InfoNCE a <-> b with negatives from every rank (fused, fixed scale); with
    dedup_negatives, identical b captions in the global batch are not each other's negatives."""
    from llm2clip_kernels import distributed_infonce_loss

    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    emb = embedder(embedder.collate(a + b).to(device))  # one packed forward, (2n, d) fp32, normalised
    groups = None
    if dedup_negatives:
        groups = torch.tensor([text_hash(t) for t in b], dtype=torch.long, device=device)
    return distributed_infonce_loss(emb[: len(a)], emb[len(a) :], scale, group_ids=groups, backend=backend)


def mask_for_mntp(ids, pool_masks, prob: float, mask_id: int, vocab: int, gen: torch.Generator):
    """BERT-style masking of caption tokens (never a caption's first token). Returns
    (input ids, [(caption, position)] of the masked tokens, their original ids)."""
    inputs, where, targets = [list(x) for x in ids], [], []
    candidates = [(i, p) for i, m in enumerate(pool_masks) for p in range(1, len(m)) if m[p]]
    if not candidates:
        return inputs, where, targets
    draw = torch.rand(len(candidates), generator=gen)
    chosen = [c for c, u in zip(candidates, draw.tolist()) if u < prob]
    if not chosen:
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=gen))]]
    kinds = torch.rand(len(chosen), generator=gen).tolist()
    randoms = torch.randint(vocab, (len(chosen),), generator=gen).tolist()
    for (i, p), u, r in zip(chosen, kinds, randoms):
        where.append((i, p))
        targets.append(ids[i][p])
        inputs[i][p] = mask_id if u < 0.8 else (r if u < 0.9 else ids[i][p])
    return inputs, where, targets


def mntp_loss(embedder: LLMTextEmbedder, lm_head, pairs, device, gen, *, mask_prob: float = 0.2) -> Tensor:
    """Masked next-token prediction: token i predicted from the hidden state at i - 1 (LLM2Vec)."""
    texts = [t for p in pairs for t in p]
    ids, masks = embedder.tokenize(texts)
    tok = embedder.tokenizer
    mask_id = getattr(tok, "mask_token_id", None)
    mask_id = embedder.pad_id if mask_id is None else mask_id
    inputs, where, targets = mask_for_mntp(ids, masks, mask_prob, mask_id, lm_head.weight.shape[0], gen)
    ecfg = embedder.config
    batch = collate(inputs, masks, pooling=ecfg.pooling, packed=ecfg.packed, pad_id=embedder.pad_id).to(
        device
    )
    hidden = embedder.hidden_states(batch)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if not where:
        return hidden.sum() * 0.0
    if batch.packed:
        starts = [0]
        for x in inputs[:-1]:
            starts.append(starts[-1] + len(x))
        rows = [starts[i] + p - 1 for i, p in where]
    else:
        rows = [i * batch.max_seqlen + p - 1 for i, p in where]
    logits = lm_head(hidden[torch.tensor(rows, device=device)]).float()
    return F.cross_entropy(logits, torch.tensor(targets, device=device))


@torch.no_grad()
def caption_retrieval_accuracy(embedder: LLMTextEmbedder, pairs, autocast) -> float:
    """Top-1 accuracy of caption a -> its own b among all b captions (cosine). A hit on a different
    pair with the identical b caption counts as correct."""
    if not pairs:
        return float("nan")
    with autocast:
        ea = embedder.encode([p[0] for p in pairs])
        eb = embedder.encode([p[1] for p in pairs])
    top = (F.normalize(ea.float(), dim=-1) @ F.normalize(eb.float(), dim=-1).T).argmax(1).tolist()
    return sum(pairs[j][1] == pairs[i][1] for i, j in enumerate(top)) / len(pairs)
