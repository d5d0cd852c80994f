"""DPO of a MoSE Emotion-LLaMA on TRL (``DPOTrainer`` + ``DPOConfig``), from scratch or from a run of
``recipes/merr_finetune.py`` (``--init_from``), on consistency-aware preference pairs; ``recipes/merr_dpo.py``
parses and calls :func:`dpo`. The MERR recipe's pieces are reused: its data readers, YAML/JSON config files, model
building, run folder (claimed, locked, ``run_config.json``), checkpoints holding only what trains with verified
manifests, and the guards. What the trainer is given, and why: ``docs/preference.md``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from peft_mose.metrics import resolve_labels

from ..arguments import (
    CONFIG_DIR,
    ModelArguments,
    build_group,
    check_trainer_options,
    parse_values,
    trainer_group,
    trainer_values,
)
from ..distributed import end_process_group
from ..emotion_llama.features import FeatureSpec
from ..emotion_llama.model import load_tokenizer
from ..emotion_llama.prompt import PromptEncoder
from ..finetune import exit_on_refusal, open_dataset, prepare_inputs
from ..guards import NonFiniteGuard, train as guarded_train
from ..integrity import CheckpointManifests, resolve_resume, set_aside_damaged
from ..logs import setup_training_logging
from ..merr.perceive import CUES_FILE, read_cues
from ..manifests import MODEL_MANIFEST, WEIGHT_FILES, write_manifest
from ..modeling import build_model, check_init_source, merged_lora
from ..progress import TrainingProgressCallback
from ..run_config import RUN_CONFIG, RunConfig, StageConfig, base_model_identity
from ..run_folder import RESUME_ARGUMENTS as MERR_RESUME_ARGUMENTS
from ..run_folder import check_resume_agrees, claimed_run_folder, clear_previous_run
from ..trainer import TrainedPartsCheckpoints
from .data import PreferenceCollator, check_pair_samples, trl_dataset
from .model import PreferenceEmotionLlama, reference_model
from .pairs import PairMix, build_pairs, read_pairs, write_pairs

logger = logging.getLogger(__name__)

TINY_DPO_CONFIG = CONFIG_DIR / "dpo_tiny.yaml"
PAIRS_FILE = "pairs.jsonl"
METRICS_FILE = "metrics.jsonl"
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class PreferenceDataArguments:
    """The samples the pairs name (features, subtitles) and the pairs."""

    _argument_group_name = "data"

    tiny_setup: bool = field(
        default=False,
        metadata={"help": "Write a synthetic MERR dataset and a tiny random Llama to <output_dir>/tiny and tune on "
                  "pairs built from it (the built-in default)."},
    )  # fmt: skip
    tiny_samples: int = field(default=60, metadata={"help": "Synthetic samples of --tiny_setup."})
    data_root: str | None = field(default=None, metadata={"help": "MERR data root (features, subtitles, cue file)."})
    annotation: str = field(
        default="MERR_coarse_grained.txt",
        metadata={"help": "Annotation file (under data_root) of the samples the pairs name."},
    )
    pairs: str | None = field(
        default=None,
        metadata={"help": f"Pair file (JSONL, docs/preference.md). Default: built from --annotation and {CUES_FILE} "
                  f"with --mix, and written to <output_dir>/{PAIRS_FILE}."},
    )  # fmt: skip
    mix: str = field(default="", metadata={"help": "Pair mix when the pairs are built: SUBSET=SHARE,... (default 1)."})
    audio_repeat: int = field(default=1, metadata={"help": "Audio tokens per sample (as the run it starts from)."})
    labels: str = field(default="merr", metadata={"help": "Label set of the annotation (merr, dfew, mer2023, a,b,c)."})
    skip_missing: bool = field(default=False, metadata={"help": "Leave out (and count) unusable samples."})


@dataclass
class MoSEDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` with the recipe's defaults; every option keeps its TRL/Trainer meaning."""

    _argument_group_name = "DPO (trl.DPOConfig)"

    output_dir: str = field(default="runs/merr_dpo", metadata={"help": "Where everything is written."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate."})
    # TRL turns both on by default; the recipe, like merr_finetune.py, leaves them to --activation_checkpointing/--bf16
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated: --activation_checkpointing."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (the pair index column)."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Must stay unset: the recipe's collator builds every sequence (features, prompt, answer) "
                  "and truncates nothing; TRL would only drop the pairs whose text prompt reaches it."},
    )  # fmt: skip
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept: rotated once the newest has its manifest."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to resume, verified against its manifest first; with no path (or "
                  "True): the newest intact checkpoint of the run.", "nargs": "?", "const": "True"},
    )  # fmt: skip
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the run already in --output_dir (its files are deleted)."}
    )


DPO_DATACLASSES = (ModelArguments, PreferenceDataArguments, MoSEDPOConfig)
# The arguments a resumed run must share with the run it resumes: those that change what it trains.
RESUME_ARGUMENTS = {
    "model": MERR_RESUME_ARGUMENTS["model"],
    "data": ("tiny_setup", "tiny_samples", "annotation", "pairs", "mix", "audio_repeat", "labels", "skip_missing"),
    "training": (*MERR_RESUME_ARGUMENTS["training"], "beta", "loss_type", "loss_weights", "label_smoothing",
                 "max_length", "truncation_mode", "ld_alpha", "use_weighting", "f_divergence_type"),
}  # fmt: skip


@dataclass
class DPORunConfig:
    """Everything one DPO run is given (the DPO arguments with ``save_total_limit`` off: the recipe rotates)."""

    model: ModelArguments
    data: PreferenceDataArguments
    training: MoSEDPOConfig
    config_file: Path | None = None
    checkpoints_kept: int | None = None

    def arguments(self) -> dict[str, dict[str, Any]]:
        """Every argument, JSON-friendly, for ``run_config.json`` (groups as the SFT recipe records them)."""
        values = {kind: {f.name: getattr(group, f.name) for f in fields(group)}
                  for kind, group in (("model", self.model), ("data", self.data))}  # fmt: skip
        return {**values, "schedule": {}, "training": trainer_values(self.training, self.checkpoints_kept)}


def parse_dpo_args(argv: Sequence[str] | None = None) -> DPORunConfig:
    """``[config.yaml|config.json] [--option value ...]`` as ``merr_finetune.py`` reads them; without a file and
    without ``--model_name_or_path`` the file is ``recipes/configs/dpo_tiny.yaml``."""
    values, config_file = parse_values(argv, DPO_DATACLASSES, TINY_DPO_CONFIG, __doc__.splitlines()[0])
    model, data = build_group(ModelArguments, values), build_group(PreferenceDataArguments, values)
    training, kept = trainer_group(MoSEDPOConfig, values)
    return DPORunConfig(model, data, training, config_file, checkpoints_kept=kept)


def check_dpo_args(config: DPORunConfig) -> None:
    """Refuse what cannot work here, saying what does."""
    model, data, args = config.model, config.data, config.training
    check_trainer_options(args)
    if data.tiny_setup and (model.model_name_or_path or data.data_root):
        raise ValueError("--tiny_setup writes its own model and data: give it, or --model_name_or_path with "
                         "--data_root, not both.")  # fmt: skip
    if not data.tiny_setup and not (model.model_name_or_path and data.data_root):
        raise ValueError("Give --model_name_or_path and --data_root together (or --tiny_setup true).")
    if args.deepspeed:
        raise ValueError("--deepspeed: the DPO recipe's reference shares the policy's LLM (adapter disabled), which "
                         "a separate DeepSpeed engine cannot; run it with one process per GPU (accelerate/torchrun) "
                         "without --deepspeed.")  # fmt: skip
    if model.quantization != "none":
        raise ValueError("--quantization is not supported by the DPO recipe yet (its reference copies the model); "
                         "use --quantization none.")  # fmt: skip
    if args.precompute_ref_log_probs or args.sync_ref_model:
        raise ValueError("--precompute_ref_log_probs and --sync_ref_model are not supported: the reference is the "
                         "frozen starting model, computed in every step (docs/preference.md).")  # fmt: skip
    if args.remove_unused_columns:
        raise ValueError("--remove_unused_columns must stay false: the collator reads the pair index column.")
    if args.max_length is not None:
        raise ValueError(f"--max_length {args.max_length} is not supported: the recipe's collator builds every "
                         "sequence (features, prompt, answer) and truncates nothing, and TRL would drop the pairs "
                         "whose text prompt reaches it. Leave it unset.")  # fmt: skip
    if data.pairs and data.mix:
        raise ValueError("--mix chooses the pairs the recipe builds; with --pairs the file's pairs are used as they "
                         "are: give one of them.")  # fmt: skip
    if model.projector_checkpoint and model.init_from:
        raise ValueError("Give --projector_checkpoint or --init_from, not both (--init_from holds projectors too).")
    if data.audio_repeat < 1 or data.tiny_samples < 3:
        raise ValueError(f"--audio_repeat must be >= 1 and --tiny_samples >= 3, got {data.audio_repeat}, "
                         f"{data.tiny_samples}.")  # fmt: skip
    resolve_labels(data.labels)
    PairMix.parse(data.mix)


class MoSEDPOTrainer(TrainedPartsCheckpoints, DPOTrainer):
    """TRL's ``DPOTrainer`` whose checkpoints hold only what trains (adapter and projectors), as the SFT recipe's."""


def dpo(config: DPORunConfig) -> list[dict[str, float]]:
    """Tune, save the adapter, projectors and run configuration, and return Trainer's log history (TRL's reward
    metrics among it). The output folder is claimed first, as by ``merr_finetune.py``."""
    setup_training_logging(config.training)
    check_dpo_args(config)
    with claimed_run_folder(config.training, config.model.init_from) as output_dir:
        return _tune(config, output_dir)


def _tune(config: DPORunConfig, output_dir: Path) -> list[dict[str, float]]:
    args, data, model_args = config.training, config.data, config.model
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    if args.should_save and args.overwrite_output_dir and not resume:
        clear_previous_run(output_dir)
    model_path, data_root = prepare_inputs(config, output_dir, data.tiny_samples)
    samples = open_dataset(data_root / data.annotation, data_root, ("emotion",), data.skip_missing, data.labels)
    if data.skip_missing:
        logger.info(samples.skip_report())
    if data.pairs:
        pair_file = Path(data.pairs)
        pairs = read_pairs(pair_file)
    else:
        pair_file = output_dir / PAIRS_FILE
        cues = read_cues(data_root / CUES_FILE, resolve_labels(data.labels))
        pairs = build_pairs([(r.name, r.label) for r in samples.records], cues, PairMix.parse(data.mix), args.seed,
                            where=str(data_root / CUES_FILE))  # fmt: skip
        if args.should_save:
            write_pairs(pair_file, pairs)
    if not pairs:
        raise ValueError(f"No preference pairs ({pair_file}): check --mix and the annotation.")
    index = check_pair_samples(pairs, samples, pair_file)
    spec = FeatureSpec.from_dir(data_root)
    run_config = RunConfig(
        model_name_or_path=str(model_path.resolve()), data_root=str(data_root.resolve()), feature_spec=spec,
        audio_repeat=data.audio_repeat,
        stage=StageConfig("dpo", str(pair_file), tuple(dict.fromkeys(p.task for p in pairs)), args.learning_rate),
        world_size=args.world_size, merged_lora_checkpoint=merged_lora(model_args), init_from=model_args.init_from,
        config_file=str(config.config_file) if config.config_file else None, arguments=config.arguments(),
        base_model=base_model_identity(model_path),
    )  # fmt: skip
    if resume and (output_dir / RUN_CONFIG).is_file():
        check_resume_agrees(RunConfig.read(output_dir), run_config, output_dir / RUN_CONFIG,
                            resume_arguments=RESUME_ARGUMENTS)
    # The reference is the starting point, so it is built from --init_from even when resuming (the policy's weights
    # then come from the checkpoint); the run it names is checked before anything of this run is written.
    init_dir = Path(model_args.init_from) if model_args.init_from else None
    if init_dir is not None:
        check_init_source(init_dir, model_args, model_path)
    if args.should_save:
        if resume:
            set_aside_damaged(output_dir, resume)
        run_config.write(output_dir)
    tokenizer = load_tokenizer(model_path)
    encoder = PromptEncoder(tokenizer, spec.n_patch_tokens, audio_repeat=data.audio_repeat)
    set_seed(args.seed)
    start = build_model(model_args, model_path, spec, tokenizer, init_dir)
    policy = PreferenceEmotionLlama(start.llm, start.projectors, tokenizer.pad_token_id)
    reference = reference_model(policy, fresh_adapter=init_dir is None)
    trainer = MoSEDPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=trl_dataset(pairs, samples),
        processing_class=tokenizer, data_collator=PreferenceCollator(encoder, pairs, samples, index),
        callbacks=[NonFiniteGuard(), CheckpointManifests(config.checkpoints_kept), TrainingProgressCallback()],
    )  # fmt: skip
    counts = {s: sum(p.subset == s for p in pairs) for s in ("video_aligned", "audio_aligned", "consistent")}
    logger.info("DPO on %d pairs (%s) from %s; reference: %s.", len(pairs), counts, pair_file,
                "the adapter disabled, projectors frozen" if init_dir is None else f"a frozen copy of {init_dir}")
    guarded_train(trainer, resume)
    trainer.save_model(str(output_dir))
    history = trainer.state.log_history
    if args.should_save:
        (output_dir / METRICS_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in history))
        write_manifest(output_dir, trainer.state.global_step, (*WEIGHT_FILES, RUN_CONFIG), MODEL_MANIFEST)
    logger.info("Saved the adapter, projectors, run configuration, %s and the model's manifest to %s.", METRICS_FILE,
                output_dir)
    return history


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Parse and tune; a distributed run ends its process group when it succeeded."""
    history = dpo(parse_dpo_args(argv))
    end_process_group()
    return history


def cli(argv: Sequence[str] | None = None) -> None:
    """The entry point of ``recipes/merr_dpo.py``: :func:`main`, a refused input ending the process with exit
    status 2 and its message, without a traceback."""
    exit_on_refusal(main, argv, "merr_dpo.py")
