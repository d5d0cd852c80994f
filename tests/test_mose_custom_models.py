"""MoSE on any nn.Module, in the spirit of PEFT's own custom-model tests: plain MLP and Conv1D models called with
their own keywords and 2-D inputs, ``task_type=None``. Without modality ids every token is text."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_mose import MoSEConfig, MoSELayer


class MLP(nn.Module):
    """Called as ``model(X=...)`` with ``[batch, features]`` inputs, like PEFT's test MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(X))).log_softmax(-1)


class ConvStack(nn.Module):
    """transformers ``Conv1D`` layers over ``[batch, seq, features]`` and any leading shape."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(24, 12)
        self.c_proj = Conv1D(12, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_fc(x)))


CASES = {
    "mlp": (MLP, ["lin0", "lin1"], lambda: {"X": torch.randn(4, 10)}),
    "conv1d_3d": (ConvStack, ["c_fc", "c_proj"], lambda: {"x": torch.randn(2, 5, 12)}),
    "conv1d_4d": (ConvStack, ["c_fc"], lambda: {"x": torch.randn(2, 3, 5, 12)}),
}


def build(case: str, seed: int = 0, **config):
    cls, targets, inputs = CASES[case]
    torch.manual_seed(seed)
    base = cls().eval()
    options = dict(r=4, n_experts=2, eps=0.2, target_modules=targets, task_type=None, **config)
    return base, get_peft_model(copy.deepcopy(base), MoSEConfig(**options)).eval(), inputs


def output(model, inputs):
    torch.manual_seed(0)
    return model(**inputs())


@pytest.mark.parametrize("case", CASES)
def test_forward_at_init_equals_the_base_and_is_a_plain_peft_model(case):
    base, model, inputs = build(case)
    assert type(model) is PeftModel
    assert torch.equal(output(model, inputs), output(base, inputs))


@pytest.mark.parametrize("case", CASES)
def test_training_changes_the_adapter_and_the_output(case):
    base, model, inputs = build(case)
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        output(model, inputs).float().square().mean().backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before if "mose_B" in k)
    model.eval()
    assert not torch.allclose(output(model, inputs), output(base, inputs))


@pytest.mark.parametrize("case", CASES)
def test_save_load_disable_and_unload(case, tmp_path):
    base, model, inputs = build(case, init_weights=False)
    expected = output(model, inputs)
    assert not torch.allclose(expected, output(base, inputs))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(output(loaded, inputs), expected)
    with loaded.disable_adapter():
        assert torch.equal(output(loaded, inputs), output(base, inputs))
    clean = loaded.unload()
    assert not any(isinstance(m, MoSELayer) for m in clean.modules())
    assert torch.equal(output(clean, inputs), output(base, inputs))


def test_several_adapters_and_delete():
    base, model, inputs = build("mlp", init_weights=False)
    first = output(model, inputs)
    model.add_adapter("other", MoSEConfig(r=2, n_experts=3, target_modules=["lin0"], task_type=None,
                                          init_weights=False))
    model.set_adapter("other")
    other = output(model, inputs)
    assert not torch.equal(other, first)
    model.set_adapter("default")
    assert torch.equal(output(model, inputs), first)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in m.mose_A for m in model.modules() if isinstance(m, MoSELayer))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype):
    _, model, inputs = build("conv1d_3d", init_weights=False)
    x = inputs()["x"]
    expected = model(x=x)
    half = model.to(dtype)(x=x.to(dtype))
    assert half.dtype == dtype and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), expected, atol=0.05, rtol=0.05)


def test_without_ids_lambda_comes_from_the_text_mean_of_each_sample():
    _, model, _ = build("mlp", init_weights=False)
    layer = model.base_model.model.lin0
    x = torch.randn(4, 10)
    router = layer.mose_router["default"]
    expected = 0.5 + 0.2 * torch.tanh(router(torch.cat([torch.zeros_like(x), x], -1)).squeeze(-1))
    with model.base_model.scope.layer_call(torch.zeros(4, 1, dtype=torch.long)):
        in_context = layer(x[:, None])
    torch.testing.assert_close(model.base_model.routing_stats()["lin0"]["lambda"], expected)
    torch.testing.assert_close(layer(x), in_context[:, 0])  # no context: the same, every token text
