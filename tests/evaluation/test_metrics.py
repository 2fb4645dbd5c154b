from __future__ import annotations

import pytest

from synthvlm.evaluation.benchmarks import BenchmarkItem
from synthvlm.evaluation.metrics import (
    ItemScore,
    by_ability,
    extract_choice,
    keyword_match,
    normalize_answer,
    parse_yes_no,
    pope_metrics,
    rotate_choices,
    score_item,
    summarize,
    vqa_score,
)


def item(**fields) -> BenchmarkItem:
    fields.setdefault("image", "x.png")
    fields.setdefault("question", "q?")
    return BenchmarkItem(**fields)


def summary_of(items_and_outputs, **kwargs) -> dict[str, dict[str, float]]:
    return summarize([score_item(it, [out], **kwargs) for it, out in items_and_outputs])


# ---- normalization and VQA accuracy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Red", "red"),
        ("  The  red\tcar ", "red car"),  # case, whitespace, articles
        ("a dog.", "dog"),  # article, final period
        ("Two", "2"),  # number words -> digits
        ("none", "0"),  # VQA counting answers
        ("ten apples", "10 apples"),
        ("dont", "don't"),  # contraction without apostrophe restored
        ("don't", "don't"),
        ("isnt it", "isn't it"),
        ("well", "well"),  # an English word is not taken for "we'll"
        ("1,000", "1000"),  # digit grouping comma
        ("3.5", "3.5"),  # decimal point kept
        ("10:30", "10:30"),  # time kept
        ("yes!", "yes"),
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),
        ("(left)", "left"),
        ("'yes'", "yes"),  # quote marks
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_vqa_single_reference_is_normalized_exact_match() -> None:
    assert vqa_score("The Two.", ["2"]) == 1.0
    assert vqa_score("two dogs", ["2"]) == 0.0  # exact match, not containment


def test_vqa_several_answers_soft_score() -> None:
    humans = ["2", "two", "2", "3", "two dogs"]  # normalized: 2, 2, 2, 3, "2 dogs"
    assert vqa_score("Two.", humans) == 1.0  # 3 humans said it: min(3 / 3, 1) = 1
    assert vqa_score("3", humans) == pytest.approx(1 / 3)  # 1 human: min(1 / 3, 1)
    assert vqa_score("2 dogs", humans) == pytest.approx(1 / 3)
    assert vqa_score("four", humans) == 0.0
    assert vqa_score("2", ["2"] * 10) == 1.0  # capped at 1


def test_vqa_accuracy_on_a_tiny_benchmark() -> None:
    humans = ["cat", "cat", "kitten", "cat", "kitten", "dog"]
    pairs = [
        (item(type="vqa", answer="red"), "Red."),  # 1
        (item(type="vqa", answers=humans), "dog"),  # 1 human -> 1/3
        (item(type="vqa", answers=humans), "a kitten"),  # 2 humans -> 2/3
        (item(type="vqa", answer="3"), "three cats"),  # 0
    ]
    metrics = summary_of(pairs)["vqa"]
    # (1 + 1/3 + 2/3 + 0) / 4 = 2 / 4 = 0.5
    assert metrics == {"n": 4.0, "accuracy": pytest.approx(0.5)}


# ---- multiple choice -----------------------------------------------------------------------------------

CHOICES = ["cat", "dog", "red fox", "fox"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", "B"),
        ("b", "B"),  # the whole answer is one letter: any case
        ("(C)", "C"),
        ("D.", "D"),
        ("The answer is B.", "B"),
        ("Answer: (D)", "D"),
        ("Option A", "A"),
        ("B. dog", "B"),
        ("C) red fox", "C"),
        ("I think C is right", "C"),  # "I" is a word here, C the letter
        ("A cat", "A"),  # "A" is an article; "cat" is choice A's text
        ("A dog sits there", "B"),  # article + choice text of B
        ("It is a dog", "B"),  # choice text only
        ("red fox", "C"),  # "fox" (D) is inside "red fox" (C): the longer choice wins
        ("a fox", "D"),
        ("A and B", None),  # two letters: ambiguous
        ("a cat or a dog", None),  # two choice texts: ambiguous
        ("E", None),  # no such option
        ("none of these", None),
        ("", None),
    ],
)
def test_extract_choice(answer: str, expected: str | None) -> None:
    assert extract_choice(answer, CHOICES) == expected


def test_rotate_choices_moves_the_correct_letter() -> None:
    assert rotate_choices(["cat", "dog", "fox"], "B", 0) == (["cat", "dog", "fox"], "B")
    assert rotate_choices(["cat", "dog", "fox"], "B", 1) == (["dog", "fox", "cat"], "A")
    assert rotate_choices(["cat", "dog", "fox"], "B", 2) == (["fox", "cat", "dog"], "C")


def test_multiple_choice_accuracy_and_unparsed() -> None:
    mc = item(type="multiple_choice", choices=["cat", "dog", "fox"], answer="B")
    by_text = item(type="multiple_choice", choices=["cat", "dog", "fox"], answer="fox")  # answer as text
    pairs = [(mc, "B"), (mc, "(B) dog"), (mc, "A"), (mc, "I cannot tell"), (by_text, "C")]
    metrics = summary_of(pairs)["multiple_choice"]
    # correct: "B", "(B) dog", "C" for fox -> 3 of 5 = 0.6; "I cannot tell" names no option -> unparsed
    assert metrics == {"n": 5.0, "accuracy": pytest.approx(0.6), "unparsed": 1.0}


def test_circular_eval_needs_every_rotation_right() -> None:
    mc = item(type="multiple_choice", choices=["cat", "dog", "fox"], answer="B")
    # Rotations ask [cat, dog, fox] (B), [dog, fox, cat] (A), [fox, cat, dog] (C).
    knows = score_item(mc, ["B", "A", "C"])
    always_b = score_item(mc, ["B", "B", "B"])  # right only in the first order
    by_text = score_item(mc, ["dog", "dog", "It is a dog"])
    assert (knows.score, always_b.score, by_text.score) == (1.0, 0.0, 1.0)
    assert always_b.parsed == "B" and always_b.gold == "B"


# ---- yes / no and POPE --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("YES!", "yes"),
        ("Yes, there is no dog in the corner.", "yes"),  # a leading yes/no decides
        ("No, there is a cat.", "no"),
        ("There is no dog.", "no"),  # negation
        ("I don't see a dog", "no"),
        ("I don\u2019t see a dog", "no"),  # typographic apostrophe
        ("Not really", "no"),
        ("There is a dog, yes", "yes"),
        ("There is a dog.", None),  # neither yes nor a negation: unparsed
        ("A dog. No, wait", None),  # only the first sentence counts
        ("", None),
        ("...", None),
    ],
)
def test_parse_yes_no(answer: str, expected: str | None) -> None:
    assert parse_yes_no(answer) == expected


def test_pope_metrics_by_hand() -> None:
    gold = ["yes"] * 5 + ["no"] * 5
    predicted = ["yes", "yes", "yes", "no", None] + ["no", "no", "no", "no", "yes"]
    # TP = 3, FN = 2 (a "no" and an unparsed answer on yes-items), TN = 4, FP = 1
    metrics = pope_metrics(predicted, gold)
    assert metrics["accuracy"] == pytest.approx((3 + 4) / 10)
    assert metrics["precision"] == pytest.approx(3 / (3 + 1))
    assert metrics["recall"] == pytest.approx(3 / (3 + 2))
    assert metrics["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))  # = 2/3
    assert metrics["yes_ratio"] == pytest.approx((3 + 1) / 10)
    assert metrics["unparsed"] == 1.0


def test_pope_metrics_without_positive_predictions_are_zero_not_nan() -> None:
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0 and metrics["accuracy"] == 0.5


def test_yes_no_items_summarize_to_pope_metrics() -> None:
    yes_item, no_item = item(type="yes_no", answer="Yes"), item(type="yes_no", answer="no")
    pairs = [(yes_item, "Yes, it is."), (yes_item, "It is not."), (no_item, "no"), (no_item, "Yes")]
    metrics = summary_of(pairs)["yes_no"]
    # TP = 1, FN = 1, TN = 1, FP = 1
    assert metrics["n"] == 4.0
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    assert metrics["precision"] == pytest.approx(1 / 2) and metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["yes_ratio"] == pytest.approx(2 / 4)


# ---- keywords -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "keywords", "mode", "expected"),
    [
        ("It is a golden retriever.", ["golden retriever"], "any", True),
        ("It is a Golden-Retriever", ["golden retriever"], "any", True),  # punctuation normalized
        ("A cat sits.", ["dog", "cat"], "any", True),  # several acceptable answers
        ("A cat sits.", ["dog", "cat"], "all", False),
        ("A cat and a dog.", ["dog", "cat"], "all", True),
        ("This is a category.", ["cat"], "any", False),  # whole words only
        ("There are two birds", ["2"], "any", True),  # number words
        ("The Beach", ["the beach"], "any", True),  # articles
        ("anything", ["", "  "], "any", False),  # empty keywords never match
    ],
)
def test_keyword_match(answer: str, keywords: list[str], mode: str, expected: bool) -> None:
    assert keyword_match(answer, keywords, mode) is expected  # type: ignore[arg-type]


def test_keyword_accuracy_on_a_tiny_benchmark() -> None:
    kw = item(type="keyword", answers=["sunflower", "sun flower"])
    pairs = [(kw, "A sunflower in a field."), (kw, "A sun flower."), (kw, "A rose."), (kw, "Sunflowers!")]
    # matches: 1st, 2nd; "rose" no; "sunflowers" is not the word "sunflower" -> 2 / 4
    assert summary_of(pairs)["keyword"] == {"n": 4.0, "accuracy": 0.5}


# ---- aggregation ----------------------------------------------------------------------------------------


def test_per_ability_breakdown() -> None:
    pairs = [
        (item(type="vqa", answer="red", ability="color"), "red"),  # 1
        (item(type="vqa", answer="blue", ability="color"), "green"),  # 0
        (item(type="vqa", answer="cat", ability="animal"), "cat"),  # 1
        (item(type="yes_no", answer="yes", ability="animal"), "yes"),  # TP
        (item(type="yes_no", answer="no", ability="animal"), "yes"),  # FP
        (item(type="vqa", answer="two", ability=None), "2"),  # 1, no ability
    ]
    scores = [score_item(it, [out]) for it, out in pairs]
    overall = summarize(scores)
    assert overall["vqa"]["accuracy"] == pytest.approx(3 / 4)  # 1 + 0 + 1 + 1 over 4
    assert overall["yes_no"]["accuracy"] == pytest.approx(1 / 2)
    abilities = by_ability(scores)
    assert sorted(abilities) == ["animal", "color"]  # the item without ability is only in the overall
    assert abilities["color"] == {"vqa": {"n": 2.0, "accuracy": 0.5}}
    assert abilities["animal"]["vqa"] == {"n": 1.0, "accuracy": 1.0}
    assert abilities["animal"]["yes_no"]["precision"] == pytest.approx(1 / 2)  # TP 1, FP 1
    assert abilities["animal"]["yes_no"]["yes_ratio"] == 1.0


def test_judge_scores_are_averaged_and_failures_counted() -> None:
    scores = [
        ItemScore("a", "judge", None, ["x"], judge_score=5),
        ItemScore("b", "judge", None, ["x"], judge_score=2),
        ItemScore("c", "judge", None, ["x"], judge_failed=True),
        ItemScore("d", "keyword", None, ["x"], score=1.0, judge_score=4),
        ItemScore("e", "keyword", None, ["x"], score=0.0, judge_score=1),
    ]
    summary = summarize(scores)
    # judge items: (5 + 2) / 2 scored = 3.5, one failure; keyword items also judged: (4 + 1) / 2 = 2.5
    assert summary["judge"] == {"n": 3.0, "score": 3.5, "judge_failed": 1.0}
    assert summary["keyword"] == {"n": 2.0, "accuracy": 0.5, "judge_score": 2.5, "judge_failed": 0.0}


def test_no_judge_mean_when_every_judge_call_failed() -> None:
    scores = [ItemScore("a", "judge", None, ["x"], judge_failed=True)] * 2
    assert summarize(scores)["judge"] == {"n": 2.0, "judge_failed": 2.0}  # no "score": 0 would mislead


def test_score_item_requires_an_output() -> None:
    with pytest.raises(ValueError, match="no model output"):
        score_item(item(type="vqa", answer="x", id="q1"), [])
