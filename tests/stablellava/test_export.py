from __future__ import annotations

import pytest

from synthvlm.stablellava.dialogues import Dialogue, Turn
from synthvlm.stablellava.export import conversations, eval_row, llava_sample


def dialogue(kind: str, record_ids: list[str], turns: int = 1, **extra) -> Dialogue:
    return Dialogue(
        id=f"{record_ids[0]}-{kind}",
        kind=kind,
        record_ids=record_ids,
        ability="colour",
        turns=[Turn(question=f"q{i}", answer=f"a{i}") for i in range(turns)],
        **extra,
    )


def test_single_image_sample() -> None:
    sample = llava_sample(dialogue("qa", ["c0"]), ["images/c0.jpg"])
    assert sample == {
        "id": "c0-qa",
        "image": "images/c0.jpg",
        "conversations": [{"from": "human", "value": "<image>\nq0"}, {"from": "gpt", "value": "a0"}],
    }


def test_multi_turn_has_one_image_token() -> None:
    sample = llava_sample(dialogue("multi_turn", ["c0"], turns=3), ["images/c0.jpg"])
    values = [turn["value"] for turn in sample["conversations"]]
    assert [turn["from"] for turn in sample["conversations"]] == ["human", "gpt"] * 3
    assert sum(v.count("<image>") for v in values) == 1


def test_multi_image_sample_has_two_tokens_and_two_images() -> None:
    sample = llava_sample(
        dialogue("multi_image", ["p-1", "p-2"], relation="difference"), ["i/p-1.jpg", "i/p-2.jpg"]
    )
    assert sample["image"] == ["i/p-1.jpg", "i/p-2.jpg"]
    text = "".join(turn["value"] for turn in sample["conversations"])
    assert text.count("<image>") == 2
    assert sample["conversations"][0]["value"] == "<image>\n<image>\nq0"
    with pytest.raises(ValueError):
        llava_sample(dialogue("multi_image", ["p-1", "p-2"]), ["only-one.jpg"])


def test_eval_row() -> None:
    item = dialogue("eval", ["e0"], question_type="wh", answer_keywords=["teal", "blue-green"])
    assert eval_row(item, "images/e0.jpg") == {
        "id": "e0-eval",
        "image": "images/e0.jpg",
        "question": "q0",
        "answer": "a0",
        "answers": ["teal", "blue-green"],
        "type": "wh",
        "ability": "colour",
    }


def test_conversations_without_image() -> None:
    assert conversations([Turn(question="q", answer="a")], 0)[0]["value"] == "q"
