"""Score emotion predictions like the MoSEAR paper (Tables 1 and 7 for reasoning, 3 and 4 for recognition) and
write the report: ``scores.json``, ``scores.md``, ``per_sample.jsonl`` and ``scores.png``. File formats:
``docs/evaluation.md``; the command line: ``recipes/merr_evaluate.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from operator import getitem
from pathlib import Path

from tqdm import tqdm

from peft_mose import environment
from peft_mose.metrics import (
    DEFAULT_GROUPING,
    Grouping,
    audio_video_gap,
    extract_emotion_words,
    make_label_parser,
    normalize_subset,
    normalize_word,
    recognition_scores,
    resolve_labels,
    sample_set_scores,
    scores_by_subset,
    set_level_scores,
    vocabulary_of,
)

from .plots import HEADERS, METRICS, SUBSET_TITLES, plot_scores
from .textfiles import parse_json, read_text

logger = logging.getLogger(__name__)

SCORINGS = ("reasoning", "recognition")  # the paper's two evaluations (a MERR "task" is an instruction)
_SHOWN_IDS = 5
FALLBACK_LABEL = "neutral"  # Emotion-LLaMA's label for an answer that names none

Prediction = str | list[str]


@dataclass(frozen=True)
class Reference:
    """One reference record: reasoning text or emotion words (reasoning), a class label (recognition)."""

    id: str
    reference: Prediction | None = None
    label: str | None = None
    subset: str | None = None


@dataclass(frozen=True)
class ScoringConfig:
    """How predictions are turned into scores; ``describe()`` is what ``scores.json`` records."""

    kind: str = "reasoning"
    labels: tuple[str, ...] = resolve_labels("mer2023")
    parser: str = "emotion_llama"
    grouping: Grouping = DEFAULT_GROUPING
    grouping_source: str = "default"
    scope: str = "conclusion"
    extractor: Callable[[str], list[str]] | None = field(default=None, compare=False)

    def describe(self) -> dict[str, object]:
        """The settings that affect the scores, JSON-friendly."""
        if self.kind == "recognition":
            described: dict[str, object] = {"labels": list(self.labels), "parser": self.parser}
            if self.parser == "robust":
                described["grouping"] = self.grouping_source
            return described
        return {
            "grouping": self.grouping_source,
            "extractor": "custom" if self.extractor else f"default (scope={self.scope})",
        }


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; a clear ``ValueError`` for a missing or empty file, bytes
    that are not UTF-8, invalid JSON, a key given twice or a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file.")
    records = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        records.append((number, record))
    if not records:
        raise ValueError(f"{path} is empty: it holds no records.")
    return records


def write_jsonl(path: str | Path, records: Sequence[Mapping[str, object]]) -> None:
    """Write one JSON object per line (UTF-8)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _unique_ids(path: Path, records: list[tuple[int, dict]]) -> list[str]:
    first_line: dict[str, int] = {}
    for number, record in records:
        value = record.get("id")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise ValueError(f"{path}:{number}: 'id' must be a non-empty string or an integer, got {value!r}.")
        if str(value) in first_line:
            raise ValueError(f"{path}:{number}: duplicate id {str(value)!r} (first on line {first_line[str(value)]}).")
        first_line[str(value)] = number
    return list(first_line)


def _text_or_words(value: object, where: str, key: str) -> Prediction:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(w, str) for w in value):
        return value
    raise ValueError(f"{where}: {key!r} must be a string or a list of strings, got {value!r}.")


def load_predictions(path: str | Path) -> dict[str, Prediction]:
    """``{id: prediction}`` from a JSONL file of ``{"id", "prediction"}`` records."""
    path = Path(path)
    records = read_jsonl(path)
    ids = _unique_ids(path, records)
    predictions = {}
    for sample_id, (number, record) in zip(ids, records):
        if "prediction" not in record:
            raise ValueError(f"{path}:{number} (id {sample_id!r}): missing field 'prediction'.")
        predictions[sample_id] = _text_or_words(record["prediction"], f"{path}:{number}", "prediction")
    return predictions


def load_references(path: str | Path, kind: str, labels: Sequence[str] = ()) -> list[Reference]:
    """References from a JSONL file of ``{"id", "reference" (reasoning) | "label" (recognition), "subset"?}``."""
    path = Path(path)
    records = read_jsonl(path)
    ids = _unique_ids(path, records)
    references = []
    for sample_id, (number, record) in zip(ids, records):
        where = f"{path}:{number} (id {sample_id!r})"
        subset = record.get("subset")
        if subset is not None:
            try:
                subset = normalize_subset(subset)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if kind == "recognition":
            if not isinstance(record.get("label"), str):
                raise ValueError(f"{where}: recognition scoring needs a string field 'label'.")
            label = normalize_word(record["label"])
            if label not in labels:
                raise ValueError(f"{where}: label {record['label']!r} is not in the label set {list(labels)}.")
            references.append(Reference(sample_id, label=label, subset=subset))
        else:
            if "reference" not in record:
                raise ValueError(f"{where}: reasoning scoring needs a field 'reference'.")
            reference = _text_or_words(record["reference"], where, "reference")
            references.append(Reference(sample_id, reference, subset=subset))
    with_subset = [r.subset is not None for r in references]
    if any(with_subset) and not all(with_subset):
        missing = references[with_subset.index(False)].id
        raise ValueError(f"{path}: some records have a 'subset', others not (e.g. id {missing!r}): give all or none.")
    return references


def _id_list(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    return shown + (f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else "")


def check_ids(predictions: Mapping[str, Prediction], references: Sequence[Reference]) -> None:
    """Raise unless predictions and references have exactly the same ids (no partial scores)."""
    reference_ids = [r.id for r in references]
    missing = [i for i in reference_ids if i not in predictions]
    unknown = sorted(set(predictions) - set(reference_ids))
    problems = []
    if missing:
        problems.append(f"{len(missing)} reference ids have no prediction: {_id_list(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} prediction ids are not in the references: {_id_list(unknown)}")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def _words(value: Prediction, extractor: Callable[[str], list[str]]) -> list[str]:
    return extractor(value) if isinstance(value, str) else value


def score(
    predictions: Mapping[str, Prediction], references: Sequence[Reference], config: ScoringConfig
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Score predictions against references: ``(result, per-sample rows)``; scores per CA-MER subset when the
    references have subsets, plus ``overall`` and the audio-minus-video ``gap``; for recognition, ``fallback`` counts
    the answers that named no label and were scored as :data:`FALLBACK_LABEL`."""
    if config.kind not in SCORINGS:
        raise ValueError(f"Unknown scoring {config.kind!r}; expected one of {SCORINGS}.")
    check_ids(predictions, references)
    subsets = [r.subset for r in references]
    if config.kind == "reasoning":
        vocabulary = vocabulary_of(config.grouping)
        extractor = config.extractor or (lambda text: extract_emotion_words(text, vocabulary, config.scope))
        pred_words, ref_words, rows = [], [], []
        for ref in tqdm(references, desc="extracting emotion words", disable=None):
            if ref.reference is None:
                raise ValueError(f"Reference for id {ref.id!r} has no reference text or words (reasoning scoring).")
            pred_words.append(_words(predictions[ref.id], extractor))
            ref_words.append(_words(ref.reference, extractor))
            accuracy, recall = sample_set_scores(pred_words[-1], ref_words[-1], config.grouping) or (None, None)
            rows.append(
                {
                    "id": ref.id,
                    "subset": ref.subset,
                    "prediction_words": pred_words[-1],
                    "reference_words": ref_words[-1],
                    "accuracy": accuracy,
                    "recall": recall,
                }
            )

        def score_indices(indices: list[int]) -> dict[str, object]:
            return set_level_scores([pred_words[i] for i in indices], [ref_words[i] for i in indices], config.grouping)

    else:
        parse = make_label_parser(config.parser, config.labels, fallback=FALLBACK_LABEL, grouping=config.grouping)
        # An answer that names no label gets the fallback; a parser with another fallback tells those answers apart.
        other = next((label for label in config.labels if label != FALLBACK_LABEL), FALLBACK_LABEL)
        probe = make_label_parser(config.parser, config.labels, fallback=other, grouping=config.grouping)
        parsed, rows = [], []
        for ref in tqdm(references, desc="parsing labels", disable=None):
            if ref.label is None:
                raise ValueError(f"Reference for id {ref.id!r} has no label (recognition scoring).")
            text = predictions[ref.id]
            if not isinstance(text, str):
                raise ValueError(f"Prediction for id {ref.id!r} must be generated text for recognition scoring.")
            parsed.append(parse(text))
            rows.append(
                {"id": ref.id, "subset": ref.subset, "predicted_label": parsed[-1], "label": ref.label,
                 "fallback": parsed[-1] != probe(text)}
            )  # fmt: skip

        def score_indices(indices: list[int]) -> dict[str, object]:
            labels = [references[i].label for i in indices]
            return recognition_scores([parsed[i] for i in indices], labels, config.labels)

    scores = scores_by_subset(subsets, score_indices)
    result = {
        "scoring": config.kind,
        "num_samples": len(references),
        "scores": scores,
        "gap": audio_video_gap(scores, METRICS[config.kind]),
        "settings": config.describe(),
    }
    if config.kind == "recognition":
        result["fallback"] = {"label": FALLBACK_LABEL, "count": sum(row["fallback"] for row in rows)}
    return result, rows


def _columns(result: Mapping[str, object]) -> list[tuple[str, tuple[str, ...]]]:
    """(header, key path into ``result``) per table column."""
    metrics = METRICS[result["scoring"]]
    scores = result["scores"]
    columns = []
    if list(scores) == ["overall"] and result["scoring"] == "recognition":
        for label in scores["overall"]["per_class_recall"]:
            columns.append((label.capitalize(), ("scores", "overall", "per_class_recall", label)))
    for subset in scores:
        prefix = "" if list(scores) == ["overall"] else f"{SUBSET_TITLES[subset]} "
        columns += [(prefix + HEADERS[m], ("scores", subset, m)) for m in metrics]
    if result["gap"] is not None:
        columns += [(f"Gap A-V {HEADERS[m]}", ("gap", m)) for m in metrics]
    return columns


def markdown_table(rows: Sequence[tuple[str, Mapping[str, object]]]) -> str:
    """A markdown table with one line per ``(name, result)``, scores in percent (the paper's style)."""
    if not rows:
        raise ValueError("No results to tabulate.")
    headers = [header for header, _ in _columns(rows[0][1])]
    lines = ["| Model | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for name, result in rows:
        columns = _columns(result)
        if [header for header, _ in columns] != headers:
            raise ValueError(f"Result {name!r} has different columns (scoring or subsets) from {rows[0][0]!r}.")
        cells = [f"{100 * reduce(getitem, keys, result):{'+' if keys[0] == 'gap' else ''}.2f}" for _, keys in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    result: Mapping[str, object], rows: Sequence[Mapping[str, object]], out_dir: str | Path, name: str
) -> dict[str, Path]:
    """Write ``scores.json`` (with the :func:`~peft_mose.environment` it was produced in), ``scores.md``,
    ``per_sample.jsonl`` and ``scores.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {"json": "scores.json", "markdown": "scores.md", "per_sample": "per_sample.jsonl", "plot": "scores.png"}
    paths = {kind: out / file_name for kind, file_name in names.items()}
    record = {"name": name, **result, "environment": environment()}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table([(name, result)]), encoding="utf-8")
    write_jsonl(paths["per_sample"], rows)
    plot_scores([(name, result)], paths["plot"])
    return paths


def warn_skipped(rows: Sequence[Mapping[str, object]], kind: str) -> None:
    """Log a warning naming the reasoning samples skipped for want of an emotion word in their reference, or the
    recognition answers that named no label and were scored as :data:`FALLBACK_LABEL`."""
    if kind == "reasoning":
        skipped = [row["id"] for row in rows if row["accuracy"] is None]
        message = "samples have no emotion word in their reference and are skipped (MER-OV convention)"
    else:
        skipped = [row["id"] for row in rows if row["fallback"]]
        message = f"of {len(rows)} answers name no label and are scored as {FALLBACK_LABEL!r}"
    if skipped:
        logger.warning("%d %s: %s", len(skipped), message, _id_list(skipped))
