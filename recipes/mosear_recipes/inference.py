"""Answer about one sample with a trained MoSE run or the Emotion-LLaMA base model, greedily, with and without
attention reallocation: the command line of ``recipes/merr_infer.py``.

The sample is a MERR sample named by its id (its subtitle and features read from a data root), or one sample's own
feature files and subtitle. Either way it is read, checked and prompted by the dataset code and answered by
:func:`~mosear_recipes.generation.generate_predictions`, model and AR/PAI options as in ``recipes/merr_evaluate.py``
(:mod:`mosear_recipes.model_choice`), so an answer here is the one evaluation gives for that sample.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peft_mose import Modality
from peft_mose.attention import Strategy

from .emotion_llama.features import SPEC_FILE, FeatureSpec
from .generation import generate_predictions
from .logs import setup_logging
from .merr.collator import MERRCollator
from .merr.dataset import SUBTITLE_FILE, MERRDataset, MERRRecord
from .merr.readers import read_subtitles
from .merr.tasks import TASKS
from .model_choice import (
    ModelChoice,
    Reallocation,
    add_model_arguments,
    add_reallocation_arguments,
    check_exists,
    parse_strategies,
    split_strategies,
)
from .model_eval import MAX_NEW_TOKENS
from .run_config import RunConfig

logger = logging.getLogger(__name__)

FEATURE_KINDS = tuple(FeatureSpec().folders)
"""The feature files of one sample, as :class:`FeatureSpec` names them: ``eva``, ``face``, ``video``, ``audio``."""
FILE_OPTIONS = {kind: f"--{kind}_file" for kind in FEATURE_KINDS}
PROMPT_MODALITIES = (Modality.TEXT, Modality.VISUAL, Modality.AUDIO)
CLOSE_MATCHES = 5

USAGE = """\
Answer about one sample, greedily, with and without attention reallocation (AR; PAI for comparison).

A MERR sample by its id (subtitle and features from --data_root, by default the run's data):

  python recipes/merr_infer.py --run_dir runs/stage2 --sample_id sample_00000001
  python recipes/merr_infer.py --run_dir runs/stage2 --sample_id sample_00000001 --task reason_v2 \\
      --strategies none,ar,pai --tau 0.5

One sample's own feature files (the four .npy files MERR holds per sample) and subtitle, with the base model:

  python recipes/merr_infer.py --model_name_or_path Llama-2-7b-chat-hf --projector_checkpoint Emotion_LLaMA.pth \\
      --eva_file clip/EVA_448.npy --face_file clip/mae_340_UTT.npy --video_file clip/maeV_399_UTT.npy \\
      --audio_file clip/HL-UTT.npy --subtitle "I did not expect to see you here"

Prints one line per strategy, "<strategy>: <answer>"; the prompt's layout (text, visual, audio tokens) is logged.
Data formats: docs/recipes.md.
"""


STRATEGIES = tuple(s for s in Strategy if not s.gated)
"""Every strategy but the gated one, whose gate needs the task's label set and reports over a dataset
(``merr_evaluate.py``)."""


@dataclass
class InferenceConfig:
    """The model (a trained run, or the base model with its projector weights and feature spec), the sample (an id
    in a MERR data root, or its feature files and subtitle), the prompt task and the strategies to answer with.
    Problems are reported with the command line's option names."""

    model: ModelChoice = field(default_factory=ModelChoice)
    feature_spec: Path | None = None
    data_root: Path | None = None
    sample_id: str | None = None
    feature_files: Mapping[str, Path] = field(default_factory=dict)
    subtitle: str | None = None
    task: str = "emotion"
    strategies: Sequence[Strategy | str] = (Strategy.NONE, Strategy.AR)
    reallocation: Reallocation = field(default_factory=Reallocation)
    max_new_tokens: int | None = None


class SampleDataset(MERRDataset):
    """One sample as a :class:`MERRDataset`, so that it is read, checked (each feature file by
    :func:`~mosear_recipes.merr.readers.read_feature`, whenever it is read) and prompted exactly as in evaluation.
    ``MERRDataset.__init__`` is not run: it reads an annotation and a subtitle file, which a sample given by its own
    files does not have; this sets what reading and :meth:`keys` use."""

    def __init__(self, record: MERRRecord, spec: FeatureSpec, task: str) -> None:
        self.records = [record]
        self.spec = spec
        self.tasks = (task,)


def check_config(config: InferenceConfig) -> None:
    """Refuse contradictory, incomplete or out-of-range settings and missing model files before anything is read."""
    config.model.check("answer with", run_supplies={"--feature_spec": config.feature_spec})
    _check_sample_options(config)
    if config.task not in TASKS:
        raise ValueError(f"--task must be one of {list(TASKS)}, got {config.task!r}.")
    parse_strategies(config.strategies, STRATEGIES)
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {config.max_new_tokens}.")


def _check_sample_options(config: InferenceConfig) -> None:
    """One way to name the sample: an id (with a data root for the base model) or all four files and a subtitle."""
    files = ", ".join(FILE_OPTIONS.values())
    if (config.sample_id is None) == (not config.feature_files):
        raise ValueError(
            f"Give --sample_id (a sample of --data_root) or the sample's feature files ({files}, with --subtitle)"
            + (", not both." if config.sample_id is not None else " to answer about.")
        )
    if config.sample_id is not None:
        if config.subtitle is not None:
            raise ValueError(f"--subtitle goes with the feature files: --sample_id's is read from {SUBTITLE_FILE}.")
        if config.model.kind == "base" and config.data_root is None:
            raise ValueError("--sample_id with --model_name_or_path needs --data_root, the MERR folder holding it.")
        return
    unknown = sorted(set(config.feature_files) - set(FEATURE_KINDS))
    if unknown:
        raise ValueError(f"Unknown feature kinds {unknown}; the files are {files}.")
    absent = [option for kind, option in FILE_OPTIONS.items() if kind not in config.feature_files]
    if absent:
        raise ValueError(f"A sample needs all four feature files ({files}): {', '.join(absent)} missing.")
    if config.subtitle is None:
        raise ValueError('The feature files need --subtitle, what the person says ("" for nothing).')
    if config.data_root is not None:
        raise ValueError("--data_root is where --sample_id is looked up; the feature files do not need it.")


def resolve_spec(config: InferenceConfig) -> FeatureSpec:
    """The feature spec: a run's own; for the base model ``--feature_spec`` (a ``feature_spec.json`` or a folder
    holding one), else the data root's, else the real MERR layout."""
    if config.model.kind == "run":
        return RunConfig.read(config.model.run_dir).feature_spec
    if config.feature_spec is not None:
        path = Path(config.feature_spec)
        folder = path.parent if path.name == SPEC_FILE else path
        if not (folder / SPEC_FILE).is_file():
            raise FileNotFoundError(f"--feature_spec {path}: {folder / SPEC_FILE} does not exist.")
        return FeatureSpec.from_dir(folder)
    return FeatureSpec.from_dir(config.data_root) if config.data_root is not None else FeatureSpec()


def sample_record(config: InferenceConfig, spec: FeatureSpec) -> MERRRecord:
    """The sample to answer about: its subtitle and feature files (read and checked by the dataset). Its label and
    answer are left empty: generation reads neither."""
    answers = {config.task: ""}
    if config.sample_id is None:
        files = {kind: Path(path) for kind, path in config.feature_files.items()}
        return MERRRecord(files["eva"].stem, "", config.subtitle, answers, **files)
    data_root = Path(config.data_root or RunConfig.read(config.model.run_dir).data_root)
    check_exists(data_root, "the data folder (recorded by the run unless given)", "--data_root")
    subtitle_file = data_root / SUBTITLE_FILE
    subtitles = read_subtitles(subtitle_file)
    name = config.sample_id
    if name not in subtitles:
        close = difflib.get_close_matches(name, subtitles, n=CLOSE_MATCHES)
        hint = f"close matches: {', '.join(map(repr, close))}" if close else "no close match"
        raise ValueError(f"--sample_id {name!r} is not a sample of {subtitle_file} ({len(subtitles)} samples); {hint}.")
    files = {kind: data_root / folder / f"{name}.npy" for kind, folder in spec.folders.items()}
    return MERRRecord(name, "", subtitles[name], answers, **files)


def modality_counts(batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Tokens per modality of a one-prompt batch's prompt: ``{"text": ..., "visual": ..., "audio": ...}``."""
    ids = batch["modality_ids"][0]
    return {modality.name.lower(): int((ids == modality).sum()) for modality in PROMPT_MODALITIES}


def infer(config: InferenceConfig) -> dict[str, str]:
    """Greedy answers of the model to the sample's prompt (the task's first instruction, as evaluation prompts),
    ``{strategy: answer}`` in the order given. The sample is read and checked before the model is loaded."""
    check_config(config)
    spec = resolve_spec(config)
    dataset = SampleDataset(sample_record(config, spec), spec, config.task)
    sample = dataset[dataset.keys(config.task)[0]]
    model, encoder = config.model.load(spec)
    counts = modality_counts(MERRCollator(encoder, with_answer=False)([sample]))
    logger.info(
        "Sample %s, task %s: a prompt of %d tokens, %s.", sample.name, config.task, sum(counts.values()),
        ", ".join(f"{count} {modality}" for modality, count in counts.items()),
    )  # fmt: skip
    device = next(model.parameters()).device
    max_new_tokens = config.max_new_tokens or MAX_NEW_TOKENS["recognition" if config.task == "emotion" else "reasoning"]
    answers = {}
    for strategy in parse_strategies(config.strategies, STRATEGIES):
        predictions = generate_predictions(
            model, dataset, encoder, device, 1, max_new_tokens, task=config.task,
            reallocation=config.reallocation.options(strategy),
        )  # fmt: skip
        answers[strategy.value] = predictions[sample.name]
    return answers


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line options, defaults shown."""
    parser = argparse.ArgumentParser(
        prog="merr_infer.py", description=USAGE, formatter_class=_Formatter, allow_abbrev=False
    )
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--feature_spec", type=Path,
                       help=f"base model: {SPEC_FILE} or its folder (default: --data_root's, else MERR's)")  # fmt: skip
    sample = parser.add_argument_group("sample: an id in a MERR folder, or the sample's own files")
    sample.add_argument("--sample_id", help=f"sample name (a row of {SUBTITLE_FILE})")
    sample.add_argument("--data_root", type=Path, help="MERR folder of --sample_id (default for a run: the run's)")
    sample.add_argument("--eva_file", type=Path, help="EVA-CLIP .npy [eva_patches + 1, eva_dim], MERR: [1025, 1408]")
    sample.add_argument("--face_file", type=Path, help="face MAE .npy [feature_dim] or [1, feature_dim], MERR: 1024")
    sample.add_argument("--video_file", type=Path, help="VideoMAE .npy, shaped as --face_file")
    sample.add_argument("--audio_file", type=Path, help="HuBERT .npy, shaped as --face_file")
    sample.add_argument("--subtitle", help='with the files: what the person says ("" for nothing)')
    generation = parser.add_argument_group("generation")
    generation.add_argument("--task", choices=tuple(TASKS), default="emotion",
                            help="prompt: emotion (a label), reason or reason_v2 (coarse / fine reasons)")  # fmt: skip
    generation.add_argument("--strategies", default="none,ar",
                            help=f"comma-separated, one answer each: {[s.value for s in STRATEGIES]}")  # fmt: skip
    add_reallocation_arguments(generation)
    generation.add_argument("--max_new_tokens", type=int,
                            help=f"tokens per answer (default: emotion {MAX_NEW_TOKENS['recognition']}, reasoning "
                                 f"{MAX_NEW_TOKENS['reasoning']})")  # fmt: skip
    parser.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                        help="of the recipe's messages (transformers': TRANSFORMERS_VERBOSITY)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Parse the command line, answer and print ``<strategy>: <answer>`` per strategy; return the answers."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    files = {kind: getattr(args, f"{kind}_file") for kind in FEATURE_KINDS}
    try:
        config = InferenceConfig(
            model=ModelChoice.from_args(args),
            feature_spec=args.feature_spec,
            data_root=args.data_root,
            sample_id=args.sample_id,
            feature_files={kind: path for kind, path in files.items() if path is not None},
            subtitle=args.subtitle,
            task=args.task,
            strategies=split_strategies(args.strategies),
            reallocation=Reallocation.from_args(args),
            max_new_tokens=args.max_new_tokens,
        )
        answers = infer(config)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    for strategy, answer in answers.items():
        print(f"{strategy}: {answer}")
    return answers
