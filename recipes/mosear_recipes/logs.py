"""Logging set-up shared by the recipes' entry points: one format; the recipes' level, and transformers' when asked."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import transformers

if TYPE_CHECKING:
    from transformers import TrainingArguments

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


def setup_training_logging(args: TrainingArguments) -> None:
    """A training run's logging: Trainer's default level ("passive") means info on the process that logs, as HF's
    examples set it; the recipes' and transformers' levels are then ``args``'s level for this process."""
    if args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = args.get_process_log_level()
    setup_logging(level, level)
