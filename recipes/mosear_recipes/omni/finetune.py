"""MoSE fine-tuning of the Qwen2.5-Omni thinker on raw clips (``recipes/omni_finetune.py``): the clips checked and
counted before anything is written, the run folder claimed as the MERR recipe claims it, Trainer with the recipe's
guards, checkpoint manifests, resume and loss curve; optionally scored on an evaluation manifest. docs/omni.md."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from peft import get_peft_model
from transformers import set_seed

from peft_mose.metrics import resolve_labels

from ..arguments import ScheduleArguments
from ..distributed import end_process_group
from ..finetune import exit_on_refusal
from ..guards import train as guarded_train
from ..integrity import resolve_resume
from ..logs import setup_training_logging
from ..manifests import MODEL_MANIFEST, write_manifest
from ..run_config import EVAL_DIR, RUN_CONFIG, base_model_identity
from ..run_folder import check_resume_agrees, claimed_run_folder, start_run
from ..scoring import ScoringConfig
from .arguments import OmniConfig, check_omni_args, parse_omni_args
from .data import ClipDataset, MediaOptions
from .evaluation import clip_references, evaluate_clips
from .inputs import DEFAULT_QUESTION, DEFAULT_SYSTEM, OmniEncoder, collate
from .model import OMNI_MODEL_FILES, load_thinker
from .run_config import RESUME_ARGUMENTS, OmniRunConfig
from .tiny import TINY_SYSTEM, write_tiny_clips, write_tiny_model
from .trainer import OmniTrainer

logger = logging.getLogger(__name__)

TINY_DIR = "tiny"


@dataclass
class Inputs:
    """What a run trains on: the base model folder, its encoder, the checked training clips and evaluation clips."""

    model_path: Path
    encoder: OmniEncoder
    train: ClipDataset
    evaluation: ClipDataset | None
    options: MediaOptions


def media_options(config: OmniConfig) -> MediaOptions:
    data = config.data
    return MediaOptions(data.fps, data.max_frames, data.max_audio_seconds, data.audio, data.use_audio_in_video)


def open_inputs(config: OmniConfig, model_path: Path, train_manifest: Path, eval_manifest: Path | None) -> Inputs:
    """The encoder of ``model_path`` and the clips, every one decoded and encoded (a bad file raises naming it)."""
    from transformers import AutoConfig

    data = config.data
    thinker_config = AutoConfig.from_pretrained(model_path)
    thinker_config = getattr(thinker_config, "thinker_config", thinker_config)  # the full model's config nests it
    system = data.system_prompt or (TINY_SYSTEM if data.tiny_setup else DEFAULT_SYSTEM)
    encoder = OmniEncoder.from_pretrained(model_path, thinker_config, data.max_pixels,
                                          question=data.question or DEFAULT_QUESTION, system_prompt=system)  # fmt: skip
    options = media_options(config)
    train = ClipDataset(train_manifest, encoder, options)
    interleaved = {clip: flag for clip, flag in train.interleaved.items() if flag}
    if config.training.per_device_train_batch_size > 1 and 0 < len(interleaved) < len(train.interleaved):
        alone = next(clip for clip in train.interleaved if clip not in interleaved)
        raise ValueError(
            f"{train_manifest}: clips whose audio is interleaved with their video and clips where it is not (e.g. "
            f"{alone!r}) cannot share a batch: train with --per_device_train_batch_size 1, or give every clip the "
            "same media."
        )
    evaluation = None
    if eval_manifest:
        evaluation = ClipDataset(eval_manifest, encoder, options, need_target=False)
        clip_references(evaluation.records, resolve_labels(data.eval_labels))
    return Inputs(model_path, encoder, train, evaluation, options)


def finetune(config: OmniConfig) -> dict | None:
    """Train, save the adapter, run configuration and loss curve, and score ``--eval_manifest`` when given. A
    user's clips are all checked before the output folder is touched."""
    setup_training_logging(config.training)
    check_omni_args(config)
    data = config.data
    inputs = None
    if not data.tiny_setup:  # nothing is written to a run folder refused for bad media
        evaluation = Path(data.eval_manifest) if data.eval_manifest else None
        inputs = open_inputs(config, Path(config.model.model_name_or_path), Path(data.train_manifest), evaluation)
    with claimed_run_folder(config.training) as output_dir:
        if inputs is None:
            inputs = _tiny_inputs(config, output_dir)
        return _train(config, output_dir, inputs)


def _tiny_inputs(config: OmniConfig, output_dir: Path) -> Inputs:
    """The tiny default, written by rank 0 to ``output_dir/tiny``: its clips also serve as evaluation clips."""
    args, tiny = config.training, output_dir / TINY_DIR
    with args.main_process_first(local=False, desc="writing the tiny setup"):
        if args.process_index == 0 and not (tiny / "data" / "train.jsonl").is_file():
            write_tiny_model(tiny / "model", seed=args.seed)
            write_tiny_clips(tiny / "data")
    manifest = tiny / "data" / "train.jsonl"
    return open_inputs(config, tiny / "model", manifest, manifest)


def _train(config: OmniConfig, output_dir: Path, inputs: Inputs) -> dict | None:
    args, data = config.training, config.data
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    encoder = inputs.encoder
    run_config = OmniRunConfig(
        model_name_or_path=str(inputs.model_path.resolve()),
        base_model=base_model_identity(inputs.model_path),
        train_manifest=str(Path(inputs.train.records[0].file).resolve()),
        media=inputs.options,
        max_pixels=data.max_pixels,
        question=encoder.question,
        system_prompt=encoder.system_prompt,
        input_path=encoder.path,
        world_size=args.world_size,
        config_file=str(config.config_file) if config.config_file else None,
        arguments=config.arguments(),
    )
    if resume and (output_dir / RUN_CONFIG).is_file():
        check_resume_agrees(OmniRunConfig.read(output_dir), run_config, output_dir / RUN_CONFIG,
                            compared=("base_model",), resume_arguments=RESUME_ARGUMENTS)  # fmt: skip
    start_run(output_dir, run_config, resume, args.overwrite_output_dir, args.should_save)
    set_seed(args.seed)
    thinker = load_thinker(inputs.model_path, config.model.quantization)
    model = get_peft_model(thinker, config.model.mose_config())
    trainer = OmniTrainer(
        model=model,
        args=args,
        train_dataset=inputs.train,
        data_collator=partial(collate, pad_id=encoder.tokenizer.pad_token_id),
        batch_sampler=None,
        schedule=ScheduleArguments(lr_schedule="trainer"),
        total_steps=0,
        checkpoints_kept=config.checkpoints_kept,
    )
    logger.info("%d training clips; inputs: %s.", len(inputs.train), encoder.path)
    guarded_train(trainer, resume)
    trainer.save_model(str(output_dir))
    if args.should_save:
        write_manifest(output_dir, trainer.state.global_step, OMNI_MODEL_FILES, MODEL_MANIFEST)
    result = None
    if inputs.evaluation is not None:
        scoring = ScoringConfig("recognition", resolve_labels(data.eval_labels), parser=data.eval_parser)
        result = evaluate_clips(trainer.model, inputs.evaluation, scoring, data.eval_max_new_tokens,
                                output_dir / EVAL_DIR, args.should_save)  # fmt: skip
    logger.info("Saved the adapter, run configuration, loss curve and the model's manifest to %s.", output_dir)
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Parse ``[config file] [--options]`` and train."""
    result = finetune(parse_omni_args(argv))
    end_process_group()
    return result


def cli(argv: Sequence[str] | None = None) -> None:
    """``recipes/omni_finetune.py``: :func:`main` under :func:`~mosear_recipes.finetune.exit_on_refusal` (bad media
    included: exit status 2 and the message, no traceback)."""
    exit_on_refusal(main, argv, "omni_finetune.py")
