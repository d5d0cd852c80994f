"""Greedy answers of a model to one task's prompt over a whole dataset, split over the processes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from tqdm import tqdm

from .distributed import process_rank
from .emotion_llama.model import EmotionLlama
from .emotion_llama.prompt import PromptEncoder
from .merr.collator import MERRCollator
from .merr.dataset import MERRDataset
from .modeling import to_device


def generate_predictions(
    model: EmotionLlama, dataset: MERRDataset, encoder: PromptEncoder, device: torch.device, batch_size: int,
    max_new_tokens: int, task: str = "emotion", reallocation: Mapping[str, Any] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Greedy answers to the prompt of ``task`` (the first instruction of its pool, so that runs are comparable) for
    every sample, ``{name: text}``, on every process, under attention reallocation with the options
    ``reallocation`` when given. The samples are split over the processes in equal shares (the
    last one repeated): ZeRO-3 needs every process in every generate call."""
    collate = MERRCollator(encoder, with_answer=False)
    rank, world = process_rank()
    keys = dataset.keys(task)
    share = math.ceil(len(keys) / world)
    keys = (keys + keys[-1:] * (share * world - len(keys)))[rank * share : (rank + 1) * share]
    predictions: dict[str, str] = {}
    model.eval()
    for start in tqdm(range(0, share, batch_size), desc="generate", unit="batch", disable=rank != 0):
        batch = collate([dataset[k] for k in keys[start : start + batch_size]])
        ids = model.generate(
            to_device(batch, device), reallocation=reallocation, max_new_tokens=max_new_tokens, do_sample=False
        )
        texts = encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        predictions.update(zip(batch["names"], (t.strip() for t in texts)))
    if world == 1:
        return predictions
    parts: list[dict[str, str] | None] = [None] * world
    torch.distributed.all_gather_object(parts, predictions)
    return {name: text for part in parts for name, text in part.items()}
