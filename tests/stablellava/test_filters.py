from __future__ import annotations

import pytest

from synthvlm.stablellava import filters as F
from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.emphasis import parse_prompt
from synthvlm.stablellava.filters import FilterConfig, RepetitionTracker, check_prompt, find_eval_overlaps

REGISTRY = load_registry()
COLOUR = REGISTRY["colour"]
GOOD = "((teal bicycle)), brick wall, soft light, 8k"


def verdict(prompt: str, ability: str = "colour", **config):
    found = check_prompt(
        parse_prompt(prompt), REGISTRY[ability], REGISTRY[ability].keyword_bank, FilterConfig(**config)
    )
    return found.reason if found else None


def test_good_prompt_passes() -> None:
    assert verdict(GOOD) is None


def test_at_most_ten_keywords() -> None:
    ten = "((teal bicycle)), " + ", ".join(f"word{i}" for i in range(9))
    assert verdict(ten) is None
    assert verdict(ten + ", word9") == F.TOO_MANY_KEYWORDS
    assert verdict(ten, max_keywords=5) == F.TOO_MANY_KEYWORDS


def test_repeated_keywords_within_a_prompt() -> None:
    assert verdict("((teal bicycle)), soft light, Soft Light, 8k") == F.REPEATED_KEYWORDS
    # a tolerated repetition rate lets it through (1 of 4 keywords repeats: 0.25)
    assert verdict("((teal bicycle)), soft light, soft light, 8k", max_keyword_repetition=0.3) is None
    assert F.keyword_repetition_rate(["a", "b", "a", "a"]) == 0.5


def test_key_subject_must_be_first_and_double_bracketed() -> None:
    assert verdict("brick wall, ((teal bicycle)), 8k") == F.SUBJECT_NOT_FIRST
    assert verdict("(teal bicycle), brick wall") == F.SUBJECT_NOT_FIRST
    assert verdict("teal bicycle, brick wall") == F.SUBJECT_NOT_FIRST


def test_first_keyword_must_name_an_ability_keyword() -> None:
    assert verdict("((old bicycle)), brick wall") == F.NO_ABILITY_KEYWORD  # no colour named
    assert verdict("((old bicycle)), brick wall", require_ability_keyword=False) is None


@pytest.mark.parametrize("word", ["growing", "thinking", "sounds", "smell", "aroma"])
def test_non_visual_words(word: str) -> None:
    assert verdict(f"((teal bicycle)), {word}, brick wall") == F.NON_VISUAL
    assert verdict(f"((teal bicycle)), brick wall, the {word} of the city") == F.NON_VISUAL


def test_non_visual_words_match_whole_words_only() -> None:
    assert verdict("((teal bicycle)), soundproof studio") is None  # "sound" inside another word


def test_task_restrictions() -> None:
    # v2 §4.4: profession prompts need a person, not only the building site.
    assert verdict("((construction worker)), building site, cranes", "profession") == F.MISSING_REQUIRED
    assert verdict("((construction worker)), woman in hard hat, building site", "profession") is None
    assert verdict("((crimson kite)), rainbow, sky") == F.FORBIDDEN_WORD


def test_empty_prompt() -> None:
    assert verdict(" , ,") == F.EMPTY_PROMPT


def test_repetition_across_the_dataset() -> None:
    tracker = RepetitionTracker(FilterConfig(near_duplicate_jaccard=0.6, max_subject_repeats=3))
    first = parse_prompt("((teal bicycle)), brick wall, soft light, 8k")
    assert tracker.check(first) is None
    tracker.add("p1", first)
    same = parse_prompt("((Teal bicycle)), 8k, brick wall, soft light")  # same keywords, other order
    assert tracker.check(same).reason == F.DUPLICATE_PROMPT
    near = parse_prompt("((teal bicycle)), brick wall, soft light, 4k")  # 3 of 5 shared: 0.6
    found = tracker.check(near)
    assert found.reason == F.NEAR_DUPLICATE and "p1" in found.detail
    other_subject = parse_prompt("((coral bicycle)), brick wall, soft light, 4k")
    assert tracker.check(other_subject) is None
    for i, scene in enumerate(["harbour", "forest"]):
        tracker.add(f"p{i + 2}", parse_prompt(f"((teal bicycle)), {scene}"))
    assert tracker.check(parse_prompt("((teal bicycle)), desert, night")).reason == F.SUBJECT_OVERUSED
    assert 0 < tracker.dataset_repetition_rate() < 1


def test_answer_length_limit() -> None:
    assert F.answer_length_problem(["a" * 500], 500) is None
    found = F.answer_length_problem(["short", "a" * 501], 500)
    assert found.reason == F.ANSWER_TOO_LONG and "501" in found.detail


def test_eval_overlap_by_keywords() -> None:
    evals = {"e1": parse_prompt("((teal bicycle)), brick wall, soft light, 8k")}
    train = {
        "copy": parse_prompt("((teal bicycle)), brick wall, soft light, 8k"),
        "close": parse_prompt("((teal bicycle)), brick wall, soft light, 4k"),  # Jaccard 0.6
        "other": parse_prompt("((coral bicycle)), brick wall, soft light, 8k"),  # another key subject
    }
    assert find_eval_overlaps(evals, train, threshold=0.7) == {"copy": "e1"}
    assert find_eval_overlaps(evals, train, threshold=0.6) == {"copy": "e1", "close": "e1"}
    assert find_eval_overlaps({}, train, threshold=0.7) == {}
