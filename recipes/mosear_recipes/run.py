"""Loading a finished run folder of ``recipes/merr_finetune.py`` for evaluation and inference, verified (run config,
adapter config, both weight files) before anything is loaded. Imports nothing of training: no ``Trainer``, no
guards, no checkpoint manifests (``tests/test_recipe_layout_imports.py`` checks it)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import CONFIG_NAME

from peft_mose.checksum import result_fields

from .emotion_llama.checkpoint import load_projectors, merge_lora_checkpoint
from .emotion_llama.model import EmotionLlama, load_llm, load_tokenizer
from .emotion_llama.projectors import EmotionLlamaProjectors
from .emotion_llama.prompt import PromptEncoder
from .manifests import check_weights
from .quantization import prepare_for_training, quantization_config
from .run_config import ADAPTER_DIR, PROJECTORS_FILE, RUN_CONFIG, RunConfig, base_model_mismatch, target_modules_option
from .textfiles import load_json

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model rebuilt by :func:`load_trained`: the wrapper (eval mode), its prompt encoder, the run configuration."""

    model: EmotionLlama
    encoder: PromptEncoder
    run_config: RunConfig


def check_adapter_dir(directory: Path) -> None:
    """Refuse an adapter folder whose ``adapter_config.json`` PEFT would fail on with a bare ``KeyError`` or
    ``JSONDecodeError``: missing, invalid JSON, no ``peft_type`` or one PEFT does not know."""
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: {directory} holds no saved adapter.")
    config = load_json(config_file)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{config_file} has no 'peft_type': it is not the configuration of a saved PEFT adapter.")
    if config["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise ValueError(
            f"{config_file}: unknown peft_type {config['peft_type']!r} (known: {known}; MOSE needs `import peft_mose`)."
        )


def check_trained_weights(directory: Path) -> None:
    """Refuse a folder (a run, or one of its checkpoints) without both trained parts, ``adapter/`` and
    ``projectors.safetensors``, with an adapter configuration PEFT cannot read (:func:`check_adapter_dir`), or whose
    model files are not the ones its run wrote (:func:`~mosear_recipes.manifests.check_weights`)."""
    missing = [p for p in (directory / ADAPTER_DIR, directory / PROJECTORS_FILE) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{directory} holds no trained model: {', '.join(map(str, missing))} missing.")
    check_adapter_dir(directory / ADAPTER_DIR)
    check_weights(directory)


# The MoSE options of merr_finetune.py that are adapter_config.json fields of the same name.
MOSE_OPTIONS = ("r", "n_experts", "eps", "lora_alpha", "router_hidden_size", "expert_kind", "router", "target_modules")


def adapter_mismatch(model_options: dict, adapter_dir: Path) -> list[str]:
    """``"field: X in the run's options, Y in adapter_dir"`` for each MoSE option (``--target_modules``
    comma-separated) that differs from the adapter's saved ``adapter_config.json``. Targets left to MoSE (none given,
    or ``all-linear``) are not compared: the adapter records what they resolved to."""
    expected = {k: model_options[k] for k in MOSE_OPTIONS if k in model_options}
    targets = target_modules_option(expected.pop("target_modules", None))
    if isinstance(targets, list):
        expected["target_modules"] = targets
    saved, wanted = result_fields(load_json(adapter_dir / CONFIG_NAME)), result_fields(expected)
    return [f"{k}: {wanted[k]!r} in the run's options, {saved[k]!r} in {adapter_dir}" for k in expected
            if saved[k] != wanted[k]]  # fmt: skip


def check_base_model(recorded: dict | None, model_path: str | Path, what: str, name_may_differ: bool) -> None:
    """Refuse a base model whose config differs from the identity ``recorded`` with ``what`` (a run); a different
    folder name is refused too unless ``name_may_differ`` (a base model given on purpose), then warned about."""
    mismatch = base_model_mismatch(recorded, model_path)
    if "config_sha256" in mismatch or (mismatch and not name_may_differ):
        raise ValueError(
            f"{what} was trained on base model {recorded['name']!r} (config sha256 {recorded['config_sha256'][:12]}...),"
            f" but {model_path} is another ({', '.join(mismatch)} differ): its adapter would load on the wrong model "
            "without an error. Give the base model it was trained on."
        )
    if mismatch:
        logger.warning("%s was trained on base model %r; %s has the same config under another name: check that it "
                       "is the same model.", what, recorded["name"], model_path)  # fmt: skip


def run_config_of(weights: Path) -> RunConfig | None:
    """The run configuration of a run folder or of one of its checkpoints (``None`` when neither holds one)."""
    for folder in (weights, weights.parent):
        if (folder / RUN_CONFIG).is_file():
            return RunConfig.read(folder)
    return None


def load_base_llm(
    model_path: str | Path, lora_checkpoint: str | Path | None, quantization: str = "none"
) -> torch.nn.Module:
    """The frozen LLM that MoSE is added to: ``model_path``, with the LoRA of ``lora_checkpoint`` merged in when
    given (its load report is logged), quantized as ``--quantization`` says (and then prepared as for training, so
    that a reloaded run computes as it trained)."""
    llm = load_llm(model_path, quantization_config=quantization_config(quantization))
    if quantization != "none":
        llm = prepare_for_training(llm)
    if lora_checkpoint is None:
        return llm
    llm, report = merge_lora_checkpoint(llm, lora_checkpoint)
    logger.info("%s", report.summary())
    return llm


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
    check_trained_weights(weights)
    mismatch = adapter_mismatch(run_config.arguments.get("model", {}), weights / ADAPTER_DIR)
    if mismatch:
        raise ValueError(
            f"{weights / ADAPTER_DIR} is not the adapter of the run in {output_dir / RUN_CONFIG}: {'; '.join(mismatch)}."
        )
    model_path = model_name_or_path or run_config.model_name_or_path
    check_base_model(run_config.base_model, model_path, f"The run in {output_dir}", model_name_or_path is not None)
    tokenizer = load_tokenizer(model_path)
    spec = run_config.feature_spec
    quantization = run_config.arguments.get("model", {}).get("quantization", "none")
    base = load_base_llm(model_path, run_config.merged_lora_checkpoint, quantization)
    llm = PeftModel.from_pretrained(base, str(weights / ADAPTER_DIR))
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    load_projectors(projectors, weights / PROJECTORS_FILE)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id).eval()
    encoder = PromptEncoder(tokenizer, spec.n_patch_tokens, audio_repeat=run_config.audio_repeat)
    return TrainedModel(model=model, encoder=encoder, run_config=run_config)
