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
    pass over the dataset, and one instruction per sample.

    Deterministic given ``seed`` and the epoch: ``set_epoch`` sets the epoch, and every iteration advances it
    by one when it starts (so copies iterated in step, e.g. one per process, agree without ``set_epoch``).
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
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        streams = {task: self._stream(rng) for task in self.tasks}
        for _ in range(self.num_batches):
            task = self.tasks[rng.choice(len(self.tasks), p=self.probabilities)]
            draws = rng.integers(_DRAW_RANGE, size=self.batch_size)
            yield [(next(streams[task]), task, int(draw)) for draw in draws]

    def _stream(self, rng: np.random.Generator) -> Iterator[int]:
        """Sample indices in shuffled passes over the dataset, endlessly."""
        while True:
            yield from (int(i) for i in rng.permutation(self.dataset_size))
