"""The paper's Table 6 designs as MoSEConfig options, each against the float64 reference loop, outputs and
gradients: (a) MoAE, (b) symmetric LoRAs (an A per B), (c) no router (lambda = 1/2, no router parameters)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import layout, make_tiny_llama, random_tokens
from expert_paths import expert_path
from mose_reference import reference_output, reference_params
from peft_mose import MoSEConfig
from test_mose_equations import ANS, LAYOUTS, A, T, V, cfg, wrap

ABLATIONS = {
    "moae": dict(expert_kind="moae"),
    "symmetric": dict(expert_kind="symmetric"),
    "no_router": dict(router=False),
    "symmetric_no_router": dict(expert_kind="symmetric", router=False),
}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
@pytest.mark.parametrize("n_experts", [1, 3])
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablations_match_the_reference_in_outputs_and_gradients(ablation, n_experts, grouped):
    model, layer = wrap(cfg(n_experts=n_experts, **ABLATIONS[ablation]))
    model.double().train()
    ids = torch.tensor(LAYOUTS["answer_tokens"])
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    x = torch.randn(*ids.shape, layer.in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*ids.shape, layer.out_features, dtype=torch.float64)
    params = reference_params(layer, "default")
    x_ref = x.detach().clone().requires_grad_()
    expected = reference_output(layer, "default", x_ref, ids, mask.bool(), params)
    (expected * weight).sum().backward()
    with expert_path(grouped):
        out = model(inputs_embeds=x, attention_mask=mask, modality_ids=ids)
    # the router pools in float32 (its pooling weights are shared by all layers): lambda agrees to ~1e-8
    tol = dict(rtol=1e-10, atol=1e-10) if "mose_router.in_weight" not in params else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, expected, **tol)
    (out * weight).sum().backward()
    trainable = {name.replace(".default", ""): p for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable.keys() == params.keys() - {"base_layer.weight", "base_layer.bias"}
    for name, p in trainable.items():
        reference = params[name].grad if params[name].grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(p.grad, reference, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_shapes_and_parameters_of_each_design():
    d, r, n = 24, 4, 3
    shapes = {}
    for name, options in {"mose": {}, **ABLATIONS}.items():
        _, layer = wrap(cfg(n_experts=n, **options))
        shapes[name] = {k: tuple(v.shape) for k, v in layer.named_parameters() if ".default" in k}
    assert shapes["mose"]["mose_A.default"] == (3, r, d)
    assert shapes["symmetric"]["mose_A.default"] == (3, n, r, d)
    assert shapes["moae"]["mose_A.default"] == (1, n, r, d) and shapes["moae"]["mose_B.default"] == (20, 1, n, r)
    assert not any("router" in k for k in shapes["moae"]) and not any("router" in k for k in shapes["no_router"])
    assert shapes["no_router"].keys() == {k for k in shapes["mose"] if "router" not in k}


def test_moae_treats_every_modality_alike_and_no_router_is_lambda_one_half():
    model, layer = wrap(cfg(expert_kind="moae"))
    x = torch.randn(2, 7, layer.in_features)
    ids = torch.tensor(LAYOUTS["complete"])
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=x, modality_ids=ids), model(inputs_embeds=x))
    model, layer = wrap(cfg(router=False, eps=0.5))
    with torch.no_grad():
        model(inputs_embeds=x, modality_ids=ids)
    assert torch.equal(model.base_model.routing_stats()["proj"]["lambda"], torch.full((2,), 0.5))


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablations_save_load_and_generate(ablation, llama, tmp_path):
    base_state = {k: v.clone() for k, v in llama.state_dict().items()}
    model = get_peft_model(llama, MoSEConfig(r=4, n_experts=2, init_weights=False, lora_dropout=0.0,
                                             **ABLATIONS[ablation])).eval()
    ids, mods = random_tokens(), layout()
    expected = model(input_ids=ids, modality_ids=mods).logits
    cached = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=4, do_sample=False)
    uncached = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    fresh = make_tiny_llama()
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert torch.equal(loaded(input_ids=ids, modality_ids=mods).logits, expected)
    assert loaded.peft_config["default"].expert_kind == ABLATIONS[ablation].get("expert_kind", "asymmetric")


@pytest.mark.parametrize("text_goes_to", ["visual", "nonvisual"])
def test_answer_tokens_read_as_text_take_whichever_expert_text_takes(text_goes_to):
    """answer_modality='text': an answer token runs the experts a text token runs, also when text is routed to the
    visual expert; only the router's pooling leaves it out."""
    groups = dict(visual_modalities=["visual"], nonvisual_modalities=["audio", "text"])
    if text_goes_to == "visual":
        groups = dict(visual_modalities=["visual", "text"], nonvisual_modalities=["audio"])
    model, layer = wrap(cfg(answer_modality="text", **groups))
    x = torch.randn(1, 4, layer.in_features)
    x[0, 3] = x[0, 2]  # the same vector as a text token (position 2) and as an answer token (position 3)
    with torch.no_grad():
        with_answer = model(inputs_embeds=x, modality_ids=torch.tensor([[V, A, T, ANS]]))
        prompt_only = model(inputs_embeds=x[:, :3], modality_ids=torch.tensor([[V, A, T]]))  # the same lambda
    torch.testing.assert_close(with_answer[0, 3], prompt_only[0, 2], rtol=0, atol=1e-6)
