"""MoSE on quantized bases (docs/quantization.md): bitsandbytes 4-bit (NF4, FP4, double quant) and 8-bit, torchao
int8 and int4 weight-only, bf16 and fp16 compute. Attach, train only MoSE, save/load, merge refused, AR and cached
generate; the bitsandbytes CPU repacking that silently stops training, reproduced with plain PEFT LoRA."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torchao.quantization import Int4WeightOnlyConfig
from transformers import AutoModelForCausalLM, TorchAoConfig

from conftest import layout, make_tiny_llama, random_tokens
from peft_mose import Modality, MoSEConfig
from peft_mose.attention import attention_reallocation
from quantized_models import QUANTIZATIONS, load_quantized, quantized_data

CONFIG = dict(r=8, n_experts=2, eps=0.3, lora_dropout=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a user's checkpoint, quantized by each test on load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    return path


def mose_on(checkpoint, quantization: str, dtype: torch.dtype = torch.bfloat16, **overrides):
    return get_peft_model(load_quantized(checkpoint, quantization, dtype), MoSEConfig(**{**CONFIG, **overrides}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("quantization", sorted(QUANTIZATIONS))
def test_only_mose_trains_and_the_loss_falls(checkpoint, quantization, dtype):
    model = mose_on(checkpoint, quantization, dtype, init_weights=False).train()
    frozen = quantized_data(model)
    mose_params = {n for n, p in model.named_parameters() if ".mose_" in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == mose_params
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in mose_params)
    ids, mods = random_tokens(), layout()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(input_ids=ids, labels=ids, modality_ids=mods)
        assert out.logits.dtype == dtype
        out.loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().amax() > 0}
        assert with_grad == mose_params  # every MoSE tensor, nothing else
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3
    assert torch.equal(quantized_data(model), frozen)


@pytest.mark.parametrize("quantization", ["bnb-nf4-double", "bnb-int8", "torchao-int8"])
def test_save_and_load_give_identical_logits_and_merge_is_refused(checkpoint, tmp_path, quantization):
    model = mose_on(checkpoint, quantization, init_weights=False).eval()
    ids, mods = random_tokens(), layout()
    with torch.no_grad():
        before = model(input_ids=ids, modality_ids=mods).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_quantized(checkpoint, quantization, torch.bfloat16), tmp_path).eval()
    with torch.no_grad():
        after = loaded(input_ids=ids, modality_ids=mods).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=ids).logits
    assert torch.equal(after, before) and not torch.equal(base, after)  # the adapter loaded, and it acts
    with pytest.raises(ValueError, match="cannot be merged"):
        loaded.merge_and_unload()


@pytest.mark.parametrize("quantization", ["bnb-nf4", "bnb-int8"])
def test_generate_under_ar_equals_a_manual_greedy_loop(checkpoint, quantization):
    """Cached ``generate`` under AR gives the tokens of a loop of uncached forwards over prompt + answer, with the
    generated tokens marked ANSWER; AR changes the scores."""
    model = mose_on(checkpoint, quantization, init_weights=False).eval()
    ids, mods = random_tokens(seq=20), layout(seq=20)
    steps = 5
    with torch.no_grad():
        plain = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=steps, do_sample=False,
                               output_scores=True, return_dict_in_generate=True)
        with attention_reallocation(model, tau=0.0):
            out = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=steps, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
            seq = ids
            for _ in range(steps):
                answer = torch.full((2, seq.shape[1] - ids.shape[1]), int(Modality.ANSWER))
                logits = model(input_ids=seq, modality_ids=torch.cat([mods, answer], dim=1)).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    assert any((a - b).abs().amax() > 1e-3 for a, b in zip(out.scores, plain.scores))


def test_unsupported_layer_types_are_refused_naming_the_layer():
    """A quantized layer that is not a ``nn.Linear`` (GPTQ/AWQ/HQQ kernels) gets an error naming it and what works."""

    class PackedLinear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qweight = torch.nn.Parameter(torch.zeros(8, 2, dtype=torch.int32), requires_grad=False)

    model = make_tiny_llama()
    model.model.layers[0].self_attn.q_proj = PackedLinear()
    with pytest.raises(ValueError, match=r"PackedLinear at 'model\.layers\.0\.self_attn\.q_proj'.*bitsandbytes"):
        get_peft_model(model, MoSEConfig(**CONFIG))


def test_torchao_int4_weight_only_has_no_cpu_kernels(checkpoint):
    """torchao 0.18's ``Int4WeightOnlyConfig`` quantizes with CUDA kernels (mslk or tinygemm) only, so a CPU load
    fails in transformers; ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` is the CPU int4 path (above). If this
    starts to pass, the CPU path works and docs/quantization.md should say so."""
    config = TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"))
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=torch.bfloat16,
                                             device_map="cpu")


def _lora_losses(model, ids: torch.Tensor, steps: int = 3) -> tuple[list[float], float]:
    """Losses of ``steps`` AdamW steps and the largest gradient any trainable tensor received."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, largest = [], 0.0
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad.abs().amax().item() for p in model.parameters() if p.grad is not None]
        largest = max([largest, *grads])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, largest


def test_a_no_grad_eval_forward_stops_4bit_training_on_avx512_bf16_cpus(checkpoint):
    """The upstream trap, with plain PEFT LoRA (bitsandbytes 0.50.2, peft 0.21.2).

    Cause: on a CPU with AVX512-BF16, ``bnb.nn.Linear4bit.forward`` in eval mode with an input that does not require
    grad (any forward under ``torch.no_grad()`` after ``model.eval()``: a validation or probe forward) repacks the
    layer's weight in place into a CPU inference layout (``weight.quant_state.packing_format_for_cpu = True``) and
    keeps it. From then on ``bnb.matmul_4bit`` calls the custom op ``bitsandbytes::gemv_4bit``, which has no autograd
    kernel: torch warns once and backpropagates nothing through it (no gradient, not even zeros). Every path from an
    adapter to the loss crosses a 4-bit o_proj/down_proj, so no adapter receives a gradient, AdamW changes nothing,
    the loss stays flat. Only saving the base's state dict or moving it to CUDA unpacks the weight. Setting
    ``support_avx512bf16_for_cpu = False`` on every Linear4bit before the first eval forward avoids it.
    On a CPU without AVX512-BF16 (or on CUDA) nothing is repacked and training goes on.
    """
    ids = random_tokens()
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    base = load_quantized(checkpoint, "bnb-nf4", torch.float32)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    untouched = copy.deepcopy(base)

    trapped = get_peft_model(base, config)
    with torch.no_grad():
        trapped.eval()(input_ids=ids)
    repacks = bnb.functional.has_avx512bf16()
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) == repacks for m in layers)
    losses, largest = _lora_losses(trapped, ids)
    if repacks:
        assert largest == 0.0 and len(set(losses)) == 1  # the trap: no gradient, flat loss, no error
    else:
        assert largest > 0 and losses[-1] < losses[0]

    for module in untouched.modules():  # the way around it
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    avoided = get_peft_model(untouched, config)
    with torch.no_grad():
        avoided.eval()(input_ids=ids)
    losses, largest = _lora_losses(avoided, ids)
    assert largest > 0 and losses[-1] < losses[0]
