"""Command-line and config-file arguments of ``recipes/merr_finetune.py``: four dataclasses (model, data, schedule,
and Trainer's ``TrainingArguments`` with the paper's defaults), parsed from an optional YAML/JSON file plus the
command line, and checked together."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from transformers import HfArgumentParser, TrainingArguments

from peft_mose import MoSEConfig
from peft_mose.metrics import resolve_labels

from .distributed import share_cpu_deepspeed_state
from .merr.tasks import parse_tasks
from .quantization import QUANTIZATIONS
from .run_config import target_modules_option
from .textfiles import load_json, load_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY_CONFIG = CONFIG_DIR / "tiny.yaml"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
STAGE_TASKS = {"coarse": ("emotion", "reason"), "fine": ("emotion", "reason_v2")}
STAGE_ANNOTATIONS = {"coarse": "MERR_coarse_grained.txt", "fine": "MERR_fine_grained.txt"}
STAGE_LEARNING_RATES = {"coarse": 2e-5, "fine": 1e-5}
SCHEDULES = ("emotion_llama", "trainer")


def mose_field(name: str):
    """A field with ``MoSEConfig``'s own default and help, so the two cannot drift apart."""
    source = MoSEConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata=dict(source.metadata))


@dataclass
class MoSEArguments:
    """MoSE's options, with ``MoSEConfig``'s defaults and help; ``--target_modules`` comma-separated or ``all-linear``
    (default: MoSE's own targets)."""

    r: int = mose_field("r")
    n_experts: int = mose_field("n_experts")
    eps: float = mose_field("eps")
    lora_alpha: float = mose_field("lora_alpha")
    lora_dropout: float = mose_field("lora_dropout")
    router_hidden_size: int = mose_field("router_hidden_size")
    expert_kind: str = mose_field("expert_kind")
    router: bool = mose_field("router")
    target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated target modules or all-linear; default: MoSE's own (the "
                                "language model's q_proj, v_proj)."},
    )  # fmt: skip

    def mose_config(self) -> MoSEConfig:
        """The MoSE adapter configuration."""
        return MoSEConfig(
            r=self.r,
            n_experts=self.n_experts,
            eps=self.eps,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            router_hidden_size=self.router_hidden_size,
            expert_kind=self.expert_kind,
            router=self.router,
            target_modules=target_modules_option(self.target_modules),
        )


@dataclass
class ModelArguments(MoSEArguments):
    """The LLM, what initialises it and the MoSE adapter."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder of the LLM (e.g. Llama-2-7b-chat-hf); not with --tiny_setup."}
    )
    projector_checkpoint: str | None = field(
        default=None,
        metadata={"help": "MiniGPT-v2 / Emotion-LLaMA .pth initialising the projectors (loaded with weights_only)."},
    )
    merge_checkpoint_lora: bool = field(
        default=False,
        metadata={
            "help": "Merge the LLM's LoRA held in --projector_checkpoint (MiniGPT-v2's) into the LLM before adding "
            "MoSE: the paper's starting point. With --init_from the checkpoint is read for this LoRA only."
        },
    )
    quantization: str = field(
        default="none",
        metadata={"help": "The frozen LLM's weights: none, 4bit (bitsandbytes NF4 with double quantization, bf16 "
                          "compute) or 8bit (bitsandbytes LLM.int8); the adapters stay float32 (docs/quantization.md)."},
    )  # fmt: skip
    init_from: str | None = field(
        default=None,
        metadata={"help": "A run folder (or checkpoint) whose adapter and projectors start this run: stage fine "
                  "starts from stage coarse's output."},
    )  # fmt: skip
    target_modules: str | None = field(default="q_proj,v_proj", metadata={"help": "Comma-separated target modules."})


@dataclass
class DataArguments:
    """The MERR data, the stage, the validation split and the end-of-run recognition evaluation."""

    _argument_group_name = "data"

    tiny_setup: bool = field(
        default=False,
        metadata={"help": "Write a synthetic MERR dataset and a tiny random Llama to <output_dir>/tiny and train on "
                  "them (recipes/configs/tiny.yaml, the default without --model_name_or_path)."},
    )  # fmt: skip
    data_root: str | None = field(
        default=None, metadata={"help": "MERR folder (annotations, JSON, subtitles, features); see docs/recipes.md."}
    )
    stage: str = field(
        default="coarse",
        metadata={"help": "coarse (MERR_coarse_grained, tasks emotion + reason) or fine (MERR_fine_grained, "
                  "emotion + reason_v2; start it from the coarse run with --init_from)."},
    )  # fmt: skip
    tasks: str | None = field(
        default=None,
        metadata={"help": "Tasks to train, e.g. emotion; emotion,perceive adds perceive-then-reason answers (from "
                  "MERR_cues.json, docs/preference.md). Default: the stage's."},
    )  # fmt: skip
    annotation: str | None = field(
        default=None, metadata={"help": "Annotation file (under data_root). Default: the stage's MERR file."}
    )
    skip_missing: bool = field(default=False, metadata={"help": "Leave out (and count) unusable samples."})
    audio_repeat: int = field(
        default=1, metadata={"help": "Repeat the audio token K times (token-imbalance experiment, paper Appendix C.2)."}
    )
    val_size: float = field(
        default=0.0,
        metadata={"help": "Samples held out of the annotation file for validation (eval loss during training): a "
                  "fraction in (0, 1) or a count >= 1; 0: none."},
    )  # fmt: skip
    val_annotation: str | None = field(
        default=None, metadata={"help": "Validation annotation file (under data_root) instead of --val_size."}
    )
    eval_annotation: str = field(
        default="auto",
        metadata={"help": "Annotation file (under data_root) of the end-of-run recognition evaluation; 'auto': "
                  "synthetic_test.txt when present, 'none': no evaluation."},
    )  # fmt: skip
    labels: str = field(
        default="merr",
        metadata={"help": "Label set of the annotation files: merr (MERR's nine), dfew (DFEW's seven, with disgust), "
                  "mer2023 or a,b,c; a sample with another label is an error naming its file and line."},
    )  # fmt: skip
    eval_labels: str = field(default="mer2023", metadata={"help": "Label set scored: mer2023, dfew, merr or a,b,c."})
    eval_max_new_tokens: int = field(default=8, metadata={"help": "Greedy tokens generated per evaluation prompt."})

    @property
    def stage_tasks(self) -> tuple[str, ...]:
        """The tasks trained: ``--tasks``, else the stage's."""
        return parse_tasks(self.tasks) if self.tasks else STAGE_TASKS[self.stage]


@dataclass
class ScheduleArguments:
    """The learning-rate schedule and the epoch length."""

    _argument_group_name = "schedule"

    lr_schedule: str = field(
        default="emotion_llama",
        metadata={"help": "emotion_llama: Emotion-LLaMA's linear warm-up from --warmup_start_lr (in epoch 0), then "
                  "one cosine value per epoch down to --min_lr (the paper's); trainer: Trainer's --lr_scheduler_type."},
    )  # fmt: skip
    warmup_start_lr: float = field(default=1e-6, metadata={"help": "Learning rate of the first warm-up step."})
    min_lr: float = field(default=1e-6, metadata={"help": "Learning rate the cosine decays towards."})
    iters_per_epoch: int = field(default=1000, metadata={"help": "Optimizer steps per epoch (paper: 1000)."})


@dataclass
class FinetuneArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's defaults (section 6.1); every option keeps its Trainer meaning."""

    _argument_group_name = "Trainer (TrainingArguments)"

    output_dir: str = field(default="runs/merr_finetune", metadata={"help": "Where everything is written."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate. Default: the stage's (coarse 2e-5, fine 1e-5)."}
    )  # None only until parse_finetune_args gives Trainer its final value
    num_train_epochs: float = field(default=30, metadata={"help": "Epochs (paper: 30)."})
    warmup_steps: float = field(default=1000, metadata={"help": "Warm-up steps (a fraction < 1: of all steps)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on 1-D parameters)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0: none, as the original."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per batch and process."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (no, steps or epoch)."})
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Checkpoints kept: the recipe rotates them once the newest has its manifest (Trainer's own "
                  "rotation, which runs before, stays off)."},
    )  # fmt: skip
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (batches are dicts)."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Batch key of labels."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume (<output_dir>/checkpoint-N), verified against its manifest first; "
            "with no path (or True): the newest intact checkpoint of the run.",
            "nargs": "?",
            "const": "True",
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in --output_dir: its files and checkpoints are deleted (logged and "
                  "recorded in run_config.json). Without it such a folder is refused (unless resumed)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        share_cpu_deepspeed_state(self)
        super().__post_init__()


@dataclass
class FinetuneConfig:
    """Everything one run is given: the four argument groups (Trainer's with their final values: the stage's
    learning rate, and ``save_total_limit`` off, the recipe's rotation keeping ``checkpoints_kept``) and the config
    file they were read from."""

    model: ModelArguments
    data: DataArguments
    schedule: ScheduleArguments
    training: FinetuneArguments
    config_file: Path | None = None
    checkpoints_kept: int | None = None

    def arguments(self) -> dict[str, dict[str, Any]]:
        """Every argument, JSON-friendly, for the run configuration (``--save_total_limit`` as given)."""
        return {
            "model": argument_values(self.model),
            "data": argument_values(self.data),
            "schedule": argument_values(self.schedule),
            "training": trainer_values(self.training, self.checkpoints_kept),
        }


DATACLASSES = (ModelArguments, DataArguments, ScheduleArguments, FinetuneArguments)


def argument_values(arguments: object) -> dict[str, Any]:
    """``{field: value}`` of an arguments dataclass (what ``run_config.json`` records)."""
    return {f.name: getattr(arguments, f.name) for f in fields(arguments)}


def build_parser(
    exit_on_error: bool = True, dataclass_types: Sequence[type] = DATACLASSES, description: str | None = None
) -> HfArgumentParser:
    """The recipe's parser (``dataclass_types``: another script's groups): its own groups first in ``--help``, then
    Trainer's; no abbreviated options."""
    return HfArgumentParser(dataclass_types, description=description or __doc__.splitlines()[0], allow_abbrev=False,
                            exit_on_error=exit_on_error)  # fmt: skip


def read_config_file(path: Path, dataclass_types: Sequence[type] = DATACLASSES) -> dict[str, Any]:
    """The ``{option: value}`` mapping of a YAML or JSON config file, every key an option of the recipe and every
    value one it accepts (:func:`check_config_values`); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    values = load_json(path) if path.suffix == ".json" else load_yaml(path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of option: value, got {type(values).__name__}.")
    known = {f.name for dataclass_type in dataclass_types for f in fields(dataclass_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Config file {path}: unknown options {unknown} (see the script's --help).")
    return check_config_values(values, path, dataclass_types)


def _takes_list(option: str, dataclass_types: Sequence[type] = DATACLASSES) -> bool:
    """Whether the option's field is typed with a list (e.g. Trainer's ``report_to: str | list[str]``); read from the
    annotations, as the parser rewrites the fields' types."""
    return any("list" in str(get_type_hints(kind).get(option)) for kind in dataclass_types)


def _token(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_config_values(
    values: dict[str, Any], path: Path, dataclass_types: Sequence[type] = DATACLASSES
) -> dict[str, Any]:
    """The file's values converted as the command line would convert them, each refused (naming the file, the key,
    the value and what the option takes) when the command line would refuse it: a file's values bypass the
    parser's types otherwise. Mappings go as they are to Trainer's dict options, which check them."""
    probe = build_parser(exit_on_error=False, dataclass_types=dataclass_types)
    defaults = vars(probe.parse_args([]))
    checked = {}
    for key, value in values.items():
        if value is None or isinstance(value, dict):
            if value is None and defaults[key] is not None:
                raise ValueError(f"Config file {path}: {key}: null is not a value of --{key} (default {defaults[key]!r}).")
            checked[key] = value
            continue
        items = value if isinstance(value, list) else [value]
        problem = None
        try:
            parsed, extra = probe.parse_known_args([f"--{key}", *map(_token, items)])
            parsed = getattr(parsed, key)
            if isinstance(value, list) and _takes_list(key, dataclass_types) and all(isinstance(v, str) for v in value):
                parsed = value  # an option of Trainer's typed ``str | list[str]`` (report_to, ...)
            elif extra or (isinstance(value, list) and not isinstance(parsed, list)) or not items:
                problem = "the option takes a single value, not a list"
        except argparse.ArgumentError as error:
            problem = str(error)
        if problem:
            raise ValueError(
                f"Config file {path}: {key}: {value!r} is not a valid value ({problem}; default {defaults[key]!r})."
            )
        checked[key] = parsed
    return checked


def _gives(argv: Sequence[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in argv)


def parse_values(
    argv: Sequence[str] | None, dataclass_types: Sequence[type], default_config: Path, description: str | None = None
) -> tuple[dict[str, Any], Path | None]:
    """``({option: value}, config file)`` of ``[config.yaml|config.json] [--option value ...]`` for the groups
    ``dataclass_types``: the file's values replace the defaults, the command line's replace the file's; without a
    file and without ``--model_name_or_path`` the file is ``default_config`` (a script's built-in tiny default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = None
    if argv and Path(argv[0]).suffix in CONFIG_SUFFIXES and not argv[0].startswith("-"):
        config_file = Path(argv.pop(0))
    elif not _gives(argv, "--model_name_or_path"):
        config_file = default_config
    parser = build_parser(dataclass_types=dataclass_types, description=description)
    if config_file is not None:
        parser.set_defaults(**read_config_file(config_file, dataclass_types))
    namespace, unused = parser.parse_known_args(argv)
    if unused:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {unused}")
    return vars(namespace), config_file


def parse_finetune_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    """Parse ``[config.yaml|config.json] [--option value ...]``: the file's values replace the defaults, the command
    line's replace the file's. Without a file and without ``--model_name_or_path``, the file is
    ``recipes/configs/tiny.yaml`` (the built-in tiny default)."""
    values, config_file = parse_values(argv, DATACLASSES, TINY_CONFIG)
    model, data, schedule = (build_group(kind, values) for kind in (ModelArguments, DataArguments, ScheduleArguments))
    # Trainer's arguments are built once, with their final values (building them again would reset accelerate's
    # state): the stage's learning rate unless one is given, and no rotation of Trainer's own, which would run before
    # the newest checkpoint has its manifest (integrity.CheckpointManifests rotates after it).
    rate = values["learning_rate"] if values["learning_rate"] is not None else STAGE_LEARNING_RATES.get(data.stage)
    training, kept = trainer_group(FinetuneArguments, values, learning_rate=rate)
    return FinetuneConfig(model, data, schedule, training, config_file, checkpoints_kept=kept)


def build_group(kind: type, values: dict[str, Any]):
    """A dataclass of the parser built from the parsed ``values`` it has fields for (as HfArgumentParser does)."""
    return kind(**{f.name: values[f.name] for f in fields(kind) if f.init})


def trainer_group(kind: type, values: dict[str, Any], **final: Any) -> tuple[Any, int | None]:
    """Trainer's argument group ``kind`` built from ``values`` (``final`` replacing some) with Trainer's own checkpoint
    rotation off, and the ``--save_total_limit`` asked for: the recipes rotate after each checkpoint's manifest
    (:class:`~mosear_recipes.integrity.CheckpointManifests`)."""
    return build_group(kind, {**values, **final, "save_total_limit": None}), values["save_total_limit"]


def trainer_values(training: TrainingArguments, checkpoints_kept: int | None) -> dict[str, Any]:
    """Trainer's arguments, JSON-friendly, with ``--save_total_limit`` as given (not Trainer's own, which is off)."""
    return {**training.to_dict(), "save_total_limit": checkpoints_kept}


def check_trainer_options(args: TrainingArguments) -> None:
    """Refuse Trainer options the recipes' models and checkpoints do not honour: Trainer's label smoother shifts
    labels only for the model classes it knows (a recipe's wrapper would learn to copy its input), and its best-model
    reload cannot find a checkpoint that the recipes' own verified rotation (``--save_total_limit``) may have
    removed."""
    if args.label_smoothing_factor:
        raise ValueError(f"--label_smoothing_factor {args.label_smoothing_factor} is not supported by the recipes: "
                         "Trainer would smooth against unshifted labels of their model. Leave it at 0.")  # fmt: skip
    if args.load_best_model_at_end:
        raise ValueError("--load_best_model_at_end is not supported by the recipes: their checkpoint rotation may "
                         "remove the best checkpoint. Keep the checkpoints (--save_total_limit) and pick one by its "
                         "logged eval_loss.")  # fmt: skip


def check_args(config: FinetuneConfig) -> None:
    """Refuse contradictory or unsupported settings with a message that says what to do instead."""
    model, data, schedule, args = config.model, config.data, config.schedule, config.training
    if data.tiny_setup and (model.model_name_or_path or data.data_root):
        raise ValueError(
            "--tiny_setup writes its own model and data: give it, or --model_name_or_path with --data_root, not both."
        )
    if not data.tiny_setup and not (model.model_name_or_path and data.data_root):
        raise ValueError("Give --model_name_or_path and --data_root together (or --tiny_setup true).")
    if model.projector_checkpoint and model.init_from and not model.merge_checkpoint_lora:
        raise ValueError(
            "Give --projector_checkpoint or --init_from, not both (--init_from holds projectors too; with "
            "--merge_checkpoint_lora the checkpoint is read for its LoRA only)."
        )
    if model.merge_checkpoint_lora and not model.projector_checkpoint:
        raise ValueError(
            "--merge_checkpoint_lora merges the LoRA of --projector_checkpoint: give that checkpoint "
            "(minigptv2_checkpoint.pth)."
        )
    if model.quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {list(QUANTIZATIONS)}, got {model.quantization!r}.")
    if model.quantization != "none" and model.merge_checkpoint_lora:
        raise ValueError("--merge_checkpoint_lora merges a LoRA into the LLM's weights, which a quantized LLM "
                         "(--quantization) cannot hold exactly: merge it into a bf16 copy first, or use "
                         "--quantization none.")  # fmt: skip
    if model.quantization != "none" and args.deepspeed:
        raise ValueError("--quantization (bitsandbytes) does not shard under DeepSpeed ZeRO: run it with one "
                         "process per GPU (accelerate/torchrun DDP) or without --deepspeed.")  # fmt: skip
    if data.stage not in STAGE_TASKS:
        raise ValueError(f"--stage must be one of {list(STAGE_TASKS)}, got {data.stage!r}.")
    for option, labels in (("--labels", data.labels), ("--eval_labels", data.eval_labels)):
        try:
            resolve_labels(labels)
        except ValueError as error:
            raise ValueError(f"{option}: {error}") from error
    if data.audio_repeat < 1:
        raise ValueError(f"--audio_repeat must be >= 1, got {data.audio_repeat}.")
    if data.val_size < 0 or (data.val_size >= 1 and data.val_size != int(data.val_size)):
        raise ValueError(f"--val_size must be a fraction in (0, 1) or a whole count, got {data.val_size}.")
    if data.val_size and data.val_annotation:
        raise ValueError("Give --val_size or --val_annotation, not both.")
    if args.eval_strategy != "no" and not (data.val_size or data.val_annotation):
        raise ValueError(
            f"--eval_strategy {args.eval_strategy.value} evaluates on a validation split: give --val_size (held out "
            "of the training annotation) or --val_annotation."
        )
    if args.remove_unused_columns:
        raise ValueError(
            "--remove_unused_columns must stay false: the model reads batch keys its forward signature does not name "
            "(features, modality ids)."
        )
    if schedule.iters_per_epoch < 1 or args.num_train_epochs <= 0:
        raise ValueError(
            f"--iters_per_epoch must be >= 1 and --num_train_epochs > 0, got {schedule.iters_per_epoch}, "
            f"{args.num_train_epochs}."
        )
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if schedule.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr_schedule must be one of {list(SCHEDULES)}, got {schedule.lr_schedule!r}.")
    check_trainer_options(args)
    if schedule.lr_schedule == "emotion_llama":
        if args.max_steps > total_steps(config):
            raise ValueError(
                f"--max_steps {args.max_steps} goes past the emotion_llama schedule's {total_steps(config)} steps "
                "(--num_train_epochs x --iters_per_epoch), where its cosine would rise again: raise "
                "--num_train_epochs instead."
            )
        changed = [name for name, default in (("lr_scheduler_type", "linear"), ("lr_scheduler_kwargs", {}))
                   if getattr(args, name) not in (default, None)]  # fmt: skip
        if changed:
            raise ValueError(
                f"--{changed[0]} sets Trainer's schedule, but --lr_schedule is emotion_llama (the paper's warm-up and "
                "per-epoch cosine): add --lr_schedule trainer to use Trainer's."
            )
        warmup = args.get_warmup_steps(total_steps(config))
        if warmup > schedule.iters_per_epoch:
            raise ValueError(
                f"--warmup_steps ({warmup}) must fit in the first epoch (--iters_per_epoch "
                f"{schedule.iters_per_epoch}): the emotion_llama schedule's cosine starts at epoch 1."
            )


def total_steps(config: FinetuneConfig) -> int:
    """Optimizer steps of the full schedule (``--max_steps`` only cuts it short)."""
    return math.ceil(config.training.num_train_epochs * config.schedule.iters_per_epoch)
