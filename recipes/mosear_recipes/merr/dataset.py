"""The MERR dataset: annotation rows joined with subtitles, captions and pre-extracted features, validated up front."""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..emotion_llama.features import FeatureSpec

from .readers import (
    EMOTION_LABELS,
    Annotation,
    SampleError,
    check_label,
    read_annotations,
    read_captions,
    read_feature,
    read_subtitles,
)
from .perceive import CUES_FILE, Cues, perceive_then_reason, read_cues
from .tasks import CAPTION_FIELDS, TASKS, normalize_answer, parse_tasks

SUBTITLE_FILE = "transcription_en_all.csv"
CAPTION_FILES = {
    "coarse_json": "MERR_coarse_grained.json",
    "fine_json": "MERR_fine_grained.json",
    "cues_json": CUES_FILE,
}
"""MERR's subtitle and caption files (and the cue file of the task ``perceive``), under its data root."""
CHECK_THREADS = min(8, os.cpu_count() or 1)  # feature files read at once while the dataset is checked
SampleKey = tuple[int, str, int]
"""``(sample index, task name, instruction draw)``; the draw picks the instruction (modulo the pool size)."""


@dataclass(frozen=True)
class MERRRecord:
    """A validated sample: label, subtitle, normalised answer per task, and its feature files."""

    name: str
    label: str
    subtitle: str
    answers: dict[str, str]
    eva: Path
    face: Path
    video: Path
    audio: Path


@dataclass
class MERRSample:
    """One (sample, task) item with its features as float32 tensors shaped for the projectors."""

    name: str
    task: str
    label: str
    subtitle: str
    instruction: str
    answer: str
    eva_patch: torch.Tensor  # [eva_patches / eva_group, eva_dim * eva_group]
    eva_cls: torch.Tensor  # [eva_dim]
    face: torch.Tensor  # [feature_dim]
    video: torch.Tensor
    audio: torch.Tensor


class MERRDataset(Dataset):
    """MERR samples for ``tasks``, indexed by :data:`SampleKey`.

    Every sample is checked when the dataset is built (label, subtitle, the captions its tasks need, feature files,
    their shapes, and that every feature value is finite, which reads every file once), and its features again when it
    is read. Sample names must be unique. A problem raises :class:`~mosear_recipes.merr.readers.SampleError` naming
    the sample and the file, unless ``skip_missing`` is set: then the sample is left out and listed in ``skipped``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        subtitle_file: str | Path,
        tasks: Sequence[str] | str = ("emotion",),
        coarse_json: str | Path | None = None,
        fine_json: str | Path | None = None,
        cues_json: str | Path | None = None,
        feature_root: str | Path | None = None,
        spec: FeatureSpec | None = None,
        subtitle_column: str | None = None,
        labels: Sequence[str] = EMOTION_LABELS,
        skip_missing: bool = False,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.tasks = parse_tasks(tasks)
        self.feature_root = Path(feature_root) if feature_root is not None else self.annotation_file.parent
        self.spec = spec if spec is not None else FeatureSpec.from_dir(self.feature_root)
        self.labels = tuple(labels)
        self._captions = self._load_captions({"coarse": coarse_json, "fine": fine_json})
        self._cues = self._load_cues(cues_json)
        self._subtitle_file = Path(subtitle_file)
        subtitles = read_subtitles(subtitle_file, subtitle_column)
        self.records: list[MERRRecord] = []
        self.skipped: list[SampleError] = []
        # Checking the features reads every file: in threads, as it waits on the disk (numpy releases the GIL).
        pool = ThreadPoolExecutor(max_workers=CHECK_THREADS)
        try:
            for outcome in pool.map(lambda a: self._checked_record(a, subtitles), read_annotations(annotation_file)):
                if isinstance(outcome, SampleError):
                    if not skip_missing:
                        raise outcome
                    self.skipped.append(outcome)
                else:
                    self.records.append(outcome)
        finally:
            pool.shutdown(cancel_futures=True)
        if not self.records:
            raise ValueError(f"No usable samples in {self.annotation_file}. {self.skip_report()}")

    def _load_captions(self, files: dict[str, str | Path | None]) -> dict[str, tuple[Path, dict[str, str]]]:
        """``{source: (file, {name: caption})}`` for the caption sources the tasks need."""
        captions = {}
        for task in self.tasks:
            source = TASKS[task].answer_source
            if source in files and source not in captions:  # "cues": _load_cues
                if files[source] is None:
                    raise ValueError(f"Task {task!r} needs the {source}-grained caption JSON ({source}_json).")
                captions[source] = (Path(files[source]), read_captions(files[source], CAPTION_FIELDS[source]))
        return captions

    def _load_cues(self, cues_json: str | Path | None) -> tuple[Path, dict[str, Cues]] | None:
        """The cue file when a task answers from it (``perceive``), else ``None``."""
        if not any(TASKS[t].answer_source == "cues" for t in self.tasks):
            return None
        if cues_json is None:
            raise ValueError(f"The task 'perceive' needs the cue file ({CUES_FILE}, cues_json).")
        return Path(cues_json), read_cues(cues_json, self.labels)

    def _checked_record(self, annotation: Annotation, subtitles: dict[str, str]) -> MERRRecord | SampleError:
        """The sample's record, or the problem that makes it unusable."""
        try:
            return self._record(annotation, subtitles)
        except SampleError as err:
            return err

    def _record(self, annotation: Annotation, subtitles: dict[str, str]) -> MERRRecord:
        name = annotation.name
        label = check_label(annotation, self.labels)
        if name not in subtitles:
            raise SampleError(name, self._subtitle_file, "missing subtitle", "no row with this name")
        answers = {}
        for task in self.tasks:
            source = TASKS[task].answer_source
            if source == "label":
                answers[task] = normalize_answer(label)
                continue
            if source == "cues":
                path, cues = self._cues
                if name not in cues:
                    raise SampleError(name, path, "missing cues", f"no entry for task {task!r}")
                try:
                    answers[task] = normalize_answer(perceive_then_reason(cues[name], label, cues[name].carrier(label)))
                except ValueError as error:
                    raise SampleError(name, path, "bad cues", str(error)) from error
                continue
            path, captions = self._captions[source]
            if name not in captions:
                raise SampleError(name, path, "missing caption", f"no entry for task {task!r}")
            if isinstance(captions[name], SampleError):
                raise captions[name]
            answers[task] = normalize_answer(captions[name])
        files = {kind: self.feature_root / folder / f"{name}.npy" for kind, folder in self.spec.folders.items()}
        for kind, path in files.items():
            read_feature(path, name, self.spec.shapes(kind))
        return MERRRecord(name=name, label=label, subtitle=subtitles[name], answers=answers, **files)

    def skip_report(self) -> str:
        """How many samples were skipped and why, e.g. ``"skipped 2 of 300 samples ...: 2 missing feature file"``."""
        total = len(self.records) + len(self.skipped)
        if not self.skipped:
            return f"skipped 0 of {total} samples in {self.annotation_file}."
        kinds = Counter(err.kind for err in self.skipped)
        reasons = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        return (
            f"skipped {len(self.skipped)} of {total} samples in {self.annotation_file}: {reasons} "
            f"(first: {self.skipped[0]})."
        )

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, name: str, task: str) -> str:
        """The caption a reasoning task answers with, as written in the caption JSON (``records`` hold it
        normalised): the reference text of reasoning evaluation."""
        self._check_task(task)
        source = TASKS[task].answer_source
        if source not in self._captions:
            raise ValueError(f"Task {task!r} answers with the label, not a caption.")
        return self._captions[source][1][name]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"Task {task!r} was not loaded; this dataset has {self.tasks}.")

    def keys(self, task: str, instruction: int = 0) -> list[SampleKey]:
        """Keys of every sample for one task and a fixed instruction (for evaluation)."""
        self._check_task(task)
        return [(index, task, instruction) for index in range(len(self.records))]

    def subset(self, indices: Sequence[int]) -> MERRDataset:
        """The same dataset restricted to the records at ``indices`` (in that order); nothing is read again."""
        part = copy.copy(self)
        part.records = [self.records[i] for i in indices]
        part.skipped = []
        return part

    def split(self, val_size: float, seed: int) -> tuple[MERRDataset, MERRDataset]:
        """``(train, validation)``: ``val_size`` samples (a fraction in (0, 1) or a count) drawn at random with
        ``seed`` for validation, the rest for training; both non-empty."""
        count = round(val_size * len(self)) if val_size < 1 else int(val_size)
        if not 1 <= count < len(self):
            raise ValueError(
                f"--val_size {val_size} holds out {count} of the {len(self)} samples of {self.annotation_file}: "
                "validation and training both need at least one."
            )
        order = np.random.default_rng(seed).permutation(len(self))
        return self.subset(sorted(order[count:].tolist())), self.subset(sorted(order[:count].tolist()))

    def __getitem__(self, key: SampleKey) -> MERRSample:
        index, task, draw = key
        self._check_task(task)
        record = self.records[index]
        instructions = TASKS[task].instructions
        spec = self.spec
        eva = read_feature(record.eva, record.name, spec.shapes("eva"))

        def utterance(path: Path, kind: str) -> torch.Tensor:
            return torch.from_numpy(read_feature(path, record.name, spec.shapes(kind)).astype("float32").reshape(-1))

        return MERRSample(
            name=record.name,
            task=task,
            label=record.label,
            subtitle=record.subtitle,
            instruction=instructions[draw % len(instructions)],
            answer=record.answers[task],
            eva_patch=torch.from_numpy(eva[1:].astype("float32").reshape(spec.n_patch_tokens, spec.patch_token_dim)),
            eva_cls=torch.from_numpy(eva[0].astype("float32")),
            face=utterance(record.face, "face"),
            video=utterance(record.video, "video"),
            audio=utterance(record.audio, "audio"),
        )


class KeyedSamples(Dataset):
    """A fixed list of :data:`SampleKey` of a dataset, indexed by position: the validation set Trainer evaluates
    (every sample once per task, the first instruction)."""

    def __init__(self, dataset: MERRDataset, tasks: Sequence[str] | None = None) -> None:
        self.dataset = dataset
        self.keys = [key for task in (tasks or dataset.tasks) for key in dataset.keys(task)]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> MERRSample:
        return self.dataset[self.keys[index]]
