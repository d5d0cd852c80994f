"""Preference pairs as TRL's ``DPOTrainer`` reads them, and the collator that gives each pair its multimodal layout.

``DPOTrainer`` takes a ``datasets.Dataset`` with ``prompt``, ``chosen`` and ``rejected`` text; it tokenizes them
(``prompt_ids``, ``chosen_ids``, ``rejected_ids``) and, with ``remove_unused_columns=False``, keeps the other
columns. The text alone cannot carry Emotion-LLaMA's layout (259 visual and K audio slots between text segments),
so each row also holds ``pair``, its index in the pair file, and :class:`PreferenceCollator` (``DPOTrainer``'s
public ``data_collator`` argument) builds the batch from the pair and its sample with the recipe's own
:class:`~mosear_recipes.emotion_llama.prompt.PromptEncoder`, exactly as SFT encodes an answer: TRL's token columns
are not used. The batch is TRL's ``[chosen rows; rejected rows]`` with ``input_ids``, ``attention_mask``,
``completion_mask`` (the answer and ``</s>``) plus ``modality_ids`` and the features, repeated for both halves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from peft_mose import Modality
from peft_mose.layout import collate_rows

from ..emotion_llama.projectors import FEATURE_KEYS
from ..emotion_llama.prompt import PromptEncoder, prompt_tail
from ..merr.dataset import MERRDataset
from ..merr.tasks import TASKS, normalize_answer
from .pairs import PreferencePair


def check_pair_samples(pairs: Sequence[PreferencePair], samples: MERRDataset, pair_file: str | Path) -> dict[str, int]:
    """``{name: index in samples}`` for every pair's sample; a pair whose sample the annotation lacks is refused,
    naming the pair file's line (blank lines aside, pair ``i`` is on the ``i``-th record line)."""
    index = {record.name: i for i, record in enumerate(samples.records)}
    for number, pair in enumerate(pairs, start=1):
        if pair.name not in index:
            raise ValueError(
                f"{pair_file}: pair {number} names sample {pair.name!r}, which {samples.annotation_file} does not list "
                "(or was skipped): its features and subtitle are read from there."
            )
    return index


def trl_dataset(pairs: Sequence[PreferencePair], samples: MERRDataset) -> Dataset:
    """The rows ``DPOTrainer`` reads: ``prompt`` (the text of the prompt, for TRL's logs), ``chosen``, ``rejected``
    (normalised as the recipe trains answers) and ``pair``."""
    subtitles = {record.name: record.subtitle for record in samples.records}
    return Dataset.from_list([
        {"prompt": prompt_tail(subtitles[p.name], p.task, TASKS[p.task].instructions[0]),
         "chosen": normalize_answer(p.chosen), "rejected": normalize_answer(p.rejected), "pair": i}
        for i, p in enumerate(pairs)
    ])  # fmt: skip


class PreferenceCollator:
    """Turns rows of :func:`trl_dataset` into ``DPOTrainer`` batches in Emotion-LLaMA's layout (module docstring):
    the pair's sample read from ``samples`` (features, subtitle), its task's first instruction as the prompt."""

    def __init__(
        self, encoder: PromptEncoder, pairs: Sequence[PreferencePair], samples: MERRDataset, index: Mapping[str, int]
    ) -> None:
        self.encoder = encoder
        self.pairs = pairs
        self.samples = samples
        self.index = index

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [self.pairs[int(example["pair"])] for example in examples]
        items = [self.samples[(self.index[p.name], self.samples.tasks[0], 0)] for p in pairs]
        rows = [
            self.encoder.encode(item.subtitle, p.task, TASKS[p.task].instructions[0], normalize_answer(answer))
            for answers in ("chosen", "rejected")
            for p, item in zip(pairs, items)
            for answer in (getattr(p, answers),)
        ]
        batch = dict(collate_rows(rows, self.encoder.tokenizer.pad_token_id, "right", with_labels=False))
        batch["completion_mask"] = ((batch["modality_ids"] == Modality.ANSWER) & (batch["attention_mask"] == 1)).long()
        for field in FEATURE_KEYS:
            features = torch.stack([getattr(item, field) for item in items])
            batch[field] = torch.cat([features, features])
        return batch
