from __future__ import annotations

import dataclasses
from collections import Counter

from synthvlm.llava_format import brief_instructions
from synthvlm.llm import LLMResult
from synthvlm.records import Record
from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.dialogues import (
    BAD_OPTIONS,
    LLM_REJECTED,
    NO_ANSWER_KEYWORDS,
    RELATION_QUESTIONS,
    REPLY_SCHEMAS,
    TASKS,
    TOO_FEW_TURNS,
    CaptionReply,
    Dialogue,
    EitherOrEvalReply,
    EvalReply,
    MultiTurnReply,
    QAReply,
    Turn,
    YesNoEvalReply,
    interleaved_dialogues,
    job_request,
    plan_jobs,
    reply_schema,
    to_dialogue,
)
from synthvlm.stablellava.filters import (
    ANSWER_TOO_LONG,
    DIALOGUE_TOO_LONG,
    STRAY_IMAGE_MARKER,
    LengthLimit,
)

LIMIT = LengthLimit()

REGISTRY = load_registry()


def record(record_id: str, **provenance) -> Record:
    raw = provenance.pop("raw", "((teal bicycle)), brick wall, 8k")
    return Record(
        id=record_id,
        caption=raw.replace("(", "").replace(")", ""),
        provenance={"ability": "colour", "raw_prompt": raw, "kind": "single", "split": "train", **provenance},
    )


def pair(pair_id: str, relation: str) -> list[Record]:
    return [
        record(f"{pair_id}-{m + 1}", kind="pair", pair_id=pair_id, relation=relation, member=m)
        for m in (1, 0)
    ]


def test_plan_covers_every_kind() -> None:
    records = [record(f"c{i}") for i in range(40)] + [record("e0", split="eval")] + pair("p0", "difference")
    jobs = plan_jobs(records, multi_turn_fraction=0.5, seed=0)
    kinds = Counter(j.kind for j in jobs)
    assert kinds["caption"] == kinds["qa"] == 40
    assert 10 < kinds["multi_turn"] < 30  # about half
    assert kinds["eval"] == 1 and kinds["multi_image"] == 1
    multi = next(j for j in jobs if j.kind == "multi_image")
    assert [r.id for r in multi.records] == ["p0-1", "p0-2"]  # in member order
    assert multi.question in RELATION_QUESTIONS["difference"]
    caption = next(j for j in jobs if j.kind == "caption")
    assert caption.question in brief_instructions()  # predefined questions, v1 §4.2
    assert plan_jobs(records, 0.5, seed=0) == jobs


def test_question_types_vary() -> None:
    jobs = plan_jobs([record(f"c{i}") for i in range(60)], multi_turn_fraction=0.0, seed=3)
    types = Counter(j.question_type for j in jobs if j.kind == "qa")
    assert set(types) == {"yes_no", "wh", "either_or"}
    assert min(types.values()) >= 10


def test_requests_use_the_bracketed_prompt_and_the_kind_schema() -> None:
    records = [record("c0"), record("e0", split="eval")] + pair("p0", "similarity")
    for job in plan_jobs(records, multi_turn_fraction=1.0, seed=0):
        request = job_request(job, REGISTRY, LIMIT, turns=3, seed=0)
        text = request.messages[-1]["content"]
        assert request.task == TASKS[job.kind] and request.schema is reply_schema(job.kind, job.question_type)
        assert "((teal bicycle))" in text and "whole conversation" in text and "500 characters" in text
        if job.kind != "eval":
            assert request.schema is REPLY_SCHEMAS[job.kind]


def test_eval_template_is_fig5() -> None:
    job = next(j for j in plan_jobs([record("e0", split="eval")], 0.0, 0) if j.kind == "eval")
    text = job_request(job, REGISTRY, LIMIT, 3, 0).messages[-1]["content"]
    field = {"wh": "answer_keywords", "yes_no": "yes_or_no", "either_or": "correct_option"}
    assert field[job.question_type] in text and REGISTRY["colour"].cautions in text


def finish(kind: str, reply, limit: LengthLimit = LIMIT, question_type: str | None = None):
    records = [record("c0"), record("e0", split="eval")]
    job = next(j for j in plan_jobs(records, 1.0, 0) if j.kind == kind)
    if question_type is not None:
        job = dataclasses.replace(job, question_type=question_type)
    return to_dialogue(job, LLMResult(id=job.id, parsed=reply), limit, {"llm": {"backend": "test"}})


def test_reply_becomes_dialogue() -> None:
    dialogue = finish("caption", CaptionReply(description=" A teal bicycle by a wall. "))
    assert isinstance(dialogue, Dialogue)
    assert dialogue.turns[0].answer == "A teal bicycle by a wall."
    assert dialogue.turns[0].question in brief_instructions()
    assert dialogue.record_ids == ["c0"] and dialogue.provenance["llm"] == {"backend": "test"}


def test_dialogues_over_500_characters_are_rejected_per_dialogue_by_default() -> None:
    # v2 §4.4 "we also limit dialogues to 500 characters": questions and answers of a dialogue together.
    assert isinstance(finish("qa", QAReply(question="What colour?", answer="t" * 488)), Dialogue)
    long = finish("qa", QAReply(question="What colour?", answer="t" * 489))
    assert long.reason == DIALOGUE_TOO_LONG and "501 characters" in long.detail
    turns = [Turn(question="q", answer="a" * 200), Turn(question="q2", answer="b" * 300)]
    assert finish("multi_turn", MultiTurnReply(turns=turns)).reason == DIALOGUE_TOO_LONG
    # per: answer, the looser reading: each answer on its own.
    per_answer = LengthLimit(per="answer")
    assert isinstance(finish("multi_turn", MultiTurnReply(turns=turns), per_answer), Dialogue)
    turns[1] = Turn(question="q2", answer="b" * 501)
    assert finish("multi_turn", MultiTurnReply(turns=turns), per_answer).reason == ANSWER_TOO_LONG


def test_other_rejections() -> None:
    assert (
        finish("multi_turn", MultiTurnReply(turns=[Turn(question="q", answer="a")])).reason == TOO_FEW_TURNS
    )
    assert finish("qa", QAReply(question=" ", answer="a")).reason == "empty question or answer"
    no_keywords = EvalReply(question="What colour?", answer="Teal.", answer_keywords=["(( ))"])
    assert finish("eval", no_keywords).reason == NO_ANSWER_KEYWORDS
    job = plan_jobs([record("c0")], 0.0, 0)[0]
    failed = to_dialogue(job, LLMResult(id=job.id, reject_kind="truncated", reason="cut off"), LIMIT, {})
    assert failed.reason == LLM_REJECTED and "truncated" in failed.detail


def test_eval_keywords_are_cleaned() -> None:
    reply = EvalReply(
        question="What colour?", answer="Teal.", answer_keywords=["((teal))", "teal", "blue-green"]
    )
    dialogue = finish("eval", reply)
    assert dialogue.answer_keywords == ["teal", "blue-green"]
    assert dialogue.kind == "eval" and dialogue.question_type in ("yes_no", "wh", "either_or")


def test_eval_replies_by_question_type() -> None:
    yes_no = finish(
        "eval", YesNoEvalReply(question="Is it teal?", answer="No.", yes_or_no="no"), question_type="yes_no"
    )
    assert yes_no.answer_keywords == ["no"] and yes_no.choices is None
    reply = EitherOrEvalReply(
        question="Is the bicycle red or teal?",
        answer="Teal.",
        options=["red", "((teal))"],
        correct_option="Teal",
    )
    either = finish("eval", reply, question_type="either_or")
    assert either.choices == ["red", "teal"] and either.answer_keywords == ["teal"]
    for options, correct in ((["red"], "red"), (["red", "teal"], "blue"), (["red", "green"], "red")):
        bad = EitherOrEvalReply(
            question="Is the bicycle red or teal?", answer="x", options=options, correct_option=correct
        )
        assert finish("eval", bad, question_type="either_or").reason == BAD_OPTIONS


def test_llm_written_image_markers_are_rejected() -> None:
    assert (
        finish("qa", QAReply(question="What is in <image>?", answer="A bike.")).reason == STRAY_IMAGE_MARKER
    )


def interleaved_records(images: int = 2, **head) -> list[Record]:
    turns = [
        {"question": "How do I make tea? <image>", "answer": "Boil water."},
        {"question": "Done. Next? <image>", "answer": "Add the leaves."},
    ]
    return [
        Record(
            id=f"interleaved-00000-{i + 1}",
            caption=f"step {i + 1}",
            provenance={
                "ability": "interleaved",
                "kind": "interleaved",
                "split": "train",
                "dialogue_id": "interleaved-00000",
                "image_index": i,
                "images": images,
                "turn": i,
                **({"turns": turns, "phrase": "make tea", **head} if i == 0 else {}),
            },
        )
        for i in range(2)
    ]


def test_interleaved_dialogues_come_from_the_prompt_records() -> None:
    records = interleaved_records()
    assert plan_jobs(records, 1.0, 0) == []  # nothing to ask: the prompts stage wrote them
    [(dialogue_id, dialogue)] = interleaved_dialogues(records, LIMIT, {})
    assert isinstance(dialogue, Dialogue) and dialogue.kind == "interleaved"
    assert dialogue.record_ids == ["interleaved-00000-1", "interleaved-00000-2"] and dialogue.image_turns == [
        0,
        1,
    ]
    [(_, short)] = interleaved_dialogues(records, LengthLimit(max_chars=40), {})
    assert short.reason == DIALOGUE_TOO_LONG
    [(_, missing)] = interleaved_dialogues(interleaved_records(images=3), LIMIT, {})
    assert "2 of 3 image records" in missing.detail
