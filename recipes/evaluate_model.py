"""The model-running mode of ``recipes/evaluate.py``: generate with a trained run, with or without AR or PAI, and
score every variant side by side (the paper's Table 7 layout).

    python recipes/evaluate.py --run_dir out/merr --out_dir out/eval --strategies none,ar,pai
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_mose.attention import attention_reallocation
from peft_mose.metrics import resolve_labels
from recipes.evaluate import ScoringConfig, markdown_table, plot_scores, score, write_jsonl, write_report
from recipes.merr.dataset import MERRDataset
from recipes.merr.synthetic import FILES as SYNTHETIC_FILES
from recipes.merr_finetune import SUBTITLE_FILE, generate_predictions, load_trained, subset_references

STRATEGIES = ("none", "ar", "pai")


@dataclass
class ModelEvalConfig:
    """What to run: the trained run, the evaluation annotation, and the attention strategies to compare."""

    run_dir: Path
    out_dir: Path
    strategies: Sequence[str] = ("none", "ar")
    annotation: Path | None = None
    tau: float = 1.0
    alpha: float = 0.5
    layers: Sequence[int] | None = None
    labels: str = "mer2023"
    parser: str = "emotion_llama"
    batch_size: int = 8
    max_new_tokens: int = 8


def _strategies(values: Sequence[str]) -> list[str]:
    unknown = [v for v in values if v not in STRATEGIES]
    if unknown or not values:
        raise ValueError(f"Unknown strategies {unknown or values!r}; choose from {list(STRATEGIES)}.")
    return list(dict.fromkeys(values))


def evaluate_run(config: ModelEvalConfig) -> list[tuple[str, Mapping[str, object]]]:
    """Generate and score each strategy; write ``<out_dir>/<strategy>/`` reports, ``predictions_<strategy>.jsonl``
    and the combined ``scores.md`` / ``scores.png``; return the table rows."""
    strategies = _strategies(config.strategies)
    trained = load_trained(config.run_dir)
    data_root = Path(trained.run_config["data_root"])
    annotation = config.annotation or data_root / SYNTHETIC_FILES["test_txt"]
    if not Path(annotation).is_file():
        raise FileNotFoundError(f"Evaluation annotation {annotation} does not exist; pass --annotation.")
    dataset = MERRDataset(annotation, data_root / SUBTITLE_FILE, tasks=("emotion",))
    references = subset_references(dataset)
    scoring = ScoringConfig("recognition", resolve_labels(config.labels), parser=config.parser)
    device = next(trained.model.parameters()).device
    config.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, Mapping[str, object]]] = []
    for strategy in strategies:
        context = (
            contextlib.nullcontext()
            if strategy == "none"
            else attention_reallocation(
                trained.model.llm, tau=config.tau, strategy=strategy, alpha=config.alpha, layers=config.layers
            )
        )
        with context, torch.no_grad():
            predictions = generate_predictions(
                trained.model, dataset, trained.encoder, device, config.batch_size, config.max_new_tokens
            )
        write_jsonl(
            config.out_dir / f"predictions_{strategy}.jsonl",
            [{"id": name, "prediction": text} for name, text in sorted(predictions.items())],
        )
        result, per_sample = score(predictions, references, scoring)
        name = "MoSE" if strategy == "none" else f"MoSE + {strategy.upper()}"
        write_report(result, per_sample, config.out_dir / strategy, name=name)
        rows.append((name, result))
    (config.out_dir / "scores.md").write_text(markdown_table(rows), encoding="utf-8")
    plot_scores(rows, config.out_dir / "scores.png")
    return rows
