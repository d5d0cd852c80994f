"""One stage of MoSEAR's training (paper section 6.1) on HF ``Trainer``: data, model, training, the run folder, the
reference outputs and the end-of-run recognition evaluation. ``recipes/merr_finetune.py`` parses and calls
:func:`finetune`; the layout of the run folder is in ``docs/recipes.md``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import set_seed

from peft_mose.metrics import resolve_labels

from .arguments import (
    STAGE_ANNOTATIONS,
    FinetuneConfig,
    check_args,
    parse_finetune_args,
    total_steps,
)
from .distributed import end_process_group
from .emotion_llama.features import FeatureSpec
from .emotion_llama.model import EmotionLlama, load_tokenizer
from .emotion_llama.prompt import PromptEncoder
from .generation import generate_predictions
from .guards import train as guarded_train
from .integrity import resolve_resume
from .logs import setup_training_logging
from .merr.collator import MERRCollator
from .merr.dataset import CAPTION_FILES, SUBTITLE_FILE, KeyedSamples, MERRDataset
from .merr.references import merr_references
from .merr.sampler import SingleTaskBatchSampler
from .merr.synthetic import FILES as SYNTHETIC_FILES
from .manifests import MODEL_FILES, MODEL_MANIFEST, write_manifest
from .modeling import build_model, check_init_source, merged_lora, reference_batch, write_reference_outputs
from .run_config import EVAL_DIR, REFERENCE_FILE, RUN_CONFIG, RunConfig, StageConfig, base_model_identity
from .run_folder import check_resume_agrees, claimed_run_folder, start_run
from .scoring import ScoringConfig, markdown_table, score, warn_skipped, write_report
from .tiny_setup import write_tiny_setup
from .trainer import MoSETrainer

logger = logging.getLogger(__name__)

TINY_DIR = "tiny"
TINY_NUM_SAMPLES = 300


def stage_config(config: FinetuneConfig, data_root: Path) -> StageConfig:
    """The stage this run trains, resolved: annotation file, tasks and peak learning rate."""
    data = config.data
    annotation = data_root / (data.annotation or STAGE_ANNOTATIONS[data.stage])
    return StageConfig(data.stage, str(annotation), data.stage_tasks, config.training.learning_rate)


def open_dataset(
    annotation: str | Path, data_root: Path, tasks: Sequence[str], skip_missing: bool, labels: str = "merr"
) -> MERRDataset:
    """A MERR-format dataset under ``data_root`` whose labels belong to the set ``labels`` (``--labels``), every
    sample validated (captions are read for the tasks that need them)."""
    captions = {key: data_root / name for key, name in CAPTION_FILES.items()}
    return MERRDataset(annotation, data_root / SUBTITLE_FILE, tasks=tasks, labels=resolve_labels(labels),
                       skip_missing=skip_missing, **captions)  # fmt: skip


def training_data(
    config: FinetuneConfig, stage: StageConfig, data_root: Path
) -> tuple[MERRDataset, MERRDataset | None]:
    """``(train, validation)`` of the stage: the validation samples are ``--val_annotation`` or ``--val_size`` of
    the annotation held out (``None`` without either)."""
    data = config.data
    dataset = open_dataset(stage.annotation, data_root, stage.tasks, data.skip_missing, data.labels)
    if data.val_annotation:
        validation = data_root / data.val_annotation
        return dataset, open_dataset(validation, data_root, stage.tasks, data.skip_missing, data.labels)
    if data.val_size:
        return dataset.split(data.val_size, config.training.seed)
    return dataset, None


def eval_dataset(config: FinetuneConfig, data_root: Path) -> MERRDataset | None:
    """The end-of-run evaluation samples (emotion task), or ``None`` for no evaluation."""
    data = config.data
    if data.eval_annotation == "none":
        return None
    annotation = data_root / data.eval_annotation
    if data.eval_annotation == "auto":
        annotation = data_root / SYNTHETIC_FILES["test_txt"]
        if not annotation.exists():
            return None
    return open_dataset(annotation, data_root, ("emotion",), data.skip_missing, data.labels)


def prepare_inputs(
    config: FinetuneConfig, output_dir: Path, num_samples: int = TINY_NUM_SAMPLES
) -> tuple[Path, Path]:
    """``(model folder, data root)``: the given ones, or the tiny setup (``num_samples`` synthetic samples) that rank
    0 writes to ``output_dir/tiny``. Also takes the DPO recipe's configuration (the same model, data and training
    groups' fields)."""
    if not config.data.tiny_setup:
        return Path(config.model.model_name_or_path), Path(config.data.data_root)
    args = config.training
    tiny = output_dir / TINY_DIR
    with args.main_process_first(local=False, desc="writing the tiny setup"):
        if args.process_index == 0:
            write_tiny_setup(tiny, num_samples=num_samples, seed=args.seed)
    return tiny / "model", tiny / "data"


def evaluate(
    model: EmotionLlama, encoder: PromptEncoder, dataset: MERRDataset, config: FinetuneConfig, out_dir: Path
) -> dict | None:
    """Recognition scores on ``dataset`` (per CA-MER subset when ``synthetic_subsets.csv`` lists them): logged as a
    markdown table and written to ``out_dir`` by the main process, which also returns them (``None`` elsewhere)."""
    args = config.training
    predictions = generate_predictions(
        model, dataset, encoder, args.device, args.per_device_eval_batch_size, config.data.eval_max_new_tokens
    )
    if not args.should_save:
        return None
    references = merr_references(dataset, "emotion")
    result, rows = score(predictions, references, ScoringConfig("recognition", resolve_labels(config.data.eval_labels)))
    for row in rows:
        row["prediction"] = predictions[row["id"]]
    warn_skipped(rows, "recognition")
    write_report(result, rows, out_dir, name="MoSE")
    logger.info("recognition scores on %s:\n%s", dataset.annotation_file, markdown_table([("MoSE", result)]))
    return result


def finetune(config: FinetuneConfig) -> dict | None:
    """Train one stage, save the model, its run configuration, reference outputs and loss curve, and evaluate it;
    returns the evaluation result on the main process. The output folder is claimed first (``run_folder``): a run
    already there is never written over unless resumed or replaced on purpose."""
    setup_training_logging(config.training)
    check_args(config)
    with claimed_run_folder(config.training, config.model.init_from) as output_dir:
        return _train(config, output_dir)


def _train(config: FinetuneConfig, output_dir: Path) -> dict | None:
    args = config.training
    model_path, data_root = prepare_inputs(config, output_dir)
    stage = stage_config(config, data_root)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)  # verified before anything of it is loaded
    train, validation = training_data(config, stage, data_root)
    evaluation = eval_dataset(config, data_root)
    spec = FeatureSpec.from_dir(data_root)
    model_args = config.model
    run_config = RunConfig(
        model_name_or_path=str(model_path.resolve()),
        data_root=str(data_root.resolve()),
        feature_spec=spec,
        audio_repeat=config.data.audio_repeat,
        stage=stage,
        world_size=args.world_size,
        merged_lora_checkpoint=merged_lora(model_args),
        init_from=model_args.init_from,
        config_file=str(config.config_file) if config.config_file else None,
        arguments=config.arguments(),
        base_model=base_model_identity(model_path),
    )
    if resume and (output_dir / RUN_CONFIG).is_file():
        check_resume_agrees(RunConfig.read(output_dir), run_config, output_dir / RUN_CONFIG)
    # A resumed run starts from its checkpoint, which holds every trainable tensor.
    init_dir = Path(model_args.init_from) if model_args.init_from and not resume else None
    if init_dir is not None:
        check_init_source(init_dir, model_args, model_path)
    start_run(output_dir, run_config, resume, args.overwrite_output_dir, args.should_save)
    encoder = PromptEncoder(load_tokenizer(model_path), spec.n_patch_tokens, audio_repeat=config.data.audio_repeat)
    set_seed(args.seed)
    model = build_model(model_args, model_path, spec, encoder.tokenizer, init_dir)
    sampler = SingleTaskBatchSampler(
        train,
        batch_size=args.per_device_train_batch_size,
        # accelerate deals the batches out to the processes: each gets iters_per_epoch optimizer steps per epoch
        num_batches=config.schedule.iters_per_epoch * args.gradient_accumulation_steps * args.world_size,
        seed=args.seed if args.data_seed is None else args.data_seed,  # Trainer's meaning: the sampler's seed
    )
    trainer = MoSETrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=KeyedSamples(validation) if validation is not None else None,
        data_collator=MERRCollator(encoder),
        batch_sampler=sampler,
        schedule=config.schedule,
        total_steps=total_steps(config),
        checkpoints_kept=config.checkpoints_kept,
    )
    held_out = f", {len(validation)} for validation" if validation is not None else ""
    logger.info(
        "Stage %s: %d training samples%s; %s Tasks %s, peak lr %g.", stage.name, len(train), held_out,
        train.skip_report(), ", ".join(stage.tasks), stage.learning_rate,
    )  # fmt: skip
    guarded_train(trainer, resume)
    trainer.save_model(str(output_dir))
    batch = reference_batch(train, encoder)
    write_reference_outputs(trainer.model, batch, output_dir / REFERENCE_FILE, args.device, args.should_save)
    if args.should_save:
        write_manifest(output_dir, trainer.state.global_step, MODEL_FILES, MODEL_MANIFEST)
    result = None
    if evaluation is not None:
        result = evaluate(trainer.model, encoder, evaluation, config, output_dir / EVAL_DIR)
    logger.info("Saved the adapter, projectors, run configuration, loss curve, reference outputs and the model's "
                "manifest to %s.", output_dir)
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Parse ``[config file] [--options]`` and train; a distributed run ends its process group when training
    succeeded."""
    result = finetune(parse_finetune_args(argv))
    end_process_group()
    return result


def exit_on_refusal(run: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None, script: str) -> None:
    """A script's entry point: ``run(argv)``, a refused input (a ``ValueError`` or ``OSError`` naming what is
    wrong) ending the process with exit status 2 and ``script: error: <message>``, without a traceback."""
    try:
        run(argv)
    except (OSError, ValueError) as error:
        logger.debug("refused", exc_info=error)
        print(f"{script}: error: {error}", file=sys.stderr)
        sys.exit(2)


def cli(argv: Sequence[str] | None = None) -> None:
    """The entry point of ``recipes/merr_finetune.py``: :func:`main` under :func:`exit_on_refusal`."""
    exit_on_refusal(main, argv, "merr_finetune.py")
