"""Building the model a run trains (frozen LLM + MoSE + projectors) and rebuilding it from a run folder, with the
reference outputs that prove the rebuilt model is the trained one."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .arguments import ModelArguments
from .emotion_llama.checkpoint import (
    load_projector_checkpoint,
    load_projectors,
    merge_lora_checkpoint,
)
from .emotion_llama.features import FeatureSpec
from .emotion_llama.model import EmotionLlama, load_llm, load_tokenizer
from .emotion_llama.projectors import EmotionLlamaProjectors
from .emotion_llama.prompt import PromptEncoder
from .integrity import check_adapter_dir
from .merr.collator import MERRCollator
from .merr.dataset import MERRDataset
from .run_config import ADAPTER_DIR, PROJECTORS_FILE, RunConfig
from .trainer import load_trained_weights

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model rebuilt by :func:`load_trained`: the wrapper (eval mode), its prompt encoder, the run configuration."""

    model: EmotionLlama
    encoder: PromptEncoder
    run_config: RunConfig


def load_base_llm(model_path: str | Path, lora_checkpoint: str | Path | None) -> torch.nn.Module:
    """The frozen LLM that MoSE is added to: ``model_path``, with the LoRA of ``lora_checkpoint`` merged in when
    given (its load report is logged)."""
    llm = load_llm(model_path)
    if lora_checkpoint is None:
        return llm
    llm, report = merge_lora_checkpoint(llm, lora_checkpoint)
    logger.info("%s", report.summary())
    return llm


def merged_lora(model_args: ModelArguments) -> str | None:
    """The checkpoint whose LoRA is merged into the LLM (``--merge_checkpoint_lora``); ``None`` for the plain LLM."""
    return model_args.projector_checkpoint if model_args.merge_checkpoint_lora else None


def build_model(
    model_args: ModelArguments,
    model_path: str | Path,
    spec: FeatureSpec,
    tokenizer: PreTrainedTokenizerBase,
    init_dir: Path | None = None,
) -> EmotionLlama:
    """The frozen LLM (with the checkpoint's LoRA merged in under ``--merge_checkpoint_lora``) with a MoSE adapter,
    plus trainable projectors; initialised from ``init_dir`` (adapter and projectors) when given, else the projectors
    from ``--projector_checkpoint`` when given."""
    base = load_base_llm(model_path, merged_lora(model_args))
    llm = get_peft_model(base, model_args.mose_config())
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id)
    if init_dir is not None:
        load_trained_weights(model, init_dir)
    elif model_args.projector_checkpoint:
        logger.info("%s", load_projector_checkpoint(projectors, model_args.projector_checkpoint).summary())
    return model


def load_trained(
    output_dir: str | Path, weights_dir: str | Path | None = None, model_name_or_path: str | Path | None = None
) -> TrainedModel:
    """Rebuild a trained model from a run folder: its :class:`~mosear_recipes.run_config.RunConfig` (base model,
    feature spec, audio repeat) and the adapter and projectors of ``weights_dir`` (default ``output_dir``: the final
    model; a checkpoint also works), on the base model the run trained (its checkpoint's LoRA merged in if the run
    merged it). ``model_name_or_path`` replaces the recorded base model folder."""
    output_dir = Path(output_dir)
    run_config = RunConfig.read(output_dir)
    weights = Path(weights_dir) if weights_dir is not None else output_dir
    model_path = model_name_or_path or run_config.model_name_or_path
    tokenizer = load_tokenizer(model_path)
    spec = run_config.feature_spec
    check_adapter_dir(weights / ADAPTER_DIR)
    base = load_base_llm(model_path, run_config.merged_lora_checkpoint)
    llm = PeftModel.from_pretrained(base, str(weights / ADAPTER_DIR))
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    load_projectors(projectors, weights / PROJECTORS_FILE)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id).eval()
    encoder = PromptEncoder(tokenizer, spec.n_patch_tokens, audio_repeat=run_config.audio_repeat)
    return TrainedModel(model=model, encoder=encoder, run_config=run_config)


def to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, object]:
    """The batch with its tensors on ``device`` (lists such as ``names`` unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def reference_batch(dataset: MERRDataset, encoder: PromptEncoder, size: int = 2) -> dict[str, torch.Tensor]:
    """A fixed training batch (the first ``size`` samples, first task, first instruction), tensors only."""
    task = dataset.tasks[0]
    batch = MERRCollator(encoder)([dataset[(i, task, 0)] for i in range(min(size, len(dataset)))])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def write_reference_outputs(
    model: EmotionLlama, batch: dict[str, torch.Tensor], path: Path, device: torch.device, is_main: bool
) -> None:
    """Save ``batch`` and the model's logits on it (eval mode): what :func:`load_trained` must reproduce. Under
    ZeRO-3 every process must call this."""
    model.eval()
    with torch.no_grad():
        logits = model(**to_device(batch, device)).logits
    if is_main:
        save_file({**batch, "logits": logits.float().cpu().contiguous()}, str(path))


def read_reference_outputs(path: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch and the logits written at the end of training (``reference_outputs.safetensors``)."""
    # Copies: tensors loaded from safetensors may sit at unaligned addresses, and MKL's float results depend on the
    # alignment of its inputs, so the batch would not reproduce the logits bit for bit.
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    return {k: v for k, v in tensors.items() if k != "logits"}, tensors["logits"]
