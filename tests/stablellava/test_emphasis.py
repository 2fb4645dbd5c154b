from __future__ import annotations

from synthvlm.stablellava.emphasis import (
    contains_phrase,
    emphasis_level,
    keyword_text,
    parse_prompt,
    plain_prompt,
    split_keywords,
)


def test_split_keeps_commas_inside_brackets() -> None:
    assert split_keywords("((red, blue car)), street ,, 8k ") == ["((red, blue car))", "street", "8k"]


def test_emphasis_level_counts_wrapping_pairs_only() -> None:
    assert emphasis_level("car") == 0
    assert emphasis_level("(car)") == 1
    assert emphasis_level("(( red panda ))") == 2
    assert emphasis_level("((car:1.3))") == 2
    assert emphasis_level("(a) and (b)") == 0  # brackets that do not wrap the whole keyword


def test_keyword_text_drops_brackets_and_weights() -> None:
    assert keyword_text("((Red  panda:1.2))") == "Red panda"
    assert keyword_text("[blurry]") == "blurry"


def test_plain_prompt_is_what_diffusers_gets() -> None:
    raw = "((crimson umbrella)), wet street, (evening:1.1), [soft light]"
    assert plain_prompt(raw) == "crimson umbrella, wet street, evening, soft light"
    assert "(" not in plain_prompt(raw) and "[" not in plain_prompt(raw)


def test_parsed_prompt_keeps_emphasis_and_key_subject() -> None:
    parsed = parse_prompt("((Crimson Umbrella)), Wet street, ((rain))")
    assert parsed.emphasized == ("Crimson Umbrella", "rain")
    assert parsed.subject == "crimson umbrella"
    assert parsed.keyword_set == frozenset({"crimson umbrella", "wet street", "rain"})


def test_contains_phrase_matches_whole_words() -> None:
    assert contains_phrase("a Red car", "red")
    assert not contains_phrase("a bored cat", "red")
    assert contains_phrase("double-decker bus, street", "double-decker bus")
    assert not contains_phrase("anything", "")
