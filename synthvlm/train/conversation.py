"""LLaVA's conversation templates as text plus the character spans the model is trained to produce.

Two templates, as LLaVA-1.5 trains with them:
- "plain" (stage 1): the human turn is replaced by the image placeholder(s) and the text is
  `<image>{caption}\\n`; the caption and the newline are the target.
- "vicuna_v1" (stage 2): `{system} USER: {question} ASSISTANT: {answer}</s>USER: ...`; every answer and
  its `</s>` are targets, everything else (system prompt, questions, role names) is context.

Rendering returns the answer spans in characters; data.py tokenizes the whole text once with offsets
and marks the tokens inside those spans, so the labels follow whatever tokenizer is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

IMAGE_TOKEN = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN
# LLaVA conv_vicuna_v1 system prompt.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "user", "assistant"
_VICUNA_ROLES = {USER: "USER", ASSISTANT: "ASSISTANT"}
# LLaVA data says "human"/"gpt"; a few converted sets say "user"/"assistant".
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}

Template = Literal["plain", "vicuna_v1"]


@dataclass(frozen=True)
class Turn:
    role: str  # USER or ASSISTANT
    text: str


@dataclass(frozen=True)
class Rendered:
    text: str
    answer_spans: tuple[tuple[int, int], ...]  # [start, end) character ranges of the targets


def render_plain(turns: Sequence[Turn], num_images: int) -> Rendered:
    """LLaVA's preprocess_plain: `<image>` x num_images + caption + newline; the caption is the target."""
    if len(turns) != 2 or turns[0].role != USER or turns[1].role != ASSISTANT:
        raise ValueError("the plain template needs exactly one user turn and one assistant turn")
    prefix = IMAGE_TOKEN * num_images
    answer = turns[1].text + "\n"
    return Rendered(prefix + answer, ((len(prefix), len(prefix) + len(answer)),))


def render_vicuna_v1(turns: Sequence[Turn], eos_token: str, system: str = VICUNA_SYSTEM) -> Rendered:
    """LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 eos); answers + eos are targets."""
    parts = [system, " "]
    length = len(system) + 1
    spans: list[tuple[int, int]] = []
    for turn in turns:
        head = f"{_VICUNA_ROLES[turn.role]}: "
        parts.append(head)
        length += len(head)
        if turn.role == USER:
            body = turn.text + " "
        else:
            body = turn.text + eos_token
            spans.append((length, length + len(body)))
        parts.append(body)
        length += len(body)
    return Rendered("".join(parts), tuple(spans))


def render(template: Template, turns: Sequence[Turn], *, eos_token: str, num_images: int) -> Rendered:
    if template == "plain":
        return render_plain(turns, num_images)
    if template == "vicuna_v1":
        return render_vicuna_v1(turns, eos_token)
    raise ValueError(f"unknown conversation template {template!r}")


def generation_prompt(
    turns: Sequence[Turn], template: Template = "vicuna_v1", *, eos_token: str = "</s>", num_images: int = 1
) -> str:
    """The prompt a trained model continues: the conversation so far, ending where the answer starts.

    `turns` ends with the user's question (earlier turns may include answers); `eos_token` is the
    tokenizer's end-of-sequence text, which closes every earlier answer as in training.
    """
    if not turns or turns[-1].role != USER:
        raise ValueError("a generation prompt ends with a user turn")
    if template == "plain":
        return IMAGE_TOKEN * num_images
    text = render_vicuna_v1(turns, eos_token=eos_token).text
    return text + f"{_VICUNA_ROLES[ASSISTANT]}:"
