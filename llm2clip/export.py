"""``python -m llm2clip.export``: export a stage-2 model, an application in llm2clip.apps.export."""

if __name__ == "__main__":
    from llm2clip.apps.export import main
    from llm2clip.cli import run

    run(main, "llm2clip.export")
