"""The Emotion-LLaMA baseline without MoSE: the LLM, its original LoRA adapter when the checkpoint holds one, and the
projectors, from an original ``.pth`` (or our projector safetensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import has_lora_weights, load_lora_checkpoint, load_projector_checkpoint, load_projectors
from .features import FeatureSpec
from .model import EmotionLlama, load_llm, load_tokenizer
from .projectors import EmotionLlamaProjectors
from .prompt import PromptEncoder


@dataclass
class EmotionLlamaBaseline:
    """A base model built by :func:`load_baseline` (eval mode), its prompt encoder and the load reports to show."""

    model: EmotionLlama
    encoder: PromptEncoder
    reports: list[str] = field(default_factory=list)


def load_baseline(
    model_name_or_path: str | Path,
    spec: FeatureSpec,
    projector_checkpoint: str | Path | None = None,
    projectors: str | Path | None = None,
    audio_repeat: int = 1,
) -> EmotionLlamaBaseline:
    """Build Emotion-LLaMA from a local LLM folder and either ``projector_checkpoint``, an original ``.pth`` whose
    projectors and, when it has them, LoRA weights are loaded (Emotion-LLaMA's released checkpoint: the real
    baseline), or ``projectors``, a ``projectors.safetensors`` of our own (the plain LLM then)."""
    if (projector_checkpoint is None) == (projectors is None):
        raise ValueError("Give the projector weights: an original .pth checkpoint or a projectors.safetensors file.")
    tokenizer = load_tokenizer(model_name_or_path)
    llm = load_llm(model_name_or_path)
    reports = []
    if projector_checkpoint is not None and has_lora_weights(projector_checkpoint):
        llm, lora_report = load_lora_checkpoint(llm, projector_checkpoint)
        reports.append(lora_report.summary())
    elif projector_checkpoint is not None:
        reports.append(f"LoRA checkpoint {projector_checkpoint}: no LoRA weights; the LLM runs without an adapter.")
    modules = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    if projector_checkpoint is not None:
        reports.insert(0, load_projector_checkpoint(modules, projector_checkpoint).summary())
    else:
        load_projectors(modules, projectors)
    model = EmotionLlama(llm, modules, tokenizer.pad_token_id).eval()
    encoder = PromptEncoder(tokenizer, spec.n_patch_tokens, audio_repeat=audio_repeat)
    return EmotionLlamaBaseline(model=model, encoder=encoder, reports=reports)
