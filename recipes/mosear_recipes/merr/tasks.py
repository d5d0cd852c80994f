"""The MERR tasks, their instruction pools and the answer normalisation (from Emotion-LLaMA's ``first_face.py``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

EMOTION_INSTRUCTIONS = (
    "Please determine which emotion label in the video represents: "
    "happy, sad, neutral, angry, worried, surprise, fear, contempt, doubt.",
)
REASON_INSTRUCTIONS = (
    "Please analyze all the clues in the video and reason out the emotional label of the person in the video.",
    "What is the emotional state of the person in the video? Please tell me the reason.",
    "What are the facial expressions and vocal tone used in the video? What is the intended meaning behind his "
    "words? Which emotion does this reflect?",
    "Please integrate information from various modalities to infer the emotional category of the person in the "
    "video.",
    "Could you describe the emotion-related features of the individual in the video? What emotional category do "
    "they fall into?",
)


@dataclass(frozen=True)
class Task:
    """A task: its instruction pool and where its answer comes from (``"label"``, ``"coarse"``, ``"fine"`` or
    ``"cues"``)."""

    name: str
    instructions: tuple[str, ...]
    answer_source: str


TASKS = {
    "emotion": Task("emotion", EMOTION_INSTRUCTIONS, "label"),
    "reason": Task("reason", REASON_INSTRUCTIONS, "coarse"),
    "reason_v2": Task("reason_v2", REASON_INSTRUCTIONS, "fine"),
    # perceive-then-reason answers built from the cue file (merr/perceive.py); the instruction that asks for cues
    "perceive": Task("perceive", REASON_INSTRUCTIONS[2:3], "cues"),
}
CAPTION_FIELDS = {"coarse": "caption", "fine": "smp_reason_caption"}


def parse_tasks(names: Iterable[str] | str) -> tuple[str, ...]:
    """Validate task names (a list, or one comma-separated string) and drop duplicates, keeping the order."""
    if isinstance(names, str):
        names = names.split(",")
    tasks = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"Unknown or no tasks {unknown or list(tasks)}; known tasks: {', '.join(TASKS)}.")
    return tasks


def normalize_answer(text: str, max_words: int = 200) -> str:
    """Emotion-LLaMA's answer normalisation: lowercase, ``.!"()*#:;~`` to spaces, spaces collapsed, at most
    ``max_words`` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])
