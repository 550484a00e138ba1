"""llm2clip: the LLM2CLIP training pipeline (stage 1, extraction, stage 2, evaluation)."""
