"""``python -m llm2clip.extract``: caption-embedding extraction (llm2clip.apps.extract)."""

if __name__ == "__main__":
    from llm2clip.apps.extract import main
    from llm2clip.cli import run

    run(main, "llm2clip.extract")
