"""Eq. 2-4: the fast MoSE layer against the loop-by-loop reference, plus the special cases the paper names."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from mose_reference import reference_lambda, reference_output
from peft_mose import Modality, MoSEConfig, MoSELayer

T, V, A, ANS = int(Modality.TEXT), int(Modality.VISUAL), int(Modality.AUDIO), int(Modality.ANSWER)


class Toy(nn.Module):
    """One projection over a token sequence: the smallest model a MoSE layer can sit in."""

    def __init__(self, d_in: int = 24, d_out: int = 20):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, inputs_embeds, attention_mask=None):
        return self.proj(inputs_embeds)


def wrap(config: MoSEConfig, seed: int = 0, **toy):
    torch.manual_seed(seed)
    model = get_peft_model(Toy(**toy), config).eval()
    return model, next(m for m in model.modules() if isinstance(m, MoSELayer))


def cfg(**kw) -> MoSEConfig:
    values = dict(r=4, n_experts=3, eps=0.3, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"], task_type=None,
                  init_weights=False, router_hidden_size=5)
    values.update(kw)
    return MoSEConfig(**values)


LAYOUTS = {
    "complete": [[T, V, V, V, A, T, T], [T, V, A, A, T, T, T]],
    "no_visual_sample": [[T, V, V, A, T, T, T], [T, T, T, A, T, T, T]],
    "no_audio_sample": [[T, V, V, V, T, T, T], [T, V, A, T, T, T, T]],
    "answer_tokens": [[T, V, V, A, T, ANS, ANS], [T, V, V, A, T, T, ANS]],
    "visual_only": [[V, V, V, V, V, V, V], [V, V, V, V, V, V, V]],
}


def run(model, layer, ids, mask=None, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(ids.shape[0], ids.shape[1], layer.in_features).to(dtype)
    return x, model(inputs_embeds=x, attention_mask=mask, modality_ids=ids)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n_experts", [1, 2, 3])
def test_fast_path_matches_reference_fp32(name, n_experts):
    model, layer = wrap(cfg(n_experts=n_experts))
    ids = torch.tensor(LAYOUTS[name])
    x, out = run(model, layer, ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    ref = reference_output(layer, "default", x, ids, valid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    lam = model.base_model.routing_stats()["proj"]["lambda"]
    torch.testing.assert_close(lam.double(), torch.tensor(reference_lambda(layer, "default", x, ids, valid)).double())


def test_padding_is_excluded_from_the_router_and_outputs_match_reference():
    model, layer = wrap(cfg())
    ids = torch.tensor([[T, T, V, V, A, T, T], [T, V, V, A, T, T, T]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    x, out = run(model, layer, ids, mask=mask)
    ref = reference_output(layer, "default", x, ids, mask.bool())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    padded = x.clone()
    padded[mask == 0] = 1e3
    out_changed = model(inputs_embeds=padded, attention_mask=mask, modality_ids=ids)
    torch.testing.assert_close(out_changed[mask.bool()], out[mask.bool()])


@given(data=st.data())
def test_random_layouts_match_reference(data):
    batch = data.draw(st.integers(1, 3))
    seq = data.draw(st.integers(1, 9))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([T, V, A, ANS]), min_size=seq, max_size=seq),
                                          min_size=batch, max_size=batch)))
    mask = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=seq, max_size=seq),
                                           min_size=batch, max_size=batch)))
    nonvisual = data.draw(st.sampled_from([["text", "audio"], ["audio"]]))
    answer = data.draw(st.sampled_from(["text", "omni"]))
    model, layer = wrap(cfg(nonvisual_modalities=nonvisual, answer_modality=answer), seed=data.draw(st.integers(0, 3)))
    x, out = run(model, layer, ids, mask=mask)
    torch.testing.assert_close(out.double(), reference_output(layer, "default", x, ids, mask.bool()),
                               rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_adapter_matches_reference():
    model, layer = wrap(cfg(n_experts=2))
    model.base_model.model.proj.base_layer.to(torch.bfloat16)
    assert layer.mose_A["default"].dtype == torch.float32
    ids = torch.tensor(LAYOUTS["complete"])
    x, out = run(model, layer, ids, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = reference_output(layer, "default", x.float(), ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_eps_zero_gives_lambda_exactly_one_half():
    model, layer = wrap(cfg(eps=0.0))
    run(model, layer, torch.tensor(LAYOUTS["complete"]))
    lam = model.base_model.routing_stats()["proj"]["lambda"]
    assert torch.equal(lam, torch.full_like(lam, 0.5))


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_lambda_stays_within_eps_of_one_half(eps):
    model, layer = wrap(cfg(eps=eps))
    with torch.no_grad():
        layer.mose_router["default"].out_weight.mul_(1e4)
    run(model, layer, torch.tensor(LAYOUTS["complete"]))
    lam = model.base_model.routing_stats()["proj"]["lambda"]
    assert ((lam >= 0.5 - eps) & (lam <= 0.5 + eps)).all()
    assert (lam - 0.5).abs().max() > 0.9 * eps  # saturated router reaches the bound


def test_n1_expert_is_exactly_a_lora():
    """With N = 1 and one expert active, MoSE is PEFT's LoRA with that expert's A and B."""
    torch.manual_seed(0)
    toy = Toy()
    mose = get_peft_model(copy.deepcopy(toy), cfg(n_experts=1)).eval()
    layer = next(m for m in mose.modules() if isinstance(m, MoSELayer))
    lora = get_peft_model(copy.deepcopy(toy), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])).eval()
    lora_layer = lora.base_model.model.proj
    with torch.no_grad():
        lora_layer.lora_A["default"].weight.copy_(layer.mose_A["default"][2])
        lora_layer.lora_B["default"].weight.copy_(layer.mose_B["default"][:, 2, 0, :])
    x = torch.randn(2, 5, 24)
    ids = torch.full((2, 5), A)
    ids_visual_off = cfg(n_experts=1, visual_modalities=["visual"], nonvisual_modalities=["text"])
    mose_omni = get_peft_model(copy.deepcopy(toy), ids_visual_off).eval()
    mose_omni.load_state_dict(mose.state_dict())
    torch.testing.assert_close(mose_omni(inputs_embeds=x, modality_ids=ids), lora(x), rtol=1e-6, atol=1e-6)


def test_init_weights_true_is_the_base_model():
    torch.manual_seed(0)
    toy = Toy()
    model = get_peft_model(copy.deepcopy(toy), cfg(init_weights=True)).eval()
    x = torch.randn(2, 7, 24)
    assert torch.equal(model(inputs_embeds=x, modality_ids=torch.tensor(LAYOUTS["complete"])), toy(x))
    lam = model.base_model.routing_stats()["proj"]["lambda"]
    assert torch.equal(lam, torch.full_like(lam, 0.5))


def test_expert_weight_statistics_are_the_mean_gates_of_each_experts_tokens():
    model, layer = wrap(cfg(n_experts=2))
    ids = torch.tensor([[T, V, V, A, ANS]])
    x, _ = run(model, layer, ids)
    stats = model.base_model.routing_stats()["proj"]["expert_weights"]
    gate = layer.mose_gate["default"]
    probs = torch.softmax(torch.einsum("end,sd->sen", gate, x[0]), dim=-1)
    torch.testing.assert_close(stats[0, 0], probs[[1, 2], 0].mean(0))
    torch.testing.assert_close(stats[0, 1], probs[[0, 3, 4], 1].mean(0))
    torch.testing.assert_close(stats[0, 2], probs[:, 2].mean(0))
    torch.testing.assert_close(stats.sum(-1), torch.ones(1, 3))


def test_gradients_reach_every_adapter_parameter():
    model, layer = wrap(cfg(init_weights=True))
    model.train()
    ids = torch.tensor(LAYOUTS["complete"])
    x = torch.randn(2, 7, 24)
    for _ in range(2):  # B starts at 0, then the router's zero output layer: two steps until every gradient flows
        model(inputs_embeds=x, modality_ids=ids).pow(2).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p -= 0.1 * p.grad
                    p.grad = None
    model(inputs_embeds=x, modality_ids=ids).pow(2).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mose_" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not model.base_model.model.proj.base_layer.weight.requires_grad
