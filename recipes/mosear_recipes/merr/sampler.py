"""Unified multi-task training (MoSEAR section 6.1): every batch holds one task, drawn at random per batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .dataset import MERRDataset, SampleKey

_DRAW_RANGE = 2**31


class SingleTaskBatchSampler(Sampler[list[SampleKey]]):
    """Yields ``num_batches`` batches of :data:`~mosear_recipes.merr.dataset.SampleKey`; each batch draws one task from
    ``tasks`` (with ``task_weights``, uniform by default), then ``batch_size`` samples from that task's own shuffled
    passes over the dataset, and one instruction per sample. A task's passes go on across epochs where the last epoch
    left them (as Emotion-LLaMA's per-dataset iterators do): with two tasks an epoch draws about half the dataset for
    each, and the next epoch takes the other half, so no sample is left out of a task for good.

    Deterministic given ``seed`` and the epoch: ``set_epoch`` sets the epoch, and every iteration advances it
    by one when it starts (so copies iterated in step, e.g. one per process, agree without ``set_epoch``). Epoch
    ``e`` replays the task draws of the epochs before it to find where each task's pass stands.
    """

    def __init__(
        self,
        dataset: MERRDataset,
        batch_size: int,
        tasks: Sequence[str] | None = None,
        task_weights: Sequence[float] | None = None,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        self.tasks = tuple(tasks) if tasks is not None else dataset.tasks
        missing = [t for t in self.tasks if t not in dataset.tasks]
        if missing:
            raise ValueError(f"Tasks {missing} were not loaded in the dataset (it has {dataset.tasks}).")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        weights = np.ones(len(self.tasks)) if task_weights is None else np.asarray(task_weights, dtype=float)
        if weights.shape != (len(self.tasks),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"task_weights must be {len(self.tasks)} non-negative numbers, not all 0; got {task_weights}."
            )
        self.probabilities = weights / weights.sum()
        self.dataset_size = len(dataset)
        self.batch_size = batch_size
        self.num_batches = num_batches if num_batches is not None else math.ceil(self.dataset_size / batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.epoch
        self.epoch += 1
        drawn = np.zeros(len(self.tasks), dtype=np.int64)
        for earlier in range(epoch):
            for task, _ in self._plan(earlier):
                drawn[task] += self.batch_size
        streams = [self._stream(task, int(drawn[task])) for task in range(len(self.tasks))]
        for task, draws in self._plan(epoch):
            yield [(next(streams[task]), self.tasks[task], int(draw)) for draw in draws]

    def _plan(self, epoch: int) -> Iterator[tuple[int, np.ndarray]]:
        """Epoch ``epoch``'s batches: the task index of each and its instruction draws."""
        rng = np.random.default_rng([self.seed, epoch])
        for _ in range(self.num_batches):
            task = int(rng.choice(len(self.tasks), p=self.probabilities))
            yield task, rng.integers(_DRAW_RANGE, size=self.batch_size)

    def _stream(self, task: int, start: int) -> Iterator[int]:
        """Task ``task``'s sample indices from its ``start``-th on: shuffled passes over the dataset, endlessly."""
        passes, offset = divmod(start, self.dataset_size)
        while True:
            order = np.random.default_rng([self.seed, task, passes]).permutation(self.dataset_size)
            yield from (int(i) for i in order[offset:])
            passes, offset = passes + 1, 0
