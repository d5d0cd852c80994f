"""The recipe's ``Trainer``: one-task batches, the paper's schedule, no weight decay on 1-D parameters, checkpoints
holding only what trains (``adapter/`` and ``projectors.safetensors``), the non-finite guards of :mod:`.guards` and
the checkpoint manifests of :mod:`.integrity`, all through Trainer's public hooks but one (resuming; see below)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader
from transformers import (
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from .arguments import ScheduleArguments
from .distributed import gathered
from .emotion_llama.checkpoint import save_projectors
from .emotion_llama.model import EmotionLlama
from .guards import NonFiniteGuard
from .integrity import CheckpointManifests
from .merr.sampler import SingleTaskBatchSampler
from .modeling import load_trained_weights
from .plots import plot_loss_curve
from .progress import TrainingProgressCallback
from .run_config import ADAPTER_DIR, LOSS_CURVE, PROJECTORS_FILE


def warmup_cosine_lr(
    step: int, lr: float, warmup_start_lr: float, warmup_steps: int, min_lr: float, iters_per_epoch: int, epochs: float
) -> float:
    """Emotion-LLaMA's ``linear_warmup_cosine_lr`` (LAVIS): in epoch 0 a linear warm-up from ``warmup_start_lr`` to
    ``lr`` over ``warmup_steps``, then ``lr``; from epoch 1 one cosine value per epoch, from ``lr`` to ``min_lr``."""
    epoch = step // iters_per_epoch
    if epoch == 0:
        return min(lr, warmup_start_lr + (lr - warmup_start_lr) * step / max(warmup_steps, 1))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def save_trained(model: EmotionLlama, directory: Path, is_main: bool = True) -> None:
    """Write ``directory/adapter`` (``save_pretrained``) and ``directory/projectors.safetensors``. Under ZeRO-3 the
    trainable parameters are gathered first (else they would be saved as empty tensors): every process must call."""
    with gathered([p for p in model.parameters() if p.requires_grad]):
        if is_main:
            directory.mkdir(parents=True, exist_ok=True)
            model.llm.save_pretrained(str(directory / ADAPTER_DIR))
            save_projectors(model.projectors, directory / PROJECTORS_FILE)


class SamplerEpochCallback(TrainerCallback):
    """Sets the batch sampler's epoch from the optimizer step at the start of every epoch. Trainer's own ``set_epoch``
    does not reach a sampler that accelerate wrapped twice (sharded over processes, then skipping the batches already
    trained), so a multi-process run resumed inside epoch k >= 1 would replay epoch 0's batches without this."""

    def __init__(self, sampler: SingleTaskBatchSampler, steps_per_epoch: int) -> None:
        self.sampler = sampler
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.sampler.set_epoch(state.global_step // self.steps_per_epoch)


class LossCurveCallback(TrainerCallback):
    """Writes ``loss.png`` (training and validation loss against the step) into the output folder at the end of
    training, from Trainer's own log history."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, Path(args.output_dir) / LOSS_CURVE)


class TrainedPartsCheckpoints:
    """Trainer methods that save and resume only what trains (``adapter/`` + ``projectors.safetensors``): mixed into
    :class:`MoSETrainer` and the DPO recipe's trainer (``mosear_recipes.preference.dpo``)."""

    # The checkpoint format: only what trains, adapter/ + projectors.safetensors. Trainer writes the whole state dict
    # of a model that is not a PreTrainedModel or PeftModel (here the frozen LLM too), so saving goes through its
    # public save_model, and resuming through the one private override left: Trainer.train(resume_from_checkpoint=...)
    # always calls _load_from_checkpoint (without DeepSpeed, which resumes from its engine checkpoint), whose own version
    # reads full-model weight files or a bare PeftModel's adapter, and no public hook replaces it. The checkpoint was
    # verified against its manifest before train() (integrity.resolve_resume). Checked on transformers 5.4-5.24
    # (tests/test_compat.py checks its signature).
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter and the projectors (under ZeRO-3 every process must call this)."""
        save_trained(self.model, Path(output_dir or self.args.output_dir), self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trained_weights(model if model is not None else self.model, Path(resume_from_checkpoint))


class MoSETrainer(TrainedPartsCheckpoints, Trainer):
    """``Trainer`` with one-task batches (``batch_sampler``; ``None``: Trainer's own), no weight decay on 1-D
    parameters, the warm-up + per-epoch cosine of ``schedule`` (unless it asks for Trainer's own), checkpoints
    holding only what trains, and a loss curve; it stops on non-finite values (:class:`~mosear_recipes.guards.NonFiniteGuard`) and gives every checkpoint a manifest,
    rotating them after it (:class:`~mosear_recipes.integrity.CheckpointManifests`, keeping ``checkpoints_kept``:
    Trainer's own ``save_total_limit`` must be off)."""

    def __init__(
        self, *args: Any, batch_sampler: SingleTaskBatchSampler | None, schedule: ScheduleArguments, total_steps: int,
        checkpoints_kept: int | None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.args.save_total_limit is not None:
            raise ValueError("MoSETrainer rotates checkpoints itself after their manifest: build its arguments with "
                             "save_total_limit=None and pass checkpoints_kept.")  # fmt: skip
        self.batch_sampler = batch_sampler
        self.schedule = schedule
        self.total_steps = total_steps
        self.guard = NonFiniteGuard()
        for callback in (self.guard, CheckpointManifests(checkpoints_kept), TrainingProgressCallback(),
                         LossCurveCallback()):  # fmt: skip
            self.add_callback(callback)
        if batch_sampler is not None:
            self.add_callback(SamplerEpochCallback(batch_sampler, schedule.iters_per_epoch))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Trainer's loss, checked before its backward pass when training (no callback sees the loss before it)."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = result[0] if return_outputs else result
            self.guard.check_loss(loss, inputs, self.args, self.state.global_step + 1)
        return result

    def get_train_dataloader(self) -> DataLoader:
        """The dataset read in :class:`SingleTaskBatchSampler` batches (sharded over processes by accelerate);
        Trainer's own loader without a batch sampler."""
        if self.batch_sampler is None:
            return super().get_train_dataloader()
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type != "cpu",
        )
        return self.accelerator.prepare(loader)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Weight decay on matrices only: biases, norms and other 1-D parameters get none (as the original)."""
        return [name for name, param in model.named_parameters() if param.ndim >= 2]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> LRScheduler:
        """:func:`warmup_cosine_lr` over the full schedule (``max_steps`` only cuts it short), or Trainer's own
        scheduler under ``--lr_schedule trainer``."""
        if self.schedule.lr_schedule == "trainer":
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            args, schedule = self.args, self.schedule
            warmup = args.get_warmup_steps(self.total_steps)

            def factor(step: int) -> float:
                rate = warmup_cosine_lr(
                    step, args.learning_rate, schedule.warmup_start_lr, warmup, schedule.min_lr,
                    schedule.iters_per_epoch, args.num_train_epochs,
                )  # fmt: skip
                return rate / args.learning_rate

            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, factor)
        return self.lr_scheduler
