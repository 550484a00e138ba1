"""``python -m llm2clip.demo``: the embedded demo (llm2clip.apps.demo)."""

if __name__ == "__main__":
    from llm2clip.apps.demo.__main__ import main
    from llm2clip.cli import run

    run(main, "llm2clip.demo")
