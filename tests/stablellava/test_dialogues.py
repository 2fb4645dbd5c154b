from __future__ import annotations

from collections import Counter

from synthvlm.llava_format import brief_instructions
from synthvlm.llm import LLMResult
from synthvlm.records import Record
from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.dialogues import (
    LLM_REJECTED,
    NO_ANSWER_KEYWORDS,
    RELATION_QUESTIONS,
    REPLY_SCHEMAS,
    TASKS,
    TOO_FEW_TURNS,
    CaptionReply,
    Dialogue,
    EvalReply,
    MultiTurnReply,
    QAReply,
    Turn,
    job_request,
    plan_jobs,
    to_dialogue,
)
from synthvlm.stablellava.filters import ANSWER_TOO_LONG

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
        request = job_request(job, REGISTRY, max_chars=500, turns=3, seed=0)
        text = request.messages[-1]["content"]
        assert request.task == TASKS[job.kind] and request.schema is REPLY_SCHEMAS[job.kind]
        assert "((teal bicycle))" in text and "500 characters" in text


def test_eval_template_is_fig5() -> None:
    job = next(j for j in plan_jobs([record("e0", split="eval")], 0.0, 0) if j.kind == "eval")
    text = job_request(job, REGISTRY, 500, 3, 0).messages[-1]["content"]
    assert "yes/no" in text or "wh-question" in text or "either-or" in text
    assert "answer_keywords" in text and REGISTRY["colour"].cautions in text


def finish(kind: str, reply, **job_kwargs):
    records = [record("c0"), record("e0", split="eval")]
    job = next(j for j in plan_jobs(records, 1.0, 0) if j.kind == kind)
    return to_dialogue(job, LLMResult(id=job.id, parsed=reply), 500, {"llm": {"backend": "test"}})


def test_reply_becomes_dialogue() -> None:
    dialogue = finish("caption", CaptionReply(description=" A teal bicycle by a wall. "))
    assert isinstance(dialogue, Dialogue)
    assert dialogue.turns[0].answer == "A teal bicycle by a wall."
    assert dialogue.turns[0].question in brief_instructions()
    assert dialogue.record_ids == ["c0"] and dialogue.provenance["llm"] == {"backend": "test"}


def test_answers_over_500_characters_are_rejected() -> None:
    ok = finish("qa", QAReply(question="What colour?", answer="t" * 500))
    assert isinstance(ok, Dialogue)
    long = finish("qa", QAReply(question="What colour?", answer="t" * 501))
    assert long.reason == ANSWER_TOO_LONG
    turns = [Turn(question="q", answer="a"), Turn(question="q2", answer="b" * 600)]
    assert finish("multi_turn", MultiTurnReply(turns=turns)).reason == ANSWER_TOO_LONG


def test_other_rejections() -> None:
    assert (
        finish("multi_turn", MultiTurnReply(turns=[Turn(question="q", answer="a")])).reason == TOO_FEW_TURNS
    )
    assert finish("qa", QAReply(question=" ", answer="a")).reason == "empty question or answer"
    no_keywords = EvalReply(question="What colour?", answer="Teal.", answer_keywords=["(( ))"])
    assert finish("eval", no_keywords).reason == NO_ANSWER_KEYWORDS
    job = plan_jobs([record("c0")], 0.0, 0)[0]
    failed = to_dialogue(job, LLMResult(id=job.id, reject_kind="truncated", reason="cut off"), 500, {})
    assert failed.reason == LLM_REJECTED and "truncated" in failed.detail


def test_eval_keywords_are_cleaned() -> None:
    reply = EvalReply(
        question="What colour?", answer="Teal.", answer_keywords=["((teal))", "teal", "blue-green"]
    )
    dialogue = finish("eval", reply)
    assert dialogue.answer_keywords == ["teal", "blue-green"]
    assert dialogue.kind == "eval" and dialogue.question_type in ("yes_no", "wh", "either_or")
