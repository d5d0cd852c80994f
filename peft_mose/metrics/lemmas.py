"""Base forms of inflected emotion words, from a small set of English suffix rules checked against a vocabulary.

Generated explanations say "happier", "saddened", "terrifying", "angrier", which a vocabulary of base forms misses.
:func:`lemmatize` maps such a word to a vocabulary word: the word itself when it is listed, else the first listed
candidate of the rules below. A candidate counts only when the vocabulary holds it, so the rules can be generous
without inventing emotion words; what they cannot avoid is an inflection of an emotion word used in another sense
(:data:`NOT_INFLECTIONS` lists the common ones). Rules, in order:

- comparative and superlative: ``-ier``/``-iest`` -> ``-y`` (happier -> happy), ``-er``/``-est`` -> the stem
  (calmer -> calm, sadder -> sad, tenser -> tense);
- adverbs and nouns: ``-ily`` -> ``-y``, ``-ly`` -> the stem, ``-iness`` -> ``-y``, ``-ness`` -> the stem;
- verb forms: ``-ied`` -> ``-y``, ``-ed``, ``-ing``, ``-ies`` -> ``-y``, ``-es``, ``-s`` -> the stem; from the
  stem, a verb in ``-en`` loses it (saddened -> sadden -> sad, frightening -> fright), and the verb's participle is
  tried (terrifying -> terrify -> terrified, annoys -> annoyed, disappointing -> disappointed).

A stem is tried as written, with a doubled final consonant undone (sadd -> sad) and with a silent ``e`` restored
(tens -> tense). Offline and deterministic: no dictionary, no download (nltk's WordNet needs one).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

NOT_INFLECTIONS = frozenset({"concerning"})
"""Words that look like an inflected emotion word but are mostly something else ("concerning" the matter)."""

_VOWELS = frozenset("aeiou")
# (suffix, replacement, the stem is a verb whose -en and participle forms are tried too)
_RULES: tuple[tuple[str, str, bool], ...] = (
    ("iest", "y", False),
    ("ier", "y", False),
    ("est", "", False),
    ("er", "", False),
    ("ily", "y", False),
    ("ly", "", False),
    ("iness", "y", False),
    ("ness", "", False),
    ("ied", "y", True),
    ("ed", "", True),
    ("ing", "", True),
    ("ies", "y", True),
    ("es", "", True),
    ("s", "", True),
)
_MIN_STEM = 2


def _spellings(stem: str) -> Iterator[str]:
    """``stem`` as written, with a doubled final consonant undone and with a silent ``e`` restored."""
    yield stem
    if len(stem) > _MIN_STEM and stem[-1] == stem[-2] and stem[-1] not in _VOWELS:
        yield stem[:-1]
    if stem[-1] != "e":
        yield stem + "e"


def _verb_forms(verb: str) -> Iterator[str]:
    """A verb, the verb without an ``-en`` ending (sadden -> sad), and the verb's past participles."""
    yield verb
    if verb.endswith("en") and len(verb) > _MIN_STEM + 2:
        yield from _spellings(verb[:-2])
    yield verb + "d" if verb.endswith("e") else verb + "ed"
    yield verb + verb[-1] + "ed"
    if verb.endswith("y"):
        yield verb[:-1] + "ied"


def lemma_candidates(word: str) -> list[str]:
    """Base forms the rules propose for ``word`` (lower case), most specific first, without ``word`` itself."""
    if word in NOT_INFLECTIONS:
        return []
    candidates: dict[str, None] = {}
    for suffix, replacement, verb in _RULES:
        stem = word[: -len(suffix)] if word.endswith(suffix) else ""
        if len(stem) < _MIN_STEM:
            continue
        for spelling in _spellings(stem + replacement):
            forms = _verb_forms(spelling) if verb else iter((spelling,))
            candidates.update(dict.fromkeys(form for form in forms if form != word))
    return list(candidates)


def lemmatize(word: str, vocabulary: Collection[str]) -> str | None:
    """The vocabulary word that ``word`` (lower case) is a form of: itself when listed, else the first listed
    candidate of :func:`lemma_candidates`, else ``None``."""
    if word in vocabulary:
        return word
    return next((candidate for candidate in lemma_candidates(word) if candidate in vocabulary), None)
