"""The ``llm2clip`` model type for LAION-AI/CLIP_benchmark's own CLI (pip install clip-benchmark).

    python -m llm2clip.clip_benchmark eval --model_type llm2clip --model llm2clip \\
        --pretrained runs/stage2/final --dataset wds/mscoco_captions \\
        --dataset_root data/wds_mscoco_captions --task zeroshot_retrieval --recall_k 1 5 10 --output coco.json

CLIP_benchmark picks a loader from a fixed dict (``clip_benchmark.models.TYPE2FUNC``; the CLI's
``--model_type`` choices are ``MODEL_TYPES``) and has no plugin entry point, so ``register()``
adds ``llm2clip`` to both before its CLI parses the arguments; ``python -m llm2clip.clip_benchmark``
does that and then runs their ``clip_benchmark.cli.main`` unchanged (every flag is theirs).

A loader returns (model, transform, tokenizer): the bundle loaded by ``llm2clip.load(pretrained)``
(its recorded LLM probe-checked), ``model.preprocess`` (resize, center crop, the tower's
normalisation) and ``model.tokenize`` (the recorded LLM's tokenizer and template; ``.to(device)``
is a no-op). ``encode_text`` runs the LLM (autocast off: the recipe's dtype) and the adapter,
``encode_image`` the tower. ``--model`` is not used (name it ``llm2clip`` for the output file).

numpy >= 2.4 refuses ``float()`` of a one-element array, which clip-benchmark 1.6.2's
``metrics.zeroshot_classification.accuracy`` does (every classification run then crashes).
``register()`` replaces that one function, only when it fails, by ``accuracy_compat``: the same
top-k count with the scalar taken by ``float(tensor)``, hence the same numbers.
"""

from __future__ import annotations

import os

import torch

__all__ = ["MODEL_TYPE", "accuracy_compat", "load_llm2clip", "register"]

MODEL_TYPE = "llm2clip"


def load_llm2clip(model_name: str, pretrained: str, cache_dir: str | None = None, device="cuda"):
    """CLIP_benchmark's loader signature -> (model, transform, tokenizer) of the bundle `pretrained`."""
    from llm2clip.bundle import load

    if not pretrained or not os.path.isdir(pretrained):
        raise ValueError(
            f"--pretrained {pretrained!r}: give an llm2clip bundle folder (e.g. runs/stage2/final)"
        )
    model = load(pretrained, device)
    return model, model.preprocess, model.tokenize


def accuracy_compat(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark's ``accuracy`` (top-k accuracies of logits (N, C) for labels (N,)) with the
    scalar conversion numpy >= 2.4 accepts."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0)) / n for k in topk]


def _fix_accuracy() -> None:
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    except TypeError:  # numpy >= 2.4: float() of a 1-element array
        zeroshot_classification.accuracy = linear_probe.accuracy = accuracy_compat


def register() -> None:
    """Add the llm2clip type to CLIP_benchmark's model registry (idempotent; module docstring);
    ImportError naming the package when clip-benchmark is not installed."""
    try:
        import clip_benchmark.models as registry
    except ImportError as e:
        raise ImportError(f"CLIP_benchmark is not installed: pip install clip-benchmark ({e})") from e
    registry.TYPE2FUNC[MODEL_TYPE] = load_llm2clip
    if MODEL_TYPE not in registry.MODEL_TYPES:
        registry.MODEL_TYPES.append(MODEL_TYPE)  # the CLI's --model_type choices are this list
    _fix_accuracy()
