"""Timing helpers shared by the decode benchmarks."""

from __future__ import annotations

import time

import torch
from transformers import LogitsProcessor


class StepClock(LogitsProcessor):
    """Stamps the time at each generated token (``generate`` calls its logits processors once per step, after the
    step's forward): from ``start`` to the first stamp is the prefill, the gaps between stamps are the decode steps,
    each timed alone. On a GPU the stamp waits for the step's kernels (``scores`` is still being computed when the
    processor is called)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.device.type == "cuda":
            torch.cuda.synchronize(scores.device)
        self.stamps.append(time.perf_counter())
        return scores

    def prefill(self) -> float:
        return self.stamps[0] - self.start

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]
