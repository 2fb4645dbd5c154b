"""Caption heuristics: each ratio on hand-computed examples, and each threshold at and around its value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from synthvlm.curation.heuristics import (
    ALNUM_LOW,
    CHAR_REPETITION_HIGH,
    FLAGGED_WORDS,
    SPECIAL_CHARS_HIGH,
    SPECIAL_CHARS_LOW,
    WORD_REPETITION_HIGH,
    FlaggedWords,
    HeuristicFilter,
    HeuristicsConfig,
    TextStats,
    alnum_ratio,
    char_repetition_ratio,
    is_special_char,
    special_char_ratio,
    word_repetition_ratio,
    words,
)
from synthvlm.errors import ConfigError

DEMO_CAPTIONS = Path(__file__).resolve().parents[2] / "synthvlm" / "data" / "demo_captions.jsonl"


@pytest.fixture(scope="module")
def heuristic_filter() -> HeuristicFilter:
    return HeuristicFilter(HeuristicsConfig())


# ---- the ratios, by hand ---------------------------------------------------------------------------------


def test_alnum_and_special_ratios_by_hand() -> None:
    text = "A cat, 2 dogs!"  # 14 characters: A c a t 2 d o g s are alphanumeric (9);
    # special: 3 spaces, ',', '2', '!' (6). The digit counts for both, as in data-juicer.
    assert len(text) == 14
    assert alnum_ratio(text) == pytest.approx(9 / 14)
    assert special_char_ratio(text) == pytest.approx(6 / 14)


def test_special_characters_are_everything_but_letters_and_marks() -> None:
    assert [is_special_char(c) for c in "aé中 \t9½.,$☕\x00"] == [False] * 3 + [True] * 9
    text = "café ☕ 100%"  # special: 2 spaces, the cup, 1 0 0, % = 7 of 11
    assert special_char_ratio(text) == pytest.approx(7 / 11)
    decomposed = "cafe\u0301"  # e + combining acute accent: a mark is part of its letter, not special
    assert special_char_ratio(decomposed) == 0.0 and alnum_ratio(decomposed) == pytest.approx(4 / 5)
    assert special_char_ratio("") == 0.0 and alnum_ratio("") == 0.0


def test_normal_english_has_about_one_special_character_in_six() -> None:
    # 5 spaces + 1 period of 24 characters: why the paper's range starts at 0.165 (whitespace counts).
    assert special_char_ratio("A dog runs on the beach.") == pytest.approx(6 / 24)
    assert special_char_ratio("Photograph of mountains") == pytest.approx(2 / 23)


def test_char_repetition_ratio_bloom_definition() -> None:
    # 3-grams of "abcabcabc": abc, bca, cab, abc, bca, cab, abc -> abc 3, bca 2, cab 2; D = 3 distinct,
    # floor(sqrt(3)) = 1, so only the most frequent counts: 3 / 7.
    assert char_repetition_ratio("abcabcabc", 3) == pytest.approx(3 / 7)
    # 1-grams of "aabbccdd": four letters twice each; floor(sqrt(4)) = 2 most frequent: (2 + 2) / 8.
    assert char_repetition_ratio("aabbccdd", 1) == pytest.approx(0.5)
    assert char_repetition_ratio("aaaa", 2) == 1.0  # aa x3, the only n-gram
    assert char_repetition_ratio("abcd", 2) == 0.0  # nothing repeats
    assert char_repetition_ratio("short", 10) == 0.0  # fewer characters than n


def test_char_repetition_threshold_with_one_repeated_10_gram() -> None:
    limit = HeuristicsConfig().max_char_repetition_ratio
    # "0123456789" twice around unique letters: its one 10-gram occurs 2 times, every other once.
    kept = "0123456789" + "abcdefghijk" + "0123456789"  # 31 chars, 22 10-grams: 2/22 = 0.0909
    dropped = "0123456789" + "abcdefghij" + "0123456789"  # 30 chars, 21 10-grams: 2/21 = 0.0952
    assert char_repetition_ratio(kept, 10) == pytest.approx(2 / 22)
    assert char_repetition_ratio(dropped, 10) == pytest.approx(2 / 21)
    assert char_repetition_ratio(kept, 10) <= limit < char_repetition_ratio(dropped, 10)


def test_words_are_lowercased_and_stripped_of_special_characters() -> None:
    assert words("Beach! -- The DOG's  \n(big) ball.") == ["beach", "the", "dog's", "big", "ball"]
    assert words("") == [] and words("... !!") == []
    # Digits are special characters, so they are stripped from word ends too (as in data-juicer).
    assert words("Room 101, 2nd floor") == ["room", "nd", "floor"]


def test_word_repetition_ratio_by_hand() -> None:
    # 2-grams of a b a b c: (a b) (b a) (a b) (b c): "a b" occurs twice -> 2 of 4 occurrences.
    assert word_repetition_ratio("a b a b c", 2) == pytest.approx(0.5)
    assert word_repetition_ratio("A b, a B c.", 2) == pytest.approx(0.5)  # case and punctuation ignored
    assert word_repetition_ratio("a b c d", 2) == 0.0
    assert word_repetition_ratio("one two three", 10) == 0.0  # fewer words than n


def test_word_repetition_threshold_with_one_repeated_10_gram() -> None:
    limit = HeuristicsConfig().max_word_repetition_ratio

    def word(prefix: str, i: int) -> str:  # letters only: digits at word ends would be stripped
        return prefix + chr(ord("a") + i // 26) + chr(ord("a") + i % 26)

    repeated = [word("r", i) for i in range(10)]

    def caption(fillers: int) -> str:
        return " ".join(repeated + [word("f", i) for i in range(fillers)] + repeated)

    # 74 words -> 65 word 10-grams, one of them twice: 2/65 = 0.03077 <= 0.03086 < 2/64 = 0.03125.
    assert word_repetition_ratio(caption(54), 10) == pytest.approx(2 / 65)
    assert word_repetition_ratio(caption(53), 10) == pytest.approx(2 / 64)
    assert word_repetition_ratio(caption(54), 10) <= limit < word_repetition_ratio(caption(53), 10)


def test_flagged_words_match_whole_words_and_phrases() -> None:
    flagged = FlaggedWords.from_text("# comment\nnude\nstrip club  # a phrase\n\nXXX\n")
    assert len(flagged) == 3
    assert flagged.find(words("A NUDE model, nude!")) == ["nude", "nude"]
    assert flagged.find(words("Neon sign of a strip club at night")) == ["strip club"]
    assert flagged.find(words("Stripped paint on a club house")) == []
    assert flagged.find(words("xxx!!")) == ["xxx"]
    assert flagged.find(words("A nudibranch on coral")) == []


def test_bundled_flagged_words_load_and_custom_lists_replace_them(tmp_path: Path) -> None:
    bundled = HeuristicFilter(HeuristicsConfig())
    assert len(bundled.flagged) > 30
    assert bundled.measure("Analysis of a rooster in a barn").flagged == ()  # whole words only
    stats = bundled.measure("A nude model posing on a sofa.")
    assert stats.flagged == ("nude",) and stats.flagged_word_ratio == pytest.approx(1 / 7)

    custom = tmp_path / "words.txt"
    custom.write_text("sofa\n")
    own = HeuristicFilter(HeuristicsConfig(flagged_words=str(custom)))
    assert own.measure("A nude model posing on a sofa.").flagged == ("sofa",)
    with pytest.raises(ConfigError, match="flagged_words"):
        HeuristicFilter(HeuristicsConfig(flagged_words=str(tmp_path / "missing.txt")))


# ---- thresholds: at the value kept, just beyond it rejected ------------------------------------------------


def clean_stats(**changes: float) -> TextStats:
    base = TextStats(
        alnum_ratio=0.8,
        char_repetition_ratio=0.0,
        word_repetition_ratio=0.0,
        special_char_ratio=0.2,
        flagged_word_ratio=0.0,
        flagged=(),
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("field", "at", "beyond", "reason"),
    [
        ("alnum_ratio", 0.60, 0.5999, ALNUM_LOW),
        ("char_repetition_ratio", 0.09373663, 0.0938, CHAR_REPETITION_HIGH),
        ("word_repetition_ratio", 0.03085751, 0.0309, WORD_REPETITION_HIGH),
        ("special_char_ratio", 0.16534802, 0.1653, SPECIAL_CHARS_LOW),
        ("special_char_ratio", 0.42023757, 0.4203, SPECIAL_CHARS_HIGH),
        ("flagged_word_ratio", 0.0, 0.01, FLAGGED_WORDS),
    ],
)
def test_each_threshold_is_inclusive(
    heuristic_filter, field: str, at: float, beyond: float, reason: str
) -> None:
    assert heuristic_filter.failures(clean_stats(**{field: at})) == []
    assert heuristic_filter.failures(clean_stats(**{field: beyond})) == [reason]


def test_paper_thresholds_are_the_defaults() -> None:
    config = HeuristicsConfig()
    assert config.min_alnum_ratio == 0.60
    assert round(config.max_char_repetition_ratio, 4) == 0.0937 and config.char_repetition_n == 10
    assert round(config.max_word_repetition_ratio, 4) == 0.0309 and config.word_repetition_n == 10
    assert round(config.min_special_char_ratio, 3) == 0.165
    assert round(config.max_special_char_ratio, 3) == 0.420
    assert config.max_flagged_word_ratio == 0.0
    with pytest.raises(ValidationError, match="min_special_char_ratio"):
        HeuristicsConfig(min_special_char_ratio=0.5, max_special_char_ratio=0.4)


# ---- whole captions -------------------------------------------------------------------------------------


def test_normal_captions_pass(heuristic_filter) -> None:
    captions = [json.loads(line)["caption"] for line in DEMO_CAPTIONS.read_text().splitlines()]
    assert len(captions) == 16
    assert {c: heuristic_filter.check(c)[1] for c in captions} == {c: [] for c in captions}


@pytest.mark.parametrize(
    ("caption", "reasons"),
    [
        ("Photograph of mountains", [SPECIAL_CHARS_LOW]),  # 2 special of 23
        ("BUY NOW!!! 50% OFF $$$ www.shop.com", [SPECIAL_CHARS_HIGH]),
        ("#1 #2 #3 ### 2024-01-01 12:00", [ALNUM_LOW, SPECIAL_CHARS_HIGH]),
        ("dog dog dog dog dog dog dog dog.", [CHAR_REPETITION_HIGH]),
        ("A nude model posing on a sofa in a bright studio.", [FLAGGED_WORDS]),
    ],
)
def test_bad_captions_fail_for_the_right_reasons(heuristic_filter, caption: str, reasons: list[str]) -> None:
    assert heuristic_filter.check(caption)[1] == reasons
