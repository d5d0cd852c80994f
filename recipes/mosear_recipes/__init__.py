"""The recipe library under ``recipes/*.py``: Emotion-LLaMA wiring, MERR data, training on HF ``Trainer``, loading
finished runs for evaluation and inference (layout: ``docs/recipes.md``). Installed with the project."""
