"""Generate answers with a trained MoSE run or with the Emotion-LLaMA base model, with or without AR or PAI, and
score every variant side by side (the paper's Tables 1 and 7): the model-running mode of
``recipes/merr_evaluate.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from sklearn.metrics import precision_score, recall_score

from peft_mose._versions import environment
from peft_mose.attention import DEFAULT_GATE_THRESHOLD, label_token_ids
from peft_mose.attention.backend import PAI_MODES
from peft_mose.attention.gate import check_gate_threshold

from .emotion_llama.baseline import load_baseline
from .emotion_llama.features import FeatureSpec
from .emotion_llama.model import EmotionLlama
from .emotion_llama.prompt import PromptEncoder
from .generation import generate_predictions
from .merr.dataset import CAPTION_FILES, SUBTITLE_FILE, MERRDataset
from .merr.references import merr_references
from .merr.synthetic import FILES as SYNTHETIC_FILES
from .merr.tasks import TASKS
from .modeling import load_trained
from .plots import SUBSET_TITLES, plot_scores
from .run_config import RUN_CONFIG, RunConfig
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

STRATEGIES = ("none", "ar", "ar+gate", "pai")
"""``ar+gate``: AR only on the samples the conflict gate flags (``docs/ar.md``, "The conflict gate")."""
CONFLICT_SUBSETS = ("video_aligned", "audio_aligned")
"""The CA-MER subsets whose face and voice disagree: what the gate should flag (``consistent`` should not be)."""
REASONING_TASKS = ("reason_v2", "reason")
"""Prompts of the reasoning task: ``reason_v2`` answers with the fine-grained ``smp_reason_caption`` (Emotion-LLaMA's
EMER evaluation and MoSEAR's stage 2), ``reason`` with the coarse-grained ``caption``."""
MAX_NEW_TOKENS = {"recognition": 8, "reasoning": 500}
"""Default generation lengths: a label and ``</s>``; an explanation (Emotion-LLaMA's EMER evaluation uses 500)."""
ROW_NAMES = {"run": "MoSE", "base": "Emotion-LLaMA"}
ROW_SUFFIXES = {"ar": " + AR", "ar+gate": " + AR (gated)", "pai": " + PAI", "none": ""}


@dataclass
class ModelEvalConfig:
    """What to run: a trained run (``run_dir``) or the base model (``model_name_or_path`` + ``data_root`` + projector
    weights), the evaluation data, the attention strategies to compare, and how to generate and score. Problems are
    reported with the command line's option names."""

    out_dir: Path
    scoring: ScoringConfig
    run_dir: Path | None = None
    model_name_or_path: Path | None = None
    data_root: Path | None = None
    projector_checkpoint: Path | None = None
    projectors: Path | None = None
    annotation: Path | None = None
    subsets: Path | None = None
    reasoning_task: str = "reason_v2"
    strategies: Sequence[str] = ("none", "ar")
    tau: float = 1.0
    alpha: float = 0.5
    pai_mode: str = "logits"
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    layers: Sequence[int] | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    name: str | None = None
    device: str | None = None

    @property
    def kind(self) -> str:
        """``"run"`` (MoSE) or ``"base"`` (Emotion-LLaMA)."""
        return "run" if self.run_dir is not None else "base"

    @property
    def prompt_task(self) -> str:
        """The MERR task whose prompt is generated from: ``emotion`` (recognition) or the reasoning task."""
        return "emotion" if self.scoring.task == "recognition" else self.reasoning_task


class ModelChoice(Protocol):
    """What :func:`check_model_choice`, :func:`load_model` and :func:`reallocation_options` read: the model (a
    trained run, or the base model with its projector weights), the device and the reallocation settings. Both
    :class:`ModelEvalConfig` and :class:`~mosear_recipes.inference.InferenceConfig` have these fields."""

    run_dir: Path | None
    model_name_or_path: Path | None
    projector_checkpoint: Path | None
    projectors: Path | None
    device: str | None
    tau: float
    alpha: float
    pai_mode: str
    layers: Sequence[int] | None

    @property
    def kind(self) -> str: ...


def check_model_choice(config: ModelChoice, purpose: str, run_supplies: Mapping[str, Any] | None = None) -> None:
    """One model, which exists: ``--run_dir`` (a folder of ``recipes/merr_finetune.py``, which brings its own
    projectors and whatever ``run_supplies`` names, ``{option: value}``) or ``--model_name_or_path`` with the
    projector weights (:func:`check_base_weights`). ``purpose`` ends the message that asks for one."""
    if (config.run_dir is None) == (config.model_name_or_path is None):
        raise ValueError(
            "Give --run_dir (a MoSE run) or --model_name_or_path (the base model)"
            + (", not both." if config.run_dir is not None else f" to {purpose}.")
        )
    if config.kind == "base":
        check_exists(config.model_name_or_path, "the LLM folder", "--model_name_or_path")
        check_base_weights(config.projector_checkpoint, config.projectors)
        return
    check_exists(config.run_dir, "the run folder", "--run_dir")
    if not (Path(config.run_dir) / RUN_CONFIG).is_file():
        raise FileNotFoundError(
            f"--run_dir {config.run_dir} holds no {RUN_CONFIG}: is it an output folder of recipes/merr_finetune.py?"
        )
    own = {"--projector_checkpoint": config.projector_checkpoint, "--projectors": config.projectors,
           **(run_supplies or {})}  # fmt: skip
    given = [option for option, value in own.items() if value is not None]
    if given:
        extras = " and ".join(option.removeprefix("--").replace("_", " ") for option in run_supplies or {})
        raise ValueError(
            f"{' and '.join(given)} go with --model_name_or_path: a run has its own projectors"
            + (f" and {extras}." if extras else ".")
        )


def check_exists(path: Path | None, what: str, option: str) -> None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{option} {path}: {what} does not exist.")


def check_base_weights(projector_checkpoint: Path | None, projectors: Path | None) -> None:
    """The base model's projector weights: exactly one of ``--projector_checkpoint`` and ``--projectors``, existing."""
    if (projector_checkpoint is None) == (projectors is None):
        raise ValueError(
            "--model_name_or_path needs the projector weights: --projector_checkpoint (an Emotion-LLaMA or "
            "MiniGPT-v2 .pth, its LoRA included) or --projectors (a projectors.safetensors)"
            + (", not both." if projector_checkpoint is not None else ".")
        )
    check_exists(projector_checkpoint, "the checkpoint", "--projector_checkpoint")
    check_exists(projectors, "the projector weights", "--projectors")


def check_config(config: ModelEvalConfig) -> None:
    """Refuse contradictory, incomplete or out-of-range settings and missing files before anything is loaded."""
    check_model_choice(config, "generate with")
    if config.kind == "base" and config.data_root is None:
        raise ValueError(
            "--model_name_or_path needs --data_root, the MERR folder (features, feature_spec.json, subtitles, "
            "captions)."
        )
    check_exists(config.data_root, "the data folder", "--data_root")
    check_exists(config.subsets, "the subsets file", "--subsets")
    unknown = [s for s in config.strategies if s not in STRATEGIES]
    if unknown or not config.strategies:
        raise ValueError(f"Unknown strategies {unknown or list(config.strategies)!r}; choose from {list(STRATEGIES)}.")
    check_gate_threshold(config.gate_threshold)
    if config.pai_mode not in PAI_MODES:
        raise ValueError(f"--pai_mode must be one of {list(PAI_MODES)}, got {config.pai_mode!r}.")
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
    run_config = RunConfig.read(config.run_dir) if config.kind == "run" else None
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
    dataset = MERRDataset(annotation, subtitles, tasks=(task,), feature_root=data_root, spec=spec, **captions)
    return dataset, merr_references(dataset, task, config.subsets), spec


def load_model(config: ModelChoice, spec: FeatureSpec) -> tuple[EmotionLlama, PromptEncoder]:
    """The model to generate with (eval mode, on ``config.device``) and its prompt encoder; the base model's
    checkpoint reports go to stderr."""
    if config.kind == "run":
        trained = load_trained(config.run_dir)
        model, encoder = trained.model, trained.encoder
    else:
        baseline = load_baseline(config.model_name_or_path, spec, config.projector_checkpoint, config.projectors)
        logger.info("%s", "\n".join(baseline.reports))
        model, encoder = baseline.model, baseline.encoder
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), encoder


def reallocation_options(strategy: str, config: ModelChoice, gate: Mapping[str, Any] | None = None) -> dict | None:
    """``None`` for ``none``; otherwise the :func:`~peft_mose.attention_reallocation` options of AR, gated AR (with
    the gate's options ``gate``: ``gate_labels`` and ``gate_threshold``) or PAI (the model passes its modality ids
    along, MoSE or not)."""
    if strategy == "none":
        return None
    options = {
        "tau": config.tau, "strategy": strategy.removesuffix("+gate"), "alpha": config.alpha,
        "pai_mode": config.pai_mode, "layers": config.layers,
    }  # fmt: skip
    if strategy == "ar+gate":
        if gate is None:
            raise ValueError("Strategy 'ar+gate' needs the gate's options (gate_labels, gate_threshold).")
        options.update(gate="conflict", **gate)
    return options


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
    strategies = list(dict.fromkeys(config.strategies))
    dataset, references, spec = evaluation_data(config)
    model, encoder = load_model(config, spec)
    device = next(model.parameters()).device
    max_new_tokens = config.max_new_tokens or MAX_NEW_TOKENS[config.scoring.task]
    generation = {
        "model": str(config.run_dir or config.model_name_or_path),
        "weights": str(config.projector_checkpoint or config.projectors or config.run_dir),
        "annotation": str(dataset.annotation_file),
        "prompt_task": config.prompt_task,
        "instruction": TASKS[config.prompt_task].instructions[0],
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "references.jsonl", [_reference_record(r) for r in references])
    prefix = config.name or ROW_NAMES[config.kind]
    rows: list[tuple[str, Mapping[str, object]]] = []
    summary = []
    answers: dict[str, dict[str, str]] = {}
    gate = None
    if "ar+gate" in strategies:
        gate = {"gate_labels": label_token_ids(encoder.tokenizer, config.scoring.labels),
                "gate_threshold": config.gate_threshold}  # fmt: skip
    for strategy in strategies:
        gated: dict[str, bool] = {}
        with torch.no_grad():
            predictions = generate_predictions(
                model, dataset, encoder, device, config.batch_size, max_new_tokens, task=config.prompt_task,
                reallocation=reallocation_options(strategy, config, gate), gated=gated,
            )
        answers[strategy] = predictions
        records = [{"id": r.id, "prediction": predictions[r.id], **({"gated": gated[r.id]} if gated else {})}
                   for r in references]  # fmt: skip
        write_jsonl(out / f"predictions_{strategy}.jsonl", records)
        result, per_sample = score(predictions, references, config.scoring)
        warn_skipped(per_sample, config.scoring.task)
        result["settings"]["generation"] = {**generation, **_strategy_settings(strategy, config)}
        for row in per_sample:
            row["prediction"] = predictions[row["id"]]
        name = prefix + ROW_SUFFIXES[strategy]
        write_report(result, per_sample, out / strategy, name=name)
        rows.append((name, result))
        entry = {"name": name, "strategy": strategy, **result, "environment": environment()}
        if strategy != "none":
            entry["trade_off"] = trade_off(references, predictions, answers.get("none"), gated)
        summary.append(entry)
    table = markdown_table(rows)
    trade_offs = trade_off_table(summary)
    if trade_offs:
        table += "\nAnswers changed against the plain model, and the gate's decisions, per subset:\n\n" + trade_offs
    (out / "scores.md").write_text(table, encoding="utf-8")
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_scores(rows, out / "scores.png")
    return rows


def _strategy_settings(strategy: str, config: ModelEvalConfig) -> dict[str, object]:
    layers = sorted(config.layers) if config.layers is not None else "all"
    if strategy == "ar":
        return {"strategy": strategy, "tau": config.tau, "layers": layers}
    if strategy == "ar+gate":
        return {"strategy": strategy, "tau": config.tau, "layers": layers, "gate": "conflict",
                "gate_threshold": config.gate_threshold, "gate_labels": list(config.scoring.labels)}  # fmt: skip
    if strategy == "pai":
        return {"strategy": strategy, "alpha": config.alpha, "pai_mode": config.pai_mode, "layers": layers}
    return {"strategy": strategy}


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
