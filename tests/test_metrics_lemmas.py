"""Inflected emotion words: the suffix rules of peft_mose.metrics.lemmas, and their effect on extraction, the
default grouping, the set-level scores and the robust label parser."""

from __future__ import annotations

import pytest

from peft_mose.metrics import (
    DEFAULT_GROUPING,
    SynonymTable,
    emotion_mentions,
    extract_emotion_words,
    lemma_candidates,
    lemmatize,
    make_label_parser,
    set_level_scores,
)

VOCABULARY = DEFAULT_GROUPING.vocabulary

# inflected form -> (vocabulary word it is a form of, its default group)
INFLECTED = {
    "happier": ("happy", "happy"),
    "happiest": ("happy", "happy"),
    "angrier": ("angry", "angry"),
    "angriest": ("angry", "angry"),
    "angriness": ("angry", "angry"),
    "saddened": ("sad", "sad"),
    "saddening": ("sad", "sad"),
    "sadder": ("sad", "sad"),
    "saddest": ("sad", "sad"),
    "gloomier": ("gloomy", "sad"),
    "gloomily": ("gloomy", "sad"),
    "gloominess": ("gloomy", "sad"),
    "terrifying": ("terrified", "fear"),
    "terrifies": ("terrified", "fear"),
    "horrifying": ("horrified", "fear"),
    "frightening": ("fright", "fear"),
    "fears": ("fear", "fear"),
    "feared": ("fear", "fear"),
    "calmer": ("calm", "neutral"),
    "calmest": ("calm", "neutral"),
    "calmed": ("calm", "neutral"),
    "tenser": ("tense", "tense"),
    "anxieties": ("anxiety", "worried"),
    "anxiousness": ("anxious", "worried"),
    "concerns": ("concern", "worried"),
    "annoys": ("annoyed", "annoyed"),
    "annoying": ("annoyed", "annoyed"),
    "disappointing": ("disappointed", "disappointed"),
    "depressing": ("depressed", "sad"),
    "amusing": ("amused", "amused"),
    "exciting": ("excited", "excited"),
    "relieving": ("relieved", "relieved"),
    "satisfying": ("satisfied", "satisfied"),
    "embarrassing": ("embarrassed", "embarrassed"),
    "confusing": ("confused", "confused"),
    "shyer": ("shy", "embarrassed"),
    "prouder": ("proud", "proud"),
    "lonelier": ("lonely", "lonely"),
    "doubted": ("doubt", "doubt"),
    "dreading": ("dread", "fear"),
    "rages": ("rage", "angry"),
    "gladdened": ("glad", "happy"),
    "maddened": ("mad", "angry"),
    "stresses": ("stress", "tense"),
    "fearfulness": ("fearful", "fear"),
    "sorrowfully": ("sorrowful", "sad"),
}


@pytest.mark.parametrize("word, expected", INFLECTED.items())
def test_inflected_forms_reach_their_vocabulary_word_and_group(word, expected):
    lemma, group = expected
    assert word not in VOCABULARY  # else the case would test nothing
    assert lemmatize(word, VOCABULARY) == lemma
    assert DEFAULT_GROUPING(word) == group


@pytest.mark.parametrize("word", ["please", "made", "nothing", "feeling", "concerning", "interesting", "others",
                                  "family", "honest", "bring", "need", "smiles", "sadist", "xyzzy"])  # fmt: skip
def test_words_that_are_no_form_of_an_emotion_word_stay_unmatched(word):
    assert lemmatize(word, VOCABULARY) is None
    assert DEFAULT_GROUPING(word) == word


def test_listed_words_are_their_own_lemma_and_candidates_exclude_the_word():
    for word in ("happy", "worried", "sadness", "worrying", "angered"):
        assert lemmatize(word, VOCABULARY) == word
    assert "happier" not in lemma_candidates("happier") and "happy" in lemma_candidates("happier")
    assert lemma_candidates("concerning") == []
    assert lemmatize("sadder", {"sad"}) == "sad" and lemmatize("sadder", {"happy"}) is None


def test_extraction_finds_inflected_words_as_their_vocabulary_word():
    assert extract_emotion_words("She feels angrier and more anxious") == ["angry", "anxious"]
    text = "The news saddened him at first. Later he seemed happier, if a little terrified."
    assert extract_emotion_words(text) == ["happy", "terrified"]
    assert extract_emotion_words(text, scope="all") == ["sad", "happy", "terrified"]
    assert extract_emotion_words("He is not happier than before, only calmer.") == ["calm"]
    assert extract_emotion_words("Concerning the meeting, he spoke calmly.") == ["calmly"]
    assert extract_emotion_words("She grew gloomier", vocabulary=["Gloomy"]) == ["gloomy"]


def test_mentions_give_the_offset_after_each_word_in_the_callers_text():
    text = "Oh. She looks HAPPIER now\u2019s the time, not sad, but Saddened."
    mentions = emotion_mentions(text)
    assert [(m.word, m.sentence) for m in mentions] == [("happy", 1), ("sad", 1)]
    assert [text[: m.end].split()[-1] for m in mentions] == ["HAPPIER", "Saddened"]


def test_scores_and_robust_parser_count_inflections_as_their_group():
    scores = set_level_scores([["happier", "angrier"]], [["happy", "angry"]])
    assert scores["accuracy"] == 1.0 and scores["recall"] == 1.0
    parse = make_label_parser("robust", "mer2023")
    assert parse("at first saddened, in the end she is happier") == "happy"
    assert parse("he looks angrier with every word") == "angry"
    table = SynonymTable({"joy": "happy"})
    assert table("joys") == "happy" and table("happier") == "happy"  # group names are listed words too
    assert table("angrier") == "angrier"  # only listed words have forms
