"""Quantized tiny Llamas loaded the way a user loads a quantized base: ``from_pretrained`` of a saved checkpoint with
a transformers quantization config (bitsandbytes or torchao)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
from torchao.quantization.granularity import PerGroup
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

QUANTIZATIONS: dict[str, Callable[[torch.dtype], object]] = {
    "bnb-nf4": lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=dtype),
    "bnb-nf4-double": lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
    "bnb-fp4-double": lambda dtype: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
    "bnb-int8": lambda dtype: BitsAndBytesConfig(load_in_8bit=True),
    "torchao-int8": lambda dtype: TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
    # int4 values (stored one per int8 on CPU): torchao's Int4WeightOnlyConfig has CUDA kernels only
    "torchao-int4": lambda dtype: TorchAoConfig(
        quant_type=IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    ),
}


def load_quantized(path: Path, quantization: str, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint at ``path`` quantized on load, non-quantized weights and compute in ``dtype``."""
    config = QUANTIZATIONS[quantization](dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype, device_map=device)
    model.generation_config.pad_token_id = 0
    return model.eval()


def quantized_data(model: torch.nn.Module) -> torch.Tensor:
    """A copy of the stored integers of the first decoder layer's q_proj weight (bitsandbytes packs them in the
    weight's data, torchao's weight subclasses in ``qdata``)."""
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    return getattr(weight, "qdata", weight.data).detach().clone()
