"""Shared fixtures of the recipe tests: the tiny configuration (synthetic MERR data and a tiny model) written once."""

from __future__ import annotations

import pytest

from recipes.make_tiny import TinySetup, write_tiny_setup
from recipes.merr.dataset import MERRDataset
from recipes.merr.synthetic import SyntheticMERR


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """60 synthetic samples (48 train, 12 test) and a tiny random Llama with its tokenizer."""
    return write_tiny_setup(tmp_path_factory.mktemp("tiny"), num_samples=60, seed=0)


def coarse_dataset(data: SyntheticMERR, **kwargs) -> MERRDataset:
    """The coarse-grained training set with the emotion and reason tasks."""
    return MERRDataset(
        data.coarse_txt, data.subtitles, tasks=("emotion", "reason"), coarse_json=data.coarse_json, **kwargs
    )
