"""Eq. 2-4: the fast MoSE layer against the loop-by-loop reference, plus the special cases the paper names."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from expert_paths import expert_path
from mose_reference import reference_lambda, reference_output, reference_params
from peft_mose import Modality, MoSEConfig, MoSELayer
from peft_mose.experts import EVERY_EXPERT, mose_delta, token_groups

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


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n_experts", [1, 2, 3])
def test_fast_path_matches_reference_fp32(name, n_experts, grouped):
    model, layer = wrap(cfg(n_experts=n_experts))
    ids = torch.tensor(LAYOUTS[name])
    with expert_path(grouped):
        x, out = run(model, layer, ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    ref = reference_output(layer, "default", x, ids, valid)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    lam = model.base_model.routing_stats()["proj"]["lambda"]
    torch.testing.assert_close(lam.double(), torch.tensor(reference_lambda(layer, "default", x, ids, valid)).double())


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
def test_padding_is_excluded_from_the_router_and_outputs_match_reference(grouped):
    model, layer = wrap(cfg())
    ids = torch.tensor([[T, T, V, V, A, T, T], [T, V, V, A, T, T, T]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    with expert_path(grouped):
        x, out = run(model, layer, ids, mask=mask)
        padded = x.clone()
        padded[mask == 0] = 1e3
        out_changed = model(inputs_embeds=padded, attention_mask=mask, modality_ids=ids)
    ref = reference_output(layer, "default", x, ids, mask.bool())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_changed[mask.bool()], out[mask.bool()])


def draw_layout(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality ids and an attention mask ``[batch, seq]``: any mix of text, visual, audio and answer tokens."""
    batch = data.draw(st.integers(1, 3))
    seq = data.draw(st.integers(1, 9))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([T, V, A, ANS]), min_size=seq, max_size=seq),
                                          min_size=batch, max_size=batch)))
    mask = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 1), min_size=seq, max_size=seq),
                                           min_size=batch, max_size=batch)))
    return ids, mask


def draw_config(data, **kw) -> MoSEConfig:
    nonvisual = data.draw(st.sampled_from([["text", "audio"], ["audio"]]))
    return cfg(nonvisual_modalities=nonvisual, answer_modality=data.draw(st.sampled_from(["text", "omni"])), **kw)


@given(data=st.data())
def test_random_layouts_match_reference(data):
    ids, mask = draw_layout(data)
    model, layer = wrap(draw_config(data), seed=data.draw(st.integers(0, 3)))
    with expert_path(data.draw(st.booleans(), label="grouped")):
        x, out = run(model, layer, ids, mask=mask)
    torch.testing.assert_close(out.double(), reference_output(layer, "default", x, ids, mask.bool()),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=30)
@given(data=st.data())
def test_gradients_match_reference_float64(data):
    """Every adapter weight, the router (through lambda) and the input get the reference's gradients, whether the
    tokens are grouped by expert or every token runs every expert. (The router's pooling weights are float32, shared
    by all layers, which limits the agreement of lambda to about 1e-8.)"""
    ids, mask = draw_layout(data)
    model, layer = wrap(draw_config(data, n_experts=data.draw(st.integers(1, 3))), seed=data.draw(st.integers(0, 3)))
    model.double().train()
    x = torch.randn(*ids.shape, layer.in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*ids.shape, layer.out_features, dtype=torch.float64)
    params = reference_params(layer, "default")
    x_ref = x.detach().clone().requires_grad_()
    (reference_output(layer, "default", x_ref, ids, mask.bool(), params) * weight).sum().backward()
    trainable = {name.replace(".default", ""): p for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable.keys() == params.keys() - {"base_layer.weight", "base_layer.bias"}
    for grouped in (True, False):
        with expert_path(grouped):
            out = model(inputs_embeds=x, attention_mask=mask, modality_ids=ids)
        (out * weight).sum().backward()
        for name, p in trainable.items():
            expected = params[name].grad if params[name].grad is not None else torch.zeros_like(p)  # lambda unused
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m, name=name, grouped=grouped: f"{name}, {grouped=}: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, grouped=grouped: f"input, {grouped=}: {m}")
        model.zero_grad(set_to_none=True)
        x.grad = None


@settings(max_examples=25)
@given(
    kinds=st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=6),
    n_experts=st.integers(1, 3),
    grouped=st.booleans(),
)
def test_expert_function_passes_gradcheck(kinds, n_experts, grouped):
    """The custom backward of the experts (recomputing h and z) against finite differences in float64, for tokens
    of each kind (0 visual, 1 non-visual, 2 omni only; groups may be empty) and both execution plans."""
    torch.manual_seed(len(kinds))
    kind = torch.tensor(kinds)
    d_in, d_out, r = 4, 3, 2

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, A, B = leaf(len(kinds), d_in), leaf(3, r, d_in), leaf(d_out, 3, n_experts, r)
    gate = leaf(3, n_experts, d_in) if n_experts > 1 else None
    used = torch.stack([kind == 0, kind == 1, torch.ones_like(kind, dtype=torch.bool)], -1)
    coef = (torch.rand(len(kinds), 3, dtype=torch.float64) * used).requires_grad_()
    groups = token_groups(kind == 0, kind == 1)

    def delta(x, A, B, gate, coef):
        with expert_path(grouped):
            return mose_delta(x, A, B, gate, coef, groups)[0]

    assert torch.autograd.gradcheck(delta, (x, A, B, gate, coef))


@given(kinds=st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=12), shape=st.sampled_from([(12,), (3, 4)]))
def test_token_groups_partition_the_tokens(kinds, shape):
    """Each token lands in exactly one group, the one that runs its experts; empty groups are left out and a group of
    every token gathers nothing."""
    kind = torch.tensor((kinds * 12)[:12]).view(shape)
    groups = token_groups(kind == 0, kind == 1)
    expected = {0: (0, 2), 1: (1, 2), 2: (2,)}
    seen = []
    for rows, experts in groups:
        members = torch.arange(12) if rows is None else rows
        assert members.numel() > 0
        assert all(expected[int(k)] == experts for k in kind.flatten()[members])
        seen.append(members)
    assert sorted(torch.cat(seen).tolist()) == list(range(12))
    assert (groups[0].rows is None) == (len(set(kind.flatten().tolist())) == 1)
    assert token_groups(kind.to("meta") == 0, kind.to("meta") == 1) == EVERY_EXPERT


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
def test_backward_keeps_no_activation_of_the_experts_width(grouped):
    """Counted, not timed: besides the input (which LoRA keeps too) and the parameters, a layer saves a few numbers
    per token for backward (the gates and expert weights), less than one rank-r activation; the experts' h
    [tokens, 3r] and z [tokens, 3Nr] are recomputed."""
    r, n_experts = 16, 2
    model, _ = wrap(cfg(r=r, n_experts=n_experts), d_in=64, d_out=64)
    model.train()
    ids = torch.tensor(LAYOUTS["complete"]).repeat(1, 8)
    x = torch.randn(*ids.shape, 64, requires_grad=True)
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with expert_path(grouped), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=x, modality_ids=ids)
    kept = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in model.parameters()}
    extra = [t for ptr, t in saved.items() if ptr not in kept]
    tokens = ids.numel()
    assert max(t.numel() for t in extra) <= tokens * 3 * n_experts  # the gates; nothing r wide
    assert sum(t.untyped_storage().nbytes() for t in extra) < tokens * r * 4  # the old path kept 3r + 3Nr floats


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
def test_bf16_base_with_fp32_adapter_matches_reference(grouped):
    model, layer = wrap(cfg(n_experts=2))
    model.base_model.model.proj.base_layer.to(torch.bfloat16)
    assert layer.mose_A["default"].dtype == torch.float32
    ids = torch.tensor(LAYOUTS["complete"])
    with expert_path(grouped):
        x, out = run(model, layer, ids, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = reference_output(layer, "default", x.float(), ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
def test_autocast_computes_the_experts_in_bf16(grouped):
    """Under autocast (what mixed-precision trainers use) the experts run in the autocast dtype, like F.linear would,
    and every adapter weight still gets an fp32 gradient."""
    model, layer = wrap(cfg(n_experts=2))
    model.train()
    ids = torch.tensor(LAYOUTS["complete"])
    with expert_path(grouped), torch.autocast("cpu", dtype=torch.bfloat16):
        x, out = run(model, layer, ids)
        out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16
    ref = reference_output(layer, "default", x, ids, torch.ones_like(ids, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name


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
