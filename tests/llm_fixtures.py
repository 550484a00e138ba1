"""A tiny local LLM folder (random Llama + a WordLevel tokenizer) for pipeline tests: no downloads.

path = tiny_llm_dir(tmp_path / "llm", corpus=["a dog runs", ...])
embedder = LLMTextEmbedder.from_pretrained(TextEmbedderConfig(model=str(path), ...))
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_CORPUS = [
    "a dog runs on the grass",
    "a cat sleeps on a red sofa",
    "two people ride bikes near the sea",
    "given a caption , retrieve a detailed relevant caption :",
    "summarize in one word",
]


def tiny_tokenizer(corpus: list[str]):
    """A WordLevel tokenizer over the corpus' words, with BOS added, pad/eos/unk tokens and offsets."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llm_dir(
    path: Path, corpus: list[str] | None = None, seed: int = 0, hidden: int = 64, layers: int = 2
) -> Path:
    """Save a random LlamaForCausalLM and its tokenizer into `path` (transformers format)."""
    import transformers

    tokenizer = tiny_tokenizer(corpus or DEFAULT_CORPUS)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        **ids,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
