"""Attention reallocation inside a tiny random Llama (SDPA and eager, GQA): against a float64 eager reference,
tau=inf equality, KV cache, padding, beams, PAI, layer selection, restore on exit and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from conftest import VOCAB, make_tiny_llama
from peft_mose import Modality
from peft_mose.attention import attention_reallocation, reallocate_attention
from peft_mose.attention.backend import _ACTIVE

GEN = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)


def make_batch(lengths=(14, 10, 12), side="left", seed=0):
    """Prompts of different lengths, padded: text, a visual block, one audio token, two text tokens each."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    mods = torch.full_like(ids, int(Modality.TEXT))
    for b, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        span = slice(start, start + n)
        ids[b, span] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[b, span] = 1
        row = torch.full((n,), int(Modality.TEXT))
        row[2 : n - 3] = int(Modality.VISUAL)
        row[n - 3] = int(Modality.AUDIO)
        mods[b, span] = row
    return ids, mask, mods


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    llama = make_tiny_llama()
    llama.set_attn_implementation(request.param)
    return llama


def reference_logits(model, ids, mask, mods, transform, layers, rows="response", **call):
    """Logits with every attention computed by a plain float64 eager loop that applies ``transform(scores, weights,
    visual, audio)`` (returning new weights) to the chosen rows of the chosen layers; ``call`` goes to the model."""
    valid = mask.bool()
    visual = valid & (mods == int(Modality.VISUAL))
    audio = valid & (mods == int(Modality.AUDIO))
    positions = torch.arange(ids.shape[1])
    last = torch.where(valid, positions, -1).amax(1, keepdim=True)
    chosen = valid if rows == "all" else positions == last
    allowed = (positions[None, :, None] >= positions[None, None, :]) & valid[:, None, :]

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
        scores = (query.double() @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[:, None], -math.inf)
        weights = torch.softmax(scores, -1).nan_to_num(0.0)
        if module.layer_idx in layers:
            new = transform(scores, weights, visual, audio).double()
            weights = torch.where(chosen[:, None, :, None], new, weights)
        return (weights @ v).transpose(1, 2).to(query.dtype), None

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = target.config._attn_implementation
    AttentionInterface.register("ar_reference", attention)
    AttentionMaskInterface.register("ar_reference", sdpa_mask)
    target.set_attn_implementation("ar_reference")
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, **call).logits
    finally:
        target.set_attn_implementation(previous)


def ar_transform(tau):
    return lambda scores, weights, visual, audio: reallocate_attention(weights.float(), visual, audio, tau)


def pai_logits_transform(alpha):
    def transform(scores, weights, visual, audio):
        boosted = torch.where(visual[:, None, None, :] & torch.isfinite(scores), scores + alpha * scores.abs(), scores)
        return torch.softmax(boosted, -1).nan_to_num(0.0)

    return transform


def pai_weights_transform(alpha):
    def transform(scores, weights, visual, audio):
        boosted = weights * torch.where(visual[:, None, None, :], 1 + alpha, 1.0)
        return boosted / boosted.sum(-1, keepdim=True).clamp_min(1e-300) * weights.sum(-1, keepdim=True)

    return transform


def logits_with(model, ids, mask, mods, **options):
    with torch.no_grad(), attention_reallocation(model, mods, **options):
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("rows", ["response", "all"])
def test_ar_matches_a_float64_eager_reference(model, side, rows):
    ids, mask, mods = make_batch(side=side)
    valid = mask.bool()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    out = logits_with(model, ids, mask, mods, tau=0.0, rows=rows)
    expected = reference_logits(model, ids, mask, mods, ar_transform(0.0), layers={0, 1}, rows=rows)
    torch.testing.assert_close(out[valid], expected[valid].float(), atol=2e-5, rtol=1e-4)
    assert (out[valid] - base[valid]).abs().amax() > 1e-4  # AR did change something
    if rows == "response":  # the other prompt rows keep the base model's output bit for bit
        last = torch.where(valid, torch.arange(ids.shape[1]), -1).amax(1, keepdim=True)
        others = valid & (torch.arange(ids.shape[1]) != last)
        assert torch.equal(out[others], base[others])


@pytest.mark.parametrize(
    "pai_mode, transform", [("logits", pai_logits_transform(0.5)), ("weights", pai_weights_transform(0.5))]
)
def test_pai_on_one_layer_matches_the_reference_and_spares_the_others(model, pai_mode, transform):
    ids, mask, mods = make_batch(side="right")
    valid = mask.bool()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with attention_reallocation(model, mods, strategy="pai", alpha=0.5, pai_mode=pai_mode, layers=[1]):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = reference_logits(model, ids, mask, mods, transform, layers={1})
    torch.testing.assert_close(out.logits[valid], expected[valid].float(), atol=2e-5, rtol=1e-4)
    assert torch.equal(out.hidden_states[1], base.hidden_states[1])  # layer 0 untouched
    assert (out.logits[valid] - base.logits[valid]).abs().amax() > 1e-4


def test_tau_inf_is_exactly_the_model_without_ar(model):
    ids, mask, mods = make_batch()
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
        base = model.generate(ids, attention_mask=mask, **GEN)
        with attention_reallocation(model, mods, tau=math.inf):
            logits = model(input_ids=ids, attention_mask=mask).logits
            out = model.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(logits, base_logits)
    assert torch.equal(out.sequences, base.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, base.scores))


def test_generation_with_kv_cache_equals_generation_without(model):
    ids, mask, mods = make_batch()
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        cached = model.generate(ids, attention_mask=mask, **GEN)
        uncached = model.generate(ids, attention_mask=mask, use_cache=False, **GEN)
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **GEN)
    base = model.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, static.sequences)
    for a, b, c in zip(cached.scores, uncached.scores, static.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert any((a - b).abs().amax() > 1e-4 for a, b in zip(cached.scores, base.scores))


@pytest.mark.parametrize("beams", [1, 3])
def test_a_sample_does_not_depend_on_the_rest_of_the_batch(model, beams):
    lengths = (14, 10, 12)
    ids, mask, mods = make_batch(lengths)
    options = dict(GEN, num_beams=beams, num_return_sequences=min(beams, 2))
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        batched = model.generate(ids, attention_mask=mask, **options)
    per_sample = len(batched.sequences) // len(lengths)
    for b, n in enumerate(lengths):
        alone = slice(ids.shape[1] - n, None)
        with torch.no_grad(), attention_reallocation(model, mods[b : b + 1, alone], tau=0.0):
            single = model.generate(ids[b : b + 1, alone], **options)
        mine = batched.sequences[b * per_sample : (b + 1) * per_sample, ids.shape[1] :]
        assert torch.equal(mine, single.sequences[:, n:])
        if beams == 1:
            for step_batched, step_single in zip(batched.scores, single.scores):
                torch.testing.assert_close(step_batched[b : b + 1], step_single, atol=1e-4, rtol=1e-4)


def test_beam_search_with_tau_inf_equals_the_base_model(model):
    ids, mask, mods = make_batch()
    options = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        base = model.generate(ids, attention_mask=mask, **options)
        with attention_reallocation(model, mods, tau=math.inf):
            out = model.generate(ids, attention_mask=mask, **options)
    assert torch.equal(out, base)


def test_generation_from_inputs_embeds_equals_generation_from_input_ids(model):
    ids, mask, mods = make_batch()
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        from_ids = model.generate(ids, attention_mask=mask, **GEN)
        from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, **GEN)
    assert torch.equal(from_ids.sequences[:, ids.shape[1] :], from_embeds.sequences)
    for a, b in zip(from_ids.scores, from_embeds.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_plain_model_takes_its_ids_from_the_block_only(model):
    ids, mask, mods = make_batch()
    with pytest.raises(ValueError, match="needs `modality_ids`"), attention_reallocation(model, tau=0.0):
        pass
    with pytest.raises(ValueError, match="not used by the model"), attention_reallocation(model, mods, tau=0.0):
        generate_kwargs = {"modality_ids": mods}  # generate knows no such keyword: there is no second way in
        model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs, **GEN)


def test_a_forward_longer_than_the_block_ids_is_refused(model):
    ids, mask, mods = make_batch()
    longer = torch.cat([ids, ids[:, :2]], 1)
    with torch.no_grad(), attention_reallocation(model, mods, tau=0.0):
        with pytest.raises(ValueError, match="describes a prompt of"):
            model(input_ids=longer)
        with pytest.raises(ValueError, match="has length 14 but the inputs have sequence length 16"):
            model.generate(input_ids=longer, **GEN)


def test_eager_returns_the_reallocated_weights():
    model = make_tiny_llama()
    model.set_attn_implementation("eager")
    ids, mask, mods = make_batch(side="right")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
        with attention_reallocation(model, mods, tau=0.0):
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    valid = mask.bool()
    visual, audio = valid & (mods == int(Modality.VISUAL)), valid & (mods == int(Modality.AUDIO))
    last = torch.where(valid, torch.arange(ids.shape[1]), -1).amax(1)
    for b in range(len(ids)):
        row = last[b]
        expected = reallocate_attention(base[b : b + 1, :, row : row + 1], visual[b : b + 1], audio[b : b + 1], 0.0)
        torch.testing.assert_close(out[b : b + 1, :, row : row + 1], expected)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[last[0]] = False
    assert torch.equal(out[0, :, others], base[0, :, others])
    assert not torch.equal(out, base)


def test_bfloat16_model_stays_finite_and_close_to_float32():
    model = make_tiny_llama()
    ids, mask, mods = make_batch()
    expected = logits_with(model, ids, mask, mods, tau=0.0)
    out = logits_with(model.to(torch.bfloat16), ids, mask, mods, tau=0.0)
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all()
    torch.testing.assert_close(out[valid].float(), expected[valid], atol=0.05, rtol=0.05)


def test_previous_implementation_and_hooks_are_restored_on_exit_and_on_error(model):
    ids, mask, mods = make_batch()
    previous = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    with attention_reallocation(model, mods, tau=0.0):
        assert model.config._attn_implementation == "mosear_" + previous
        assert model._forward_pre_hooks and model._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with attention_reallocation(model, mods, tau=0.0):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == previous
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(m in _ACTIVE for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_nested_blocks_restore_the_outer_settings(model):
    ids, mask, mods = make_batch()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), attention_reallocation(model, mods, tau=math.inf):
        inner = logits_with(model, ids, mask, mods, tau=0.0)
        outer = model(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation.startswith("mosear_")
    assert torch.equal(outer, base) and not torch.equal(inner, base)
    assert model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(strategy="foo"), "Unknown strategy 'foo'"),
        (dict(tau=math.nan), "tau"),
        (dict(layers=[0, 2]), "Layer index 2 is out of range"),
        (dict(layers=[]), "empty"),
        (dict(layers=["1"]), "layer indices"),
        (dict(rows="prompt"), "Unknown rows"),
        (dict(strategy="pai", pai_mode="softmax"), "Unknown pai_mode"),
        (dict(strategy="pai", alpha=-1.0), "alpha"),
        (dict(strategy="pai", tau=0.5), r"tau does not apply to strategy='pai'"),
        (dict(alpha=0.2, pai_mode="weights"), r"alpha and pai_mode do not apply to strategy='ar'"),
        (dict(strategy="ar+gate", alpha=0.2), r"alpha does not apply to strategy='ar'"),
        (dict(modality_ids=torch.zeros(2, 3)), "integer tensor"),
    ],
)
def test_bad_arguments_raise_value_errors(options, message):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=message):
        with attention_reallocation(model, **options):
            pass
    assert model.config._attn_implementation == "sdpa" and not model._forward_pre_hooks


def test_attention_dropout_in_training_mode_is_refused():
    model = make_tiny_llama(attention_dropout=0.1).train()
    ids, mask, mods = make_batch()
    with pytest.raises(ValueError, match="inference-time"), attention_reallocation(model, mods, tau=0.0):
        model(input_ids=ids, attention_mask=mask)


def test_unsupported_models_and_mismatched_ids_raise_value_errors():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="PreTrainedModel"):
        with attention_reallocation(torch.nn.Linear(2, 2)):
            pass
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="'flex_attention'"):
        with attention_reallocation(model, make_batch()[2]):
            pass
    model.set_attn_implementation("sdpa")
    ids, mask, mods = make_batch()
    with pytest.raises(ValueError, match="modality_ids"), attention_reallocation(model, mods[:, :-1]):
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == "sdpa"


FLOAT64_CASES = {  # options, and the reference's transform of the float64 weights (computed in float64)
    "ar": (dict(tau=0.0), lambda scores, weights, visual, audio: reallocate_attention(weights, visual, audio, 0.0)),
    "pai": (dict(strategy="pai", alpha=0.5), pai_logits_transform(0.5)),
}


@pytest.mark.parametrize("strategy", sorted(FLOAT64_CASES))
def test_a_float64_model_is_reallocated_in_float64(model, strategy):
    model.double()
    # right padding: transformers' float64 eager mask turns fully masked (left) padding rows into NaN values
    ids, mask, mods = make_batch(side="right")
    valid = mask.bool()
    options, transform = FLOAT64_CASES[strategy]
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    # every row explicit: transformers' eager attention takes its softmax in float32 even for a float64 model
    out = logits_with(model, ids, mask, mods, rows="all", **options)
    expected = reference_logits(model, ids, mask, mods, transform, layers={0, 1}, rows="all")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[valid], expected[valid], atol=1e-12, rtol=0)
    assert (out[valid] - base[valid]).abs().amax() > 1e-4
