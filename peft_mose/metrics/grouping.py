"""Synonym groupings G for open-vocabulary emotion words (paper Appendix C.1, Eq. 22).

A grouping is any callable ``word -> group name``. Words that share a group name are synonyms. Three sources:

- :data:`DEFAULT_GROUPING`: a table written for this project (not derived from the MER2025/2026 emotion-wheel files,
  which are CC BY-NC 4.0 and must not be bundled); deterministic and offline.
- :func:`load_grouping`: a user mapping file (CSV ``word,group`` or JSON).
- :class:`CachedGrouping`: a user callable such as an LLM client, called once per distinct word.
"""

from __future__ import annotations

import csv
import json
import string
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .lemmas import lemmatize

Grouping = Callable[[str], str]

# Group name -> members. The group name is the MERR label word for the nine MERR classes and DFEW's "disgust", so
# that a grouped label is a valid class label. Other common emotion words form their own small groups: only
# inflections and near-synonyms share a group, related but distinct emotions (anger / frustration / annoyance) do not.
_DEFAULT_GROUPS: dict[str, tuple[str, ...]] = {
    "neutral": (
        "neutrally", "neutrality", "calm", "calmly", "calmness", "composed", "composure", "unemotional",
        "emotionless", "expressionless", "impassive", "indifferent", "indifference", "nonchalant", "nonchalance",
    ),
    "angry": (
        "angrily", "anger", "angered", "furious", "furiously", "fury", "enraged", "rage", "irate", "wrath",
        "wrathful", "mad", "outraged", "outrage", "livid", "hostile", "hostility",
    ),
    "happy": (
        "happily", "happiness", "joy", "joyful", "joyfully", "joyous", "glad", "gladness", "cheerful", "cheerfully",
        "cheerfulness", "cheery", "delighted", "delight", "elated", "elation", "jubilant", "merry", "pleased",
        "gleeful", "glee",
    ),
    "sad": (
        "sadly", "sadness", "sorrow", "sorrowful", "unhappy", "unhappiness", "grief", "grieving", "melancholy",
        "melancholic", "downcast", "dejected", "dejection", "gloomy", "gloom", "depressed", "heartbroken", "mournful",
    ),
    "worried": (
        "worry", "worries", "worrying", "worriedly", "anxious", "anxiously", "anxiety", "concerned", "concern",
        "uneasy", "unease", "uneasiness", "nervous", "nervously", "nervousness", "apprehensive", "apprehension",
        "troubled",
    ),
    "surprise": (
        "surprised", "surprising", "surprisingly", "astonished", "astonishment", "amazed", "amazement", "astounded",
        "shocked", "shock", "startled", "stunned",
    ),
    "fear": (
        "fearful", "fearfully", "afraid", "scared", "frightened", "fright", "terrified", "terror", "dread",
        "panic", "panicked", "horrified", "horror",
    ),
    "contempt": (
        "contemptuous", "contemptuously", "disdain", "disdainful", "scorn", "scornful", "derision", "derisive",
        "disrespect", "disrespectful", "sneer", "sneering",
    ),
    "doubt": (
        "doubtful", "doubting", "doubts", "doubtfully", "skeptical", "skepticism", "sceptical", "scepticism",
        "suspicious", "suspicion", "disbelief", "incredulous", "incredulity", "distrust", "distrustful", "dubious",
        "uncertain", "uncertainty",
    ),
    "disgust": ("disgusted", "disgusting", "revulsion", "repulsed", "repulsion", "revolted", "loathing", "aversion"),
    "frustrated": ("frustration", "frustrating"),
    "annoyed": ("annoyance", "irritated", "irritation", "irritable", "exasperated", "exasperation"),
    "dissatisfied": ("dissatisfaction", "displeased", "displeasure", "discontent"),
    "disappointed": ("disappointment",),
    "excited": ("excitement", "enthusiastic", "enthusiasm", "thrilled", "eager", "eagerness"),
    "relieved": ("relief",),
    "satisfied": ("satisfaction", "contented", "contentment"),
    "amused": ("amusement", "playful", "playfulness", "humor", "humour", "humorous"),
    "relaxed": ("relaxation",),
    "confused": ("confusion", "puzzled", "perplexed", "bewildered", "baffled"),
    "curious": ("curiosity", "intrigued"),
    "embarrassed": ("embarrassment", "awkward", "awkwardness", "shy", "shyness"),
    "ashamed": ("shame",),
    "guilty": ("guilt", "remorse", "remorseful", "regret", "regretful"),
    "tense": ("tension", "stressed", "stress"),
    "distressed": ("distress",),
    "upset": (),
    "helpless": ("helplessness", "powerless", "powerlessness"),
    "sarcastic": ("sarcasm", "ironic", "irony", "mocking", "mockery"),
    "serious": ("seriousness", "solemn"),
    "determined": ("determination", "resolute"),
    "proud": ("pride",),
    "grateful": ("gratitude", "thankful"),
    "hopeful": ("hopefulness",),
    "affectionate": ("affection", "loving", "tender", "tenderness"),
    "jealous": ("jealousy", "envy", "envious"),
    "lonely": ("loneliness",),
    "bored": ("boredom",),
    "impatient": ("impatience",),
    "agitated": ("agitation",),
    "hesitant": ("hesitation", "hesitancy"),
    "resigned": ("resignation",),
}

_STRIP = string.punctuation + string.whitespace
APOSTROPHES = str.maketrans(dict.fromkeys("\u2019\u2018\u02bc\uff07\u0060\u00b4", "'"))
"""Apostrophe look-alikes to ``'``, one character for one (offsets into a text stay valid)."""


def normalize_word(word: str) -> str:
    """Lowercase, collapse inner whitespace and strip surrounding punctuation, Unicode's included (quotes, ``。``,
    ``«»``), and invisible format characters (zero-width space): ``" “Happy.” "`` -> ``"happy"``."""
    text = "".join(c for c in unicodedata.normalize("NFKC", word) if unicodedata.category(c) != "Cf")
    text = " ".join(text.lower().translate(APOSTROPHES).split())
    start, end = 0, len(text)
    while start < end and _stripped(text[start]):
        start += 1
    while end > start and _stripped(text[end - 1]):
        end -= 1
    return text[start:end]


def _stripped(char: str) -> bool:
    return char in _STRIP or unicodedata.category(char).startswith("P")


class SynonymTable:
    """A grouping given as a table: listed words map to their group name, unlisted inflections of listed words
    (``happier``, ``saddened``) to the group of their base form, every other word is its own group."""

    def __init__(self, word_to_group: Mapping[str, str]) -> None:
        table: dict[str, str] = {}
        for word, group in word_to_group.items():
            key, value = normalize_word(word), normalize_word(group)
            if not key or not value:
                raise ValueError(f"Empty word or group name in the synonym table: {word!r} -> {group!r}.")
            if table.setdefault(key, value) != value:
                raise ValueError(f"Word {key!r} is mapped to two groups: {table[key]!r} and {value!r}.")
        for group in sorted(set(table.values())):
            if table.setdefault(group, group) != group:
                raise ValueError(
                    f"Group name {group!r} is itself mapped to {table[group]!r}; map every word directly to its group."
                )
        if not table:
            raise ValueError("The synonym table is empty.")
        self._table = table

    @classmethod
    def from_groups(cls, groups: Mapping[str, Iterable[str]]) -> SynonymTable:
        """Build from ``{group name: [member words]}``; the group name is a member too."""
        return cls.from_clusters([[group, *words] for group, words in groups.items()])

    @classmethod
    def from_clusters(cls, clusters: Iterable[Sequence[str]]) -> SynonymTable:
        """Build from a list of synonym lists (the paper's LLM output format); the first word names the group."""
        table: dict[str, str] = {}
        for cluster in clusters:
            if isinstance(cluster, str) or not cluster:
                raise ValueError(f"Each cluster must be a non-empty list of words, got {cluster!r}.")
            group = normalize_word(cluster[0])
            for word in cluster:
                key = normalize_word(word)
                if table.setdefault(key, group) != group:
                    raise ValueError(f"Word {key!r} appears in two clusters: {table[key]!r} and {group!r}.")
        return cls(table)

    def __call__(self, word: str) -> str:
        """G(word): the group name of the word or of its base form (:func:`~.lemmas.lemmatize`), or the normalised
        word itself when the table lists neither."""
        key = normalize_word(word)
        lemma = lemmatize(key, self._table)
        return key if lemma is None else self._table[lemma]

    @property
    def vocabulary(self) -> frozenset[str]:
        """Every word the table lists (group names included)."""
        return frozenset(self._table)

    def as_dict(self) -> dict[str, str]:
        """The table as ``{word: group}``, sorted by word (the JSON mapping-file format)."""
        return dict(sorted(self._table.items()))


DEFAULT_GROUPING = SynonymTable.from_groups(_DEFAULT_GROUPS)


def load_grouping(path: str | Path) -> SynonymTable:
    """Read a mapping file: CSV with ``word,group`` columns, JSON ``{word: group}`` or ``[[group, synonym, ...]]``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"Grouping file {path} is empty.")
    if path.suffix.lower() == ".csv":
        return _table_from_csv(text.splitlines(), path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Grouping file {path}: invalid JSON ({error.msg}).") from None
        return _table_from_json(data, path)
    raise ValueError(f"Grouping file {path} must end in .csv or .json.")


def _table_from_csv(lines: list[str], path: Path) -> SynonymTable:
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"word", "group"} <= set(reader.fieldnames):
        raise ValueError(f"Grouping file {path} needs a header row with columns 'word' and 'group'.")
    table: dict[str, str] = {}
    for row in reader:
        word, group = normalize_word(row["word"] or ""), normalize_word(row["group"] or "")
        if table.setdefault(word, group) != group:
            raise ValueError(
                f"Grouping file {path}, line {reader.line_num}: {word!r} is mapped to {table[word]!r} and {group!r}."
            )
    if not table:
        raise ValueError(f"Grouping file {path} has a header but no rows.")
    return SynonymTable(table)


def _table_from_json(data: object, path: Path) -> SynonymTable:
    if isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
        return SynonymTable(data)
    if isinstance(data, list) and data and all(isinstance(c, list) and c for c in data):
        return SynonymTable.from_clusters(data)
    raise ValueError(
        f"Grouping file {path} must hold a non-empty JSON object {{word: group}} or a list of non-empty word lists."
    )


class CachedGrouping:
    """Wrap a ``word -> group`` callable (e.g. an LLM client) so it is called once per distinct normalised word.

    With ``cache_path`` the answers are kept in a JSON ``{word: group}`` file, read back on the next run; that file is
    also a valid ``--grouping`` mapping file, which makes a run with an LLM grouping reproducible offline.
    """

    def __init__(self, fn: Grouping, cache_path: str | Path | None = None) -> None:
        self._fn = fn
        self._path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, str] = {}
        if self._path is not None and self._path.exists():
            self._cache = json.loads(self._path.read_text(encoding="utf-8"))

    def __call__(self, word: str) -> str:
        key = normalize_word(word)
        if key not in self._cache:
            self._cache[key] = normalize_word(self._fn(key))
            if self._path is not None:
                self._path.write_text(json.dumps(self._cache, indent=1, sort_keys=True), encoding="utf-8")
        return self._cache[key]
