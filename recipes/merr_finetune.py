"""Fine-tune Emotion-LLaMA with MoSE on MERR: MoSEAR's two-stage training (paper section 6.1) on HF ``Trainer``.

    python recipes/merr_finetune.py                        # built-in tiny default: synthetic MERR, tiny random Llama
    deepspeed --num_accelerators 4 recipes/merr_finetune.py --deepspeed recipes/configs/zero2.json \\
        --model_name_or_path Llama-2-7b-chat-hf --data_root MERR \\
        --projector_checkpoint minigptv2_checkpoint.pth --merge_checkpoint_lora true --bf16 true \\
        --output_dir runs/mosear

Stage ``coarse`` trains on ``MERR_coarse_grained.txt`` (tasks emotion + reason, lr 2e-5), stage ``fine`` on
``MERR_fine_grained.txt`` (emotion + reason_v2, lr 1e-5); each stage: 30 epochs x 1000 iterations, a linear warm-up
from 1e-6, then a per-epoch cosine, AdamW with weight decay 0.05 (none on 1-D parameters), one task per batch.
Outputs, the tiny default's overrides and the multi-GPU commands: ``docs/recipes.md``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import (
    HfArgumentParser,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from peft_mose import MoSEConfig
from peft_mose._versions import environment
from peft_mose.metrics import resolve_labels

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `recipes` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from recipes.distributed import gathered, process_rank, share_cpu_deepspeed_state  # noqa: E402
from recipes.emotion_llama.checkpoint import (  # noqa: E402
    load_projector_checkpoint,
    load_projectors,
    merge_lora_checkpoint,
    save_projectors,
)
from recipes.emotion_llama.features import FeatureSpec  # noqa: E402
from recipes.emotion_llama.model import EmotionLlama, load_llm, load_tokenizer  # noqa: E402
from recipes.emotion_llama.projectors import EmotionLlamaProjectors  # noqa: E402
from recipes.emotion_llama.prompt import PromptEncoder  # noqa: E402
from recipes.evaluate import ScoringConfig, markdown_table, score, warn_skipped, write_report  # noqa: E402
from recipes.guards import GuardedTrainer  # noqa: E402
from recipes.integrity import check_adapter_dir, resolve_resume  # noqa: E402
from recipes.make_tiny import write_tiny_setup  # noqa: E402
from recipes.merr.collator import MERRCollator  # noqa: E402
from recipes.merr.dataset import MERRDataset  # noqa: E402
from recipes.merr.references import merr_references  # noqa: E402
from recipes.merr.sampler import SingleTaskBatchSampler  # noqa: E402
from recipes.merr.synthetic import FILES as SYNTHETIC_FILES  # noqa: E402
from recipes.merr.tasks import parse_tasks  # noqa: E402

STAGE_TASKS = {"coarse": ("emotion", "reason"), "fine": ("emotion", "reason_v2")}
SUBTITLE_FILE = "transcription_en_all.csv"
CAPTION_FILES = {"coarse_json": "MERR_coarse_grained.json", "fine_json": "MERR_fine_grained.json"}
RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
PROJECTORS_FILE = "projectors.safetensors"
REFERENCE_FILE = "reference_outputs.safetensors"
EVAL_DIR = "eval"
TINY_DIR = "tiny"
TINY_NUM_SAMPLES = 300
# The built-in default's arguments, placed before the command line's (which therefore win): the paper's schedule
# (30 x 1000 iterations per stage, lr 2e-5 / 1e-5, warm-up 1000 steps, batch 1, r 64) shrunk to seconds on a CPU.
TINY_DEFAULTS = (
    "--r", "8",
    "--per_device_train_batch_size", "4",
    "--num_train_epochs", "3",
    "--iters_per_epoch", "50",
    "--warmup_steps", "5",
    "--coarse_learning_rate", "3e-3",
    "--fine_learning_rate", "1e-3",
    "--min_lr", "1e-4",
    "--logging_steps", "25",
    "--eval_max_new_tokens", "3",
)  # fmt: skip


def _mose_field(name: str):
    """A command-line field with ``MoSEConfig``'s own default and help, so the two cannot drift apart."""
    source = MoSEConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata=dict(source.metadata))


@dataclass
class ModelArguments:
    """The LLM, the initialisation and the MoSE adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder of the LLM (e.g. Llama-2-7b-chat-hf). Default: write the tiny setup (synthetic MERR "
            "data and a tiny random Llama) to <output_dir>/tiny and train it with the tiny defaults."
        },
    )
    projector_checkpoint: str | None = field(
        default=None,
        metadata={"help": "MiniGPT-v2 / Emotion-LLaMA .pth initialising the projectors (loaded with weights_only)."},
    )
    merge_checkpoint_lora: bool = field(
        default=False,
        metadata={
            "help": "Merge the LLM's LoRA adapter held in --projector_checkpoint (MiniGPT-v2's, in "
            "minigptv2_checkpoint.pth) into the LLM before adding MoSE: the paper's starting point. With --init_from "
            "the checkpoint is read for this LoRA only."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Folder holding adapter/ and projectors.safetensors (a run's output, stage folder or checkpoint) "
            "to start from, e.g. to run stage fine alone after stage coarse."
        },
    )
    r: int = _mose_field("r")
    n_experts: int = _mose_field("n_experts")
    eps: float = _mose_field("eps")
    lora_alpha: float = _mose_field("lora_alpha")
    lora_dropout: float = _mose_field("lora_dropout")
    router_hidden_size: int = _mose_field("router_hidden_size")
    expert_kind: str = _mose_field("expert_kind")
    router: bool = _mose_field("router")
    target_modules: str = field(default="q_proj,v_proj", metadata={"help": "Comma-separated target modules."})

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
            target_modules=[m.strip() for m in self.target_modules.split(",") if m.strip()],
        )


@dataclass
class DataArguments:
    """Where the MERR data lies, which stages and tasks to train, and the end-of-run evaluation."""

    data_root: str | None = field(
        default=None, metadata={"help": "MERR folder (annotations, JSON, subtitles, features); see docs/recipes.md."}
    )
    stages: str = field(default="coarse,fine", metadata={"help": "Stages to run, in order: coarse, fine or both."})
    tasks: str | None = field(
        default=None,
        metadata={"help": "Tasks of every stage, e.g. emotion. Default: coarse emotion,reason; fine emotion,reason_v2"},
    )
    coarse_annotation: str = field(
        default="MERR_coarse_grained.txt", metadata={"help": "Stage coarse's annotation file (under data_root)."}
    )
    fine_annotation: str = field(
        default="MERR_fine_grained.txt", metadata={"help": "Stage fine's annotation file (under data_root)."}
    )
    skip_missing: bool = field(default=False, metadata={"help": "Leave out (and count) unusable samples."})
    audio_repeat: int = field(
        default=1, metadata={"help": "Repeat the audio token K times (token-imbalance experiment, paper Appendix C.2)."}
    )
    eval_annotation: str = field(
        default="auto",
        metadata={
            "help": "Annotation file (under data_root) of the end-of-run recognition evaluation; 'auto': "
            "synthetic_test.txt when present, 'none': no evaluation."
        },
    )
    eval_labels: str = field(default="mer2023", metadata={"help": "Label set scored: mer2023, dfew, merr or a,b,c."})
    eval_max_new_tokens: int = field(default=8, metadata={"help": "Greedy tokens generated per evaluation prompt."})


@dataclass
class FinetuneArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's schedule as defaults and per-stage learning rates."""

    output_dir: str = field(default="runs/merr_finetune", metadata={"help": "Where everything is written."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Not used: give --coarse_learning_rate / --fine_learning_rate."}
    )
    coarse_learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of stage coarse."})
    fine_learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of stage fine."})
    warmup_start_lr: float = field(default=1e-6, metadata={"help": "Learning rate of the first warm-up step."})
    min_lr: float = field(default=1e-6, metadata={"help": "Learning rate the cosine decays towards."})
    iters_per_epoch: int = field(default=1000, metadata={"help": "Optimizer steps per epoch (paper: 1000)."})
    num_train_epochs: float = field(default=30, metadata={"help": "Epochs per stage (paper: 30)."})
    warmup_steps: float = field(default=1000, metadata={"help": "Warm-up steps, within the first epoch."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on 1-D parameters)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping; 0: none, as the original."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per batch and process."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Fixed: a warm-up from --warmup_start_lr, then a per-epoch cosine."}
    )
    logging_steps: float = field(default=50, metadata={"help": "Log every N optimizer steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch (no, steps or epoch)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept per stage."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (batches are dicts)."})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={"help": "Batch key of labels."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume (<output_dir>/<stage>/checkpoint-N), verified against its manifest "
            "first; with no path (or True): the newest intact checkpoint of the run.",
            "nargs": "?",
            "const": "True",
        },
    )

    def __post_init__(self) -> None:
        share_cpu_deepspeed_state(self)
        super().__post_init__()


@dataclass(frozen=True)
class Stage:
    """One training stage, resolved."""

    name: str
    annotation: Path
    tasks: tuple[str, ...]
    learning_rate: float


@dataclass
class TrainedModel:
    """A model rebuilt by :func:`load_trained`: the wrapper (eval mode), its prompt encoder, the run configuration."""

    model: EmotionLlama
    encoder: PromptEncoder
    run_config: dict


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataArguments, FinetuneArguments]:
    """Parse the command line; without ``--model_name_or_path`` the tiny defaults come first (yours win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneArguments))
    model_args, _, _ = parser.parse_args_into_dataclasses(argv)
    if model_args.model_name_or_path is None:
        argv = [*TINY_DEFAULTS, *argv]
    return parser.parse_args_into_dataclasses(argv)


def total_steps(args: FinetuneArguments) -> int:
    """Optimizer steps of one stage's full schedule."""
    return math.ceil(args.num_train_epochs * args.iters_per_epoch)


def check_args(model_args: ModelArguments, data_args: DataArguments, args: FinetuneArguments) -> None:
    """Refuse contradictory or unsupported settings with a message that says what to do instead."""
    if args.learning_rate is not None:
        raise ValueError("--learning_rate is not used: give --coarse_learning_rate and/or --fine_learning_rate.")
    if args.lr_scheduler_type != "cosine":
        raise ValueError(
            f"--lr_scheduler_type {args.lr_scheduler_type} is not supported: the schedule is a warm-up from "
            "--warmup_start_lr, then a per-epoch cosine to --min_lr (set --warmup_steps, --warmup_start_lr, --min_lr)."
        )
    if (model_args.model_name_or_path is None) != (data_args.data_root is None):
        raise ValueError(
            "Give --model_name_or_path and --data_root together, or neither (the built-in tiny default writes its "
            "own model and synthetic data)."
        )
    if model_args.projector_checkpoint and model_args.init_from and not model_args.merge_checkpoint_lora:
        raise ValueError(
            "Give --projector_checkpoint or --init_from, not both (--init_from holds projectors too; with "
            "--merge_checkpoint_lora the checkpoint is read for its LoRA only)."
        )
    if model_args.merge_checkpoint_lora and not model_args.projector_checkpoint:
        raise ValueError(
            "--merge_checkpoint_lora merges the LoRA of --projector_checkpoint: give that checkpoint "
            "(minigptv2_checkpoint.pth)."
        )
    if args.iters_per_epoch < 1 or args.num_train_epochs <= 0:
        raise ValueError(
            f"--iters_per_epoch must be >= 1 and --num_train_epochs > 0, got {args.iters_per_epoch}, "
            f"{args.num_train_epochs}."
        )
    warmup = args.get_warmup_steps(total_steps(args))
    if warmup > args.iters_per_epoch:
        raise ValueError(
            f"--warmup_steps ({warmup}) must fit in the first epoch (--iters_per_epoch {args.iters_per_epoch}): the "
            "cosine starts at epoch 1, as in Emotion-LLaMA's linear_warmup_cosine_lr."
        )
    for name in ("coarse_learning_rate", "fine_learning_rate"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}.")
    if data_args.audio_repeat < 1:
        raise ValueError(f"--audio_repeat must be >= 1, got {data_args.audio_repeat}.")


def parse_stages(data_args: DataArguments, args: FinetuneArguments, data_root: Path) -> list[Stage]:
    """The stages to run, in the given order, with their annotation file, tasks and learning rate."""
    names = [s.strip() for s in data_args.stages.split(",") if s.strip()]
    if not names or any(s not in STAGE_TASKS for s in names) or len(set(names)) != len(names):
        raise ValueError(f"--stages must list coarse and/or fine, each once, got {data_args.stages!r}.")
    annotations = {"coarse": data_args.coarse_annotation, "fine": data_args.fine_annotation}
    rates = {"coarse": args.coarse_learning_rate, "fine": args.fine_learning_rate}
    tasks = parse_tasks(data_args.tasks) if data_args.tasks else None
    return [Stage(name, data_root / annotations[name], tasks or STAGE_TASKS[name], rates[name]) for name in names]


def warmup_cosine_lr(
    step: int, lr: float, warmup_start_lr: float, warmup_steps: int, min_lr: float, iters_per_epoch: int, epochs: float
) -> float:
    """Emotion-LLaMA's ``linear_warmup_cosine_lr`` (LAVIS): in epoch 0 a linear warm-up from ``warmup_start_lr`` to
    ``lr`` over ``warmup_steps``, then ``lr``; from epoch 1 one cosine value per epoch, from ``lr`` to ``min_lr``."""
    epoch = step // iters_per_epoch
    if epoch == 0:
        return min(lr, warmup_start_lr + (lr - warmup_start_lr) * step / max(warmup_steps, 1))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def save_trained(model: EmotionLlama, directory: Path, is_main: bool = True) -> None:
    """Write ``directory/adapter`` (``save_pretrained``) and ``directory/projectors.safetensors``. Under ZeRO-3 the
    trainable parameters are gathered first (else they would be saved as empty tensors): every process must call."""
    with gathered([p for p in model.parameters() if p.requires_grad]):
        if is_main:
            directory.mkdir(parents=True, exist_ok=True)
            model.llm.save_pretrained(str(directory / ADAPTER_DIR))
            save_projectors(model.projectors, directory / PROJECTORS_FILE)


def load_trained_weights(model: EmotionLlama, directory: Path) -> None:
    """Load ``directory/adapter`` and ``directory/projectors.safetensors`` into a model built for training."""
    missing = [p for p in (directory / ADAPTER_DIR, directory / PROJECTORS_FILE) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{directory} holds no trained model: {', '.join(map(str, missing))} missing.")
    check_adapter_dir(directory / ADAPTER_DIR)
    model.llm.load_adapter(str(directory / ADAPTER_DIR), adapter_name="default", is_trainable=True)
    load_projectors(model.projectors, directory / PROJECTORS_FILE)


class SamplerEpochCallback(TrainerCallback):
    """Sets the batch sampler's epoch from the optimizer step at the start of every epoch. Trainer's own ``set_epoch``
    does not reach a sampler that accelerate wrapped twice (sharded over processes, then skipping the batches already
    trained), so a multi-process run resumed inside epoch k >= 1 would replay epoch 0's batches without this."""

    def __init__(self, sampler: SingleTaskBatchSampler, steps_per_epoch: int) -> None:
        self.sampler = sampler
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.sampler.set_epoch(state.global_step // self.steps_per_epoch)


class MoSETrainer(GuardedTrainer):
    """``Trainer`` with one-task batches, no weight decay on 1-D parameters, the warm-up + cosine schedule, and
    checkpoints holding only what trains (``adapter/`` and ``projectors.safetensors``); it stops on non-finite values
    and gives every checkpoint a manifest (:class:`~recipes.guards.GuardedTrainer`)."""

    def __init__(self, *args, batch_sampler: SingleTaskBatchSampler, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.add_callback(SamplerEpochCallback(batch_sampler, self.args.iters_per_epoch))

    def get_train_dataloader(self) -> DataLoader:
        """The dataset read in :class:`SingleTaskBatchSampler` batches (sharded over processes by accelerate)."""
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type != "cpu",
        )
        return self.accelerator.prepare(loader)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Weight decay on matrices only: biases, norms and other 1-D parameters get none (as the original)."""
        return [name for name, param in model.named_parameters() if param.ndim >= 2]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> LRScheduler:
        """:func:`warmup_cosine_lr` over the full schedule (``max_steps`` only cuts it short)."""
        if self.lr_scheduler is None:
            args = self.args
            warmup = args.get_warmup_steps(total_steps(args))

            def factor(step: int) -> float:
                rate = warmup_cosine_lr(
                    step, args.learning_rate, args.warmup_start_lr, warmup, args.min_lr, args.iters_per_epoch,
                    args.num_train_epochs,
                )  # fmt: skip
                return rate / args.learning_rate

            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, factor)
        return self.lr_scheduler

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter and the projectors (under ZeRO-3 every process must call this)."""
        save_trained(self.model, Path(output_dir or self.args.output_dir), self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        # Resuming without DeepSpeed (DeepSpeed resumes from its own engine checkpoint).
        load_trained_weights(model if model is not None else self.model, Path(resume_from_checkpoint))


def merged_lora(model: Mapping[str, Any]) -> str | None:
    """The checkpoint whose LoRA is merged into the LLM (``--merge_checkpoint_lora``), from the model arguments as
    ``run_config.json`` records them; ``None`` for the plain LLM."""
    return model.get("projector_checkpoint") if model.get("merge_checkpoint_lora") else None


def load_base_llm(model_path: str | Path, lora_checkpoint: str | Path | None) -> torch.nn.Module:
    """The frozen LLM that MoSE is added to: ``model_path``, with the LoRA of ``lora_checkpoint`` merged in when
    given (its load report is printed)."""
    llm = load_llm(model_path)
    if lora_checkpoint is None:
        return llm
    llm, report = merge_lora_checkpoint(llm, lora_checkpoint)
    print(report.summary())
    return llm


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
    base = load_base_llm(model_path, merged_lora(dataclasses.asdict(model_args)))
    llm = get_peft_model(base, model_args.mose_config())
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id)
    if init_dir is not None:
        load_trained_weights(model, init_dir)
    elif model_args.projector_checkpoint:
        print(load_projector_checkpoint(projectors, model_args.projector_checkpoint).summary())
    return model


def stage_dataset(stage: Stage, data_root: Path, skip_missing: bool) -> MERRDataset:
    """The stage's MERR dataset, every sample validated (captions are read for the tasks that need them)."""
    captions = {key: data_root / name for key, name in CAPTION_FILES.items()}  # read if a task needs it
    return MERRDataset(
        stage.annotation, data_root / SUBTITLE_FILE, tasks=stage.tasks, skip_missing=skip_missing, **captions
    )


def resume_stage(resume_from_checkpoint: str | None, output_dir: Path, stages: list[Stage]) -> int:
    """Index of the stage ``--resume_from_checkpoint`` belongs to (``<output_dir>/<stage>/checkpoint-N``); 0 if none."""
    if resume_from_checkpoint is None:
        return 0
    checkpoint = Path(resume_from_checkpoint).resolve()
    names = [s.name for s in stages]
    if not checkpoint.is_dir() or checkpoint.parent.parent != output_dir or checkpoint.parent.name not in names:
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint} must be a checkpoint folder of this run's stages, "
            f"{output_dir}/<{'|'.join(names)}>/checkpoint-N."
        )
    return names.index(checkpoint.parent.name)


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


def generate_predictions(
    model: EmotionLlama, dataset: MERRDataset, encoder: PromptEncoder, device: torch.device, batch_size: int,
    max_new_tokens: int, task: str = "emotion", reallocation: Mapping[str, Any] | None = None,
) -> dict[str, str]:  # fmt: skip
    """Greedy answers to the prompt of ``task`` (the first instruction of its pool, so that runs are comparable) for
    every sample, ``{name: text}``, on every process, under attention reallocation with the options
    ``reallocation`` when given. The samples are split over the processes in equal shares (the
    last one repeated): ZeRO-3 needs every process in every generate call."""
    collate = MERRCollator(encoder, with_answer=False)
    rank, world = process_rank()
    keys = dataset.keys(task)
    share = math.ceil(len(keys) / world)
    keys = (keys + keys[-1:] * (share * world - len(keys)))[rank * share : (rank + 1) * share]
    predictions: dict[str, str] = {}
    model.eval()
    for start in tqdm(range(0, share, batch_size), desc="generate", unit="batch", disable=rank != 0):
        batch = collate([dataset[k] for k in keys[start : start + batch_size]])
        ids = model.generate(
            to_device(batch, device), reallocation=reallocation, max_new_tokens=max_new_tokens, do_sample=False
        )
        texts = encoder.tokenizer.batch_decode(ids, skip_special_tokens=True)
        predictions.update(zip(batch["names"], (t.strip() for t in texts)))
    if world == 1:
        return predictions
    parts: list[dict[str, str] | None] = [None] * world
    torch.distributed.all_gather_object(parts, predictions)
    return {name: text for part in parts for name, text in part.items()}


def evaluate(
    model: EmotionLlama,
    encoder: PromptEncoder,
    dataset: MERRDataset,
    data_args: DataArguments,
    args: FinetuneArguments,
    out_dir: Path,
) -> dict | None:
    """Recognition scores on ``dataset`` (per CA-MER subset when ``synthetic_subsets.csv`` lists them): printed as a
    markdown table and written to ``out_dir`` by the main process, which also returns them (``None`` elsewhere)."""
    predictions = generate_predictions(
        model, dataset, encoder, args.device, args.per_device_eval_batch_size, data_args.eval_max_new_tokens
    )
    if not args.should_save:
        return None
    references = merr_references(dataset, "emotion")
    result, rows = score(predictions, references, ScoringConfig("recognition", resolve_labels(data_args.eval_labels)))
    for row in rows:
        row["prediction"] = predictions[row["id"]]
    warn_skipped(rows, "recognition")
    write_report(result, rows, out_dir, name="MoSE")
    print(markdown_table([("MoSE", result)]), end="")
    return result


def eval_dataset(data_args: DataArguments, data_root: Path) -> MERRDataset | None:
    """The evaluation samples (emotion task), or ``None`` for no evaluation."""
    if data_args.eval_annotation == "none":
        return None
    annotation = data_root / data_args.eval_annotation
    if data_args.eval_annotation == "auto":
        annotation = data_root / SYNTHETIC_FILES["test_txt"]
        if not annotation.exists():
            return None
    return MERRDataset(annotation, data_root / SUBTITLE_FILE, tasks=("emotion",), skip_missing=data_args.skip_missing)


def prepare_inputs(
    model_args: ModelArguments, data_args: DataArguments, args: FinetuneArguments, output_dir: Path
) -> tuple[Path, Path]:
    """``(model folder, data root)``: the given ones, or the tiny setup that rank 0 writes to ``output_dir/tiny``."""
    if model_args.model_name_or_path is not None:
        return Path(model_args.model_name_or_path), Path(data_args.data_root)
    tiny = output_dir / TINY_DIR
    with args.main_process_first(local=False, desc="writing the tiny setup"):
        if args.process_index == 0:
            write_tiny_setup(tiny, num_samples=TINY_NUM_SAMPLES, seed=args.seed)
    return tiny / "model", tiny / "data"


def train_stage(
    stage: Stage,
    dataset: MERRDataset,
    args: FinetuneArguments,
    model: EmotionLlama,
    encoder: PromptEncoder,
    resume_from_checkpoint: str | None,
) -> MoSETrainer:
    """Train ``model`` on one stage (``--output_dir/<stage>`` holds its checkpoints); returns the trainer."""
    sampler = SingleTaskBatchSampler(
        dataset,
        batch_size=args.per_device_train_batch_size,
        # accelerate deals the batches out to the processes: each gets iters_per_epoch optimizer steps per epoch
        num_batches=args.iters_per_epoch * args.gradient_accumulation_steps * args.world_size,
        seed=args.seed,
    )
    stage_args = dataclasses.replace(
        args, output_dir=str(Path(args.output_dir) / stage.name), learning_rate=stage.learning_rate
    )
    trainer = MoSETrainer(
        model=model, args=stage_args, train_dataset=dataset, data_collator=MERRCollator(encoder), batch_sampler=sampler
    )
    if args.should_save:
        print(f"Stage {stage.name}: {dataset.skip_report()} Tasks {', '.join(stage.tasks)}, lr {stage.learning_rate}.")
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train the stages, save the model, its reference outputs and the evaluation; returns the evaluation result on
    the main process."""
    model_args, data_args, args = parse_args(argv)
    check_args(model_args, data_args, args)
    output_dir = Path(args.output_dir).resolve()
    model_path, data_root = prepare_inputs(model_args, data_args, args, output_dir)
    stages = parse_stages(data_args, args, data_root)
    args.resume_from_checkpoint = resolve_resume(args.resume_from_checkpoint, output_dir, [s.name for s in stages])
    first = resume_stage(args.resume_from_checkpoint, output_dir, stages)
    datasets = {stage.name: stage_dataset(stage, data_root, data_args.skip_missing) for stage in stages[first:]}
    evaluation = eval_dataset(data_args, data_root)
    spec = FeatureSpec.from_dir(data_root)
    if args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        run_config = {
            "model_name_or_path": str(model_path.resolve()),
            "data_root": str(data_root.resolve()),
            "tiny_defaults": list(TINY_DEFAULTS) if model_args.model_name_or_path is None else [],
            "feature_spec": dataclasses.asdict(spec),
            "audio_repeat": data_args.audio_repeat,
            "world_size": args.world_size,
            "stages": [dataclasses.asdict(s) for s in stages],
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "training": args.to_dict(),
            "environment": environment(),
        }
        (output_dir / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    encoder = PromptEncoder(load_tokenizer(model_path), spec.n_patch_tokens, audio_repeat=data_args.audio_repeat)
    # A resumed stage starts from its checkpoint, which holds every trainable tensor.
    init_dir = Path(model_args.init_from) if model_args.init_from and not args.resume_from_checkpoint else None
    trainer = None
    for index in range(first, len(stages)):
        if trainer is not None:  # free the previous stage's model and DeepSpeed engine before building the next
            trainer.accelerator.free_memory()
            trainer = None
            gc.collect()
        set_seed(args.seed)
        model = build_model(model_args, model_path, spec, encoder.tokenizer, init_dir)
        resume = args.resume_from_checkpoint if index == first else None
        trainer = train_stage(stages[index], datasets[stages[index].name], args, model, encoder, resume)
        init_dir = output_dir if index == len(stages) - 1 else output_dir / stages[index].name
        trainer.save_model(str(init_dir))
    is_main = args.should_save
    batch = reference_batch(trainer.train_dataset, encoder)
    write_reference_outputs(trainer.model, batch, output_dir / REFERENCE_FILE, args.device, is_main)
    result = None
    if evaluation is not None:
        result = evaluate(trainer.model, encoder, evaluation, data_args, args, output_dir / EVAL_DIR)
    if is_main:
        print(f"Saved the adapter, projectors, run configuration and reference outputs to {output_dir}.")
    return result


def load_trained(
    output_dir: str | Path, weights_dir: str | Path | None = None, model_name_or_path: str | Path | None = None
) -> TrainedModel:
    """Rebuild a trained model from a run's output: ``run_config.json`` (base model, feature spec, audio repeat) and
    the adapter and projectors of ``weights_dir`` (default ``output_dir``: the final model; a stage folder or a
    checkpoint also work), on the base model the run trained (its checkpoint's LoRA merged in if the run merged it).
    ``model_name_or_path`` replaces the recorded base model folder."""
    output_dir = Path(output_dir)
    config_path = output_dir / RUN_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: is {output_dir} the output of merr_finetune.py?")
    run_config = json.loads(config_path.read_text())
    weights = Path(weights_dir) if weights_dir is not None else output_dir
    model_path = model_name_or_path or run_config["model_name_or_path"]
    tokenizer = load_tokenizer(model_path)
    spec = FeatureSpec(**run_config["feature_spec"])
    check_adapter_dir(weights / ADAPTER_DIR)
    base = load_base_llm(model_path, merged_lora(run_config.get("model", {})))
    llm = PeftModel.from_pretrained(base, str(weights / ADAPTER_DIR))
    projectors = EmotionLlamaProjectors.from_spec(spec, llm.config.hidden_size)
    load_projectors(projectors, weights / PROJECTORS_FILE)
    model = EmotionLlama(llm, projectors, tokenizer.pad_token_id).eval()
    encoder = PromptEncoder(tokenizer, spec.n_patch_tokens, audio_repeat=run_config["audio_repeat"])
    return TrainedModel(model=model, encoder=encoder, run_config=run_config)


if __name__ == "__main__":
    main()
