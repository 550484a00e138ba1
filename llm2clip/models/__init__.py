"""Models around the kernels: attention selector, vision towers, LLM text embedder, adapter, CLIP wrapper."""
