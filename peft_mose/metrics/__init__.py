"""Evaluation metrics of the MoSEAR paper: open-vocabulary set-level scores, recognition scores and CA-MER subsets."""

from .camer import (
    DISCARD_REASONS,
    SUBSETS,
    SubsetAssignment,
    SubsetVote,
    assign_subsets,
    audio_video_gap,
    normalize_subset,
    scores_by_subset,
    vote_subset,
)
from .extraction import (
    LABEL_PARSERS,
    Mention,
    emotion_mentions,
    extract_emotion_words,
    make_label_parser,
    vocabulary_of,
)
from .grouping import DEFAULT_GROUPING, CachedGrouping, Grouping, SynonymTable, load_grouping, normalize_word
from .lemmas import lemma_candidates, lemmatize
from .open_vocab import sample_set_scores, set_level_scores
from .recognition import LABEL_SETS, recognition_scores, resolve_labels

__all__ = [
    "CachedGrouping",
    "DEFAULT_GROUPING",
    "DISCARD_REASONS",
    "Grouping",
    "LABEL_PARSERS",
    "LABEL_SETS",
    "Mention",
    "SUBSETS",
    "SubsetAssignment",
    "SubsetVote",
    "SynonymTable",
    "assign_subsets",
    "audio_video_gap",
    "emotion_mentions",
    "extract_emotion_words",
    "lemma_candidates",
    "lemmatize",
    "load_grouping",
    "make_label_parser",
    "normalize_subset",
    "normalize_word",
    "recognition_scores",
    "resolve_labels",
    "sample_set_scores",
    "scores_by_subset",
    "set_level_scores",
    "vocabulary_of",
    "vote_subset",
]
