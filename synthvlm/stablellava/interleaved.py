"""Interleaved multi-turn dialogues (v2 §4.2, Appendix C, Fig. 8): one person teaches another a task step by
step; the learner shows a new picture in the turns that need one.

The LLM writes the whole conversation from a phrase ("make a sandwich"); each picture is written inline in
the learner's turn as an SD prompt enclosed in 《》 (Fig. 8: "The picture content provided is enclosed in
《》"). The prompts stage turns each picture into an image record (its prompt is what the image model
gets), and the picture's text in the turn becomes an `<image>` marker at the same place (App. C: "the
content within the brackets will be replaced with an image_placeholder"). So a later turn brings a new
image with its own `<image>`, where it appears.

Checks (`parse_reply`), each a reject reason: every 《》 is closed, non-empty and in a human turn; at most
`max_images_per_turn` per turn (Fig. 8: "In each step, there should be one picture content"); the first
turn shows a picture (the task starts from what the learner has); at least `min_images` pictures in all
(else it is not interleaved); no literal `<image>` written by the LLM (a marker without an image). The
dialogue length limit (v2 §4.4) and the image prompt filters are applied by the caller.

Phrases: v2 App. C generates "a series of non-repeating phases" with ChatGPT, "primarily on instructional
content related to the use of everyday objects and recipes". Our choice: a bundled list of such tasks
(`DEFAULT_PHRASES`, or the config's own), each used once per run in a seeded order, so phrases never repeat.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from synthvlm.config import StageConfig
from synthvlm.llm import LLMRequest
from synthvlm.stablellava.filters import IMAGE_MARKER, STRAY_IMAGE_MARKER, LengthLimit, Verdict
from synthvlm.stablellava.prompts import input_block

TASK_INTERLEAVED = "stablellava.interleaved"
ABILITY = "interleaved"  # the `ability` of interleaved records and dialogues (not one of the 13 abilities)
OPEN, CLOSE = "《", "》"

# Reject reasons.
UNBALANCED_PICTURE = "picture brackets unbalanced"
EMPTY_PICTURE = "empty picture"
PICTURE_IN_ANSWER = "picture in an answer"
TOO_MANY_PICTURES_IN_TURN = "too many pictures in a turn"
FIRST_TURN_WITHOUT_PICTURE = "first turn shows no picture"
TOO_FEW_PICTURES = "too few pictures"
TOO_FEW_TURNS = "too few turns"

_PICTURE = re.compile(f"{OPEN}(.*?){CLOSE}", re.S)

# Our choice (v2 App. C: "instructional content related to the use of everyday objects and recipes").
DEFAULT_PHRASES: tuple[str, ...] = (
    "make a sandwich",
    "tie a necktie",
    "brew Turkish coffee",
    "bake chocolate chip cookies",
    "plant a tomato seedling in a pot",
    "change a bicycle tire",
    "fold a paper airplane",
    "make a fruit salad",
    "set a dinner table",
    "wrap a gift box",
    "make pancakes",
    "repot a houseplant",
    "clean a frying pan",
    "assemble a bookshelf",
    "make a cup of green tea",
    "decorate a cupcake",
    "sew on a button",
    "make a vegetable stir-fry",
    "hang a picture frame",
    "make a smoothie",
    "pitch a camping tent",
    "make sushi rolls",
    "braid hair",
    "build a snowman",
    "carve a pumpkin",
    "make a pizza",
    "paint a wooden chair",
    "make guacamole",
    "iron a shirt",
    "make a paper lantern",
)

# v2 Fig. 8's example, shortened to our output format (the figure's text, pictures in 《》).
FIG8_EXAMPLE = (
    "Phrase: make a sandwich\n"
    '{"turns": ['
    '{"question": "Can you guide me on making a sandwich? Here is my kitchen counter 《((kitchen counter)), '
    'bread, lettuce, tomatoes, deli meat, knife, cutting board》", '
    '"answer": "Great! First, take two slices of bread from the bag."}, '
    '{"question": "I have the bread slices. What next? 《((bread slices)) on a cutting board, lettuce, '
    'tomatoes》", "answer": "Add lettuce and tomatoes, then a layer of deli meat."}, '
    '{"question": "Done! What is the final step? 《((sandwich)) with layers of ingredients, '
    'cutting board》", '
    '"answer": "Put the second slice on top. Enjoy your meal!"}]}'
)


class InterleavedConfig(StageConfig):
    """Interleaved multi-turn dialogues (v2 §4.2, App. C Fig. 8), asked in the prompts stage because their
    pictures are the images to generate."""

    # v2 §5.1 puts multi-image and multi-turn data together in 3K second-stage instances; our split: as
    # many interleaved dialogues as pairs per relation (None), i.e. 1K by default.
    dialogues: int | None = Field(None, ge=0)
    images: int = Field(3, ge=2)  # v2 Fig. 8's example has 4 pictures; ours: 3 (fits the length limit)
    min_images: int = Field(2, ge=2)  # our choice: fewer than 2 pictures is not interleaved
    max_images_per_turn: int = Field(1, ge=1)  # v2 App. C Fig. 8: "In each step, there should be one picture"
    phrases: list[str] | None = None  # v2 App. C phrases; None = DEFAULT_PHRASES (our choice)
    length: LengthLimit = Field(default_factory=LengthLimit)  # v2 §4.4, per dialogue (filters.LengthLimit)


class InterleavedTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    answer: str


class InterleavedReply(BaseModel):
    """The LLM's conversation: the learner's turns (`question`) carry the pictures in 《》."""

    turns: list[InterleavedTurn]


@dataclass(frozen=True)
class ParsedDialogue:
    """A checked interleaved dialogue: turns with `<image>` markers and the pictures' SD prompts in order."""

    turns: tuple[tuple[str, str], ...]  # (question with <image> markers, answer)
    pictures: tuple[str, ...]  # SD prompts, in marker order
    picture_turns: tuple[int, ...]  # the turn that shows each picture


def phrases_for(config: InterleavedConfig, count: int, seed: int) -> list[str]:
    """`count` distinct phrases in a seeded order (never more than there are: phrases do not repeat)."""
    pool = list(dict.fromkeys(p.strip() for p in (config.phrases or DEFAULT_PHRASES) if p.strip()))
    random.Random(f"{seed}/interleaved").shuffle(pool)
    return pool[:count]


def request_text(phrase: str, images: int, length: LengthLimit, max_keywords: int) -> str:
    """v2 Fig. 8, "ChatGPT for Interleaved multi-turn dialogues Generation", with our output format."""
    return (
        "As an AI visual assistant, your task is to construct a multi-turn conversation in which one person "
        "teaches another person to do something step by step according to the given phrase. Then the "
        "person being taught needs to provide a current picture and then ask the other person. The picture "
        f"content provided is enclosed in {OPEN}{CLOSE}: inside is the content description of this image. "
        "In each step, there should be one picture content.\n\n"
        "#Requirements for outputs\n"
        f'Reply with a JSON object {{"turns": [{{"question": "...", "answer": "..."}}, ...]}} with {images} '
        "turns; `question` is what the person being taught says, `answer` what the teacher says. Each "
        f"question shows exactly one picture, written inside {OPEN}{CLOSE} at the place the picture is "
        "shown, as a prompt for a text-to-image model: keywords separated by commas, the most important "
        f"one first and double-bracketed, at most {max_keywords} keywords, only what can be seen. Answers "
        f"never contain {OPEN}{CLOSE}. Not counting the pictures, {length.describe()}.\n\n"
        f"#Examples\nIllustrated outputs are shown below:\n{FIG8_EXAMPLE}\n\n"
        + input_block(phrase=phrase, turns=images)
    )


def interleaved_request(
    request_id: str, phrase: str, config: InterleavedConfig, max_keywords: int, seed: int
) -> LLMRequest:
    text = request_text(phrase, config.images, config.length, max_keywords)
    return LLMRequest.from_prompt(request_id, text, schema=InterleavedReply, seed=seed, task=TASK_INTERLEAVED)


def parse_reply(reply: InterleavedReply, config: InterleavedConfig) -> ParsedDialogue | Verdict:
    """The pictures out of the turns, `<image>` in their place; or the verdict that drops the dialogue."""
    turns: list[tuple[str, str]] = []
    pictures: list[str] = []
    picture_turns: list[int] = []
    for index, turn in enumerate(reply.turns):
        question, answer = turn.question.strip(), turn.answer.strip()
        if not question or not answer:
            return Verdict("empty question or answer", f"turn {index} has an empty question or answer")
        if IMAGE_MARKER in question or IMAGE_MARKER in answer:
            return Verdict(STRAY_IMAGE_MARKER, f"turn {index} writes {IMAGE_MARKER} itself")
        if OPEN in answer or CLOSE in answer:
            return Verdict(PICTURE_IN_ANSWER, f"the answer of turn {index} shows a picture")
        found = _PICTURE.findall(question)
        rest = _PICTURE.sub("", question)
        if OPEN in rest or CLOSE in rest:
            return Verdict(UNBALANCED_PICTURE, f"turn {index}: an unclosed {OPEN} or a stray {CLOSE}")
        if any(not " ".join(p.split()) for p in found):
            return Verdict(EMPTY_PICTURE, f"turn {index} has an empty {OPEN}{CLOSE}")
        if len(found) > config.max_images_per_turn:
            detail = f"turn {index} shows {len(found)} pictures > {config.max_images_per_turn}"
            return Verdict(TOO_MANY_PICTURES_IN_TURN, detail)
        if index == 0 and not found:
            return Verdict(FIRST_TURN_WITHOUT_PICTURE, "the conversation starts without a picture")
        marked = _PICTURE.sub(f" {IMAGE_MARKER} ", question)
        turns.append((" ".join(marked.split()), answer))
        pictures.extend(" ".join(p.split()) for p in found)
        picture_turns.extend([index] * len(found))
    if len(turns) < 2:
        return Verdict(TOO_FEW_TURNS, f"{len(turns)} turn(s); an interleaved dialogue needs at least 2")
    if len(pictures) < config.min_images:
        return Verdict(TOO_FEW_PICTURES, f"{len(pictures)} picture(s) < {config.min_images}")
    return ParsedDialogue(tuple(turns), tuple(pictures), tuple(picture_turns))


def marker_counts(questions: Sequence[str]) -> list[int]:
    """`<image>` markers per question."""
    return [q.count(IMAGE_MARKER) for q in questions]
