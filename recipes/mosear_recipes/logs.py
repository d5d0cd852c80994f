"""Logging set-up shared by the recipes' entry points: one format; the recipes' level, and transformers' when asked."""

from __future__ import annotations

import logging

import transformers

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PACKAGE = __name__.rpartition(".")[0]


def setup_logging(level: int | str, transformers_level: int | str | None = None) -> None:
    """Log the recipes' messages (to stderr) at ``level`` (a ``logging`` level or its name); with
    ``transformers_level``, set transformers' verbosity too (else it keeps its own: warning, or
    ``TRANSFORMERS_VERBOSITY``)."""
    logging.basicConfig(format=FORMAT, datefmt="%H:%M:%S")
    logging.getLogger(PACKAGE).setLevel(_level(level))
    if transformers_level is not None:
        transformers.utils.logging.set_verbosity(_level(transformers_level))


def _level(level: int | str) -> int:
    return level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]
