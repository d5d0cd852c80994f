"""docs/models.md is what tests/models_doc.py generates from the models and the tests' support records."""

from __future__ import annotations

from models_doc import DOC, render


def test_models_doc_is_current():
    assert DOC.read_text() == render(), "docs/models.md is stale: run `python tests/models_doc.py`"
