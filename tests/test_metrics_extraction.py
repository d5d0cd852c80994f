"""Emotion-word extraction from reasoning text and class-label parsing from generated answers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from peft_mose.metrics import (
    LABEL_SETS,
    SynonymTable,
    extract_emotion_words,
    make_label_parser,
    recognition_scores,
)

# Ground truth of the consistent example in the paper (Table 11, multimodal emotion reasoning).
TABLE_11 = (
    "The visual clue reveals clear signs of anger and frustration through tightened lips, a clenched jaw, and "
    "furrowed eyebrows, all of which reflect tension and displeasure. These expressions align with someone "
    "experiencing strong negative emotions, potentially due to dissatisfaction or confrontation. The text adds "
    "context to the emotional tone. Together, the clues harmonize, converging on the emotional inference of anger "
    "driven by unmet expectations or a need for honesty. All modalities strongly reinforce this conclusion."
)


def test_conclusion_scope_keeps_the_last_sentence_with_emotion_words():
    # The last sentence has no emotion word; the one before concludes "anger".
    assert extract_emotion_words(TABLE_11) == ["anger"]


def test_all_scope_keeps_every_sentence_in_reading_order():
    assert extract_emotion_words(TABLE_11, scope="all") == [
        "anger", "frustration", "tension", "displeasure", "dissatisfaction",
    ]


def test_text_without_sentence_punctuation_is_one_sentence():
    # Emotion-LLaMA's outputs lose their periods (training-answer normalisation).
    text = "her expression is neutral the neutral tone of her voice indicates calmness or indifference"
    assert extract_emotion_words(text) == ["neutral", "calmness", "indifference"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("She is not happy.", []),
        ("There is no anger or sadness, only joy.", ["joy"]),
        ("He doesn\u2019t look sad; he looks calm.", ["calm"]),
        ("She isn\u02bct happy, she isn\u2018t sad, he isn`t angry.", []),
        ("The tone is neutral rather than happy.", ["neutral"]),
        ("Without a doubt, she is happy.", ["happy"]),
        ("A lack of visible fear, but clear surprise.", ["surprise"]),
        ("Not sad. Happy!", ["happy"]),
        ("Never angry at all, he was, however, very ANGRY later.", ["angry"]),
    ],
)
def test_negated_words_are_dropped(text, words):
    assert extract_emotion_words(text, scope="all") == words


def test_custom_vocabulary_and_bad_scope():
    assert extract_emotion_words("I feel Blue and happy today.", vocabulary=["blue"]) == ["blue"]
    with pytest.raises(ValueError, match="Unknown extraction scope 'last'"):
        extract_emotion_words("happy", scope="last")


MER2023 = LABEL_SETS["mer2023"]


@pytest.mark.parametrize(
    "text, label",
    [
        ("happy", "happy"),
        ("worried", "worried"),
        ("  sad \n", "sad"),  # generate() strips the decoded text
        ("the emotion is angry", "angry"),
        ("Happy", "neutral"),  # exact match only
        ("happy.", "neutral"),
        ("sad happy surprised", "neutral"),  # "surprised" is not the label "surprise"
        ("fear", "neutral"),  # not one of the six MER2023 labels
        ("", "neutral"),
    ],
)
def test_emotion_llama_parser_is_last_word_unknown_neutral(text, label):
    assert make_label_parser("emotion_llama", MER2023)(text) == label


@pytest.mark.parametrize(
    "text, label",
    [
        ("Happy.", "happy"),
        ("The emotion label is Surprised!", "surprise"),
        ("She looks joyful.", "happy"),
        ("Not angry, just sad.", "sad"),
        ("She is not sad.", "neutral"),
        ("happy at first, then anxious", "worried"),
        ("She looks fearful.", "neutral"),  # fear is not a MER2023 label
        ("I cannot tell.", "neutral"),
    ],
)
def test_robust_parser(text, label):
    assert make_label_parser("robust", MER2023)(text) == label


def test_robust_parser_uses_the_label_set_and_grouping():
    assert make_label_parser("robust", LABEL_SETS["merr"])("She looks fearful.") == "fear"
    grouping = SynonymTable.from_clusters([["happy", "chuffed"], ["sad", "blue"], ["neutral"]])
    parse = make_label_parser("robust", ["happy", "sad", "neutral"], grouping=grouping)
    assert parse("Feeling blue.") == "sad"
    assert parse("Quite chuffed!") == "happy"
    assert parse("She looks joyful.") == "neutral"  # "joyful" is not in this table


def test_label_parser_errors():
    with pytest.raises(ValueError, match="fallback label 'neutral' is not one of"):
        make_label_parser("robust", ["happy", "sad"])
    with pytest.raises(ValueError, match="non-empty and distinct"):
        make_label_parser("emotion_llama", ["happy", "Happy", "neutral"])
    with pytest.raises(ValueError, match="Unknown label parser 'regex'"):
        make_label_parser("regex", MER2023)
    with pytest.raises(ValueError, match="'worried' and 'anxious' fall in the same synonym group"):
        make_label_parser("robust", ["worried", "anxious", "neutral"])


WORDS = st.sampled_from([*MER2023, "Happy", "happy.", "fear", "joy", "the", "is", "", "surprised"])


GENERATED = st.lists(WORDS, max_size=4).map(lambda words: " ".join(words).strip())  # generate() strips its output


@settings(derandomize=True, deadline=None, max_examples=50)
@given(st.lists(GENERATED, min_size=1, max_size=20), st.data())
def test_emotion_llama_pipeline_reproduces_the_original_evaluation(answers, data):
    # eval_emotion.py of Emotion-LLaMA: last word, anything outside the six labels -> "neutral",
    # sklearn weighted F1 without an explicit label list.
    targets = data.draw(st.lists(st.sampled_from(MER2023), min_size=len(answers), max_size=len(answers)))
    original = []
    for answer in answers:
        word = answer.split(" ")[-1]
        original.append(word if word in ["neutral", "angry", "happy", "sad", "worried", "surprise"] else "neutral")
    parse = make_label_parser("emotion_llama", MER2023)
    ours = recognition_scores([parse(a) for a in answers], targets, MER2023)
    assert [parse(a) for a in answers] == original
    assert ours["weighted_f1"] == pytest.approx(f1_score(targets, original, average="weighted", zero_division=0))
