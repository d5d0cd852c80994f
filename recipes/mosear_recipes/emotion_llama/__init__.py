"""Emotion-LLaMA on transformers: prompt layout, projectors, checkpoint mapping, model wrapper, tiny configuration."""
