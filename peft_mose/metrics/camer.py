"""CA-MER subsets (paper section 3): stage-2 majority-vote assignment, per-subset scores and the audio-video gap."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .grouping import DEFAULT_GROUPING, Grouping, normalize_word

SUBSETS = ("video_aligned", "audio_aligned", "consistent")
DISCARD_REASONS = ("inconsistent", "multimodal_disagrees")


def normalize_subset(name: str) -> str:
    """Canonical subset name; case, ``-`` and spaces are ignored (``"Video-Aligned"`` -> ``"video_aligned"``)."""
    key = "_".join(str(name).lower().replace("-", " ").replace("_", " ").split())
    if key not in SUBSETS:
        raise ValueError(f"Unknown CA-MER subset {name!r}; expected one of {list(SUBSETS)}.")
    return key


class SubsetVote(NamedTuple):
    """Outcome of the stage-2 vote: the subset and final label, or the reason the sample is discarded."""

    subset: str | None
    label: str | None
    discard_reason: str | None


def vote_subset(audio: str, visual: str, multimodal: str, grouping: Grouping | None = None) -> SubsetVote:
    """Majority vote over (audio, visual, multimodal) labels, compared after grouping (``surprised`` = ``surprise``).

    All agree: consistent; visual = multimodal != audio: video-aligned; audio = multimodal != visual: audio-aligned;
    all differ: discarded as ``inconsistent``. The paper names no subset for audio = visual != multimodal; such samples
    are discarded as ``multimodal_disagrees`` (with the majority label).
    """
    grouping = DEFAULT_GROUPING if grouping is None else grouping
    a, v, m = (grouping(normalize_word(x)) for x in (audio, visual, multimodal))
    if a == v == m:
        return SubsetVote("consistent", m, None)
    if v == m:
        return SubsetVote("video_aligned", m, None)
    if a == m:
        return SubsetVote("audio_aligned", m, None)
    if a == v:
        return SubsetVote(None, a, "multimodal_disagrees")
    return SubsetVote(None, None, "inconsistent")


@dataclass(frozen=True)
class SubsetAssignment:
    """Votes for every sample id, in input order."""

    votes: dict[str, SubsetVote]

    @property
    def subsets(self) -> dict[str, str]:
        """Kept samples: id -> subset."""
        return {i: v.subset for i, v in self.votes.items() if v.subset is not None}

    @property
    def discarded(self) -> dict[str, list[str]]:
        """Discard reason -> ids."""
        return {r: [i for i, v in self.votes.items() if v.discard_reason == r] for r in DISCARD_REASONS}

    def counts(self) -> dict[str, int]:
        """Number of samples per subset and per discard reason."""
        kept = list(self.subsets.values())
        return {**{s: kept.count(s) for s in SUBSETS}, **{r: len(ids) for r, ids in self.discarded.items()}}


def assign_subsets(samples: Iterable[Mapping[str, str]], grouping: Grouping | None = None) -> SubsetAssignment:
    """Stage 2 of CA-MER construction over records ``{"id", "audio", "visual", "multimodal"}`` (labels per modality)."""
    votes: dict[str, SubsetVote] = {}
    for position, sample in enumerate(samples):
        missing = [k for k in ("id", "audio", "visual", "multimodal")
                   if sample.get(k) is None or not normalize_word(str(sample[k]))]
        if missing:
            raise ValueError(f"Sample at position {position} has no {', '.join(missing)}: {dict(sample)!r}.")
        sample_id = str(sample["id"])
        if sample_id in votes:
            raise ValueError(f"Duplicate sample id {sample_id!r} (position {position}).")
        votes[sample_id] = vote_subset(sample["audio"], sample["visual"], sample["multimodal"], grouping)
    return SubsetAssignment(votes)


def scores_by_subset(
    subsets: Sequence[str | None], score: Callable[[list[int]], dict[str, object]]
) -> dict[str, dict[str, object]]:
    """``score(indices)`` for each CA-MER subset present (in :data:`SUBSETS` order) and for all samples (``overall``).

    ``subsets`` holds one name per sample, or only ``None`` for a dataset without subsets (then only ``overall``).
    """
    if not subsets:
        raise ValueError("No samples to score.")
    if all(s is None for s in subsets):
        return {"overall": score(list(range(len(subsets))))}
    if None in subsets:
        raise ValueError(f"Sample at position {list(subsets).index(None)} has no subset while others have one.")
    names = [normalize_subset(s) for s in subsets]
    result = {}
    for subset in (s for s in SUBSETS if s in names):
        try:
            result[subset] = score([i for i, n in enumerate(names) if n == subset])
        except ValueError as error:
            raise ValueError(f"Subset {subset!r}: {error}") from error
    result["overall"] = score(list(range(len(names))))
    return result


def audio_video_gap(scores: Mapping[str, Mapping[str, object]], metrics: Sequence[str]) -> dict[str, float] | None:
    """Audio-aligned minus video-aligned score per metric, the paper's audio-bias measure (section 6.2);
    ``None`` unless both subsets were scored."""
    if "audio_aligned" not in scores or "video_aligned" not in scores:
        return None
    return {m: float(scores["audio_aligned"][m]) - float(scores["video_aligned"][m]) for m in metrics}
