"""Shared fixtures: tiny random models built from configs (no downloads) and multimodal token layouts."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from hypothesis import settings
from transformers import LlamaConfig, LlamaForCausalLM

from peft_mose import Modality
from peft_mose._compat.transformers import cache_keyword, output_cache

CACHE_KEYWORD = cache_keyword(LlamaForCausalLM)


def cache_of(output) -> dict:
    """``{keyword: cache}`` to pass the cache of ``output`` back to the next call, as a user would on this release."""
    return {CACHE_KEYWORD: output_cache(output)}

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60, print_blob=True)
settings.load_profile("ci")

VOCAB = 96


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A Llama with hidden size 64 and 2 layers: large enough for GQA and RoPE, small enough for CPU tests."""
    values = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def _llama_template() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def llama(_llama_template) -> LlamaForCausalLM:
    """A fresh copy of one tiny random Llama (copies are cheap; every test may mutate its own)."""
    return copy.deepcopy(_llama_template)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The recipes' tiny configuration, written once: 60 synthetic MERR samples (48 train, 12 test) and a tiny
    random Llama with its tokenizer."""
    from mosear_recipes.tiny_setup import write_tiny_setup

    return write_tiny_setup(tmp_path_factory.mktemp("tiny"), num_samples=60, seed=0)


def layout(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Modality ids like Emotion-LLaMA's prompt, scaled down: text, a visual block, one audio token, text."""
    ids = torch.full((batch, seq), int(Modality.TEXT), dtype=torch.long)
    ids[:, 2 : seq // 2] = int(Modality.VISUAL)
    ids[:, seq // 2] = int(Modality.AUDIO)
    return ids


def random_tokens(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def free_port() -> int:
    """A free TCP port on localhost, for one launcher run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def extensions_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where DeepSpeed compiles its CPU ops (about a minute, once): pytest's cache, so later sessions reuse them."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = getattr(request.config, "cache", None)
    return str(cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.mktemp("torch_extensions"))


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip where CUDA is not available (benchmarks/gpu.sh runs them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
