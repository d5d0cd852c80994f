"""Helpers of the recipe tests (their `tiny` fixture lives in conftest.py)."""

from __future__ import annotations

from mosear_recipes.merr.dataset import MERRDataset
from mosear_recipes.merr.synthetic import SyntheticMERR


def coarse_dataset(data: SyntheticMERR, **kwargs) -> MERRDataset:
    """The coarse-grained training set with the emotion and reason tasks."""
    return MERRDataset(
        data.coarse_txt, data.subtitles, tasks=("emotion", "reason"), coarse_json=data.coarse_json, **kwargs
    )
