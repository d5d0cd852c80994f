"""Perceive-then-reason answers (SABER-LLM's structured evidence decomposition, related-work.md): the answer first
describes the visual cue and the audio cue separately, each with the emotion it suggests, then says which cue it
follows and concludes with one label::

    In the video the person looks {visual cue}, which suggests {visual label}. The voice sounds {audio cue}, which
    suggests {audio label}. {verdict} The emotion is {label}.

The verdict names the cue the conclusion follows (``The face is more telling than the voice.``, ``The voice is more
telling than the face.``, ``Face and voice agree.``). The per-sample cues come from a cue file (``MERR_cues.json``:
``{name: {"visual_cue", "visual_label", "audio_cue", "audio_label"}}``), which the synthetic dataset writes and which
real data must provide (e.g. from AU and prosody descriptions). The task ``perceive`` of the SFT recipe answers with
the template's conclusion on the sample's label; the preference pairs (:mod:`mosear_recipes.preference.pairs`) use
it for both answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..textfiles import load_json
from .readers import SampleError

CUES_FILE = "MERR_cues.json"
CUE_FIELDS = ("visual_cue", "visual_label", "audio_cue", "audio_label")
FOLLOWS = ("visual", "audio", "both")
VERDICTS = {
    "visual": "The face is more telling than the voice.",
    "audio": "The voice is more telling than the face.",
    "both": "Face and voice agree.",
}
SUBSET_OF = {"visual": "video_aligned", "audio": "audio_aligned", "both": "consistent"}
"""The CA-MER subset of a sample whose label is carried by that cue."""
_CONCLUSION = re.compile(r"the emotion is (\w+)")


@dataclass(frozen=True)
class Cues:
    """What each modality shows in one sample: a short description and the emotion it suggests."""

    visual_cue: str
    visual_label: str
    audio_cue: str
    audio_label: str

    def carrier(self, label: str) -> str:
        """Which cue carries ``label``: ``"both"``, ``"visual"`` or ``"audio"``; a ``ValueError`` when neither does."""
        if label == self.visual_label == self.audio_label:
            return "both"
        if label == self.visual_label:
            return "visual"
        if label == self.audio_label:
            return "audio"
        raise ValueError(
            f"label {label!r} is carried by neither cue (visual {self.visual_label!r}, audio {self.audio_label!r})"
        )


def perceive_then_reason(cues: Cues, label: str, follows: str) -> str:
    """The answer that describes both cues, says it follows ``follows`` (``visual``, ``audio`` or ``both``) and
    concludes ``label``."""
    if follows not in VERDICTS:
        raise ValueError(f"follows must be one of {FOLLOWS}, got {follows!r}.")
    return (
        f"In the video the person looks {cues.visual_cue}, which suggests {cues.visual_label}. "
        f"The voice sounds {cues.audio_cue}, which suggests {cues.audio_label}. {VERDICTS[follows]} "
        f"The emotion is {label}."
    )


def conclusion(text: str) -> str | None:
    """The label an answer concludes (the word after its last ``the emotion is``, case-insensitive, normalised
    answers included), ``None`` when it concludes nothing."""
    found = _CONCLUSION.findall(text.lower())
    return found[-1] if found else None


def read_cues(path: str | Path, labels: Sequence[str]) -> dict[str, Cues]:
    """Read a cue file, every entry checked: the four fields, non-empty strings, labels from ``labels``; a problem
    raises :class:`~mosear_recipes.merr.readers.SampleError` naming the sample and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Cue file {path} does not exist (the task 'perceive' and the pair builder read it).")
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"Cue file {path} must hold a JSON object {{name: {{...}}}}, got {type(data).__name__}.")
    cues = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise SampleError(name, path, "bad cues", f"expected an object with {list(CUE_FIELDS)}, got {entry!r}")
        missing = [f for f in CUE_FIELDS if not isinstance(entry.get(f), str) or not entry[f].strip()]
        unknown = sorted(set(entry) - set(CUE_FIELDS))
        if missing or unknown:
            problems = [f"missing or empty {missing}"] * bool(missing) + [f"unknown {unknown}"] * bool(unknown)
            raise SampleError(name, path, "bad cues", ", ".join(problems))
        for field in ("visual_label", "audio_label"):
            if entry[field] not in labels:
                raise SampleError(name, path, "bad cues", f"{field} {entry[field]!r} is not one of {list(labels)}")
        cues[name] = Cues(**{f: entry[f].strip() for f in CUE_FIELDS})
    return cues
