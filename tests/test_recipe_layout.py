"""peft_mose.layout: rows from segments, padding, prompt extraction and embedding insertion."""

from __future__ import annotations

import pytest
import torch

from peft_mose import Modality
from peft_mose.layout import (
    IGNORE_INDEX,
    collate_rows,
    encode_segments,
    insert_embeddings,
    pad_rows,
    prompt_only,
)

T, V, A, ANS = int(Modality.TEXT), int(Modality.VISUAL), int(Modality.AUDIO), int(Modality.ANSWER)
PAD = 0


def _rows():
    slots = [("visual", 2), ("audio", 1), ("text", [7])]
    short = encode_segments([("text", [5, 6]), *slots, ("answer", [8, 2])], PAD)
    long = encode_segments([("text", [5, 6, 9]), *slots, ("answer", [8, 8, 2])], PAD)
    return short, long


def test_encode_segments_ids_labels_and_modalities():
    row, _ = _rows()
    assert row.input_ids.tolist() == [5, 6, PAD, PAD, PAD, 7, 8, 2]
    assert row.labels.tolist() == [IGNORE_INDEX] * 6 + [8, 2]
    assert row.modality_ids.tolist() == [T, T, V, V, A, T, ANS, ANS]


@pytest.mark.parametrize(
    "segment, message",
    [(("visual", [1, 2]), "slot count"), (("text", 3), "token ids"), (("audio", -1), "slot count")],
)
def test_encode_segments_rejects_mismatched_content(segment, message):
    with pytest.raises(ValueError, match=message):
        encode_segments([segment], PAD)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_rows_pads_and_masks(side):
    short, long = _rows()
    batch = collate_rows([short, long], PAD, padding_side=side)
    assert batch["input_ids"].shape == (2, 10)
    pad_positions = [0, 1] if side == "left" else [8, 9]
    assert batch["attention_mask"][0].tolist() == [0 if i in pad_positions else 1 for i in range(10)]
    assert batch["attention_mask"][1].all()
    for key, value in [("input_ids", PAD), ("labels", IGNORE_INDEX), ("modality_ids", T)]:
        assert batch[key][0, pad_positions].tolist() == [value, value]
    kept = batch["attention_mask"][0].bool()
    assert batch["labels"][0, kept].tolist() == short.labels.tolist()
    assert batch["modality_ids"][0, kept].tolist() == short.modality_ids.tolist()


def test_pad_rows_rejects_unknown_side():
    with pytest.raises(ValueError, match="padding_side"):
        pad_rows([torch.zeros(2)], 0, "middle")


def test_prompt_only_drops_answer_and_left_pads():
    short, long = _rows()
    batch = collate_rows([short, long], PAD, padding_side="right")
    prompts = prompt_only(batch["input_ids"], batch["attention_mask"], batch["modality_ids"], PAD)
    assert prompts["input_ids"].tolist() == [[PAD, 5, 6, PAD, PAD, PAD, 7], [5, 6, 9, PAD, PAD, PAD, 7]]
    assert prompts["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 1], [1] * 7]
    assert prompts["modality_ids"].tolist() == [[T, T, T, V, V, A, T], [T, T, T, V, V, A, T]]
    again = prompt_only(prompts["input_ids"], prompts["attention_mask"], prompts["modality_ids"], PAD)
    assert all(torch.equal(again[k], prompts[k]) for k in prompts)


def test_insert_embeddings_places_slots_in_order_with_gradients():
    short, long = _rows()
    batch = collate_rows([short, long], PAD)
    text = torch.zeros(2, 10, 3)
    slots = torch.arange(2 * 3 * 3, dtype=torch.float).view(2, 3, 3).requires_grad_()
    out = insert_embeddings(text, batch["modality_ids"], slots)
    assert torch.equal(out[0, 2:5], slots[0].detach()) and torch.equal(out[1, 3:6], slots[1].detach())
    assert out[0, :2].abs().sum() == 0 and out[1, 6:].abs().sum() == 0
    out.sum().backward()
    assert torch.equal(slots.grad, torch.ones_like(slots))


def test_insert_embeddings_rejects_wrong_slot_count():
    short, long = _rows()
    batch = collate_rows([short, long], PAD)
    with pytest.raises(ValueError, match=r"needs 4 VISUAL/AUDIO positions.*\[3, 3\]"):
        insert_embeddings(torch.zeros(2, 10, 3), batch["modality_ids"], torch.zeros(2, 4, 3))
