from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from synthvlm import storage
from synthvlm.evaluation.answerers import (
    MC_INSTRUCTION,
    Answerer,
    HFLlavaAnswerer,
    Question,
    answer_all,
    local_model_dir,
    question_with_choices,
    vicuna_v1_prompt,
)
from synthvlm.train.conversation import VICUNA_SYSTEM


class Scripted:
    def answer(self, image_paths: Sequence[str], question: str, choices: Sequence[str] | None = None) -> str:
        return "yes"


@pytest.fixture(scope="module")
def tiny_llava():
    from synthvlm.train.model import build_tiny_llava

    return build_tiny_llava()


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for name, rgb, size in (("red", (220, 20, 20), (40, 24)), ("blue", (20, 20, 220), (24, 40))):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", size, rgb).save(path)
        paths.append(str(path))
    return paths


def test_question_with_choices_is_llava_format() -> None:
    text = question_with_choices("What animal?", ["cat", "dog"])
    assert text == f"What animal?\nA. cat\nB. dog\n{MC_INSTRUCTION}"
    assert question_with_choices("Q?", None) == "Q?"
    assert question_with_choices("Q?", ["x", "y"], instruction=None) == "Q?\nA. x\nB. y"


def test_vicuna_v1_prompt_puts_images_first() -> None:
    prompt = vicuna_v1_prompt("What is it?", 2)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\n<image>\nWhat is it? ASSISTANT:"
    assert vicuna_v1_prompt("Q", 0) == f"{VICUNA_SYSTEM} USER: Q ASSISTANT:"


def test_protocol_is_structural() -> None:
    assert isinstance(Scripted(), Answerer)
    assert not isinstance(object(), Answerer)


def test_hf_llava_answers_a_question_about_an_image(tiny_llava, images: list[str]) -> None:
    model, processor = tiny_llava
    answerer = HFLlavaAnswerer(model, processor, max_new_tokens=4)
    answer = answerer.answer(images[:1], "What color is the picture?")
    assert isinstance(answer, str)
    assert "ASSISTANT" not in answer and "<image>" not in answer  # only the new tokens come back
    # Greedy decoding: the same question gives the same answer.
    assert answerer.answer(images[:1], "What color is the picture?") == answer


def test_hf_llava_multiple_choice_and_two_images(tiny_llava, images: list[str]) -> None:
    model, processor = tiny_llava
    answerer = HFLlavaAnswerer(model, processor, max_new_tokens=3)
    prompt = answerer.prompt(2, "Same color?", ["yes", "no"])
    assert prompt.count("<image>") == 2 and "A. yes\nB. no\n" + MC_INSTRUCTION in prompt
    assert isinstance(answerer.answer(images, "Same color?", ["yes", "no"]), str)


def test_hf_llava_decodes_greedily(tiny_llava, images: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = tiny_llava
    calls: list[dict] = []
    original = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    HFLlavaAnswerer(model, processor, max_new_tokens=2).answer(images[:1], "Q?")
    assert calls[0]["do_sample"] is False and calls[0]["max_new_tokens"] == 2
    assert calls[0]["pixel_values"].shape[0] == 1  # one image


def test_batched_answers_equal_one_at_a_time(tiny_llava, images: list[str]) -> None:
    model, processor = tiny_llava
    answerer = HFLlavaAnswerer(model, processor, max_new_tokens=5)
    questions = [
        Question(images[:1], "What color is it?"),
        Question(images, "Do the two pictures have the same color?", ["yes", "no"]),  # longer: others padded
        Question(images[1:], "Color?"),
    ]
    one_by_one = [answerer.answer(q.image_paths, q.text, q.choices) for q in questions]
    assert answerer.answer_many(questions) == one_by_one  # left padding keeps greedy answers unchanged
    assert processor.tokenizer.padding_side == "right"  # restored after the batch
    assert answerer.answer_many([]) == []


def test_answer_all_uses_batches_when_offered() -> None:
    class Counting(Scripted):
        def answer_many(self, questions):
            return ["batch"] * len(questions)

    questions = [Question(["a.png"], "Q1"), Question(["a.png"], "Q2")]
    assert answer_all(Scripted(), questions) == ["yes", "yes"]
    assert answer_all(Counting(), questions) == ["batch", "batch"]

    class Short(Scripted):
        def answer_many(self, questions):
            return ["only one"]

    with pytest.raises(RuntimeError, match="1 answers for 2 questions"):
        answer_all(Short(), questions)


def test_load_saved_model_from_gcs(tiny_llava, images: list[str], tmp_path: Path, gcs_emulator: str) -> None:
    model, processor = tiny_llava
    local = tmp_path / "saved"
    model.save_pretrained(local)
    processor.save_pretrained(local)
    remote = storage.join(gcs_emulator, "models", "tiny-llava")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), storage.join(remote, str(path.relative_to(local))))
    loaded = HFLlavaAnswerer.load(remote, device="cpu", dtype="float32", max_new_tokens=4)
    expected = HFLlavaAnswerer(model, processor, max_new_tokens=4).answer(images[:1], "What is it?")
    assert loaded.answer(images[:1], "What is it?") == expected  # same weights, same greedy answer


def test_local_model_dir(tmp_path: Path, gcs_emulator: str) -> None:
    with local_model_dir("llava-hf/llava-1.5-7b-hf") as name:  # hub names and folders pass through
        assert name == "llava-hf/llava-1.5-7b-hf"
    with (
        pytest.raises(FileNotFoundError, match="no model files"),
        local_model_dir(f"{gcs_emulator}/models/none"),
    ):
        pass
