"""docs/models.md is what tests/models_doc.py generates from the models and the tests' support records."""

from __future__ import annotations

import re
from pathlib import Path

import transformers

from models_doc import DOC, render

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# A row's second column, where each model's language model lies: transformers moves it between releases (5.5 put the
# Qwen2.5-Omni thinker's text model at `model`, 5.24 at `model.language_model`).
_PATH_COLUMN = re.compile(r"^(\| `[^|]*` \| )`[^`|]*`", re.MULTILINE)


def _pinned_transformers() -> str:
    return re.search(r"^transformers==(\S+)$", CONSTRAINTS.read_text(), re.MULTILINE).group(1)


def test_models_doc_is_current():
    """Exact on the pinned release (the one the doc describes); on another release (tools/compat.sh) everything but
    the module paths must hold too."""
    if transformers.__version__ == _pinned_transformers():
        assert DOC.read_text() == render(), "docs/models.md is stale: run `python tests/models_doc.py`"
    else:
        assert _PATH_COLUMN.sub(r"\1-", DOC.read_text()) == _PATH_COLUMN.sub(r"\1-", render()), (
            f"on transformers {transformers.__version__}, docs/models.md differs beyond the language models' paths"
        )


def test_path_column_pattern_masks_every_model_row():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    masked = _PATH_COLUMN.sub(r"\1-", "\n".join(rows)).splitlines()
    assert rows and len(masked) == len(rows)
    assert sum(a != b for a, b in zip(rows, masked)) >= len(rows) // 2  # the multimodal rows have a path
