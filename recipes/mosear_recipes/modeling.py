"""Building the model a run trains (frozen LLM + MoSE + projectors, optionally started from another run's weights),
and the reference outputs that prove a model rebuilt by :func:`~mosear_recipes.run.load_trained` is the trained one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .arguments import ModelArguments
from .emotion_llama.checkpoint import load_projector_checkpoint, load_projectors
from .emotion_llama.features import FeatureSpec
from .emotion_llama.model import EmotionLlama
from .emotion_llama.projectors import EmotionLlamaProjectors
from .emotion_llama.prompt import PromptEncoder
from .generation import to_device
from .merr.collator import MERRCollator
from .merr.dataset import MERRDataset
from .run import adapter_mismatch, check_base_model, check_trained_weights, load_base_llm, run_config_of
from .run_config import ADAPTER_DIR, PROJECTORS_FILE

logger = logging.getLogger(__name__)


def merged_lora(model_args: ModelArguments) -> str | None:
    """The checkpoint whose LoRA is merged into the LLM (``--merge_checkpoint_lora``); ``None`` for the plain LLM."""
    return model_args.projector_checkpoint if model_args.merge_checkpoint_lora else None


def load_trained_weights(model: EmotionLlama, directory: Path) -> None:
    """Load ``directory/adapter`` and ``directory/projectors.safetensors`` (a run or a checkpoint, checked first)
    into a model built for training."""
    check_trained_weights(directory)
    model.llm.load_adapter(str(directory / ADAPTER_DIR), adapter_name="default", is_trainable=True)
    load_projectors(model.projectors, directory / PROJECTORS_FILE)


def check_init_source(init_dir: Path, model_args: ModelArguments, model_path: str | Path) -> None:
    """Refuse an ``--init_from`` run trained with other MoSE options than this run's (its adapter would replace
    them silently) or on another base model, naming both sides."""
    check_trained_weights(init_dir)
    options = {f: getattr(model_args, f) for f in ("r", "n_experts", "eps", "lora_alpha", "router_hidden_size",
                                                   "expert_kind", "router", "target_modules")}  # fmt: skip
    mismatch = adapter_mismatch(options, init_dir / ADAPTER_DIR)
    if mismatch:
        raise ValueError(
            f"--init_from {init_dir} was trained with other MoSE options than this run's: {'; '.join(mismatch)} "
            "(\"the run's options\" are this run's). Give this run the same options."
        )
    source = run_config_of(init_dir)
    check_base_model(source.base_model if source else None, model_path, f"--init_from {init_dir}", False)


def build_model(
    model_args: ModelArguments,
    model_path: str | Path,
    spec: FeatureSpec,
    tokenizer: PreTrainedTokenizerBase,
    init_dir: Path | None = None,
) -> EmotionLlama:
    """The frozen LLM (with the checkpoint's LoRA merged in under ``--merge_checkpoint_lora``) with a MoSE adapter,
    plus trainable projectors; initialised from ``init_dir`` (adapter and projectors, which
    :func:`check_init_source` must have accepted) when given, else the projectors from ``--projector_checkpoint``."""
    base = load_base_llm(model_path, merged_lora(model_args), model_args.quantization)
    llm = get_peft_model(base, model_args.mose_config())
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id)
    if init_dir is not None:
        load_trained_weights(model, init_dir)
    elif model_args.projector_checkpoint:
        logger.info("%s", load_projector_checkpoint(projectors, model_args.projector_checkpoint).summary())
    return model


def reference_batch(dataset: MERRDataset, encoder: PromptEncoder, size: int = 2) -> dict[str, torch.Tensor]:
    """A fixed training batch (the first ``size`` samples, first task, first instruction), tensors only."""
    task = dataset.tasks[0]
    batch = MERRCollator(encoder)([dataset[(i, task, 0)] for i in range(min(size, len(dataset)))])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def write_reference_outputs(
    model: EmotionLlama, batch: dict[str, torch.Tensor], path: Path, device: torch.device, is_main: bool
) -> None:
    """Save ``batch`` and the model's logits on it (eval mode): what :func:`~mosear_recipes.run.load_trained` must reproduce. Under
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
