from __future__ import annotations

from pathlib import Path

import pytest

from synthvlm.errors import InputError
from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.filters import DEFAULT_NONVISUAL_WORDS
from synthvlm.stablellava.keywords import (
    KEYWORD_TOO_LONG,
    TASK_KEYWORDS,
    KeywordReply,
    clean_keyword,
    keyword_request,
    merge_keywords,
    read_banks,
    write_banks,
)


def test_requests_show_different_seed_keywords_and_are_deterministic() -> None:
    ability = load_registry()["colour"]
    first, second = (keyword_request(ability, 25, i, seed=0) for i in range(2))
    assert (first.task, first.schema) == (TASK_KEYWORDS, KeywordReply)
    assert first.messages != second.messages  # each request anchors on other examples: diversity
    assert keyword_request(ability, 25, 0, seed=0) == first
    assert ability.keyword_instruction in first.messages[-1]["content"]


def test_clean_keyword() -> None:
    assert clean_keyword(" ((Burnt Sienna)) ", DEFAULT_NONVISUAL_WORDS) == ("Burnt Sienna", None)
    assert clean_keyword("red, blue", DEFAULT_NONVISUAL_WORDS)[0] == "red blue"
    keyword, verdict = clean_keyword("a very long keyword that is really a sentence", DEFAULT_NONVISUAL_WORDS)
    assert keyword is None and verdict.reason == KEYWORD_TOO_LONG
    assert clean_keyword("smell of rain", DEFAULT_NONVISUAL_WORDS)[1].reason == "non-visual"
    assert clean_keyword("(())", DEFAULT_NONVISUAL_WORDS)[0] is None


def test_merge_keeps_first_spelling() -> None:
    assert merge_keywords(["Teal", "coral"], ["teal ", "Ochre", "coral"]) == ["Teal", "coral", "Ochre"]


def test_banks_round_trip_and_errors(tmp_path: Path) -> None:
    uri = str(tmp_path / "keywords.json")
    write_banks(uri, {"colour": ["teal"]}, {"seed": 0})
    assert read_banks(uri) == {"colour": ["teal"]}
    (tmp_path / "bad.json").write_text('{"abilities": {"colour": ["teal", ""]}}')
    with pytest.raises(InputError) as err:
        read_banks(str(tmp_path / "bad.json"))
    assert err.value.field == "abilities.colour"
