"""Loading the Qwen2.5-Omni thinker (the text-generating half MoSE adapts) from a thinker folder or the full model,
and its encoder; a trained run's adapter, verified first."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

from ..quantization import prepare_for_training, quantization_config
from ..run import adapter_mismatch, check_adapter_dir, check_base_model
from ..manifests import check_weights
from ..run_config import ADAPTER_DIR, RUN_CONFIG
from .inputs import OmniEncoder
from .run_config import OmniRunConfig

logger = logging.getLogger(__name__)

# A finished run's model: the adapter's weights and the run configuration they were trained under.
OMNI_MODEL_FILES = (f"{ADAPTER_DIR}/{SAFETENSORS_WEIGHTS_NAME}", RUN_CONFIG)


def load_thinker(model_path: str | Path, quantization: str = "none") -> torch.nn.Module:
    """The thinker of ``model_path``: a saved ``Qwen2_5OmniThinkerForConditionalGeneration``, or the full
    ``Qwen2_5OmniForConditionalGeneration`` (the released checkpoints) with its talker dropped; quantized as
    ``quantization`` says and then prepared as for training."""
    config = AutoConfig.from_pretrained(model_path)
    options = {"quantization_config": quantization_config(quantization)}
    if config.model_type == "qwen2_5_omni":
        from transformers import Qwen2_5OmniForConditionalGeneration

        full = Qwen2_5OmniForConditionalGeneration.from_pretrained(model_path, **options)
        full.disable_talker()
        thinker = full.thinker
    elif config.model_type == "qwen2_5_omni_thinker":
        thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_path, **options)
    else:
        raise ValueError(f"{model_path} holds a {config.model_type!r} model; this recipe trains Qwen2.5-Omni "
                         "(qwen2_5_omni or its thinker, qwen2_5_omni_thinker).")  # fmt: skip
    return prepare_for_training(thinker) if quantization != "none" else thinker


def load_run(run_dir: str | Path, model_name_or_path: str | Path | None = None,
             weights_dir: str | Path | None = None) -> tuple[PeftModel, OmniEncoder, OmniRunConfig]:  # fmt: skip
    """A finished run rebuilt, eval mode: its run configuration, the base model it trained (or
    ``model_name_or_path`` when its config is the same), the adapter of ``weights_dir`` (default: the run's final one)
    checked against the manifest its run wrote and the run's options; and the encoder with the run's prompt and media bounds."""
    run_dir = Path(run_dir)
    run = OmniRunConfig.read(run_dir)
    weights = Path(weights_dir) if weights_dir else run_dir
    adapter = weights / ADAPTER_DIR
    check_adapter_dir(adapter)
    check_weights(weights)
    options = {k: v for k, v in run.arguments.get("model", {}).items() if v is not None}  # None: MoSE's default targets
    mismatch = adapter_mismatch(options, adapter)
    if mismatch:
        raise ValueError(f"{adapter} is not the adapter of the run in {run_dir / RUN_CONFIG}: {'; '.join(mismatch)}.")
    model_path = model_name_or_path or run.model_name_or_path
    check_base_model(run.base_model, model_path, f"The run in {run_dir}", model_name_or_path is not None)
    thinker = load_thinker(model_path, run.arguments.get("model", {}).get("quantization", "none"))
    model = PeftModel.from_pretrained(thinker, str(adapter)).eval()
    encoder = OmniEncoder.from_pretrained(model_path, thinker.config, run.max_pixels, question=run.question,
                                          system_prompt=run.system_prompt)  # fmt: skip
    return model, encoder, run
