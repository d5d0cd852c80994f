"""Arguments of ``recipes/omni_finetune.py``: the model (Qwen2.5-Omni thinker + MoSE), the clips (manifest and media
bounds) and Trainer's ``TrainingArguments``, parsed from an optional YAML/JSON file plus the command line by the MERR
recipe's machinery (:mod:`mosear_recipes.arguments`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from peft_mose.metrics import LABEL_PARSERS, resolve_labels

from ..arguments import (
    CONFIG_DIR,
    MoSEArguments,
    argument_values,
    build_group,
    check_trainer_options,
    parse_values,
    trainer_group,
    trainer_values,
)
from ..distributed import share_cpu_deepspeed_state
from ..quantization import QUANTIZATIONS

TINY_CONFIG = CONFIG_DIR / "omni_tiny.yaml"
AUDIO_MODES = ("required", "optional", "none")


@dataclass
class OmniModelArguments(MoSEArguments):
    """The Qwen2.5-Omni thinker and its MoSE adapter (default targets: MoSE's own, the language model's q_proj,
    v_proj)."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Qwen2.5-Omni folder or hub id (thinker weights, tokenizer, processors)."}
    )
    quantization: str = field(default="none", metadata={"help": "The frozen thinker: none, 4bit or 8bit."})


@dataclass
class OmniDataArguments:
    """The clips: manifests, how frames and audio are taken, the prompt."""

    _argument_group_name = "data"

    tiny_setup: bool = field(
        default=False, metadata={"help": "Write a tiny random thinker and synthetic clips to <output_dir>/tiny and "
                                 "train on them (recipes/configs/omni_tiny.yaml: the default with no arguments)."},
    )  # fmt: skip
    train_manifest: str | None = field(default=None, metadata={"help": "CSV/JSONL manifest of the training clips."})
    eval_manifest: str | None = field(
        default=None, metadata={"help": "Manifest scored at the end (recognition, by CA-MER subset when given)."}
    )
    fps: float = field(default=2.0, metadata={"help": "Frames sampled per second of video."})
    max_frames: int = field(default=32, metadata={"help": "At most this many frames per clip (spread evenly)."})
    max_pixels: int | None = field(
        default=None, metadata={"help": "At most this many pixels per frame (default: the model's video setting)."}
    )
    max_audio_seconds: float | None = field(
        default=None, metadata={"help": "Audio cut after this many seconds (default and maximum: the feature "
                                "extractor's window, 30 s for Qwen2.5-Omni)."},
    )  # fmt: skip
    audio: str = field(
        default="required",
        metadata={"help": "required: every clip has audio (its .wav, else the video's track), a clip without is an "
                  "error; optional: a clip without audio is used with its video only (counted); none: audio ignored."},
    )  # fmt: skip
    use_audio_in_video: bool = field(
        default=True, metadata={"help": "Interleave a clip's audio with its frames by time (Qwen2.5-Omni's "
                                "use_audio_in_video); false: audio after the video."},
    )  # fmt: skip
    question: str | None = field(default=None, metadata={"help": "The user's question (default: the recipe's)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt (default: Qwen2.5-Omni's)."})
    eval_labels: str = field(default="mer2023", metadata={"help": "Label set scored: mer2023, dfew, merr or a,b,c."})
    eval_parser: str = field(
        default="robust", metadata={"help": "How an answer is read as a label (peft_mose.metrics): robust (the first "
                                    "label named) or emotion_llama (the whole answer is a label)."},
    )  # fmt: skip
    eval_max_new_tokens: int = field(default=16, metadata={"help": "Greedy tokens generated per evaluation clip."})


@dataclass
class OmniTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the recipe's defaults; every option keeps its Trainer meaning."""

    _argument_group_name = "Trainer (TrainingArguments)"

    output_dir: str = field(default="runs/omni_finetune", metadata={"help": "Where everything is written."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=3, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Clips per batch and process."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (no, steps or epoch)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (rotated after their manifest)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Batch key of labels."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to resume, verified against its manifest first; with no path: the newest "
                  "intact checkpoint of the run.", "nargs": "?", "const": "True"},
    )  # fmt: skip
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace the run already in --output_dir."})

    def __post_init__(self) -> None:
        share_cpu_deepspeed_state(self)
        super().__post_init__()


KINDS = (OmniModelArguments, OmniDataArguments, OmniTrainingArguments)


@dataclass
class OmniConfig:
    """One run's arguments (Trainer's with ``save_total_limit`` off: the recipe rotates after the manifests)."""

    model: OmniModelArguments
    data: OmniDataArguments
    training: OmniTrainingArguments
    config_file: Path | None = None
    checkpoints_kept: int | None = None

    def arguments(self) -> dict[str, dict[str, Any]]:
        """Every argument, JSON-friendly (``--save_total_limit`` as given)."""
        return {"model": argument_values(self.model), "data": argument_values(self.data),
                "training": trainer_values(self.training, self.checkpoints_kept)}  # fmt: skip


def parse_omni_args(argv: Sequence[str] | None = None) -> OmniConfig:
    """Parse ``[config.yaml|config.json] [--option value ...]``; without a file and without
    ``--model_name_or_path``, the file is ``recipes/configs/omni_tiny.yaml`` (the built-in tiny default)."""
    values, config_file = parse_values(argv, KINDS, TINY_CONFIG, description=__doc__.splitlines()[0])
    model, data = build_group(OmniModelArguments, values), build_group(OmniDataArguments, values)
    training, kept = trainer_group(OmniTrainingArguments, values)
    return OmniConfig(model, data, training, config_file, checkpoints_kept=kept)


def check_omni_args(config: OmniConfig) -> None:
    """Refuse contradictory or unsupported settings, saying what to do instead."""
    model, data, args = config.model, config.data, config.training
    check_trainer_options(args)
    if data.tiny_setup and (model.model_name_or_path or data.train_manifest):
        raise ValueError("--tiny_setup writes its own model and clips: give it, or --model_name_or_path with "
                         "--train_manifest, not both.")  # fmt: skip
    if not data.tiny_setup and not (model.model_name_or_path and data.train_manifest):
        raise ValueError("Give --model_name_or_path and --train_manifest together (or --tiny_setup true).")
    path = model.model_name_or_path
    if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise ValueError(f"--model_name_or_path {path}: no such folder (a local Qwen2.5-Omni folder, or a hub id such "
                         "as Qwen/Qwen2.5-Omni-7B).")  # fmt: skip
    if model.quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {list(QUANTIZATIONS)}, got {model.quantization!r}.")
    if data.eval_parser not in LABEL_PARSERS:
        raise ValueError(f"--eval_parser must be one of {list(LABEL_PARSERS)}, got {data.eval_parser!r}.")
    resolve_labels(data.eval_labels)  # an unknown label set is refused before anything is written
    if data.audio not in AUDIO_MODES:
        raise ValueError(f"--audio must be one of {list(AUDIO_MODES)}, got {data.audio!r}.")
    if data.fps <= 0 or data.max_frames < 1:
        raise ValueError(f"--fps must be > 0 and --max_frames >= 1, got {data.fps}, {data.max_frames}.")
    if data.max_audio_seconds is not None and data.max_audio_seconds <= 0:
        raise ValueError(f"--max_audio_seconds must be > 0, got {data.max_audio_seconds}.")
    if args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay false: the thinker reads media keys by name.")
    if args.eval_strategy != "no":
        raise ValueError("--eval_strategy: this recipe has no validation split; score with --eval_manifest.")

