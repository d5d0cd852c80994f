"""The synonym groupings G of Eq. 22: default table, mapping files, cached callables."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_mose.metrics import (
    DEFAULT_GROUPING,
    LABEL_SETS,
    CachedGrouping,
    SynonymTable,
    load_grouping,
    normalize_word,
    sample_set_scores,
    set_level_scores,
)


def test_labels_name_their_own_groups():
    # A grouped label must stay a valid class label (robust parser, CA-MER majority vote).
    for label in set(LABEL_SETS["merr"]) | set(LABEL_SETS["dfew"]):
        assert DEFAULT_GROUPING(label) == label


@pytest.mark.parametrize(
    "word, group",
    [
        ("joyful", "happy"),
        ("Happiness", "happy"),
        ("anger", "angry"),
        ("ANGRILY", "angry"),
        ("sadness", "sad"),
        ("anxious", "worried"),
        ("worry", "worried"),
        # The words of the CA-MER stage-1 GPT prompt map onto the MERR labels.
        ("surprised", "surprise"),
        ("fearful", "fear"),
        ("doubtful", "doubt"),
        ("contemptuous", "contempt"),
        ("disgusted", "disgust"),
        ("calm", "neutral"),
        (" Skeptical. ", "doubt"),
    ],
)
def test_default_grouping_inflections_and_synonyms(word, group):
    assert DEFAULT_GROUPING(word) == group


def test_distinct_emotions_stay_apart_and_unknown_words_are_their_own_group():
    assert DEFAULT_GROUPING("frustrated") != DEFAULT_GROUPING("angry")
    assert DEFAULT_GROUPING("frustration") == DEFAULT_GROUPING("frustrated") == "frustrated"
    assert DEFAULT_GROUPING("Wistful") == "wistful"
    assert "wistful" not in DEFAULT_GROUPING.vocabulary
    assert {"happy", "joyful", "frustration"} <= DEFAULT_GROUPING.vocabulary


def test_normalize_word():
    assert normalize_word("  Very   HAPPY!! ") == "very happy"
    assert normalize_word("'sad'") == "sad"
    assert normalize_word("isn\u2019t") == "isn't"


@pytest.mark.parametrize("word", ["\u201chappy\u201d", "happy\u3002", "\u00abhappy\u00bb", "happy\u200b",
                                  "\uff08happy\uff09", "happy\u2026", "\u2018happy\u2019",
                                  "\uff28\uff41\uff50\uff50\uff59"])
def test_unicode_punctuation_and_invisible_characters_are_stripped(word):
    assert normalize_word(word) == "happy"
    assert sample_set_scores([word], ["happy"]) == (1.0, 1.0)


def test_table_rejects_a_word_in_two_groups_and_chains():
    with pytest.raises(ValueError, match="'glad'.*two clusters"):
        SynonymTable.from_clusters([["happy", "glad"], ["content", "glad"]])
    with pytest.raises(ValueError, match="Group name 'happy' is itself mapped to 'joy'"):
        SynonymTable({"glad": "happy", "happy": "joy"})
    with pytest.raises(ValueError, match="two groups"):
        SynonymTable({"Glad": "happy", "glad": "joy"})
    with pytest.raises(ValueError, match="empty"):
        SynonymTable({})


def _partition(table: SynonymTable) -> set[frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for word, group in table.as_dict().items():
        groups.setdefault(group, set()).add(word)
    return {frozenset(g) for g in groups.values()}


CLUSTERS = [["happy", "joyful", "glad"], ["sad", "sadness"], ["angry", "anger", "furious"], ["calm"]]


@settings(derandomize=True, deadline=None, max_examples=40)
@given(st.randoms(use_true_random=False))
def test_grouping_is_order_independent(rng):
    # Shuffling the clusters and the words inside them changes at most group names, never the partition,
    # so the scores are identical.
    shuffled = [rng.sample(c, len(c)) for c in rng.sample(CLUSTERS, len(CLUSTERS))]
    reference, permuted = SynonymTable.from_clusters(CLUSTERS), SynonymTable.from_clusters(shuffled)
    assert _partition(reference) == _partition(permuted)
    predictions = [["joyful", "calm"], ["furious"], ["sadness", "glad"]]
    references = [["glad"], ["anger", "sad"], ["happy"]]
    assert set_level_scores(predictions, references, reference) == set_level_scores(predictions, references, permuted)


def test_default_grouping_is_deterministic():
    rebuilt = SynonymTable(DEFAULT_GROUPING.as_dict())
    assert rebuilt.as_dict() == DEFAULT_GROUPING.as_dict()
    assert list(DEFAULT_GROUPING.as_dict()) == sorted(DEFAULT_GROUPING.as_dict())


def test_load_grouping_csv(tmp_path):
    path = tmp_path / "wheel.csv"
    path.write_text("word,group\nJoyful,happy\nglad,happy\nirate,angry\n", encoding="utf-8")
    table = load_grouping(path)
    assert table("joyful") == table("GLAD") == table("happy") == "happy"
    assert table("irate") == "angry"
    assert table("joy") == "joy"  # the file replaces the default table


def test_load_grouping_json_formats(tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"joyful": "happy", "irate": "angry"}), encoding="utf-8")
    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps([["happy", "joyful"], ["angry", "irate"]]), encoding="utf-8")
    assert load_grouping(mapping).as_dict() == load_grouping(clusters).as_dict() == {
        "angry": "angry",
        "happy": "happy",
        "irate": "angry",
        "joyful": "happy",
    }


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", "  \n", "is empty"),
        ("noheader.csv", "joyful,happy\n", "header row with columns 'word' and 'group'"),
        ("onlyheader.csv", "word,group\n", "no rows"),
        ("conflict.csv", "word,group\njoyful,happy\njoyful,sad\n", "line 3: 'joyful' is mapped to 'happy' and 'sad'"),
        ("bad.json", "[1, 2]", "must hold a non-empty JSON object"),
        ("broken.json", '{"joyful": ', "invalid JSON"),
        ("empty.json", "{}", "must hold a non-empty JSON object"),
        ("map.txt", "joyful,happy", "must end in .csv or .json"),
    ],
)
def test_load_grouping_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_grouping(path)


def test_cached_grouping_calls_once_per_word_and_persists(tmp_path):
    calls = []

    def llm(word: str) -> str:
        calls.append(word)
        return {"joyful": "Happy", "glad": "happy"}.get(word, word)

    cache = tmp_path / "cache.json"
    grouping = CachedGrouping(llm, cache)
    assert [grouping(w) for w in ("Joyful", "joyful", "glad", "joyful")] == ["happy"] * 4
    assert calls == ["joyful", "glad"]

    def offline(word: str) -> str:
        raise AssertionError("the cache should answer")

    assert CachedGrouping(offline, cache)("JOYFUL") == "happy"
    # The cache file is a valid mapping file for --grouping.
    assert load_grouping(cache)("glad") == "happy"
