"""``python -m llm2clip.stage1``: stage 1, caption-contrastive LoRA fine-tuning (llm2clip.apps.stage1)."""

if __name__ == "__main__":
    from llm2clip.apps.stage1 import main
    from llm2clip.cli import run

    run(main, "llm2clip.stage1")
