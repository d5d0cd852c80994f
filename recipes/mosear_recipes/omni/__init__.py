"""Qwen2.5-Omni from raw clips: media decoding, manifests, model inputs, the tiny default and the recipe jobs."""
