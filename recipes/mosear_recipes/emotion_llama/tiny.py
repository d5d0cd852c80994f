"""A tiny random Llama and a word-level tokenizer, written to a folder that ``--model_name_or_path`` can load."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .model import EMOTION_LLAMA_PAD_TOKEN

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": EMOTION_LLAMA_PAD_TOKEN}


def build_tiny_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer whose vocabulary is every word and punctuation run of ``corpus``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2) -> LlamaConfig:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) sized to ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_tiny_model(
    out_dir: str | Path, corpus: Iterable[str], hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> Path:
    """Write a random tiny Llama (safetensors) and its tokenizer to ``out_dir``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(corpus)
    config = tiny_llama_config(tokenizer, hidden_size, num_layers)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
