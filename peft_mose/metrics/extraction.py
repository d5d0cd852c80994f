"""Emotion words and class labels from generated text.

:func:`extract_emotion_words` turns free-text reasoning into the word set of Eq. 22; :func:`make_label_parser` turns a
generated answer into one class label (the Emotion-LLaMA protocol or a more robust parser). Both are deterministic.

Inflected forms count as their vocabulary word (``happier`` -> ``happy``, ``saddened`` -> ``sad``: :mod:`.lemmas`).
Negation is handled minimally: a word is dropped when ``not``, ``no``, ``never``, ``without``, ``lack``, a ``n't``
contraction, ``rather than`` or ``instead of`` (and a few more, see ``_NEGATORS``) occurs among the three words before
it in the same clause (clauses end at ``, ; : . ! ?`` and line breaks). Not handled: negation further away, scope
beyond a clause (``not only happy but also ...`` drops ``happy``), hedging (``might be sad``) and multi-word
expressions (only single-word vocabulary entries are matched).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Literal, NamedTuple

from .grouping import APOSTROPHES, DEFAULT_GROUPING, Grouping, SynonymTable, normalize_word
from .lemmas import lemmatize
from .recognition import resolve_labels

_SENTENCE_END = re.compile(r"[.!?\n]+")
_CLAUSE_END = re.compile(r"[,;:]+")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*", re.IGNORECASE)
_NEGATORS = frozenset(
    {"not", "no", "never", "without", "nor", "neither", "none", "nothing", "lack", "lacks", "lacking", "absence",
     "absent", "hardly", "cannot"}
)
_NEGATING_PAIRS = frozenset({("rather", "than"), ("instead", "of")})
_NEGATION_WINDOW = 3

LABEL_PARSERS = ("emotion_llama", "robust")


def _is_negated(tokens: list[str], i: int) -> bool:
    start = max(0, i - _NEGATION_WINDOW)
    if any(t in _NEGATORS or t.endswith("n't") for t in tokens[start:i]):
        return True
    return any((tokens[j - 1], tokens[j]) in _NEGATING_PAIRS for j in range(max(1, start), i))


class Mention(NamedTuple):
    """An emotion word asserted by a text: its vocabulary form, its sentence (0-based) and where it ends in the
    text (the offset just after its last character)."""

    word: str
    sentence: int
    end: int


def _pieces(pattern: re.Pattern[str], text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` offsets of the pieces of ``text[start:end]`` between the matches of ``pattern``."""
    position = start
    for match in pattern.finditer(text, start, end):
        yield position, match.start()
        position = match.end()
    yield position, end


def emotion_mentions(text: str, vocabulary: Collection[str] | None = None) -> list[Mention]:
    """Every non-negated emotion word of ``text`` (``vocabulary``: lower-case words, default the default grouping's)
    in reading order, inflected forms as their vocabulary word."""
    vocab = DEFAULT_GROUPING.vocabulary if vocabulary is None else vocabulary
    text = text.translate(APOSTROPHES)  # one character for one: the offsets stay those of the caller's text
    mentions = []
    for sentence, (start, end) in enumerate(_pieces(_SENTENCE_END, text, 0, len(text))):
        for clause_start, clause_end in _pieces(_CLAUSE_END, text, start, end):
            tokens = list(_TOKEN.finditer(text, clause_start, clause_end))
            words = [token.group().lower() for token in tokens]
            for i, token in enumerate(tokens):
                word = lemmatize(words[i], vocab)
                if word is not None and not _is_negated(words, i):
                    mentions.append(Mention(word, sentence, token.end()))
    return mentions


def _sentence_mentions(text: str, vocabulary: Collection[str]) -> list[list[str]]:
    """Per sentence that mentions any, the emotion words of :func:`emotion_mentions`, in reading order."""
    sentences: dict[int, list[str]] = {}
    for mention in emotion_mentions(text, vocabulary):
        sentences.setdefault(mention.sentence, []).append(mention.word)
    return list(sentences.values())


def vocabulary_of(grouping: Grouping) -> frozenset[str]:
    """Words extraction should look for with this grouping: a table's own words, else the default table's."""
    return grouping.vocabulary if isinstance(grouping, SynonymTable) else DEFAULT_GROUPING.vocabulary


def extract_emotion_words(
    text: str, vocabulary: Collection[str] | None = None, scope: Literal["conclusion", "all"] = "conclusion"
) -> list[str]:
    """Emotion words (from ``vocabulary``, default: the default grouping's words) that ``text`` asserts, de-duplicated.

    ``scope="conclusion"`` keeps the last sentence that mentions any (the paper extracts keywords from the final
    conclusion); ``scope="all"`` keeps every sentence. Text without sentence punctuation is one sentence.
    """
    if scope not in ("conclusion", "all"):
        raise ValueError(f"Unknown extraction scope {scope!r}; expected 'conclusion' or 'all'.")
    vocab = DEFAULT_GROUPING.vocabulary if vocabulary is None else frozenset(map(normalize_word, vocabulary))
    sentences = _sentence_mentions(text, vocab)
    if not sentences:
        return []
    chosen = sentences[-1:] if scope == "conclusion" else sentences
    return list(dict.fromkeys(word for words in chosen for word in words))


def make_label_parser(
    name: str, labels: str | Sequence[str], fallback: str = "neutral", grouping: Grouping | None = None
) -> Callable[[str], str]:
    """Return ``text -> label``: ``"emotion_llama"`` (last space-separated word, unknown -> ``fallback``) or
    ``"robust"`` (last non-negated label word or synonym anywhere in the text, none -> ``fallback``)."""
    label_list = resolve_labels(labels)
    if fallback not in label_list:
        raise ValueError(f"The fallback label {fallback!r} is not one of the labels {list(label_list)}.")
    if name == "emotion_llama":
        label_set = frozenset(label_list)

        def parse_last_word(text: str) -> str:
            # Emotion-LLaMA's eval_emotion.py: answer.split(" ")[-1], exact match, else "neutral".
            # strip() stands for the strip its generate() applies to the decoded text.
            word = text.strip().split(" ")[-1]
            return word if word in label_set else fallback

        return parse_last_word
    if name == "robust":
        grouping = DEFAULT_GROUPING if grouping is None else grouping
        group_to_label: dict[str, str] = {}
        for label in label_list:
            other = group_to_label.setdefault(grouping(label), label)
            if other != label:
                raise ValueError(f"Labels {other!r} and {label!r} fall in the same synonym group {grouping(label)!r}.")
        vocabulary = vocabulary_of(grouping) | frozenset(label_list)

        def parse_robust(text: str) -> str:
            found = [
                group_to_label[group]
                for words in _sentence_mentions(text, vocabulary)
                for group in map(grouping, words)
                if group in group_to_label
            ]
            return found[-1] if found else fallback

        return parse_robust
    raise ValueError(f"Unknown label parser {name!r}; expected one of {LABEL_PARSERS}.")
