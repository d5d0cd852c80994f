"""The omni recipe's ``Trainer``: :class:`~mosear_recipes.trainer.MoSETrainer` (guards, checkpoint manifests,
progress, loss curve) with Trainer's own data loader and schedule, saving only the adapter (``adapter/``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..distributed import gathered
from ..run import check_adapter_dir
from ..run_config import ADAPTER_DIR
from ..trainer import MoSETrainer


class OmniTrainer(MoSETrainer):
    """Checkpoints and the final model hold ``adapter/`` only (the thinker is frozen and has no projectors)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter (under ZeRO-3 every process must call this)."""
        directory = Path(output_dir or self.args.output_dir)
        with gathered([p for p in self.model.parameters() if p.requires_grad]):
            if self.args.should_save:
                directory.mkdir(parents=True, exist_ok=True)
                self.model.save_pretrained(str(directory / ADAPTER_DIR))

    # Resuming goes through the same private hook as MoSETrainer's (see the comment there; tests/test_compat.py).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapter = Path(resume_from_checkpoint) / ADAPTER_DIR
        check_adapter_dir(adapter)
        (model if model is not None else self.model).load_adapter(str(adapter), adapter_name="default", is_trainable=True)
