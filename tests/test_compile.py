"""torch.compile (inductor, CPU) on a tiny MoSE model: forward, train step and decode steps give eager's results.

The graph breaks of prefills and training (the modality-id check and the data-dependent token grouping) are
documented in docs/performance.md; a decode step has none. These tests check that compiling works, with a dynamic and
a static cache, and changes no result.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from conftest import cache_of, layout, random_tokens
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


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_compiled_decode_steps_equal_eager(models, cache):
    eager, compiled = models
    ids, mods = random_tokens(), layout()
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, **cache)
    with torch.no_grad():
        expected = eager.generate(input_ids=ids, modality_ids=mods, **kwargs)
        got = compiled.generate(input_ids=ids, modality_ids=mods, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_decode_step_compiles_into_one_graph(models):
    """Past the prompt a decode step is all answer tokens: with the context read from the scope's mirror, the whole
    forward (every MoSE layer's uniform path) traces without a graph break (``fullgraph=True`` raises on one), for
    the step that makes the per-call plans and for the steps that reuse them, and gives eager's logits."""
    eager, _ = models
    # transformers' forwards share one decorator's code object, whose recompile budget the other tests used up
    torch.compiler.reset()
    fullgraph = copy.deepcopy(eager)
    inner = fullgraph.get_base_model()
    ids, mods = random_tokens(), layout()
    token = torch.full((ids.shape[0], 1), 5)
    steps = []
    with torch.no_grad():
        for model in (eager, fullgraph):
            cache = cache_of(model(input_ids=ids, modality_ids=mods, use_cache=True))  # the prefill, eager
            if model is fullgraph:
                inner.forward = torch.compile(inner.forward, fullgraph=True)
            steps.append([model(input_ids=token, **cache, use_cache=True).logits for _ in range(3)])
    for got, expected in zip(steps[1], steps[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
