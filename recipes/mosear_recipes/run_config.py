"""What a training run folder holds and how it was made: :class:`RunConfig`, written once as ``run_config.json``
and read back by everything that reloads the run (evaluation, inference, the next stage)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

from peft_mose import environment

from .emotion_llama.features import FeatureSpec

RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
PROJECTORS_FILE = "projectors.safetensors"
REFERENCE_FILE = "reference_outputs.safetensors"
LOSS_CURVE = "loss.png"
EVAL_DIR = "eval"
FORMAT = 2


@dataclass(frozen=True)
class StageConfig:
    """The stage a run trained: its name, annotation file, tasks and peak learning rate."""

    name: str
    annotation: str
    tasks: tuple[str, ...]
    learning_rate: float


@dataclass(frozen=True)
class RunConfig:
    """One run of ``recipes/merr_finetune.py``: the base model it trained on (with the checkpoint whose LoRA was
    merged into it, if any), the data, the stage, what it started from, every argument as parsed, and the
    environment (package versions and git commit); ``base_model`` is the base model's identity
    (:func:`base_model_identity`), absent in runs written before it was recorded."""

    model_name_or_path: str
    data_root: str
    feature_spec: FeatureSpec
    audio_repeat: int
    stage: StageConfig
    world_size: int
    merged_lora_checkpoint: str | None = None
    init_from: str | None = None
    config_file: str | None = None
    arguments: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_model: dict[str, str] | None = None
    environment: dict[str, Any] = field(default_factory=environment)
    format: int = FORMAT

    def write(self, directory: str | Path) -> Path:
        """Write ``directory/run_config.json``."""
        return write_run_config(self, directory)

    @classmethod
    def read(cls, directory: str | Path) -> RunConfig:
        """The run configuration of a run folder, with an error that names what is wrong with it."""
        values = run_config_values(
            directory, "merr_finetune.py", FORMAT, "the run was written by another version of the recipe (format 1 "
            "and older held several stages per run), or by omni_finetune.py; retrain or use that version."
        )  # fmt: skip
        path = Path(directory) / RUN_CONFIG
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values and _required(f))
        unknown = sorted(set(values) - names)
        if missing or unknown:
            raise ValueError(f"{path} is not a run configuration: missing {missing}, unknown {unknown}.")
        stage = values["stage"]
        return cls(
            **{
                **values,
                "feature_spec": FeatureSpec(**values["feature_spec"]),
                "stage": StageConfig(**{**stage, "tasks": tuple(stage["tasks"])}),
            }
        )


def write_run_config(config: object, directory: str | Path) -> Path:
    """Write the dataclass ``config`` as ``directory/run_config.json``."""
    path = Path(directory) / RUN_CONFIG
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str) + "\n", encoding="utf-8")
    return path


def run_config_values(directory: str | Path, recipe: str, expected_format: object, otherwise: str) -> dict[str, Any]:
    """The JSON object of ``directory/run_config.json`` written by ``recipe`` in ``expected_format``; an error naming
    the file when it is missing, not JSON, or of another format (``otherwise`` says what that means)."""
    path = Path(directory) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {directory} an output folder of {recipe}?")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(values, dict) or values.get("format") != expected_format:
        found = values.get("format") if isinstance(values, dict) else None
        raise ValueError(f"{path} has format {found!r}, {recipe} writes format {expected_format!r}: {otherwise}")
    return values


# config.json keys that say where or how a model was saved, not what it is.
_NOT_IDENTITY = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")


def base_model_identity(model_path: str | Path) -> dict[str, str]:
    """``{"name", "config_sha256"}`` of a base model folder: its folder name and the SHA-256 of its ``config.json``
    (without the keys that only say where or how it was saved): recorded with a run, compared when it is reloaded."""
    path = Path(model_path) / "config.json"
    values = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = {k: v for k, v in values.items() if k not in _NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": Path(model_path).resolve().name, "config_sha256": digest}


def base_model_mismatch(recorded: dict[str, str] | None, model_path: str | Path) -> list[str]:
    """How the base model at ``model_path`` differs from the ``recorded`` identity (nothing when none was recorded):
    ``"name"`` and/or ``"config_sha256"``."""
    if not recorded:
        return []
    now = base_model_identity(model_path)
    return [key for key in ("name", "config_sha256") if recorded.get(key) != now[key]]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def target_modules_option(value: str | None) -> str | list[str] | None:
    """``--target_modules`` as ``MoSEConfig`` takes it: comma-separated names as a list, ``all-linear`` as PEFT's
    shorthand string (a list holding it would be looked for as a module name), nothing as ``None`` (MoSE's default
    targets)."""
    if value is None or not value.strip():
        return None
    if value.strip().lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return INCLUDE_LINEAR_LAYERS_SHORTHAND
    return [m.strip() for m in value.split(",") if m.strip()]
