"""MiniGPT-v2 / Emotion-LLaMA ``.pth`` checkpoints (projectors, the LLM's LoRA) and our own projector safetensors.

The original checkpoints are ``torch.save({"model": state_dict, "optimizer": ..., "config": ..., "epoch": ...})``
where ``state_dict`` holds the trainable parameters of ``MiniGPTv2`` (``minigpt4/models/minigpt_v2.py``). Key mapping:

================================  ===================  ==================================
original key                      ours                 shape (real model)
================================  ===================  ==================================
``llama_proj.{weight,bias}``      ``eva_patch.*``      [4096, 5632], [4096]
``cls_tk_llama_proj.*``           ``eva_cls.*``        [4096, 1408], [4096]
``feats_llama_proj1.*``           ``face.*``           [4096, 1024], [4096]  (face MAE)
``feats_llama_proj2.*``           ``video.*``          [4096, 1024], [4096]  (VideoMAE)
``feats_llama_proj3.*``           ``audio.*``          [4096, 1024], [4096]  (HuBERT)
================================  ===================  ==================================

``minigptv2_checkpoint.pth`` holds only ``llama_proj``; the other four are then reported missing.

Both also hold the LLM's LoRA adapter (r 64, alpha 16, dropout 0.05 on ``q_proj`` and ``v_proj``, saved by peft 0.2.0,
so without an adapter name): ``llama_model.base_model.model.<module>.lora_{A,B}.weight`` is PEFT's
``base_model.model.<module>.lora_{A,B}.default.weight``. :func:`load_lora_checkpoint` loads it for the Emotion-LLaMA
baseline; :func:`merge_lora_checkpoint` merges it into the LLM that MoSE training starts from
(``--merge_checkpoint_lora``).
"""

from __future__ import annotations

import pickle
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_mose.checksum import verify_file, with_checksum

ORIGINAL_TO_OURS = {
    "llama_proj": "eva_patch",
    "cls_tk_llama_proj": "eva_cls",
    "feats_llama_proj1": "face",
    "feats_llama_proj2": "video",
    "feats_llama_proj3": "audio",
}

# Key prefixes the original checkpoints hold besides the projectors: known, never loaded.
IGNORED_PREFIXES = {
    "llama_model.": "LLM / LoRA adapter weights (not projectors: see load_lora_checkpoint)",
    "attention.": "MiniGPTBase's unused auxiliary classifier",
    "visual_encoder.": "vision encoder (EVA features are pre-extracted)",
    "ln_vision.": "vision layer norm (applied when extracting EVA features)",
}


@dataclass
class ProjectorLoadReport:
    """What :func:`load_projector_checkpoint` did: ``loaded`` / ``missing`` are our parameter names, ``unknown`` the
    checkpoint keys it did not recognise, ``ignored`` the known non-projector keys counted per kind."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every projector parameter was loaded and no key was unknown."""
        return not self.missing and not self.unknown

    def summary(self) -> str:
        """A multi-line, human-readable account of the load."""
        lines = [f"Projector checkpoint {self.path}: loaded {len(self.loaded)} tensors."]
        if self.missing:
            lines.append(f"  missing (left at their initial values): {', '.join(self.missing)}")
        if self.unknown:
            more = f", ... ({len(self.unknown)} in all)" if len(self.unknown) > 10 else ""
            lines.append(f"  unknown keys (not loaded): {', '.join(self.unknown[:10])}{more}")
        for kind, count in self.ignored.items():
            lines.append(f"  ignored {count} keys: {kind}")
        return "\n".join(lines)


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load the state dict of an original ``.pth`` (``weights_only=True``): its ``"model"`` entry, or the file
    itself when it is a flat state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Projector checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        raise ValueError(
            f"Checkpoint {path} holds objects other than tensors and plain containers, which "
            f"torch.load(weights_only=True) refuses to unpickle. Re-save only its state dict. {culprit}"
        ) from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"Checkpoint {path} has no state dict: expected a 'model' entry of tensors (MiniGPT-v2 / Emotion-LLaMA) "
            f"or a flat dict of tensors; found {top}."
        )
    return state


def load_projector_checkpoint(
    projectors: nn.Module, path: str | Path, strict: bool = False
) -> ProjectorLoadReport:
    """Initialise ``projectors`` from an original checkpoint and report what was loaded, missing, unknown or ignored.

    A shape mismatch always raises ``ValueError``; with ``strict=True`` missing or unknown keys raise too.
    """
    path = Path(path)
    report = ProjectorLoadReport(path=path)

    def ours(key: str) -> str | None:
        module, _, param = key.partition(".")
        return f"{ORIGINAL_TO_OURS[module]}.{param}" if module in ORIGINAL_TO_OURS else None

    def ignored_kind(key: str) -> str | None:
        return next((k for prefix, k in IGNORED_PREFIXES.items() if key.startswith(prefix)), None)

    hint = "do the LLM hidden size and the feature dimensions match?"
    _load_mapped(projectors, projectors.state_dict(), read_original_state_dict(path), ours, ignored_kind, hint, report)
    if strict and not report.complete:
        raise ValueError(report.summary())
    return report


def _load_mapped(
    module: nn.Module,
    own: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    ours: Callable[[str], str | None],
    ignored_kind: Callable[[str], str | None],
    hint: str,
    report: ProjectorLoadReport,
) -> None:
    """Load the checkpoint tensors whose name ``ours`` maps into ``own`` (``module``'s tensors of interest) and fill
    ``report``: loaded, missing, unknown and per-kind ignored keys. A shape mismatch raises, naming both shapes."""
    mapped: dict[str, torch.Tensor] = {}
    ignored: Counter[str] = Counter()
    for key, tensor in state.items():
        name = ours(key)
        if name in own:
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"Checkpoint {report.path}: {key} has shape {tuple(tensor.shape)}, but {name} needs "
                    f"{tuple(own[name].shape)} ({hint})."
                )
            mapped[name] = tensor
        elif (kind := ignored_kind(key)) is not None:
            ignored[kind] += 1
        else:
            report.unknown.append(key)
    module.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    report.missing = sorted(set(own) - set(mapped))
    report.ignored = dict(ignored)


# Emotion-LLaMA's LoRA (minigpt4/models/minigpt_v2.py and its configs: r 64, alpha 16). Later peft versions than the
# original's 0.2.0 insert the adapter name (".default") before ".weight".
EMOTION_LLAMA_LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ("q_proj", "v_proj")}
_LORA_KEY = re.compile(r"^llama_model\.base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.default)?\.weight$")
# Known LLM keys of the original checkpoints besides the LoRA: RoPE frequencies, a persistent buffer in transformers
# 4.30, which transformers now computes itself.
_LLM_BUFFERS = {re.compile(r"\.rotary_emb\.inv_freq$"): "RoPE inv_freq buffers (computed by transformers)"}


def emotion_llama_lora_config() -> LoraConfig:
    """The LoRA configuration of Emotion-LLaMA / MiniGPT-v2, for inference."""
    values = {**EMOTION_LLAMA_LORA, "target_modules": list(EMOTION_LLAMA_LORA["target_modules"])}
    return LoraConfig(**values, bias="none", task_type="CAUSAL_LM", inference_mode=True)


@dataclass
class LoraLoadReport(ProjectorLoadReport):
    """What :func:`load_lora_checkpoint` did: ``loaded`` / ``missing`` are the PEFT model's LoRA parameter names,
    ``unknown`` the checkpoint's LLM keys it did not recognise, ``ignored`` the known other LLM keys per kind;
    ``complete`` when every LoRA parameter was loaded and no LLM key was unknown."""

    config: LoraConfig = field(default_factory=emotion_llama_lora_config)

    def summary(self) -> str:
        """A multi-line, human-readable account of the load."""
        targets = ", ".join(sorted(self.config.target_modules))
        lines = [
            f"LoRA checkpoint {self.path}: loaded {len(self.loaded)} tensors "
            + f"(r {self.config.r}, alpha {self.config.lora_alpha}, on {targets})."
        ]
        for label, keys in (("missing (left at PEFT's initialisation, B = 0)", self.missing),
                            ("unknown LLM keys (not loaded)", self.unknown)):  # fmt: skip
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 10 else ""
                lines.append(f"  {label}: {', '.join(keys[:10])}{more}")
        for kind, count in self.ignored.items():
            lines.append(f"  ignored {count} keys: {kind}")
        return "\n".join(lines)


def has_lora_weights(path: str | Path) -> bool:
    """Whether an original checkpoint holds LoRA weights of the LLM."""
    return any(_LORA_KEY.match(key) for key in read_original_state_dict(path))


def load_lora_checkpoint(
    llm: nn.Module, path: str | Path, config: LoraConfig | None = None, strict: bool = False
) -> tuple[PeftModel, LoraLoadReport]:
    """Wrap ``llm`` in a PEFT LoRA model (``config``, default :func:`emotion_llama_lora_config`) and load the LoRA
    weights of an original checkpoint into it; returns the model (eval mode) and a report.

    A shape mismatch always raises ``ValueError`` (a checkpoint of another rank or LLM); with ``strict=True`` missing
    LoRA parameters or unknown LLM keys raise too. Keys outside ``llama_model.`` are left to
    :func:`load_projector_checkpoint`.
    """
    path = Path(path)
    state = {k: v for k, v in read_original_state_dict(path).items() if k.startswith("llama_model.")}
    config = config if config is not None else emotion_llama_lora_config()
    model = get_peft_model(llm, config)
    own = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    report = LoraLoadReport(path=path, config=config)

    def ours(key: str) -> str | None:
        match = _LORA_KEY.match(key)
        return f"base_model.model.{match['module']}.lora_{match['kind']}.default.weight" if match else None

    def ignored_kind(key: str) -> str | None:
        return next((k for pattern, k in _LLM_BUFFERS.items() if pattern.search(key)), None)

    hint = f"LoRA r {config.r}: do the rank and the LLM match?"
    _load_mapped(model, own, state, ours, ignored_kind, hint, report)
    if strict and not report.complete:
        raise ValueError(report.summary())
    return model.eval(), report


def merge_lora_checkpoint(
    llm: nn.Module, path: str | Path, config: LoraConfig | None = None
) -> tuple[nn.Module, LoraLoadReport]:
    """``llm`` with the LoRA of an original checkpoint merged into its weights (W + B A alpha / r, PEFT's
    ``merge_and_unload``), as a plain model: the starting point of a fine-tuning that continues MiniGPT-v2
    (``minigptv2_checkpoint.pth``). Returns the model and the load report; ``ValueError`` if the checkpoint holds no
    LoRA weights (there would be nothing to merge)."""
    model, report = load_lora_checkpoint(llm, path, config)
    if not report.loaded:
        raise ValueError(f"Checkpoint {report.path} holds no LoRA weights of the LLM to merge.")
    return model.merge_and_unload(), report


def save_projectors(projectors: nn.Module, path: str | Path) -> Path:
    """Save the projector weights as safetensors (our names), with their checksum (``peft_mose.checksum``)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in projectors.state_dict().items()}
    save_file(tensors, str(path), metadata=with_checksum(tensors, None))
    return path


def load_projectors(projectors: nn.Module, path: str | Path) -> None:
    """Load projector weights saved by :func:`save_projectors`; a checksum mismatch, or any missing, extra or
    mis-shaped key raises."""
    verify_file(path)
    try:
        projectors.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        raise ValueError(f"Projector weights {path} do not match the projectors: {err}") from None
