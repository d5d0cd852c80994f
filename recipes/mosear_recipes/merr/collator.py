"""Collate MERR samples into Emotion-LLaMA batches (right padding; labels only on the answer and ``</s>``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from peft_mose.layout import collate_rows
from mosear_recipes.emotion_llama.projectors import FEATURE_KEYS
from mosear_recipes.emotion_llama.prompt import PromptEncoder

from .dataset import MERRSample


class MERRCollator:
    """Turns :class:`~mosear_recipes.merr.dataset.MERRSample` lists into batches for ``EmotionLlama``.

    Keys: ``input_ids``, ``attention_mask``, ``modality_ids``, ``labels`` (only with ``with_answer``), the stacked
    features ``eva_patch``, ``eva_cls``, ``face``, ``video``, ``audio``, and the lists ``names`` and ``tasks``.
    Without ``with_answer`` the rows are prompts only (for generation).
    """

    def __init__(self, encoder: PromptEncoder, with_answer: bool = True) -> None:
        self.encoder = encoder
        self.with_answer = with_answer

    def __call__(self, samples: Sequence[MERRSample]) -> dict[str, torch.Tensor | list[str]]:
        for sample in samples:
            if sample.eva_patch.shape[0] != self.encoder.n_patch_tokens:
                raise ValueError(
                    f"Sample {sample.name!r} has {sample.eva_patch.shape[0]} EVA patch tokens; the prompt layout "
                    f"expects {self.encoder.n_patch_tokens}."
                )
        rows = [
            self.encoder.encode(s.subtitle, s.task, s.instruction, s.answer if self.with_answer else None)
            for s in samples
        ]
        for sample, row in zip(samples, rows):
            if row.labels is not None and len(row.labels) != len(row.input_ids):
                raise ValueError(
                    f"Sample {sample.name!r} (task {sample.task}): its labels have {len(row.labels)} tokens, its input "
                    f"{len(row.input_ids)}: a sample needs one label per token (-100 where there is none)."
                )
        batch: dict[str, torch.Tensor | list[str]] = dict(
            collate_rows(rows, self.encoder.tokenizer.pad_token_id, "right", with_labels=self.with_answer)
        )
        for field in FEATURE_KEYS:
            batch[field] = torch.stack([getattr(s, field) for s in samples])
        batch["names"] = [s.name for s in samples]
        batch["tasks"] = [s.task for s in samples]
        return batch
