"""MoSE as a PEFT citizen: save/load, several adapters, disable/unload, dtypes, meta device, checkpointing."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import layout, make_tiny_llama, random_tokens, tiny_llama_config
from expert_paths import expert_path
from peft_mose import MoSEConfig, MoSELayer
from peft_mose._compat.transformers import enable_activation_checkpointing

CFG = dict(r=8, n_experts=2, eps=0.2, init_weights=False, lora_dropout=0.0)


def logits(model, ids=None, mods=None):
    ids = random_tokens() if ids is None else ids
    mods = layout() if mods is None else mods
    with torch.no_grad():
        return model(input_ids=ids, modality_ids=mods).logits


def test_the_documented_call_wraps_llama_q_and_v(llama):
    model = get_peft_model(llama, MoSEConfig(r=64, n_experts=2, eps=0.1))
    assert isinstance(model, PeftModelForCausalLM)
    names = sorted(m.layer_name for m in model.modules() if isinstance(m, MoSELayer))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert model.peft_config["default"].peft_type == "MOSE"


def test_trainable_parameter_count_and_print(llama, capsys):
    model = get_peft_model(llama, MoSEConfig(r=8, n_experts=2, router_hidden_size=3))
    d, kv = 64, 32  # q_proj 64->64, v_proj 64->32 (GQA)
    per = lambda out: 3 * 8 * d + out * 3 * 2 * 8 + 3 * 2 * d + (3 * 2 * d + 3) + (3 + 1)  # noqa: E731
    expected = 2 * (per(d) + per(kv))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_save_and_load_give_bit_identical_logits(llama, tmp_path):
    base = copy.deepcopy(llama)
    model = get_peft_model(llama, MoSEConfig(**CFG)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj."
    assert saved[key + "mose_A"].shape == (3, 8, 64)
    assert saved[key + "mose_B"].shape == (64, 3, 2, 8)
    assert saved[key + "mose_gate"].shape == (3, 2, 64)
    assert saved[key + "mose_router.in_weight"].shape == (2, 128)
    assert not any("default" in k for k in saved)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_auto_peft_model_loads_base_from_local_path(tmp_path):
    base = make_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, MoSEConfig(**CFG)).eval()
    model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(logits(auto), logits(model))


def test_several_adapters_load_set_and_delete(llama, tmp_path):
    base = copy.deepcopy(llama)
    first = get_peft_model(copy.deepcopy(llama), MoSEConfig(**CFG)).eval()
    torch.manual_seed(1)
    second = get_peft_model(copy.deepcopy(llama), MoSEConfig(**{**CFG, "n_experts": 3})).eval()
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.eval()
    assert torch.equal(logits(model), logits(first))
    model.set_adapter("b")
    assert torch.equal(logits(model), logits(second))
    assert set(model.base_model.routing_stats("b")) == {m.layer_name for m in model.modules() if isinstance(m, MoSELayer)}
    assert model.base_model.routing_stats("a") == {}  # the last call ran "b" only
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    assert not any("b" in m.mose_A for m in model.modules() if isinstance(m, MoSELayer))
    assert torch.equal(logits(model), logits(first))


def test_disable_adapter_gives_base_outputs_and_unload_returns_clean_base(llama):
    base_logits = logits(llama)
    model = get_peft_model(llama, MoSEConfig(**CFG)).eval()
    assert not torch.equal(logits(model), base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model), base_logits)
    clean = model.unload()
    assert not any(isinstance(m, MoSELayer) for m in clean.modules())
    assert not clean._forward_pre_hooks and not clean._forward_hooks
    assert torch.equal(clean(input_ids=random_tokens()).logits, base_logits)


@pytest.mark.parametrize("call", ["merge_and_unload", "merge_adapter"])
def test_merging_is_refused_with_an_explanation(llama, call):
    model = get_peft_model(llama, MoSEConfig(**CFG))
    with pytest.raises(ValueError, match="cannot be merged.*per-sample"):
        getattr(model, call)()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, MoSELayer)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters(dtype, grouped):
    model = get_peft_model(make_tiny_llama().to(dtype), MoSEConfig(**CFG))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.mose_A["default"].dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype
    with expert_path(grouped):
        out = logits(model.eval())
        model.train()
        model(input_ids=random_tokens(), modality_ids=layout(), labels=random_tokens()).loss.backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert layer.mose_A["default"].grad.dtype == torch.float32 and torch.isfinite(layer.mose_A["default"].grad).all()


def test_meta_device_model_can_be_wrapped_and_run():
    with torch.device("meta"):
        base = LlamaForCausalLM(tiny_llama_config())
    model = get_peft_model(base, MoSEConfig(r=8))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.mose_A["default"].is_meta and layer.mose_router["default"].in_weight.is_meta
    assert model.get_nb_trainable_parameters()[0] > 0
    out = model(input_ids=torch.zeros(2, 16, dtype=torch.long, device="meta")).logits  # shapes only, no data
    assert out.is_meta and out.shape == (2, 16, tiny_llama_config().vocab_size)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "every_expert"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_identical_gradients(llama, reentrant, grouped):
    ids, mods = random_tokens(), layout()

    def grads(checkpointing):
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(llama), MoSEConfig(**CFG))
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=reentrant)
            model.enable_input_require_grads()
        model.train()
        with expert_path(grouped):
            model(input_ids=ids, modality_ids=mods, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 4 * 7
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)



@pytest.mark.slow
def test_zero3_partitioned_parameters_train_like_plain():
    """DeepSpeed ZeRO-3 gathers every parameter by hooks around forward and backward; the experts keep no reference
    to parameter data across calls, so loss, gradients and the step equal training without DeepSpeed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    script = Path(__file__).with_name("zero3_mose_step.py")
    done = subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-5000:]

def test_gpt2_conv1d_gets_its_architecture_defaults():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)).eval()
    model = get_peft_model(gpt2, MoSEConfig(**CFG)).eval()
    layers = [m for m in model.modules() if isinstance(m, MoSELayer)]
    assert [m.layer_name for m in layers] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert isinstance(layers[0].base_layer, Conv1D) and (layers[0].in_features, layers[0].out_features) == (32, 96)
    out = model.generate(input_ids=random_tokens(), modality_ids=layout(), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 19)


def test_loading_without_import_names_the_missing_import(tmp_path, llama):
    get_peft_model(llama, MoSEConfig(**CFG)).save_pretrained(tmp_path)
    code = (
        "import sys; from peft import PeftConfig\n"
        f"try:\n    PeftConfig.from_pretrained({str(tmp_path)!r})\n"
        "except KeyError as e:\n    print('KeyError', e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "MOSE" in done.stdout


def test_layers_to_transform_and_exclude_modules_select_targets(llama):
    only_second = get_peft_model(copy.deepcopy(llama), MoSEConfig(r=4, layers_to_transform=[1], layers_pattern="layers"))
    assert sorted(m.layer_name for m in only_second.modules() if isinstance(m, MoSELayer)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    no_v = get_peft_model(llama, MoSEConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]))
    assert all(m.layer_name.endswith("q_proj") for m in no_v.modules() if isinstance(m, MoSELayer))


def test_modules_to_save_are_trained_saved_and_loaded(llama, tmp_path):
    base = copy.deepcopy(llama)
    model = get_peft_model(llama, MoSEConfig(**CFG, modules_to_save=["lm_head"])).eval()
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    assert model.base_model.model.lm_head.modules_to_save["default"].weight.requires_grad
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
