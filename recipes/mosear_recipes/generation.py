"""Greedy answers of a model to one task's prompt over a whole dataset, split over the processes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from tqdm import tqdm

from peft_mose.attention import AttentionReallocation

from .distributed import process_rank
from .emotion_llama.model import EmotionLlama
from .emotion_llama.prompt import PromptEncoder
from .merr.collator import MERRCollator
from .merr.dataset import MERRDataset


def to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, object]:
    """The batch with its tensors on ``device`` (lists such as ``names`` unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def generate_predictions(
    model: EmotionLlama, dataset: MERRDataset, encoder: PromptEncoder, device: torch.device, batch_size: int,
    max_new_tokens: int, task: str = "emotion", reallocation: Mapping[str, Any] | None = None,
    gated: dict[str, bool] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Greedy answers to the prompt of ``task`` (the first instruction of its pool, so that runs are comparable) for
    every sample, ``{name: text}``, on every process, under attention reallocation with the options
    ``reallocation`` when given; with a ``gate`` among them, ``gated`` (when given) is filled with each sample's
    decision (``True``: AR applied). The samples are split over the processes in equal shares (the
    last one repeated): ZeRO-3 needs every process in every generate call."""
    collate = MERRCollator(encoder, with_answer=False)
    rank, world = process_rank()
    keys = dataset.keys(task)
    share = math.ceil(len(keys) / world)
    keys = (keys + keys[-1:] * (share * world - len(keys)))[rank * share : (rank + 1) * share]
    predictions: dict[str, str] = {}
    decisions: dict[str, bool] = {}
    model.eval()
    for start in tqdm(range(0, share, batch_size), desc="generate", unit="batch", disable=rank != 0):
        batch = collate([dataset[k] for k in keys[start : start + batch_size]])
        log: list[AttentionReallocation] = []
        ids = model.generate(
            to_device(batch, device), reallocation=reallocation, reallocation_log=log, max_new_tokens=max_new_tokens,
            do_sample=False,
        )  # fmt: skip
        texts = encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        predictions.update(zip(batch["names"], (t.strip() for t in texts)))
        for entry in log:
            for decision in entry.gate_decisions:
                decisions.update(zip(batch["names"], decision.conflict.tolist()))
    if world > 1:
        parts: list[tuple[dict[str, str], dict[str, bool]] | None] = [None] * world
        torch.distributed.all_gather_object(parts, (predictions, decisions))
        predictions = {name: text for texts, _ in parts for name, text in texts.items()}
        decisions = {name: flag for _, flags in parts for name, flag in flags.items()}
    if gated is not None:
        gated.update(decisions)
    return predictions
