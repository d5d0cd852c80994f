"""The per-call modality context: one per call, read by every layer and AR, closed whatever happens, nothing
carried into the next call except through the KV cache the caller passes back."""

from __future__ import annotations

import copy
import math
import pickle
import threading

import pytest
import torch
from peft import get_peft_model

from conftest import cache_of, layout, make_tiny_llama, random_tokens
from peft_mose import Modality, MoSEConfig, MoSELayer
from peft_mose.attention import attention_reallocation
from peft_mose import CallKind, ForwardPositions, ModalityContext
from peft_mose.layer import RoutingMemo

CFG = dict(r=8, n_experts=2, eps=0.3, init_weights=False, lora_dropout=0.0)
GEN = dict(max_new_tokens=5, do_sample=False)


@pytest.fixture
def mose(llama):
    return get_peft_model(llama, MoSEConfig(**CFG)).eval()


def test_a_second_call_in_an_ar_block_does_not_reuse_the_first_calls_lambda(mose):
    """Defect 2 of the modality-context issue: the router weight of one call leaked into the next."""
    x1, x2 = random_tokens(seed=1), random_tokens(seed=2)
    with torch.no_grad():
        alone = mose(input_ids=x2).logits
        with attention_reallocation(mose, tau=math.inf):
            mose(input_ids=x1, modality_ids=layout())
            second = mose(input_ids=x2).logits
    assert torch.equal(second, alone)


def test_no_context_stays_open_after_a_call_even_when_it_fails(mose):
    mose(input_ids=random_tokens(), modality_ids=layout())
    assert mose.base_model.scope.open_context() is None
    with pytest.raises(ValueError, match="call covers 16 positions"):
        mose(input_ids=random_tokens(), modality_ids=layout()[:, :10])
    with pytest.raises(RuntimeError, match="boom"):
        with attention_reallocation(mose, tau=0.0):
            mose.generate(input_ids=random_tokens(), modality_ids=layout(), max_new_tokens=1,
                          logits_processor=[_Boom()])
    assert mose.base_model.scope.open_context() is None
    base = mose.get_base_model()
    assert not base._forward_pre_hooks and not base._forward_hooks


def test_compiled_code_reads_the_same_context_from_the_scopes_mirror(mose, monkeypatch):
    """Under torch.compile the layers read the scope's mirror of its open context (Dynamo cannot trace
    ContextVar.get): with every lookup forced onto the mirror, a forward, a generate (prefill and decode steps) and
    a gated AR call give what the ContextVar path gives, and no mirror outlives its call, even a failed one."""
    ids, mods, scope = random_tokens(), layout(), mose.base_model.scope
    labels = dict(gate="conflict", gate_labels=(10, 20, 30))

    def run():
        with torch.no_grad():
            logits = mose(input_ids=ids, modality_ids=mods).logits
            tokens = mose.generate(input_ids=ids, modality_ids=mods, **GEN)
            with attention_reallocation(mose, tau=0.0, **labels):
                gated = mose.generate(input_ids=ids, modality_ids=mods, **GEN)
        return logits, tokens, gated

    expected = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = run()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert scope._compiled_view is None
    with pytest.raises(ValueError, match="call covers 16 positions"):
        mose(input_ids=ids, modality_ids=mods[:, :10])
    assert scope._compiled_view is None


class _Boom:
    def __call__(self, input_ids, scores):
        raise RuntimeError("boom")


def test_the_prompts_lambda_lives_in_the_context_and_routing_stats_report_it(mose):
    ids, mods = random_tokens(), layout()
    seen = []

    def spy(module, args, output):
        seen.append(dict(mose.base_model.scope.open_context().memos.get(RoutingMemo).router_weights))

    handle = next(m for m in mose.modules() if isinstance(m, MoSELayer)).register_forward_hook(spy)
    mose.generate(input_ids=ids, modality_ids=mods, **GEN)
    handle.remove()
    first, last = seen[1], seen[-1]  # seen[0] is taken in the prefill, after the first layer only
    assert len(seen) == GEN["max_new_tokens"] and first.keys() == last.keys() and len(first) == 4
    assert all(torch.equal(first[k], last[k]) for k in first)  # decode steps reuse the prefill's lambda
    stats = mose.base_model.routing_stats()
    assert all(torch.equal(stats[layer]["lambda"], last[(layer, "default")]) for layer, _ in last)


def test_two_models_never_share_a_context(llama):
    one = get_peft_model(copy.deepcopy(llama), MoSEConfig(**CFG)).eval()
    torch.manual_seed(5)
    two = get_peft_model(copy.deepcopy(llama), MoSEConfig(**CFG)).eval()
    ids, mods = random_tokens(), layout()
    expected = two(input_ids=ids).logits

    class Nested(torch.nn.Module):  # one's forward calls two inside it: two must see its own (empty) context
        def forward(self, module, args, kwargs, output):
            self.inner = two(input_ids=ids).logits

    nested = Nested()
    handle = one.get_base_model().register_forward_hook(nested, with_kwargs=True)
    one(input_ids=ids, modality_ids=mods)
    handle.remove()
    assert torch.equal(nested.inner, expected)


def test_threads_have_their_own_calls(mose):
    ids, mods = random_tokens(), layout()
    expected = {"text": mose(input_ids=ids).logits, "mods": mose(input_ids=ids, modality_ids=mods).logits}
    results, barrier = {}, threading.Barrier(2)

    def run(name):
        barrier.wait()
        for _ in range(5):
            kwargs = {"modality_ids": mods} if name == "mods" else {}
            results[name] = mose(input_ids=ids, **kwargs).logits

    threads = [threading.Thread(target=run, args=(name,)) for name in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[k], expected[k]) for k in expected)


def test_copies_and_pickles_start_with_no_calls_behind_them(mose):
    ids, mods = random_tokens(), layout()
    out = mose(input_ids=ids, modality_ids=mods, use_cache=True)
    clone = pickle.loads(pickle.dumps(mose))
    assert clone.base_model.routing_stats() == {}
    with pytest.raises(ValueError, match="whose prompt did not run through this MoSE model"):
        clone(input_ids=ids[:, :1], **cache_of(out))
    assert torch.equal(clone(input_ids=ids, modality_ids=mods).logits, out.logits)


def test_a_decode_step_without_ids_continues_the_prompt_that_filled_the_cache(mose):
    ids, mods = random_tokens(), layout()
    out = mose(input_ids=ids, modality_ids=mods, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    step = mose(input_ids=nxt, **cache_of(out)).logits[:, -1]
    full = torch.cat([mods, torch.full((2, 1), int(Modality.ANSWER))], 1)
    expected = mose(input_ids=torch.cat([ids, nxt], 1), modality_ids=full).logits[:, -1]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    text_only = mose(input_ids=torch.cat([ids, nxt], 1)).logits[:, -1]
    assert (step - text_only).abs().amax() > 1e-4  # the prompt's visual/audio layout was kept, not all text


def test_ids_on_the_meta_device_are_refused(mose):
    with pytest.raises(ValueError, match="meta device"):
        mose(input_ids=random_tokens(), modality_ids=layout().to("meta"))


def test_static_cache_generation_equals_dynamic(mose):
    ids, mods = random_tokens(), layout()
    dynamic = mose.generate(input_ids=ids, modality_ids=mods, **GEN)
    static = mose.generate(input_ids=ids, modality_ids=mods, cache_implementation="static", **GEN)
    assert torch.equal(static, dynamic)
    with attention_reallocation(mose, tau=0.0):
        ar_dynamic = mose.generate(input_ids=ids, modality_ids=mods, **GEN)
        ar_static = mose.generate(input_ids=ids, modality_ids=mods, cache_implementation="static", **GEN)
    assert torch.equal(ar_static, ar_dynamic)


def test_plain_generate_under_ar_is_one_call_with_or_without_cache():
    model = make_tiny_llama()
    ids, mods = random_tokens(), layout()
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        cached = model.generate(input_ids=ids, **GEN)
        uncached = model.generate(input_ids=ids, use_cache=False, **GEN)
    assert torch.equal(cached, uncached)
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("options", [dict(n_experts=2), dict(n_experts=1), dict(n_experts=2, answer_modality="omni")],
                         ids=["nonvisual+omni", "one_B", "omni_only"])
def test_the_decode_path_equals_the_general_path_for_outputs_and_gradients(llama, options):
    """A decode step (new tokens all answer tokens, known from the cache) takes the uniform path; in float64 it
    gives the general grouped path's output and gradients."""
    model = get_peft_model(llama.double(), MoSEConfig(r=4, eps=0.3, init_weights=False, lora_dropout=0.0, **options))
    layer = next(m for m in model.modules() if isinstance(m, MoSELayer))
    scope, key = model.base_model.scope, (layer.layer_name, "default")
    prompt = layout(seq=6)
    ids = torch.cat([prompt, torch.full((2, 1), int(Modality.ANSWER))], 1)
    x = torch.randn(2, 1, layer.in_features, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3, 0.7], dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]

    def run(uniform):
        valid = torch.ones_like(ids, dtype=torch.bool)
        positions = ForwardPositions(ids, valid, past_length=6, new_length=1,
                                     uniform=Modality.ANSWER if uniform else None)
        context = ModalityContext(CallKind.GENERATE, prompt, needs_grad=True, forward=positions, past_length=6)
        routing = context.memos.get(RoutingMemo)
        routing.router_weights[key] = lam
        with scope._opened(context):
            out = layer(x)
        assert (routing.uniform_plans.get(key) is not None) == uniform
        return out, torch.autograd.grad(out.square().sum(), [x, *params], allow_unused=True)

    (fast, fast_grads), (general, general_grads) = run(True), run(False)
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-12)
    for a, b, p in zip(fast_grads, general_grads, [x, *params]):  # None: no gradient reaches it (a zero one)
        a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_static_cache_generation_equals_dynamic_on_a_left_padded_batch(mose):
    """A static cache's forwards get a 4-D mask: the prompt's padding comes from generate's own 2-D mask."""
    ids, mods = random_tokens(), layout()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    run = dict(input_ids=ids, attention_mask=mask, modality_ids=mods, output_scores=True, return_dict_in_generate=True)
    dynamic = mose.generate(**run, **GEN)
    static = mose.generate(**run, cache_implementation="static", **GEN)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), rtol=0, atol=1e-5)


def test_routing_statistics_of_a_padded_sample_are_those_of_the_sample_alone(mose):
    """The first layer's inputs do not depend on position, so its gates and lambda for a left-padded sample are the
    sample's own: padding is in neither the experts' mean gates nor the router's pool."""
    ids, mods = random_tokens(), layout()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    first = next(m for m in mose.modules() if isinstance(m, MoSELayer)).layer_name
    with torch.no_grad():
        mose(input_ids=ids, attention_mask=mask, modality_ids=mods)
        padded = mose.base_model.routing_stats()[first]
        mose(input_ids=ids[1:, 3:], modality_ids=mods[1:, 3:])
        alone = mose.base_model.routing_stats()[first]
    torch.testing.assert_close(padded["expert_weights"][1], alone["expert_weights"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(padded["lambda"][1], alone["lambda"][0], rtol=0, atol=1e-6)


def test_chunked_prefill_is_refused(mose):
    with pytest.raises(ValueError, match=r"prefill_chunk_size=4\) is not supported"):
        mose.generate(input_ids=random_tokens(), modality_ids=layout(), prefill_chunk_size=4, **GEN)


def test_a_forward_under_ar_refuses_prompt_ids_of_another_batch():
    model = make_tiny_llama()
    with attention_reallocation(model, layout(batch=2), tau=0.0):
        with pytest.raises(ValueError, match="batch size 2 but the model was called with batch size 4"):
            model(input_ids=random_tokens(batch=4))
