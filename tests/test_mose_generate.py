"""modality_ids through forward and generate on a tiny Llama: cache, beams, sampling, padding, embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from conftest import cache_of, layout, random_tokens
from expert_paths import expert_path
from mose_reference import reference_lambda
from peft_mose import Modality, MoSEConfig, MoSELayer

GEN = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture(params=[True, False], ids=["grouped", "every_expert"])
def mose(llama, request):
    """The tiny MoSE Llama, with the tokens grouped by expert and with every expert on every token."""
    with expert_path(request.param):
        yield get_peft_model(llama, MoSEConfig(r=8, n_experts=2, eps=0.3, init_weights=False, lora_dropout=0.0)).eval()


def mose_layers(model):
    return [m for m in model.modules() if isinstance(m, MoSELayer)]


def test_forward_reaches_every_layer_with_the_papers_lambda(mose):
    ids, mods = random_tokens(), layout()
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.__setitem__(mod.layer_name, inp[0]))
             for m in mose_layers(mose)]
    mose(input_ids=ids, modality_ids=mods)
    for h in hooks:
        h.remove()
    stats = mose.base_model.routing_stats()
    assert set(stats) == set(captured) and len(stats) == 4  # q_proj and v_proj of 2 layers
    for layer in mose_layers(mose):
        expected = reference_lambda(layer, "default", captured[layer.layer_name], mods, torch.ones_like(mods).bool())
        torch.testing.assert_close(stats[layer.layer_name]["lambda"].double(), torch.tensor(expected).double())


@pytest.mark.parametrize("use_embeds", [False, True])
def test_greedy_generation_with_cache_equals_without(mose, use_embeds):
    ids, mods = random_tokens(), layout()
    inputs = {"inputs_embeds": mose.get_input_embeddings()(ids)} if use_embeds else {"input_ids": ids}
    am = torch.ones_like(ids)
    cached = mose.generate(**inputs, attention_mask=am, modality_ids=mods, **GEN)
    uncached = mose.generate(**inputs, attention_mask=am, modality_ids=mods, use_cache=False, **GEN)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == (0 if use_embeds else ids.shape[1]) + GEN["max_new_tokens"]


def test_generation_reuses_the_prompt_lambda_and_matches_teacher_forcing(mose):
    """Each generated token equals the argmax of a forward over prompt + generated tokens marked ANSWER."""
    ids, mods = random_tokens(), layout()
    out = mose.generate(input_ids=ids, attention_mask=torch.ones_like(ids), modality_ids=mods, **GEN)
    decode_lambda = {k: v["lambda"] for k, v in mose.base_model.routing_stats().items()}
    mose(input_ids=ids, modality_ids=mods)
    prompt_lambda = {k: v["lambda"] for k, v in mose.base_model.routing_stats().items()}
    for name in prompt_lambda:
        torch.testing.assert_close(decode_lambda[name], prompt_lambda[name])
    full_mods = torch.cat([mods, torch.full((2, GEN["max_new_tokens"]), int(Modality.ANSWER))], dim=1)
    logits = mose(input_ids=out, modality_ids=full_mods).logits
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), out[:, ids.shape[1] :])


def test_answer_tokens_do_not_change_lambda(mose):
    ids, mods = random_tokens(seq=20), layout(seq=20)
    mods[:, 14:] = int(Modality.ANSWER)
    mose(input_ids=ids, modality_ids=mods)
    first = {k: v["lambda"] for k, v in mose.base_model.routing_stats().items()}
    ids2 = ids.clone()
    ids2[:, 14:] = random_tokens(seq=6, seed=5)
    mose(input_ids=ids2, modality_ids=mods)
    for k, v in mose.base_model.routing_stats().items():
        torch.testing.assert_close(v["lambda"], first[k])


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_beams=3, num_return_sequences=2, do_sample=False), dict(do_sample=True, num_return_sequences=3, top_k=5)],
    ids=["beams", "sampling"],
)
def test_beams_and_sampling_expand_modality_ids_per_sample(mose, kwargs):
    ids, mods = random_tokens(), layout()
    mods[1, 2:8] = int(Modality.TEXT)  # the second sample has no visual tokens: per-sample lambda must differ
    torch.manual_seed(0)
    out = mose.generate(input_ids=ids, attention_mask=torch.ones_like(ids), modality_ids=mods, max_new_tokens=4, **kwargs)
    assert out.shape[0] == 2 * kwargs["num_return_sequences"]
    lam = next(iter(mose.base_model.routing_stats().values()))["lambda"]
    per_sample = lam.view(2, -1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))
    assert not torch.equal(per_sample[0], per_sample[1])


def test_left_padded_batch_generates_like_each_sample_alone(mose):
    ids, mods = random_tokens(seq=12), layout(seq=12)
    short_ids, short_mods = ids[1:, 3:], mods[1:, 3:]
    padded_ids = ids.clone()
    padded_ids[1, :3] = 0
    am = torch.ones_like(ids)
    am[1, :3] = 0
    batch = mose.generate(input_ids=padded_ids, attention_mask=am, modality_ids=mods, **GEN)
    alone = mose.generate(input_ids=short_ids, attention_mask=torch.ones_like(short_ids), modality_ids=short_mods, **GEN)
    first = mose.generate(input_ids=ids[:1], attention_mask=am[:1], modality_ids=mods[:1], **GEN)
    assert torch.equal(batch[1, 12:], alone[0, 9:])
    assert torch.equal(batch[0], first[0])


def test_right_padded_forward_matches_each_sample_alone(mose):
    ids, mods = random_tokens(seq=12), layout(seq=12)
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    batch = mose(input_ids=ids, attention_mask=am, modality_ids=mods).logits
    alone = mose(input_ids=ids[1:, :9], modality_ids=mods[1:, :9]).logits
    torch.testing.assert_close(batch[1, :9], alone[0], rtol=1e-5, atol=1e-5)


def test_without_modality_ids_every_token_is_text_and_nothing_leaks(mose):
    ids, mods = random_tokens(), layout()
    text = mose(input_ids=ids, modality_ids=torch.zeros_like(mods)).logits
    mose(input_ids=ids, modality_ids=mods)
    after = mose(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert torch.equal(after, text)
    gen_text = mose.generate(input_ids=ids, modality_ids=torch.zeros_like(mods), **GEN)
    mose.generate(input_ids=ids, modality_ids=mods, **GEN)
    assert torch.equal(mose.generate(input_ids=ids, **GEN), gen_text)


def test_manual_decoding_with_a_cache_reuses_the_prompt_lambda(mose):
    ids, mods = random_tokens(), layout()
    out = mose(input_ids=ids, modality_ids=mods, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    full_mods = torch.cat([mods, torch.full((2, 1), int(Modality.ANSWER))], dim=1)
    step = mose(input_ids=nxt, **cache_of(out), modality_ids=full_mods).logits
    whole = mose(input_ids=torch.cat([ids, nxt], 1), modality_ids=full_mods).logits
    torch.testing.assert_close(step[:, -1], whole[:, -1], rtol=1e-5, atol=1e-5)
    # the cache remembers its prompt: the ids of the cached positions may be left out
    again = mose(input_ids=nxt, **cache_of(mose(input_ids=ids, modality_ids=mods, use_cache=True))).logits
    torch.testing.assert_close(again[:, -1], whole[:, -1], rtol=1e-5, atol=1e-5)


def test_deepcopy_keeps_its_own_context_scope(mose):
    ids, mods = random_tokens(), layout()
    clone = copy.deepcopy(mose)
    a = mose(input_ids=ids, modality_ids=mods).logits
    b = clone(input_ids=ids, modality_ids=mods).logits
    assert torch.equal(a, b)
    clone_layers = mose_layers(clone)
    assert all(layer.scope is clone.base_model.scope for layer in clone_layers)
    assert clone.base_model.scope is not mose.base_model.scope
    assert clone.base_model.routing_stats().keys() == mose.base_model.routing_stats().keys()
