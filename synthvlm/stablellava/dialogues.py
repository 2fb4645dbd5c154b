"""Dialogues written by the LLM from the same SD prompt that made the image (v2 §4.2, v1 §4.2, §5.2).

Kinds, each with its own template and pydantic reply schema (structured output):
- caption: a brief description for pretraining (v1 Fig. 4 "ChatGPT for Dialogue Generation"); the question
  is one of LLaVA's predefined brief-description instructions, and the LLM writes only the answer
  (v1 §4.2: "we prepare a set of image description questions ... and only instruct ChatGPT to generate
  the answers");
- qa: one question about the double-bracketed keywords with an answer; the question type (yes/no, wh-,
  either-or: v1 Fig. 5) is assigned per record so the types are balanced;
- multi_turn: a conversation of several rounds about one image (v2 §4.2 "multi-turn dialogues");
- multi_image: one caption about the similarity / difference / logical relation of a pair of prompts
  (v2 Fig. 7), asked with a predefined question per relation;
- eval: the evaluation question-answer template (v1 Fig. 5) with answers as keywords (v1 §5.2); the reply
  schema follows the question type, so that each item can be scored by its kind: keywords for a
  wh-question, "yes"/"no" for a yes/no question, the two options and the right one for an either-or one;
- interleaved: a multi-turn, multi-image dialogue whose later turns bring new images (v2 App. C); the LLM
  writes it in the prompts stage (interleaved.py), because its pictures are the images to generate, and
  `interleaved_dialogue` reads it back from the prompt records.

The length limit (filters.LengthLimit, v2 §4.4: 500 characters per dialogue by default) rejects longer
dialogues with a reason; they are never cut (a cut answer is a wrong answer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from synthvlm.llava_format import brief_instruction
from synthvlm.llm import LLMRequest, LLMResult
from synthvlm.records import Record
from synthvlm.stablellava.abilities import QUESTION_TYPES, Ability, QuestionType
from synthvlm.stablellava.emphasis import contains_phrase, keyword_text, normalize
from synthvlm.stablellava.filters import (
    IMAGE_MARKER,
    STRAY_IMAGE_MARKER,
    LengthLimit,
    Verdict,
    length_problem,
)
from synthvlm.stablellava.prompts import PAIR_EXAMPLES, input_block

DialogueKind = Literal["caption", "qa", "multi_turn", "multi_image", "eval", "interleaved"]
TRAIN_KINDS: tuple[DialogueKind, ...] = ("caption", "qa", "multi_turn", "multi_image", "interleaved")
TASKS: dict[str, str] = {
    "caption": "stablellava.caption",
    "qa": "stablellava.qa",
    "multi_turn": "stablellava.multi_turn",
    "multi_image": "stablellava.multi_image",
    "eval": "stablellava.eval_qa",
}

LLM_REJECTED = "llm rejected"
EMPTY_DIALOGUE = "empty question or answer"
TOO_FEW_TURNS = "too few turns"
NO_ANSWER_KEYWORDS = "no answer keywords"
BAD_OPTIONS = "either-or options unusable"
MISSING_INTERLEAVED = "interleaved dialogue incomplete"

QUESTION_TYPE_TEXT: dict[str, str] = {
    "yes_no": "a yes/no question (the answer starts with Yes or No)",
    "wh": "a wh-question (what, which, where, who or how)",
    "either_or": "an either-or question that offers two options, exactly one of them right",
}

# Our own predefined questions per relation (the multi-image analogue of LLaVA's brief instructions).
RELATION_QUESTIONS: dict[str, tuple[str, ...]] = {
    "similarity": (
        "What do these two images have in common?",
        "Describe the similarities between the two images.",
        "How are the two pictures alike?",
    ),
    "difference": (
        "What is the difference between the two images?",
        "Describe how the two images differ.",
        "What changes from the first image to the second?",
    ),
    "logical": (
        "How are the two images related?",
        "What is the logical connection between the first and the second image?",
        "Explain how the second image follows from the first.",
    ),
}


# ---- LLM reply schemas (no length constraints here: too-long answers are rejected with a reason) -----


class CaptionReply(BaseModel):
    description: str


class QAReply(BaseModel):
    question: str
    answer: str


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str
    answer: str


class MultiTurnReply(BaseModel):
    turns: list[Turn]


class MultiImageReply(BaseModel):
    caption: str


class EvalReply(BaseModel):
    """A wh-question eval item: scored by keyword match (v1 §5.2)."""

    question: str
    answer: str
    answer_keywords: list[str]


class YesNoEvalReply(BaseModel):
    """A yes/no eval item: scored by the parsed yes/no (POPE style)."""

    question: str
    answer: str
    yes_or_no: Literal["yes", "no"]


class EitherOrEvalReply(BaseModel):
    """An either-or eval item: the two options the question offers and the right one (a 2-way choice)."""

    question: str
    answer: str
    options: list[str]
    correct_option: str


REPLY_SCHEMAS: dict[str, type[BaseModel]] = {
    "caption": CaptionReply,
    "qa": QAReply,
    "multi_turn": MultiTurnReply,
    "multi_image": MultiImageReply,
    "eval": EvalReply,
}
EVAL_SCHEMAS: dict[str, type[BaseModel]] = {
    "wh": EvalReply,
    "yes_no": YesNoEvalReply,
    "either_or": EitherOrEvalReply,
}


def reply_schema(kind: str, question_type: str | None) -> type[BaseModel]:
    if kind == "eval":
        return EVAL_SCHEMAS[str(question_type)]
    return REPLY_SCHEMAS[kind]


# ---- the dialogue records the stage writes ----------------------------------------------------------


class Dialogue(BaseModel):
    """One dialogue about its images, as written to dialogues.jsonl.

    `image_turns` (interleaved dialogues): the turn that shows each image, in `record_ids` order; those
    turns' questions hold one `<image>` per image at its place. None: every image belongs to the first turn
    and the questions hold no marker (the exporter puts them first, LLaVA's layout).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: DialogueKind
    record_ids: list[str] = Field(min_length=1)  # prompt records, i.e. images, in order
    ability: str
    turns: list[Turn] = Field(min_length=1)
    image_turns: list[int] | None = None
    question_type: QuestionType | None = None
    relation: str | None = None
    answer_keywords: list[str] = Field(default_factory=list)  # eval only: the reference answers (v1 §5.2)
    choices: list[str] | None = None  # eval either-or only: the two options
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _markers_match_images(self) -> Dialogue:
        markers = [t.question.count(IMAGE_MARKER) + t.answer.count(IMAGE_MARKER) for t in self.turns]
        if self.image_turns is None:
            if any(markers):
                raise ValueError(f"{IMAGE_MARKER} in a turn of a dialogue without image_turns")
            return self
        if len(self.image_turns) != len(self.record_ids):
            raise ValueError("image_turns needs one turn index per image")
        expected = [self.image_turns.count(i) for i in range(len(self.turns))]
        if markers != expected or any(IMAGE_MARKER in t.answer for t in self.turns):
            raise ValueError(f"{IMAGE_MARKER} markers per turn {markers} do not match image_turns {expected}")
        return self


@dataclass(frozen=True)
class DialogueJob:
    """One dialogue to ask for: its kind, images (records) and the per-item choices made up front."""

    id: str
    kind: DialogueKind
    records: tuple[Record, ...]
    ability: str
    question_type: QuestionType | None = None
    relation: str | None = None
    question: str | None = None  # predefined question (caption, multi_image)


def stable_index(n: int, *keys: object) -> int:
    """A deterministic index in range(n) from the keys (sha256; the same in every process)."""
    digest = hashlib.sha256("\x1f".join(map(str, keys)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def raw_prompt(record: Record) -> str:
    """The bracketed SD prompt of a prompt record (provenance), else its caption."""
    return str(record.provenance.get("raw_prompt") or record.caption)


def plan_jobs(records: Sequence[Record], multi_turn_fraction: float, seed: int) -> list[DialogueJob]:
    """Which dialogues to ask for, from the prompt records' provenance (split, kind, pair, relation)."""
    jobs: list[DialogueJob] = []
    pairs: dict[str, list[Record]] = {}
    for record in records:
        prov = record.provenance
        ability = str(prov.get("ability", ""))
        if prov.get("kind") == "interleaved":
            continue  # written with its images in the prompts stage: interleaved_dialogues()
        if prov.get("kind") == "pair":
            pairs.setdefault(str(prov["pair_id"]), []).append(record)
        elif prov.get("split") == "eval":
            qtype = QUESTION_TYPES[stable_index(len(QUESTION_TYPES), seed, record.id, "eval")]
            jobs.append(DialogueJob(f"{record.id}-eval", "eval", (record,), ability, question_type=qtype))
        else:
            jobs.extend(_single_jobs(record, ability, multi_turn_fraction, seed))
    for pair_id, members in pairs.items():
        members.sort(key=lambda r: int(r.provenance.get("member", 0)))
        relation = str(members[0].provenance["relation"])
        question = RELATION_QUESTIONS[relation][
            stable_index(len(RELATION_QUESTIONS[relation]), seed, pair_id)
        ]
        jobs.append(
            DialogueJob(
                f"{pair_id}-multi_image",
                "multi_image",
                tuple(members),
                str(members[0].provenance.get("ability", "")),
                relation=relation,
                question=question,
            )
        )
    return jobs


def _single_jobs(record: Record, ability: str, multi_turn_fraction: float, seed: int) -> list[DialogueJob]:
    qtype = QUESTION_TYPES[stable_index(len(QUESTION_TYPES), seed, record.id, "qa")]
    jobs = [
        DialogueJob(
            f"{record.id}-caption", "caption", (record,), ability, question=brief_instruction(record.id, seed)
        ),
        DialogueJob(f"{record.id}-qa", "qa", (record,), ability, question_type=qtype),
    ]
    if stable_index(10_000, seed, record.id, "multi_turn") < multi_turn_fraction * 10_000:
        jobs.append(DialogueJob(f"{record.id}-multi_turn", "multi_turn", (record,), ability))
    return jobs


# ---- request texts -----------------------------------------------------------------------------------


def _focus(ability: Ability) -> str:
    return f" {ability.dialogue_focus}" if ability.dialogue_focus else ""


def caption_text(ability: Ability, prompt: str, length: LengthLimit) -> str:
    """v1 Fig. 4 (down), "ChatGPT for Dialogue Generation"."""
    example = ability.dialogue_examples[0]
    return (
        "As an AI visual assistant specializing in caption generation, your task is to generate captions "
        "based on the images generated by text-to-image generation models. These models are based on "
        "prompts, which consists of keywords separated by commas, optionally encompassing a wide range of "
        f"terms, such as {ability.label}, scenes, visual features.\n\n"
        "You need to provide a brief caption of the image based on given prompt I provided to you. Upon "
        "receiving the prompts, your objective is to generate description focusing on the "
        f"{ability.label} keywords enclosed in the double brackets and should not talk nonsense."
        f"{_focus(ability)}\n\n"
        f'#Requirements for outputs\nReply with a JSON object {{"description": "..."}}: one or two '
        f"sentences about what the image shows; {length.describe()}.\n\n"
        f"#Examples\nIllustrated outputs are shown below:\nPrompt: {example.prompt}\n"
        f"Description: {example.caption}\n\n" + input_block(ability=ability.name, prompt=prompt)
    )


def qa_text(ability: Ability, prompt: str, question_type: str, length: LengthLimit) -> str:
    """A single-image question-answer pair (v2 Fig. 4 right, with v1 Fig. 5's question types)."""
    examples = "\n".join(
        f"Prompt: {e.prompt}\nQuestion ({e.question_type}): {e.question}\nResponse: {e.answer}"
        for e in ability.dialogue_examples
    )
    return (
        "As an AI visual assistant, your task is to design a question-answer pair about an image generated "
        "by a text-to-image generation model. These models are based on prompts, which consist of keywords "
        f"separated by commas, optionally encompassing a wide range of terms, such as {ability.label}, "
        "scenes, and visual features.\n\n"
        "#Requirements for dialogue generation\nUpon receiving the prompt, ask about the "
        f"{ability.label} keywords enclosed in double brackets with {QUESTION_TYPE_TEXT[question_type]}. "
        "Your question should not be ambiguous, and the response should demonstrate confidence and "
        "precision, as if you were looking at the image; do not mention the prompt and do not talk "
        f"nonsense.{_focus(ability)}\n\n"
        f'#Requirements for outputs\nReply with a JSON object {{"question": "...", "answer": "..."}}; '
        f"{length.describe()}.\n\n"
        f"#Examples\nIllustrated outputs are shown below:\n{examples}\n\n"
        + input_block(ability=ability.name, prompt=prompt, question_type=question_type)
    )


def multi_turn_text(ability: Ability, prompt: str, turns: int, length: LengthLimit) -> str:
    """A multi-turn conversation about one image (v2 §4.2)."""
    example = ability.dialogue_examples[0]
    return (
        f"As an AI visual assistant, your task is to construct a conversation of {turns} rounds between "
        "a person asking about an image and an assistant that can see it. The image was generated by a "
        "text-to-image model from the prompt below, whose most important keywords are enclosed in double "
        f"brackets; the conversation focuses on the {ability.label} in the image. Vary the question types "
        "(yes/no, wh- and either-or questions); later questions may build on earlier answers. Questions "
        "should not be ambiguous; answers are confident and precise, as if looking at the image, and do "
        f"not mention the prompt.{_focus(ability)}\n\n"
        '#Requirements for outputs\nReply with a JSON object {"turns": [{"question": "...", "answer": '
        f'"..."}}, ...]}} with {turns} turns; {length.describe()}.\n\n'
        f"#Examples\nPrompt: {example.prompt}\nQuestion: {example.question}\nResponse: {example.answer}\n"
        f"Question: Can you describe the image briefly?\nResponse: {example.caption}\n\n"
        + input_block(ability=ability.name, prompt=prompt, turns=turns)
    )


def multi_image_text(relation: str, prompt_1: str, prompt_2: str, length: LengthLimit) -> str:
    """v2 Fig. 7 (bottom), "ChatGPT for Multi-image Generation", for one relation."""
    examples = "\n".join(
        f"Prompt 1: {e.prompt_1}\nPrompt 2: {e.prompt_2}\nCaption: {e.caption}"
        for e in PAIR_EXAMPLES[relation]
    )
    relation_words = {"logical": "logical relation"}.get(relation, relation)
    return (
        f"As an AI visual assistant, your responsibility is to create one caption about {relation_words} of "
        "the given paired prompt for a text-to-image generator. You are required to describe the "
        f"{relation_words} between the two images based on the paired prompt. The caption should start "
        "from the specific content of the image, rather than simply listing a few keywords. Refer to the "
        "images as the first and the second image; do not mention the prompts.\n\n"
        f'#Requirements for outputs\nReply with a JSON object {{"caption": "..."}}; {length.describe()}.'
        f"\n\n#Examples\nIllustrated outputs are shown below:\n{examples}\n\n"
        + input_block(relation=relation, prompt_1=prompt_1, prompt_2=prompt_2)
    )


EVAL_OUTPUTS: dict[str, str] = {
    "wh": (
        'Reply with a JSON object {"question": "...", "answer": "...", "answer_keywords": ["..."]}. '
        "answer_keywords are the short keywords a correct answer must contain; when several answers are "
        "correct, list each of them."
    ),
    "yes_no": (
        'Reply with a JSON object {"question": "...", "answer": "...", "yes_or_no": "yes" or "no"}; '
        "yes_or_no is the right answer to the question."
    ),
    "either_or": (
        'Reply with a JSON object {"question": "...", "answer": "...", "options": ["...", "..."], '
        '"correct_option": "..."}: options are the two options the question offers, word for word as in '
        "the question, and correct_option is the right one of them."
    ),
}


def eval_text(ability: Ability, prompt: str, question_type: str, length: LengthLimit) -> str:
    """v1 Fig. 5, "ChatGPT for Evaluation Benchmark Generation", with answers a scorer can check: keywords
    (v1 §5.2), the yes/no answer or the right option, by question type."""
    example = ability.eval_examples[0]
    return (
        "As an AI visual assistant, your task is to design question-answer pair based on the images "
        "generated by text-to-image generation models. These models are based on prompts, which consist "
        "of keywords separated by commas, optionally encompassing a wide range of terms, such as "
        f"{ability.label}, scenes, and visual features.\n\n"
        "#Requirements for dialogue generation\nNow, I need you to provide a question-answer of the given "
        "image based on the given prompts I provided to you. Upon receiving the prompts, your objective is "
        "to generate question-answer about the keywords enclosed in double brackets. Ask "
        f"{QUESTION_TYPE_TEXT[question_type]}. Your questions should not be ambiguous, and responses should "
        f"demonstrate confidence and precision. In your output, you only need to include {ability.label} "
        f"and should not talk nonsense. {ability.cautions}{_focus(ability)}\n\n"
        f"#Requirements for outputs\n{EVAL_OUTPUTS[question_type]} {length.describe()}.\n\n"
        f"#Examples\nIllustrated outputs are shown below:\nPrompt: {example.prompt}\n"
        f"Question: {example.question}\nResponse: {example.answer}\n"
        f"Answer keywords: {', '.join(example.answer_keywords)}\n\n"
        + input_block(ability=ability.name, prompt=prompt, question_type=question_type)
    )


def job_request(
    job: DialogueJob, abilities: Mapping[str, Ability], length: LengthLimit, turns: int, seed: int
) -> LLMRequest:
    ability = abilities[job.ability]
    prompt = raw_prompt(job.records[0])
    if job.kind == "caption":
        text = caption_text(ability, prompt, length)
    elif job.kind == "qa":
        text = qa_text(ability, prompt, str(job.question_type), length)
    elif job.kind == "multi_turn":
        text = multi_turn_text(ability, prompt, turns, length)
    elif job.kind == "multi_image":
        text = multi_image_text(str(job.relation), prompt, raw_prompt(job.records[1]), length)
    else:
        text = eval_text(ability, prompt, str(job.question_type), length)
    request_seed = stable_index(2**31, seed, job.id)
    schema = reply_schema(job.kind, job.question_type)
    return LLMRequest.from_prompt(job.id, text, schema=schema, seed=request_seed, task=TASKS[job.kind])


# ---- replies -> dialogues ----------------------------------------------------------------------------


def _turns(job: DialogueJob, reply: BaseModel) -> list[Turn]:
    if isinstance(reply, CaptionReply):
        return [Turn(question=str(job.question), answer=reply.description)]
    if isinstance(reply, MultiTurnReply):
        return list(reply.turns)
    if isinstance(reply, MultiImageReply):
        return [Turn(question=str(job.question), answer=reply.caption)]
    if isinstance(reply, QAReply | EvalReply | YesNoEvalReply | EitherOrEvalReply):
        return [Turn(question=reply.question, answer=reply.answer)]
    raise TypeError(f"unexpected reply type {type(reply).__name__}")


def _eval_references(reply: BaseModel, question: str) -> tuple[list[str], list[str] | None] | Verdict:
    """(reference answers, choices) of an eval reply, or the verdict that drops it."""
    if isinstance(reply, YesNoEvalReply):
        return [reply.yes_or_no], None
    if isinstance(reply, EitherOrEvalReply):
        options = [keyword_text(o) for o in reply.options]
        correct = keyword_text(reply.correct_option)
        folded = [normalize(o) for o in options]
        if len(options) != 2 or not all(options) or folded[0] == folded[1]:
            return Verdict(BAD_OPTIONS, f"options {reply.options!r}: two different options are needed")
        if normalize(correct) not in folded:
            return Verdict(BAD_OPTIONS, f"correct option {reply.correct_option!r} is not one of {options!r}")
        missing = [o for o in options if not contains_phrase(question, o)]
        if missing:
            return Verdict(BAD_OPTIONS, f"option(s) {missing!r} not in the question")
        return [options[folded.index(normalize(correct))]], options
    assert isinstance(reply, EvalReply)
    keywords = list(dict.fromkeys(k for k in map(keyword_text, reply.answer_keywords) if k))
    if not keywords:
        return Verdict(NO_ANSWER_KEYWORDS, "the eval item gives no answer keywords")
    return keywords, None


def _pairs(turns: list[Turn]) -> list[tuple[str, str]]:
    return [(t.question, t.answer) for t in turns]


def to_dialogue(
    job: DialogueJob, result: LLMResult, length: LengthLimit, provenance: Mapping[str, Any]
) -> Dialogue | Verdict:
    """The dialogue of an LLM result, or the verdict that drops it."""
    if not result.ok or result.parsed is None:
        return Verdict(LLM_REJECTED, f"{result.reject_kind}: {result.reason}")
    turns = [Turn(question=t.question.strip(), answer=t.answer.strip()) for t in _turns(job, result.parsed)]
    if not turns or any(not t.question or not t.answer for t in turns):
        return Verdict(EMPTY_DIALOGUE, "a question or an answer is empty")
    if any(IMAGE_MARKER in t.question or IMAGE_MARKER in t.answer for t in turns):
        return Verdict(STRAY_IMAGE_MARKER, f"the LLM wrote {IMAGE_MARKER} (a marker without an image)")
    if job.kind == "multi_turn" and len(turns) < 2:
        return Verdict(TOO_FEW_TURNS, f"{len(turns)} turn(s); a multi-turn dialogue needs at least 2")
    too_long = length_problem(_pairs(turns), length)
    if too_long:
        return too_long
    keywords: list[str] = []
    choices: list[str] | None = None
    if job.kind == "eval":
        references = _eval_references(result.parsed, turns[0].question)
        if isinstance(references, Verdict):
            return references
        keywords, choices = references
    return Dialogue(
        id=job.id,
        kind=job.kind,
        record_ids=[r.id for r in job.records],
        ability=job.ability,
        turns=turns,
        question_type=job.question_type,
        relation=job.relation,
        answer_keywords=keywords,
        choices=choices,
        provenance={**provenance, "request_id": result.id},
    )


def interleaved_dialogues(
    records: Sequence[Record], length: LengthLimit, provenance: Mapping[str, Any]
) -> list[tuple[str, Dialogue | Verdict]]:
    """The interleaved dialogues the prompts stage wrote into its records (v2 App. C), checked again with
    this stage's length limit: [(dialogue id, dialogue or verdict)]."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        if record.provenance.get("kind") == "interleaved":
            groups.setdefault(str(record.provenance["dialogue_id"]), []).append(record)
    out: list[tuple[str, Dialogue | Verdict]] = []
    for dialogue_id, members in groups.items():
        members.sort(key=lambda r: int(r.provenance["image_index"]))
        head = members[0].provenance
        turns = [Turn.model_validate(t) for t in head.get("turns") or []]
        image_turns = [int(r.provenance["turn"]) for r in members]
        if [int(r.provenance["image_index"]) for r in members] != list(range(int(head["images"]))):
            detail = f"{len(members)} of {head['images']} image records in the prompt manifest"
            out.append((dialogue_id, Verdict(MISSING_INTERLEAVED, detail)))
            continue
        verdict = length_problem(_pairs(turns), length)
        if verdict is not None:
            out.append((dialogue_id, verdict))
            continue
        out.append(
            (
                dialogue_id,
                Dialogue(
                    id=dialogue_id,
                    kind="interleaved",
                    record_ids=[r.id for r in members],
                    ability=str(head.get("ability", "interleaved")),
                    turns=turns,
                    image_turns=image_turns,
                    provenance={**provenance, "phrase": head.get("phrase"), "llm": head.get("llm")},
                ),
            )
        )
    return out
