"""``python -m llm2clip.train``: the stage-2 trainer, an application in llm2clip.apps.train."""

if __name__ == "__main__":
    from llm2clip.apps.train import main
    from llm2clip.cli import run

    run(main, "llm2clip.train")
