"""``recipes/omni_evaluate.py``: recognition scores of a finished omni run (verified) or a base Qwen2.5-Omni model on
a manifest of raw clips, one row per attention strategy, by CA-MER subset when the manifest gives subsets."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from peft_mose import environment
from peft_mose.attention import DEFAULT_GATE_THRESHOLD, label_token_ids
from peft_mose.attention.json_data import to_plain
from peft_mose.metrics import LABEL_PARSERS, resolve_labels

from ..logs import setup_logging
from ..model_choice import Reallocation, add_reallocation_arguments, check_exists, parse_strategies, split_strategies
from ..model_eval import ROW_SUFFIXES
from ..plots import plot_scores
from ..scoring import ScoringConfig, markdown_table
from .data import ClipDataset, MediaOptions
from .evaluation import evaluate_clips
from .inputs import DEFAULT_QUESTION, DEFAULT_SYSTEM, OmniEncoder
from .model import load_run, load_thinker

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipes/omni_evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", type=Path, help="output folder of recipes/omni_finetune.py (MoSE)")
    parser.add_argument("--model_name_or_path", type=Path, help="base Qwen2.5-Omni model (no run)")
    parser.add_argument("--manifest", type=Path, required=True, help="CSV/JSONL manifest of clips with a 'label'")
    parser.add_argument("--out_dir", type=Path, required=True, help="for scores.json/.md/.png, one folder per row")
    parser.add_argument("--strategies", default="none", help="comma-separated: none, ar, ar+gate, pai")
    parser.add_argument("--labels", default="mer2023", help="label set: mer2023, dfew, merr or a,b,c")
    parser.add_argument("--parser", choices=LABEL_PARSERS, default="robust", help="how an answer is read as a label")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="greedy tokens per clip")
    parser.add_argument("--gate_threshold", type=float, default=DEFAULT_GATE_THRESHOLD, help="of ar+gate")
    parser.add_argument("--name", default=None, help="row name prefix (default: MoSE, or Qwen2.5-Omni for a base)")
    add_reallocation_arguments(parser)
    return parser


def evaluate(args: argparse.Namespace) -> list[tuple[str, Mapping[str, object]]]:
    """One ``(row name, result)`` per strategy; every row's report under ``out_dir/<strategy>``, the table of all of
    them in ``out_dir/scores.md`` and ``scores.json``."""
    if (args.run_dir is None) == (args.model_name_or_path is None):
        raise ValueError("Give --run_dir (a run of omni_finetune.py) or --model_name_or_path (a base model), one.")
    strategies = parse_strategies(split_strategies(args.strategies))
    scoring = ScoringConfig("recognition", resolve_labels(args.labels), parser=args.parser)
    check_exists(args.manifest, "the manifest", "--manifest")
    if args.run_dir is not None:
        check_exists(args.run_dir, "the run folder", "--run_dir")
        model, encoder, run = load_run(args.run_dir)
        options, prefix = run.media, args.name or "MoSE"
    else:
        check_exists(args.model_name_or_path, "the model folder", "--model_name_or_path")
        model = load_thinker(args.model_name_or_path).eval()
        encoder = OmniEncoder.from_pretrained(args.model_name_or_path, model.config, question=DEFAULT_QUESTION,
                                              system_prompt=DEFAULT_SYSTEM)  # fmt: skip
        options, prefix = MediaOptions(), args.name or "Qwen2.5-Omni"
    dataset = ClipDataset(args.manifest, encoder, options, need_target=False)  # every clip checked first
    gate = None
    if any(strategy.gated for strategy in strategies):
        gate = {"gate_labels": label_token_ids(encoder.tokenizer, scoring.labels),
                "gate_threshold": args.gate_threshold}  # fmt: skip
    reallocation = Reallocation.from_args(args)
    rows, summary = [], []
    for strategy in strategies:
        name = prefix + ROW_SUFFIXES[strategy]
        options = reallocation.options(strategy, gate)
        result = evaluate_clips(model, dataset, scoring, args.max_new_tokens, args.out_dir / strategy.value,
                                reallocation=options, name=name)  # fmt: skip
        rows.append((name, result))
        summary.append({"name": name, "strategy": strategy.value, "reallocation": to_plain(options), **result,
                        "environment": environment()})  # fmt: skip
    (args.out_dir / "scores.md").write_text(markdown_table(rows), encoding="utf-8")
    (args.out_dir / "scores.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_scores(rows, args.out_dir / "scores.png")
    return rows


def main(argv: Sequence[str] | None = None) -> list[tuple[str, Mapping[str, object]]]:
    """Parse, evaluate, print the table; a refused input exits with status 2 and its message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.INFO, logging.INFO)
    try:
        rows = evaluate(args)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(markdown_table(rows), end="")
    return rows
