"""Which layers MoSE adapts: defaults per architecture, and the check that every target sees the token sequence.

MoSE's experts are chosen by the modality of each token of the language model's sequence, so its targets are the
language model's layers (and the output head, which reads the same sequence); a vision or audio encoder, or a
projector, sees no such sequence. The default is the language model's attention query and value projections, fused
where the model fuses them (``qkv_proj``, ``query_key_value``, ``c_attn``): what PEFT's LoRA defaults to and what the
paper trains (Emotion-LLaMA's LoRA on ``q_proj``/``v_proj``). ``target_modules="all-linear"`` takes every linear layer
of the language model instead (attention and MLP, fused ``gate_up_proj`` and MoE experts' shared ``nn.Linear``
layers included). Both resolve to the full names of the chosen layers, filtered by ``layers_to_transform`` and
``exclude_modules`` like a list of names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn
from transformers.pytorch_utils import Conv1D

QUERY_VALUE = (("q_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("c_attn",), ("Wqkv",))
"""Attention's query and value projections, separate or fused, by the names transformers' text models use."""


def language_model_prefix(model: nn.Module) -> str | None:
    """The qualified name of ``model``'s language model decoder (``get_decoder()``; ``""`` if it is the model
    itself), or ``None`` for a model that has none (then every layer is the user's choice)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, nn.Module):
        return None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if decoder is model and text_config is not config:
        # some releases' multimodal classes return themselves (Qwen2.5-Omni's thinker on transformers 5.4): the
        # language model is then the outermost module that holds the text config
        return next((name for name, module in model.named_modules()
                     if name and getattr(module, "config", None) is text_config), "")  # fmt: skip
    return next((name for name, module in model.named_modules() if module is decoder), None)


def default_targets(model: nn.Module, target_modules: str | Iterable[str] | None) -> tuple[set[str], list[str]] | None:
    """For the default (``None``) and ``"all-linear"``: the layer names chosen (``{"q_proj", "v_proj"}``) and the
    full names of the language model's linear layers to pick them from; ``None`` for any other choice (the user's
    targets, checked by :func:`check_targets`)."""
    is_all_linear = isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    if target_modules is not None and not is_all_linear:
        return None
    prefix = language_model_prefix(model)
    if prefix is None:
        raise ValueError(
            f"MoSE has no default targets for {type(model).__name__}, which has no language model decoder "
            "(`get_decoder()`): pass `target_modules`, the linear layers that process the token sequence."
        )
    if is_all_linear:
        layers = _layers(model, prefix, lambda module: isinstance(module, (nn.Linear, Conv1D, BaseTunerLayer)))
        return {name.rsplit(".", 1)[-1] for name in layers}, layers
    # by name, whatever the type: a q_proj that MoSE cannot adapt (e.g. a packed quantized kernel) is refused with
    # its name when the adapter is created, rather than silently left out
    modules = _layers(model, prefix, lambda module: True)
    names = {name.rsplit(".", 1)[-1] for name in modules}
    chosen = next((set(group) for group in QUERY_VALUE if names.issuperset(group)), None)
    if not chosen:
        raise ValueError(
            f"MoSE found no attention query/value projection ({', '.join('/'.join(g) for g in QUERY_VALUE)}) in the "
            f"language model of {type(model).__name__}: pass `target_modules`, or target_modules='all-linear'."
        )
    return chosen, [name for name in modules if name.rsplit(".", 1)[-1] in chosen]


def check_targets(model: nn.Module, matches: Callable[[str], bool], target_modules: object) -> None:
    """``ValueError`` naming the module if ``matches`` (the tuner's target check) picks a layer outside the language
    model and its output head of a model that has one (an encoder or projector: it sees no token sequence)."""
    prefix = language_model_prefix(model)
    if not prefix:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    outside = [
        name for name, module in model.named_modules()
        if name and not _inside(name, prefix) and module is not head and matches(name)
    ]
    if outside:
        wanted = sorted({name.rsplit(".", 1)[-1] for name in outside})
        regex = rf"^{re.escape(prefix)}\..*\.({'|'.join(wanted)})$"
        raise ValueError(
            f"MoSE target_modules={target_modules!r} match {len(outside)} layer(s) outside the language model of "
            f"{type(model).__name__}, e.g. '{outside[0]}': MoSE routes the tokens of the language model's sequence, "
            f"which an encoder or projector does not see. Target the language model (`{prefix}`) instead, e.g. "
            f"target_modules=r'{regex}', or leave target_modules unset for the default (its attention q/v)."
        )


def _inside(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _layers(model: nn.Module, prefix: str, accept: Callable[[nn.Module], bool]) -> list[str]:
    """Full names of the modules of the language model at ``prefix`` that ``accept`` takes; a layer an adapter already
    wraps counts under its own name, and its inside (``base_layer``, the adapter's modules) is not looked into."""
    found: list[str] = []
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if name == prefix or not _inside(name, prefix) or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            found.append(name)
        elif accept(module):
            found.append(name)
    return found
