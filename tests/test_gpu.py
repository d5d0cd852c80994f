"""On CUDA (marked ``gpu``; skipped without it, run by benchmarks/gpu.sh): MoSE with a bf16 base under SDPA, and on
bitsandbytes and torchao quantized bases (torchao's Int4WeightOnlyConfig has CUDA kernels only)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torchao.quantization import Int4WeightOnlyConfig
from transformers import AutoModelForCausalLM, TorchAoConfig

from conftest import layout, make_tiny_llama, random_tokens
from peft_mose import MoSEConfig
from quantized_models import load_quantized

pytestmark = pytest.mark.gpu
CONFIG = dict(r=8, n_experts=2, eps=0.3, lora_dropout=0.0, init_weights=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    return path


def trains(model) -> None:
    """Three AdamW steps on CUDA: only MoSE gets gradients, the loss falls."""
    model.train()
    ids, mods = random_tokens().cuda(), layout().cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, modality_ids=mods).loss
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == {
            n for n, p in model.named_parameters() if ".mose_" in n}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_base_with_sdpa_trains_and_generates_with_cache_as_without():
    base = make_tiny_llama(attn_implementation="sdpa").to("cuda", torch.bfloat16)
    model = get_peft_model(base, MoSEConfig(**CONFIG))
    trains(model)
    ids, mods = random_tokens().cuda(), layout().cuda()
    with torch.no_grad():
        model.eval()
        cached = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=5, do_sample=False)
        uncached = model.generate(input_ids=ids, modality_ids=mods, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("quantization", ["bnb-nf4-double", "bnb-fp4-double", "bnb-int8", "torchao-int8"])
def test_quantized_base_trains_and_round_trips(checkpoint, tmp_path, quantization):
    model = get_peft_model(load_quantized(checkpoint, quantization, torch.bfloat16, "cuda"), MoSEConfig(**CONFIG))
    trains(model)
    ids, mods = random_tokens().cuda(), layout().cuda()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, modality_ids=mods).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load_quantized(checkpoint, quantization, torch.bfloat16, "cuda"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, modality_ids=mods).logits, before)


def test_torchao_int4_weight_only_base_runs_but_cannot_backpropagate(checkpoint):
    """torchao's int4 matmul (``aten::_weight_int4pack_mm``) has no derivative, so no adapter (LoRA's neither) trains
    through an int4 base; seen on an H200 with torch 2.11 and torchao 0.18. Inference works."""
    config = TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"))
    base = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=torch.bfloat16,
                                                device_map="cuda")
    model = get_peft_model(base, MoSEConfig(**CONFIG))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=random_tokens().cuda(), modality_ids=layout().cuda()).logits).all()
    with pytest.raises(RuntimeError, match="derivative for aten::_weight_int4pack_mm is not implemented"):
        trains(model)
