"""Answers of a (MoSE) thinker to clips, greedily, optionally under attention reallocation, and recognition scores of
a manifest's clips with the existing metrics (by CA-MER subset when the manifest gives subsets)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_mose import attention_reallocation
from peft_mose.metrics import normalize_word

from ..scoring import Reference, ScoringConfig, markdown_table, score, warn_skipped, write_report
from .data import ClipDataset
from .inputs import EncodedClip, OmniEncoder, collate
from .manifest import ClipRecord

logger = logging.getLogger(__name__)


def answer(model: nn.Module, encoder: OmniEncoder, clip: EncodedClip, max_new_tokens: int,
           reallocation: Mapping[str, Any] | None = None) -> tuple[str, list]:  # fmt: skip
    """The greedy answer to ``clip``'s prompt (its target left out) and what :func:`attention_reallocation` yielded
    (empty without ``reallocation``)."""
    n = clip.prompt_length
    prompt = dataclasses.replace(clip, input_ids=clip.input_ids[:n], labels=clip.labels[:n],
                                 modality_ids=clip.modality_ids[:n])  # fmt: skip
    batch = collate([prompt], encoder.tokenizer.pad_token_id)
    batch.pop("labels")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    log: list = []
    with contextlib.ExitStack() as stack:
        if reallocation is not None:
            log.append(stack.enter_context(attention_reallocation(model, **reallocation)))
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=encoder.end_id, pad_token_id=encoder.tokenizer.pad_token_id)  # fmt: skip
    text = encoder.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.strip(), log


def clip_references(records: Sequence[ClipRecord], label_set: Sequence[str]) -> list[Reference]:
    """The reference label of each clip; an error naming the manifest line of a clip without a label or with one
    outside ``label_set`` (checked before training, so a bad evaluation manifest costs no run)."""
    references = []
    for record in records:
        if record.label is None:
            raise ValueError(f"{record.where}: no 'label' to score the answer against.")
        label = normalize_word(record.label)
        if label not in label_set:
            raise ValueError(f"{record.where}: label {record.label!r} is not in the label set {list(label_set)}.")
        references.append(Reference(record.id, label=label, subset=record.subset))
    return references


def evaluate_clips(model: nn.Module, dataset: ClipDataset, scoring: ScoringConfig, max_new_tokens: int, out_dir: Path,
                   is_main: bool = True, reallocation: Mapping[str, Any] | None = None,
                   name: str = "MoSE") -> dict | None:  # fmt: skip
    """Recognition scores (``scoring``: labels and parser) of ``dataset``'s clips (each needs a ``label``), by subset
    when they have one; the report (scores.json, scores.md, per_sample.jsonl, scores.png) written to ``out_dir`` by
    the main process."""
    references = clip_references(dataset.records, scoring.labels)
    model.eval()
    predictions = {record.id: answer(model, dataset.encoder, dataset[i], max_new_tokens, reallocation)[0]
                   for i, record in enumerate(dataset.records)}  # fmt: skip
    if not is_main:
        return None
    result, rows = score(predictions, references, scoring)
    for row in rows:
        row["prediction"] = predictions[row["id"]]
    warn_skipped(rows, "recognition")
    write_report(result, rows, out_dir, name=name)
    logger.info("recognition scores:\n%s", markdown_table([(name, result)]))
    return result
