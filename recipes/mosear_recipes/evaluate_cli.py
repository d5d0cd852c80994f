"""The command line of ``recipes/merr_evaluate.py``: score a predictions file, or generate the predictions with a
trained run or the base model first (with and without attention reallocation), and report them."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from peft_mose.attention import DEFAULT_GATE_THRESHOLD, Strategy
from peft_mose.metrics import (
    DEFAULT_GROUPING,
    LABEL_PARSERS,
    load_grouping,
    resolve_labels,
)

from .logs import setup_logging
from .model_choice import (
    ModelChoice,
    Reallocation,
    add_model_arguments,
    add_reallocation_arguments,
    split_strategies,
)
from .model_eval import ModelEvalConfig, evaluate_model
from .scoring import (
    SCORINGS,
    ScoringConfig,
    load_predictions,
    load_references,
    markdown_table,
    score,
    warn_skipped,
    write_report,
)

logger = logging.getLogger(__name__)

USAGE = """\
Score emotion predictions like the MoSEAR paper (Tables 1 and 7 for reasoning, 3 and 4 for recognition).

Scoring an existing predictions file (no model needed):

  python recipes/merr_evaluate.py --predictions preds.jsonl --references refs.jsonl --out_dir out/eval
  python recipes/merr_evaluate.py --predictions preds.jsonl --references refs.jsonl --out_dir out/eval \\
      --scoring recognition --labels mer2023 --parser robust

Generating the answers first, with a run of recipes/merr_finetune.py (MoSE) or the base model (Emotion-LLaMA), with
and without attention reallocation (PAI for comparison):

  python recipes/merr_evaluate.py --scoring recognition --run_dir runs/stage2 --out_dir out/eval \\
      --strategies none,ar,ar+gate,pai
  python recipes/merr_evaluate.py --scoring reasoning --model_name_or_path Llama-2-7b-chat-hf --data_root MERR \\
      --projector_checkpoint Emotion_LLaMA.pth --annotation test.txt --out_dir out/eval --strategies none,ar

File formats: docs/evaluation.md.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default."""


def add_model_running_arguments(model: argparse._ActionsContainer) -> None:
    """The options of the model-running mode (none of them applies to scoring a predictions file)."""
    add_model_arguments(model)
    model.add_argument("--data_root", type=Path, help="MERR folder (default for a run: the run's)")
    model.add_argument("--annotation", type=Path, help="MERR annotation .txt (default: synthetic_test.txt of the data)")
    model.add_argument("--subsets", type=Path, help="CSV with name,subset (default: synthetic_subsets.csv beside it)")
    model.add_argument("--reasoning_task", choices=("reason_v2", "reason"), default="reason_v2",
                       help="prompt of the reasoning task: reason_v2 (fine-grained) or reason (coarse)")  # fmt: skip
    model.add_argument("--strategies", default="none,ar",
                       help=f"comma-separated, one table row each: {[s.value for s in Strategy]}")  # fmt: skip
    add_reallocation_arguments(model)
    model.add_argument("--gate_threshold", type=float, default=DEFAULT_GATE_THRESHOLD,
                       help="ar+gate: JS divergence (nats) above which a sample counts as a conflict")  # fmt: skip
    model.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    model.add_argument("--max_new_tokens", type=int, help="tokens per answer (default: recognition 8, reasoning 500)")


def model_running_options_given(argv: Sequence[str]) -> list[str]:
    """The model-running options given in ``argv`` (whatever their values, defaults included)."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_model_running_arguments(probe)
    unset = object()  # not a string: argparse leaves it unconverted
    probe.set_defaults(**{name: unset for name in vars(probe.parse_args([]))})
    given, _ = probe.parse_known_args(argv)
    return sorted(f"--{name}" for name, value in vars(given).items() if value is not unset)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of both modes, defaults shown."""
    parser = argparse.ArgumentParser(
        prog="merr_evaluate.py", description=USAGE, formatter_class=_Formatter, allow_abbrev=False
    )
    parser.add_argument("--out_dir", required=True, type=Path, help="for scores.json/.md/.png and per_sample.jsonl")
    parser.add_argument("--scoring", choices=SCORINGS, default="reasoning",
                        help="what the answers are scored as: emotion words in reasoning, or a class label")
    scoring = parser.add_argument_group("scoring mode")
    scoring.add_argument("--predictions", type=Path, help='JSONL of {"id", "prediction"}')
    scoring.add_argument("--references", type=Path, help='JSONL of {"id", "reference"|"label", "subset"}')
    add_model_running_arguments(parser.add_argument_group("model-running mode (instead of --predictions/--references)"))
    labels = parser.add_argument_group("labels and parsing")
    labels.add_argument("--labels", default="mer2023", help="recognition label set: mer2023, dfew, merr or a,b,c")
    labels.add_argument("--parser", choices=LABEL_PARSERS, default="emotion_llama", help="label parser (recognition)")
    labels.add_argument("--grouping", type=Path, help="synonym mapping file (.csv or .json); default: built-in table")
    labels.add_argument("--scope", choices=("conclusion", "all"), default="conclusion", help="emotion-word extraction")
    parser.add_argument("--name", help="row name (scoring mode; default: the predictions file name) or prefix (model)")
    parser.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                        help="of the recipe's messages (transformers': TRANSFORMERS_VERBOSITY)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Score ``--predictions`` against ``--references``, or generate them with a model first (``--run_dir`` /
    ``--model_name_or_path``); print the table and write the report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    model_mode = args.run_dir is not None or args.model_name_or_path is not None
    if model_mode and (args.predictions is not None or args.references is not None):
        parser.error(
            "give --predictions/--references (scoring mode) or --run_dir/--model_name_or_path (model-running mode), "
            "not both"
        )
    if not model_mode and (args.predictions is None or args.references is None):
        parser.error(
            "give --predictions and --references (scoring mode), or --run_dir or --model_name_or_path "
            "(model-running mode)"
        )
    ignored = [] if model_mode else model_running_options_given(sys.argv[1:] if argv is None else argv)
    if ignored:
        parser.error(
            f"{', '.join(ignored)} only apply to the model-running mode (--run_dir or --model_name_or_path); scoring "
            "--predictions runs no model"
        )
    try:
        grouping = load_grouping(args.grouping) if args.grouping else DEFAULT_GROUPING
        config = ScoringConfig(
            kind=args.scoring,
            labels=resolve_labels(args.labels),
            parser=args.parser,
            grouping=grouping,
            grouping_source=str(args.grouping) if args.grouping else "default",
            scope=args.scope,
        )
        if model_mode:
            return _run_model(args, config)
        references = load_references(args.references, args.scoring, config.labels)
        predictions = load_predictions(args.predictions)
        result, rows = score(predictions, references, config)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    warn_skipped(rows, args.scoring)
    name = args.name or args.predictions.stem
    paths = write_report(result, rows, args.out_dir, name)
    print(paths["markdown"].read_text(encoding="utf-8"), end="")
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def _run_model(args: argparse.Namespace, scoring: ScoringConfig) -> int:
    config = ModelEvalConfig(
        out_dir=args.out_dir,
        scoring=scoring,
        model=ModelChoice.from_args(args),
        data_root=args.data_root,
        annotation=args.annotation,
        subsets=args.subsets,
        reasoning_task=args.reasoning_task,
        strategies=split_strategies(args.strategies),
        reallocation=Reallocation.from_args(args),
        gate_threshold=args.gate_threshold,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        name=args.name,
    )
    rows = evaluate_model(config)
    print(markdown_table(rows), end="")
    logger.info("wrote scores.md/.json/.png, references.jsonl, predictions_*.jsonl, reports to %s", args.out_dir)
    return 0
