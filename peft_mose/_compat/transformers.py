"""How a transformers model call is read: its token input, its KV cache, the cache it returns.

Only public types are used (``transformers.Cache``, ``ModelOutput``); the keyword names are not relied on: the cache
travelled as ``past_key_values=`` up to 5.23 and as ``cache=`` from 5.24 (``past_key_values`` is then a deprecated
alias resolved inside forward, after module pre-hooks have run), so it is found by type under any keyword.
``config._attn_implementation`` is read for the implementation a model runs (:func:`attn_implementation`).
``cache_position`` is not used: Llama's forward no longer receives it from 5.4. Checked on transformers 5.4.0,
5.10.4, 5.15.1, 5.20.2, 5.23.0 and 5.24.0 (``tools/compat.sh``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Cache

INPUT_KEYWORDS = ("input_ids", "inputs_embeds")


def call_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The token input of a model call: ``input_ids``, else ``inputs_embeds``, else a positional integer tensor
    (token ids); ``None`` for other modules' inputs (e.g. an MLP's ``X``)."""
    for name in INPUT_KEYWORDS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    first = args[0] if args else None
    is_ids = isinstance(first, torch.Tensor) and not (first.is_floating_point() or first.is_complex())
    return first if is_ids else None


def call_cache(kwargs: Mapping[str, Any]) -> Cache | None:
    """The KV cache a model call receives, whatever its keyword (``cache`` from 5.24, ``past_key_values`` before)."""
    for value in kwargs.values():
        if isinstance(value, Cache):
            return value
    return None


def cached_length(cache: Cache | None) -> int:
    """Positions already in ``cache`` (0 for no cache or an empty one, which is how a prefill looks)."""
    return 0 if cache is None else int(cache.get_seq_length())


def output_cache(output: Any) -> Cache | None:
    """The cache a model call returns (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, Cache):
                return value
    return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its cache by, for callers that pass one back (``cache`` from 5.24)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def enable_activation_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> None:
    """Activation checkpointing on ``model`` under either name: ``activation_checkpointing_enable`` from 5.23,
    ``gradient_checkpointing_enable`` (with ``gradient_checkpointing_kwargs``) before."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation ``model`` runs (``config._attn_implementation``: what ``set_attn_implementation``
    sets and the attention registry is looked up by; transformers has no public getter for it)."""
    return model.config._attn_implementation


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether ``model``'s attention modules call the function registered for ``config._attn_implementation``
    (``AttentionInterface``), i.e. whether ``set_attn_implementation`` reaches them. transformers' own test,
    ``PreTrainedModel._can_set_attn_implementation`` (a classmethod reading the modeling file's source; Bloom, and
    Falcon before 5.25, which compute attention inside their modules, fail it), is private; checked on 5.4.0, 5.24.0
    and 5.25.0."""
    return bool(type(model)._can_set_attn_implementation())
