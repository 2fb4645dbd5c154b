import pytest

from synthvlm.train.conversation import (
    ASSISTANT,
    USER,
    VICUNA_SYSTEM,
    Turn,
    generation_prompt,
    render,
    render_plain,
    render_vicuna_v1,
)
from synthvlm.train.model import build_tiny_llava

TURNS = (
    Turn(USER, "<image>\nWhat is it?"),
    Turn(ASSISTANT, "A cat."),
    Turn(USER, "Colour?"),
    Turn(ASSISTANT, "Black."),
)


def spans_text(rendered):
    return [rendered.text[a:b] for a, b in rendered.answer_spans]


def test_vicuna_v1_matches_llava_conv_template_and_marks_answers_with_eos():
    rendered = render_vicuna_v1(TURNS, eos_token="</s>")
    assert rendered.text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT: Black.</s>"
    )
    assert spans_text(rendered) == ["A cat.</s>", "Black.</s>"]


def test_plain_template_is_image_then_caption_and_newline():
    rendered = render_plain((Turn(USER, "<image>\nDescribe."), Turn(ASSISTANT, "A dog.")), num_images=1)
    assert rendered.text == "<image>A dog.\n"
    assert spans_text(rendered) == ["A dog.\n"]
    with pytest.raises(ValueError, match="exactly one user turn"):
        render("plain", TURNS, eos_token="</s>", num_images=1)


def test_generation_prompt_ends_where_the_answer_starts():
    prompt = generation_prompt(TURNS[:3])
    training_text = render_vicuna_v1(TURNS, eos_token="</s>").text
    assert (
        prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:"
    )
    assert training_text.startswith(prompt)
    with pytest.raises(ValueError):
        generation_prompt(TURNS)


def test_processor_chat_template_gives_the_same_prompt():
    _, processor = build_tiny_llava()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == generation_prompt([Turn(USER, "<image>\nWhat is it?")])
