"""``python -m llm2clip.clip_benchmark``: CLIP_benchmark's CLI with the llm2clip model type, an
application in llm2clip.apps.clip_benchmark."""

if __name__ == "__main__":
    from llm2clip.apps.clip_benchmark import main
    from llm2clip.cli import run

    run(main, "llm2clip.clip_benchmark")
