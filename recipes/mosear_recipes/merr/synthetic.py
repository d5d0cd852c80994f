"""A small synthetic MERR dataset in the real file formats, with CA-MER-like conflict subsets.

Each sample has a visual label (carried by the EVA, face MAE and VideoMAE features) and an audio label (carried by the
HuBERT feature): every feature is its label's prototype (orthonormal per feature kind, scaled by 2) plus Gaussian noise
(sd 0.25 per dimension), so both labels are recoverable from the features by nearest class mean. Subsets, as in
CA-MER: ``video_aligned`` (true label = visual label, audio differs), ``audio_aligned`` (true = audio, visual differs),
``consistent`` (all agree). They are listed in ``synthetic_subsets.csv`` (``name, split, subset, label,
visual_label, audio_label``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from mosear_recipes.emotion_llama.features import FeatureSpec
from mosear_recipes.emotion_llama.prompt import HEAD, MIDDLE, prompt_tail

from .perceive import CUES_FILE, Cues
from .readers import EMOTION_LABELS
from .tasks import TASKS

LABELS = EMOTION_LABELS[:6]  # the six MER2023 labels
SUBSETS = ("video_aligned", "audio_aligned", "consistent")
VISUAL_CUES = dict(zip(LABELS, ("relaxed", "frowning", "smiling", "teary", "tense", "startled")))
AUDIO_CUES = dict(zip(LABELS, ("calm", "loud", "cheerful", "low", "hesitant", "rising")))
VERDICTS = {
    "video_aligned": "The face is more telling than the voice.",
    "audio_aligned": "The voice is more telling than the face.",
    "consistent": "Face and voice agree.",
}
SUBTITLES = (
    "I went to the market this morning",
    "We need to talk about the plan",
    "Tell me what happened yesterday",
    "It is going to rain again",
    "I have not seen him for a while",
    "Let us meet after the class",
)
FILES = {
    "coarse_txt": "MERR_coarse_grained.txt",
    "fine_txt": "MERR_fine_grained.txt",
    "test_txt": "synthetic_test.txt",
    "coarse_json": "MERR_coarse_grained.json",
    "fine_json": "MERR_fine_grained.json",
    "subtitles": "transcription_en_all.csv",
    "subsets": "synthetic_subsets.csv",
    "cues_json": CUES_FILE,
}
NOISE = 0.25  # the default noise sd of every feature kind


@dataclass(frozen=True)
class SyntheticSample:
    """One row of ``synthetic_subsets.csv``."""

    name: str
    split: str
    subset: str
    label: str
    visual_label: str
    audio_label: str


@dataclass(frozen=True)
class SyntheticMERR:
    """Paths of a written synthetic dataset (train: the coarse and fine ``.txt``; test: ``synthetic_test.txt``)."""

    root: Path
    coarse_txt: Path
    fine_txt: Path
    test_txt: Path
    coarse_json: Path
    fine_json: Path
    subtitles: Path
    subsets: Path
    cues_json: Path
    spec: FeatureSpec


def coarse_caption(subset: str, visual_label: str, audio_label: str, label: str) -> str:
    return (
        f"The person is {VISUAL_CUES[visual_label]} and the voice sounds {AUDIO_CUES[audio_label]}. "
        f"{VERDICTS[subset]} The emotion is {label}."
    )


def fine_caption(subset: str, visual_label: str, audio_label: str, label: str) -> str:
    return (
        f"In the video the person looks {VISUAL_CUES[visual_label]}, which suggests {visual_label}. "
        f"The voice is {AUDIO_CUES[audio_label]}, which suggests {audio_label}. {VERDICTS[subset]} "
        f"Therefore, it is inferred that the emotional state is: {label}."
    )


def plan_samples(
    num_samples: int, seed: int = 0, test_fraction: float = 0.2, train_subsets: Mapping[str, float] | None = None
) -> list[SyntheticSample]:
    """Labels, subsets and splits of ``num_samples`` samples. Subsets cycle through the three, except for training
    samples when ``train_subsets`` gives their shares (``{subset: weight}``, drawn with ``seed``): a conflict set
    whose training mix differs from its balanced test split."""
    if num_samples < 3:
        raise ValueError(f"num_samples must be >= 3 (one per subset), got {num_samples}.")
    rng = np.random.default_rng(seed)
    n_test = int(round(num_samples * test_fraction))
    draws = None
    if train_subsets is not None:
        unknown = sorted(set(train_subsets) - set(SUBSETS))
        weights = np.array([float(train_subsets.get(s, 0.0)) for s in SUBSETS])
        if unknown or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"train_subsets must give non-negative weights of {SUBSETS} (not all 0), got "
                             f"{dict(train_subsets)}.")  # fmt: skip
        draws = np.random.default_rng([seed, 1]).choice(len(SUBSETS), size=num_samples, p=weights / weights.sum())
    samples = []
    for i in range(num_samples):
        subset = SUBSETS[i % len(SUBSETS)]
        if draws is not None and i < num_samples - n_test:
            subset = SUBSETS[int(draws[i])]
        label = str(rng.choice(LABELS))
        other = str(rng.choice([x for x in LABELS if x != label]))
        visual, audio = {"video_aligned": (label, other), "audio_aligned": (other, label)}.get(subset, (label, label))
        split = "test" if i >= num_samples - n_test else "train"
        samples.append(SyntheticSample(f"sample_{i:08d}", split, subset, label, visual, audio))
    return samples


def _prototypes(rng: np.random.Generator, dim: int) -> dict[str, np.ndarray]:
    if dim < len(LABELS):
        raise ValueError(f"Synthetic features need at least {len(LABELS)} dimensions, got {dim}.")
    basis, _ = np.linalg.qr(rng.standard_normal((dim, len(LABELS))))
    return {label: 2.0 * basis[:, i] for i, label in enumerate(LABELS)}


def _write_features(
    root: Path, samples: list[SyntheticSample], spec: FeatureSpec, rng: np.random.Generator, noise: Mapping[str, float]
) -> None:
    kinds = {  # kind -> (prototypes, which label, rows or None for one utterance vector, dtype)
        "eva": (_prototypes(rng, spec.eva_dim), "visual_label", spec.eva_patches + 1, np.float16),
        "face": (_prototypes(rng, spec.feature_dim), "visual_label", None, np.float32),
        "video": (_prototypes(rng, spec.feature_dim), "visual_label", None, np.float32),
        "audio": (_prototypes(rng, spec.feature_dim), "audio_label", None, np.float32),
    }
    for kind, (prototypes, which, rows, dtype) in kinds.items():
        folder = root / spec.folders[kind]
        folder.mkdir(parents=True, exist_ok=True)
        for sample in samples:
            mean = prototypes[getattr(sample, which)]
            shape = (rows, mean.size) if rows else (mean.size,)
            sd = noise.get(kind, NOISE)
            np.save(folder / f"{sample.name}.npy", (mean + sd * rng.standard_normal(shape)).astype(dtype))


def write_synthetic_merr(
    root: str | Path,
    num_samples: int = 300,
    seed: int = 0,
    test_fraction: float = 0.2,
    spec: FeatureSpec | None = None,
    train_subsets: Mapping[str, float] | None = None,
    noise: Mapping[str, float] | None = None,
) -> SyntheticMERR:
    """Write the dataset to ``root`` (created if needed; tiny feature dimensions by default) and return its paths.
    ``train_subsets``: the training split's subset shares (:func:`plan_samples`); ``noise``: the noise sd per
    feature kind (``eva``, ``face``, ``video``, ``audio``; :data:`NOISE` for those not given)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    spec = spec if spec is not None else FeatureSpec.tiny()
    noise = dict(noise or {})
    unknown = sorted(set(noise) - set(spec.folders))
    if unknown or any(v < 0 for v in noise.values()):
        raise ValueError(f"noise must give sd >= 0 for feature kinds of {sorted(spec.folders)}, got {noise}.")
    rng = np.random.default_rng(seed)
    samples = plan_samples(num_samples, seed, test_fraction, train_subsets)
    paths = SyntheticMERR(root=root, spec=spec, **{key: root / name for key, name in FILES.items()})
    train = [s for s in samples if s.split == "train"]
    frames = rng.integers(30, 150, size=num_samples)
    rows = {s.name: f"{s.name} {n} {s.label}" for s, n in zip(samples, frames)}
    paths.coarse_txt.write_text("".join(rows[s.name] + "\n" for s in train))
    paths.fine_txt.write_text("".join(f"{rows[s.name]} {rng.uniform(-1, 1):.2f}\n" for s in train[::2]))
    paths.test_txt.write_text("".join(rows[s.name] + "\n" for s in samples if s.split == "test"))
    captions = {s.name: (s.subset, s.visual_label, s.audio_label, s.label) for s in samples}
    paths.coarse_json.write_text(json.dumps({n: {"caption": coarse_caption(*c)} for n, c in captions.items()}))
    fine = {
        n: {"smp_reason_caption": fine_caption(*c), "reason_caption": coarse_caption(*c)} for n, c in captions.items()
    }
    paths.fine_json.write_text(json.dumps(fine))
    with paths.subtitles.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "sentence"])
        writer.writerows((s.name, SUBTITLES[i % len(SUBTITLES)]) for i, s in enumerate(samples))
    with paths.subsets.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(SyntheticSample)])
        writer.writeheader()
        writer.writerows(asdict(s) for s in samples)
    paths.cues_json.write_text(json.dumps({s.name: asdict(synthetic_cues(s)) for s in samples}))
    _write_features(root, samples, spec, rng, noise)
    spec.save(root)
    return paths


def synthetic_cues(sample: SyntheticSample) -> Cues:
    """The cues of a synthetic sample: each modality's cue word for its label (:data:`VISUAL_CUES`,
    :data:`AUDIO_CUES`)."""
    return Cues(VISUAL_CUES[sample.visual_label], sample.visual_label, AUDIO_CUES[sample.audio_label], sample.audio_label)


def read_synthetic_subsets(path: str | Path) -> list[SyntheticSample]:
    """Read ``synthetic_subsets.csv``."""
    with Path(path).open(newline="") as handle:
        return [SyntheticSample(**row) for row in csv.DictReader(handle)]


def synthetic_corpus() -> list[str]:
    """Every text the synthetic dataset's prompts and answers can contain (the tiny tokenizer's vocabulary)."""
    texts = [HEAD, MIDDLE, *EMOTION_LABELS]
    # The task "perceive" adds nothing: its answers use the captions' words, and its name left out (a word-level
    # "<unk>" in its prompt) keeps this vocabulary, and so the tiny model and every result on it, as they were.
    for task in (t for t in TASKS.values() if t.answer_source != "cues"):
        for instruction in task.instructions:
            texts.extend(prompt_tail(subtitle, task.name, instruction) for subtitle in SUBTITLES)
    for subset in SUBSETS:
        for visual in LABELS:
            for audio in LABELS:
                texts.append(coarse_caption(subset, visual, audio, visual))
                texts.append(fine_caption(subset, visual, audio, visual))
    return texts
