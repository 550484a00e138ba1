"""``python -m llm2clip.eval``: evaluation, an application in llm2clip.apps.eval."""

if __name__ == "__main__":
    from llm2clip.apps.eval import main
    from llm2clip.cli import run

    run(main, "llm2clip.eval")
