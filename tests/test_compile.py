"""torch.compile (inductor, CPU) on a tiny MoSE model: forward, train step and decode steps give eager's results.

The graph breaks are documented in docs/performance.md (the per-call context lookup, the modality-id check and the
data-dependent token grouping of prefills); this test checks that compiling works and changes no result.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from conftest import layout, random_tokens
from peft_mose import MoSEConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(_llama_template):
    torch.manual_seed(0)
    eager = get_peft_model(copy.deepcopy(_llama_template), MoSEConfig(r=4, n_experts=2, eps=0.3, init_weights=False,
                                                                      lora_dropout=0.0))
    compiled = copy.deepcopy(eager)
    inner = compiled.get_base_model()
    inner.forward = torch.compile(inner.forward)
    return eager, compiled


def test_compiled_forward_and_train_step_equal_eager(models):
    eager, compiled = models
    ids, mods = random_tokens(), layout()
    grads = []
    for model in (eager, compiled):
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, modality_ids=mods, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        model.eval()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)


def test_compiled_decode_steps_equal_eager(models):
    eager, compiled = models
    ids, mods = random_tokens(), layout()
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = eager.generate(input_ids=ids, modality_ids=mods, **kwargs)
        got = compiled.generate(input_ids=ids, modality_ids=mods, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
