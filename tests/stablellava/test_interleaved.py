from __future__ import annotations

import pytest

from synthvlm.stablellava import interleaved as il
from synthvlm.stablellava.emphasis import parse_prompt
from synthvlm.stablellava.filters import (
    ANSWER_TOO_LONG,
    DIALOGUE_TOO_LONG,
    NON_VISUAL,
    TOO_MANY_KEYWORDS,
    FilterConfig,
    LengthLimit,
    check_image_prompt,
    dialogue_chars,
    length_problem,
)

CONFIG = il.InterleavedConfig()


def reply(*questions: str, answer: str = "Next, do this.") -> il.InterleavedReply:
    return il.InterleavedReply(turns=[il.InterleavedTurn(question=q, answer=answer) for q in questions])


def test_pictures_become_image_markers_where_they_appear() -> None:
    parsed = il.parse_reply(
        reply(
            "Teach me tea? Here is my kitchen 《((kitchen)), kettle》 ok?",
            "Done. Next?",
            "Like this? 《((cup)), tea》",
        ),
        CONFIG,
    )
    assert parsed.turns[0][0] == "Teach me tea? Here is my kitchen <image> ok?"
    assert parsed.turns[1][0] == "Done. Next?"
    assert parsed.pictures == ("((kitchen)), kettle", "((cup)), tea") and parsed.picture_turns == (0, 2)


@pytest.mark.parametrize(
    ("questions", "reason"),
    [
        (("Start 《((a))", "b 《((b))》"), il.UNBALANCED_PICTURE),
        (("Start 《 》", "b 《((b))》"), il.EMPTY_PICTURE),
        (("Start 《((a))》《((b))》", "b 《((b))》"), il.TOO_MANY_PICTURES_IN_TURN),
        (("Start", "b 《((b))》", "c 《((c))》"), il.FIRST_TURN_WITHOUT_PICTURE),
        (("Start 《((a))》", "b"), il.TOO_FEW_PICTURES),
        (("Start 《((a))》 <image>", "b 《((b))》"), il.STRAY_IMAGE_MARKER),
        (("Start 《((a))》",), il.TOO_FEW_TURNS),
    ],
)
def test_every_image_reference_must_exist(questions, reason) -> None:
    assert il.parse_reply(reply(*questions), CONFIG).reason == reason


def test_answers_show_no_pictures() -> None:
    verdict = il.parse_reply(reply("a 《((a))》", "b 《((b))》", answer="Look 《((x))》"), CONFIG)
    assert verdict.reason == il.PICTURE_IN_ANSWER


def test_phrases_do_not_repeat_and_are_seeded() -> None:
    phrases = il.phrases_for(CONFIG, 1000, seed=0)
    assert len(phrases) == len(set(phrases)) == len(il.DEFAULT_PHRASES)
    assert phrases == il.phrases_for(CONFIG, 1000, seed=0) != il.phrases_for(CONFIG, 1000, seed=1)
    own = il.InterleavedConfig(phrases=["fold a shirt", "fold a shirt ", "peel an orange"])
    assert sorted(il.phrases_for(own, 5, 0)) == ["fold a shirt", "peel an orange"]


def test_request_is_fig8_with_the_length_limit() -> None:
    text = il.interleaved_request("interleaved-00000", "make tea", CONFIG, 10, seed=0).messages[-1]["content"]
    assert "teaches another person to do something step by step" in text and "《》" in text
    assert "Phrase: make tea" in text and "at most 500 characters" in text


def test_length_limit_per_dialogue_by_default() -> None:
    pairs = [("Q <image> one?", "a" * 240), ("Q two?", "b" * 240)]
    assert dialogue_chars(pairs) == len("Q one?") + 240 + len("Q two?") + 240  # markers do not count
    assert length_problem(pairs, LengthLimit()) is None
    long = [*pairs, ("Q three?", "c" * 20)]
    assert length_problem(long, LengthLimit()).reason == DIALOGUE_TOO_LONG
    assert length_problem(long, LengthLimit(per="answer")) is None
    assert length_problem([("q", "x" * 501)], LengthLimit(per="answer")).reason == ANSWER_TOO_LONG


def test_image_prompt_checks_need_no_ability() -> None:
    config = FilterConfig()
    assert check_image_prompt(parse_prompt("((bread slices)), cutting board"), config) is None
    many = ", ".join(f"k{i}" for i in range(11))
    assert check_image_prompt(parse_prompt(many), config).reason == TOO_MANY_KEYWORDS
    assert check_image_prompt(parse_prompt("((kitchen)), the smell of bread"), config).reason == NON_VISUAL
