"""Generate answers with a trained MoSE run or with the Emotion-LLaMA base model, with or without AR or PAI, and
score every variant side by side (the paper's Tables 1 and 7): the model-running mode of
``recipes/merr_evaluate.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.metrics import precision_score, recall_score

from peft_mose import environment
from peft_mose.attention import DEFAULT_GATE_THRESHOLD, Strategy, label_token_ids
from peft_mose.attention.gate import check_gate_threshold

from .emotion_llama.features import FeatureSpec
from .generation import generate_predictions
from .merr.dataset import CAPTION_FILES, SUBTITLE_FILE, MERRDataset
from .merr.readers import EMOTION_LABELS
from .merr.references import merr_references
from .merr.synthetic import FILES as SYNTHETIC_FILES
from .merr.tasks import TASKS
from .model_choice import ModelChoice, Reallocation, check_exists, parse_strategies
from .plots import SUBSET_TITLES, plot_scores
from .run_config import RunConfig
from .scoring import (
    Reference,
    ScoringConfig,
    markdown_table,
    score,
    warn_skipped,
    write_jsonl,
    write_report,
)

logger = logging.getLogger(__name__)

CONFLICT_SUBSETS = ("video_aligned", "audio_aligned")
"""The CA-MER subsets whose face and voice disagree: what the gate should flag (``consistent`` should not be)."""
REASONING_TASKS = ("reason_v2", "reason")
"""Prompts of the reasoning task: ``reason_v2`` answers with the fine-grained ``smp_reason_caption`` (Emotion-LLaMA's
EMER evaluation and MoSEAR's stage 2), ``reason`` with the coarse-grained ``caption``."""
MAX_NEW_TOKENS = {"recognition": 8, "reasoning": 500}
"""Default generation lengths: a label and ``</s>``; an explanation (Emotion-LLaMA's EMER evaluation uses 500)."""
ROW_NAMES = {"run": "MoSE", "base": "Emotion-LLaMA"}
ROW_SUFFIXES = {Strategy.AR: " + AR", Strategy.AR_GATE: " + AR (gated)", Strategy.PAI: " + PAI", Strategy.NONE: ""}
"""Row names per strategy; ``ar+gate`` is AR only on the samples the conflict gate flags (``docs/ar.md``)."""


@dataclass
class ModelEvalConfig:
    """What to run: a trained run or the base model (``model``; the base model also needs ``data_root``), the
    evaluation data, the attention strategies to compare and their options, and how to generate and score. Problems
    are reported with the command line's option names."""

    out_dir: Path
    scoring: ScoringConfig
    model: ModelChoice = field(default_factory=ModelChoice)
    data_root: Path | None = None
    annotation: Path | None = None
    subsets: Path | None = None
    reasoning_task: str = "reason_v2"
    strategies: Sequence[Strategy | str] = (Strategy.NONE, Strategy.AR)
    reallocation: Reallocation = field(default_factory=Reallocation)
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    batch_size: int = 8
    max_new_tokens: int | None = None
    name: str | None = None

    @property
    def prompt_task(self) -> str:
        """The MERR task whose prompt is generated from: ``emotion`` (recognition) or the reasoning task."""
        return "emotion" if self.scoring.kind == "recognition" else self.reasoning_task


def check_config(config: ModelEvalConfig) -> None:
    """Refuse contradictory, incomplete or out-of-range settings and missing files before anything is loaded."""
    config.model.check("generate with")
    if config.model.kind == "base" and config.data_root is None:
        raise ValueError(
            "--model_name_or_path needs --data_root, the MERR folder (features, feature_spec.json, subtitles, "
            "captions)."
        )
    check_exists(config.data_root, "the data folder", "--data_root")
    check_exists(config.subsets, "the subsets file", "--subsets")
    parse_strategies(config.strategies)
    check_gate_threshold(config.gate_threshold)
    if config.reasoning_task not in REASONING_TASKS:
        raise ValueError(f"--reasoning_task must be one of {list(REASONING_TASKS)}, got {config.reasoning_task!r}.")
    if config.batch_size < 1 or (config.max_new_tokens is not None and config.max_new_tokens < 1):
        raise ValueError(
            f"--batch_size and --max_new_tokens must be >= 1, got {config.batch_size}, {config.max_new_tokens}."
        )


def resolve_annotation(annotation: Path | None, data_root: Path) -> Path:
    """The annotation file: as given, else under ``data_root``; by default the synthetic test split."""
    if annotation is None:
        default = data_root / SYNTHETIC_FILES["test_txt"]
        if not default.is_file():
            raise FileNotFoundError(f"{data_root} has no {SYNTHETIC_FILES['test_txt']}: pass --annotation.")
        return default
    for candidate in (Path(annotation), data_root / annotation):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"--annotation {annotation}: the file does not exist (neither as given nor in {data_root})."
    )


def evaluation_data(config: ModelEvalConfig) -> tuple[MERRDataset, list[Reference], FeatureSpec]:
    """The dataset of the prompt task (validated, features under the data root), its references and feature spec."""
    run_config = RunConfig.read(config.model.run_dir) if config.model.kind == "run" else None
    data_root = Path(config.data_root or run_config.data_root)
    check_exists(data_root, "the data folder (recorded by the run unless given)", "--data_root")
    spec = run_config.feature_spec if run_config is not None else FeatureSpec.from_dir(data_root)
    task = config.prompt_task
    captions = {}
    if TASKS[task].answer_source != "label":
        key = f"{TASKS[task].answer_source}_json"
        captions[key] = data_root / CAPTION_FILES[key]
        check_exists(captions[key], f"the caption file of task {task!r}", "--data_root")
    annotation = resolve_annotation(config.annotation, data_root)
    subtitles = data_root / SUBTITLE_FILE
    labels = tuple(dict.fromkeys((*EMOTION_LABELS, *config.scoring.labels)))  # MERR's, and those scored (DFEW's)
    dataset = MERRDataset(annotation, subtitles, tasks=(task,), feature_root=data_root, spec=spec, labels=labels,
                          **captions)  # fmt: skip
    return dataset, merr_references(dataset, task, config.subsets), spec


def trade_off(
    references: Sequence[Reference], predictions: Mapping[str, str], plain: Mapping[str, str] | None,
    gated: Mapping[str, bool] | None,
) -> dict[str, object]:  # fmt: skip
    """Per subset: how many answers differ from the plain model's (``plain``; the claim to check is that AR changes
    none on ``consistent``), and with a gate the fraction of samples it flagged; over the samples with a subset, the
    gate's precision and recall against the subsets (video- and audio-aligned: conflict, consistent: not)."""
    subsets = sorted({r.subset for r in references if r.subset is not None})
    report: dict[str, object] = {}
    if plain is not None:
        report["changed_vs_none"] = {
            s: sum(predictions[r.id] != plain[r.id] for r in references if r.subset == s) for s in subsets
        }
    if gated:
        report["gated_fraction"] = {
            s: sum(gated[r.id] for r in references if r.subset == s) / sum(r.subset == s for r in references)
            for s in subsets
        }
        labelled = [r for r in references if r.subset is not None]
        if labelled:
            truth = [r.subset in CONFLICT_SUBSETS for r in labelled]
            flags = [gated[r.id] for r in labelled]
            report["detector"] = {
                "precision": float(precision_score(truth, flags, zero_division=0)),
                "recall": float(recall_score(truth, flags, zero_division=0)),
            }
    return report


def trade_off_table(summary: Sequence[Mapping[str, object]]) -> str:
    """Markdown: per strategy, the answers changed against the plain model and the gate's share, per subset."""
    rows = [row for row in summary if row.get("trade_off", {}).get("changed_vs_none") is not None]
    if not rows:
        return ""
    subsets = list(rows[0]["trade_off"]["changed_vs_none"])
    titles = [SUBSET_TITLES[s] for s in subsets]
    lines = ["| Strategy | " + " | ".join(f"{t} changed" for t in titles) + " | " +
             " | ".join(f"{t} gated" for t in titles) + " | Gate precision | Gate recall |",
             "|---" * (1 + 2 * len(subsets) + 2) + "|"]  # fmt: skip
    for row in rows:
        report = row["trade_off"]
        changed = [str(report["changed_vs_none"][s]) for s in subsets]
        fractions = report.get("gated_fraction")
        gated = [f"{100 * fractions[s]:.1f}%" if fractions else "-" for s in subsets]
        detector = report.get("detector")
        quality = [f"{100 * detector[k]:.1f}" if detector else "-" for k in ("precision", "recall")]
        lines.append(f"| {row['name']} | " + " | ".join(changed + gated + quality) + " |")
    return "\n".join(lines) + "\n"


def evaluate_model(config: ModelEvalConfig) -> list[tuple[str, Mapping[str, object]]]:
    """Generate and score each strategy; write ``references.jsonl``, ``predictions_<strategy>.jsonl``,
    ``<strategy>/`` reports and the combined ``scores.md`` / ``scores.json`` / ``scores.png`` into ``out_dir``;
    return the table rows."""
    check_config(config)
    strategies = parse_strategies(config.strategies)
    dataset, references, spec = evaluation_data(config)
    model, encoder = config.model.load(spec)
    device = next(model.parameters()).device
    max_new_tokens = config.max_new_tokens or MAX_NEW_TOKENS[config.scoring.kind]
    generation = {
        "model": str(config.model.run_dir or config.model.model_name_or_path),
        "weights": str(config.model.weights),
        "annotation": str(dataset.annotation_file),
        "prompt_task": config.prompt_task,
        "instruction": TASKS[config.prompt_task].instructions[0],
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "references.jsonl", [_reference_record(r) for r in references])
    prefix = config.name or ROW_NAMES[config.model.kind]
    rows: list[tuple[str, Mapping[str, object]]] = []
    summary = []
    answers: dict[Strategy, dict[str, str]] = {}
    gate = None
    if any(strategy.gated for strategy in strategies):
        gate = {"gate_labels": label_token_ids(encoder.tokenizer, config.scoring.labels),
                "gate_threshold": config.gate_threshold}  # fmt: skip
    # the plain model's answers first: the other strategies' answers are compared with them (trade_off)
    for strategy in sorted(strategies, key=lambda s: s is not Strategy.NONE):
        gated: dict[str, bool] = {}
        with torch.no_grad():
            predictions = generate_predictions(
                model, dataset, encoder, device, config.batch_size, max_new_tokens, task=config.prompt_task,
                reallocation=config.reallocation.options(strategy, gate), gated=gated,
            )
        answers[strategy] = predictions
        records = [{"id": r.id, "prediction": predictions[r.id], **({"gated": gated[r.id]} if gated else {})}
                   for r in references]  # fmt: skip
        write_jsonl(out / f"predictions_{strategy.value}.jsonl", records)
        result, per_sample = score(predictions, references, config.scoring)
        warn_skipped(per_sample, config.scoring.kind)
        result["settings"]["generation"] = {**generation, **_strategy_settings(strategy, config)}
        for row in per_sample:
            row["prediction"] = predictions[row["id"]]
        name = prefix + ROW_SUFFIXES[strategy]
        write_report(result, per_sample, out / strategy.value, name=name)
        rows.append((name, result))
        entry = {"name": name, "strategy": strategy.value, **result, "environment": environment()}
        if strategy.reallocates:
            entry["trade_off"] = trade_off(references, predictions, answers.get(Strategy.NONE), gated)
        summary.append(entry)
    asked = [prefix + ROW_SUFFIXES[strategy] for strategy in strategies]
    rows.sort(key=lambda row: asked.index(row[0]))
    summary.sort(key=lambda entry: asked.index(entry["name"]))
    table = markdown_table(rows)
    trade_offs = trade_off_table(summary)
    if trade_offs:
        table += "\nAnswers changed against the plain model, and the gate's decisions, per subset:\n\n" + trade_offs
    (out / "scores.md").write_text(table, encoding="utf-8")
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_scores(rows, out / "scores.png")
    return rows


def _strategy_settings(strategy: Strategy, config: ModelEvalConfig) -> dict[str, object]:
    options = config.reallocation
    layers = sorted(options.layers) if options.layers is not None else "all"
    if strategy is Strategy.AR:
        return {"strategy": strategy.value, "tau": options.tau, "layers": layers}
    if strategy is Strategy.AR_GATE:
        return {"strategy": strategy.value, "tau": options.tau, "layers": layers, "gate": "conflict",
                "gate_threshold": config.gate_threshold, "gate_labels": list(config.scoring.labels)}  # fmt: skip
    if strategy is Strategy.PAI:
        return {"strategy": strategy.value, "alpha": options.alpha, "pai_mode": options.pai_mode.value,
                "layers": layers}  # fmt: skip
    return {"strategy": strategy.value}


def _reference_record(reference: Reference) -> dict[str, object]:
    """The scoring mode's reference format (``docs/evaluation.md``)."""
    record: dict[str, object] = {"id": reference.id}
    if reference.label is not None:
        record["label"] = reference.label
    else:
        record["reference"] = reference.reference
    if reference.subset is not None:
        record["subset"] = reference.subset
    return record
