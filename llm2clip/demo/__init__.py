"""``python -m llm2clip.demo``: the embedded demo, an application in llm2clip.apps.demo."""
