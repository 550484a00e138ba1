"""``python -m llm2clip.extract``: caption-embedding extraction (llm2clip.apps.extract)."""

if __name__ == "__main__":
    from llm2clip.apps.extract import main

    main()
