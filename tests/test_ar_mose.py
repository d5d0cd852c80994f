"""Attention reallocation on a MoSE-wrapped PEFT model: modality_ids from the block or from the MoSE call,
reference equality, tau=inf, KV cache, restore on exit, and the plot command with a saved MoSE adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model

from conftest import make_tiny_llama
from peft_mose import MoSEConfig
from peft_mose.attention import attention_reallocation, collect_diagnostics
from peft_mose.attention.plot import main as plot_main
from test_ar_backend import GEN, ar_transform, make_batch, reference_logits


def make_mose():
    config = MoSEConfig(r=8, n_experts=2, eps=0.3, init_weights=False, lora_dropout=0.0)
    return get_peft_model(make_tiny_llama(), config).eval()


@pytest.fixture
def mose():
    return make_mose()


def test_ar_on_mose_matches_the_reference(mose):
    ids, mask, mods = make_batch(side="right")
    valid = mask.bool()
    with torch.no_grad():
        base = mose(input_ids=ids, attention_mask=mask, modality_ids=mods).logits
        with attention_reallocation(mose, tau=0.0):
            out = mose(input_ids=ids, attention_mask=mask, modality_ids=mods).logits
    expected = reference_logits(mose, ids, mask, mods, ar_transform(0.0), layers={0, 1}, modality_ids=mods)
    torch.testing.assert_close(out[valid], expected[valid].float(), atol=2e-5, rtol=1e-4)
    assert (out[valid] - base[valid]).abs().amax() > 1e-4


def test_ar_on_mose_generate_with_and_without_cache(mose):
    ids, mask, mods = make_batch()
    with torch.no_grad():
        base = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, **GEN)
        with attention_reallocation(mose, tau=math.inf):
            same = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, **GEN)
        with attention_reallocation(mose, tau=0.0):
            from_call = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, **GEN)
            uncached = mose.generate(input_ids=ids, attention_mask=mask, modality_ids=mods, use_cache=False, **GEN)
        with pytest.raises(ValueError, match="pass `modality_ids` to its forward or generate"):
            with attention_reallocation(mose, mods, tau=0.0):
                pass
    assert torch.equal(same.sequences, base.sequences)
    assert all(torch.equal(a, b) for a, b in zip(same.scores, base.scores))
    assert torch.equal(from_call.sequences, uncached.sequences)
    for a, c in zip(from_call.scores, uncached.scores):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert any((a - b).abs().amax() > 1e-4 for a, b in zip(from_call.scores, base.scores))


def test_exit_restores_attention_and_leaves_no_hooks(mose):
    base_model = mose.get_base_model()
    with pytest.raises(RuntimeError, match="boom"):
        with attention_reallocation(mose, tau=0.0):
            assert base_model.config._attn_implementation == "mosear_sdpa"
            raise RuntimeError("boom")
    assert base_model.config._attn_implementation == "sdpa"
    assert not base_model._forward_pre_hooks and not base_model._forward_hooks


def test_plot_command_loads_a_mose_adapter(tmp_path, mose):
    make_tiny_llama().save_pretrained(tmp_path / "base")  # the same weights mose wraps
    mose.save_pretrained(tmp_path / "adapter")
    ids, mask, mods = make_batch()
    torch.save({"input_ids": ids, "attention_mask": mask, "modality_ids": mods}, tmp_path / "batch.pt")
    args = [str(tmp_path / "base"), str(tmp_path / "batch.pt"), "--out", str(tmp_path / "plots"), "--tau", "0"]
    paths = plot_main(args + ["--adapter", str(tmp_path / "adapter")])
    assert (tmp_path / "plots" / "uap_per_layer.png") in paths
    written = json.loads((tmp_path / "plots" / "diagnostics.json").read_text())
    expected = collect_diagnostics(mose, mods, input_ids=ids, attention_mask=mask, tau=0.0)
    for layer in written["layers"]:
        assert layer["uap_audio"] == pytest.approx(expected.layers[layer["layer"]].uap_audio.tolist(), abs=1e-6)
