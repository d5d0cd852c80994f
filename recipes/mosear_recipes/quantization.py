"""A quantized frozen LLM for the recipes: bitsandbytes 4-bit NF4 or 8-bit, prepared for training adapters on it.

``--quantization 4bit`` loads the LLM as QLoRA does (NF4, double quantization, bf16 compute); ``8bit`` as LLM.int8.
The adapters (MoSE) and projectors stay in float32. docs/quantization.md says what is supported and measured.
"""

from __future__ import annotations

import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("none", "4bit", "8bit")


def quantization_config(quantization: str) -> BitsAndBytesConfig | None:
    """The ``from_pretrained`` quantization of ``--quantization`` (``None`` for ``none``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}.")
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else None


def prepare_for_training(llm: torch.nn.Module) -> torch.nn.Module:
    """PEFT's ``prepare_model_for_kbit_training`` (norms in float32, input gradients on), and bitsandbytes' 4-bit
    layers kept out of their CPU inference layout, which has no backward (docs/quantization.md, "The no_grad trap")."""
    llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    for module in llm.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return llm
