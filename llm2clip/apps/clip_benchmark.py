"""``python -m llm2clip.clip_benchmark``: CLIP_benchmark's own CLI with the ``llm2clip`` model type.

    python -m llm2clip.clip_benchmark eval --model_type llm2clip --model llm2clip --pretrained BUNDLE_DIR \\
        --dataset wds/flickr30k --dataset_root data/wds_flickr30k --task zeroshot_retrieval --output out.json

Every argument goes to ``clip_benchmark.cli`` unchanged after ``llm2clip.evaluation.clip_benchmark.register``
has added the model type (CLIP_benchmark has no plugin entry point for model types).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from llm2clip.cli import UsageError, run
from llm2clip.evaluation.clip_benchmark import register


def main(argv: Sequence[str] | None = None) -> None:
    """Register the llm2clip model type and run ``clip_benchmark.cli.main`` on `argv`."""
    try:
        register()
    except ImportError as e:
        raise UsageError(str(e)) from None
    import clip_benchmark.cli as cli

    saved = sys.argv
    sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    run(main, "llm2clip.clip_benchmark")
