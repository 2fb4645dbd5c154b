from __future__ import annotations

import dataclasses

from synthvlm.llm.backend import BackendConfig, make_backend
from synthvlm.llm.template_backend import registered_tasks
from synthvlm.records import Record
from synthvlm.stablellava import templates
from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.dialogues import TASKS, job_request, plan_jobs, to_dialogue
from synthvlm.stablellava.emphasis import parse_prompt
from synthvlm.stablellava.filters import FilterConfig, LengthLimit, check_prompt
from synthvlm.stablellava.interleaved import InterleavedConfig, interleaved_request, parse_reply
from synthvlm.stablellava.keywords import keyword_request
from synthvlm.stablellava.prompts import RELATIONS, pair_request, prompt_request

REGISTRY = load_registry()


def backend():
    return make_backend(BackendConfig(backend="template"))


def test_every_task_is_registered() -> None:
    assert set(templates.GENERATORS) <= set(registered_tasks())
    assert set(TASKS.values()) <= set(templates.GENERATORS)


def test_template_prompts_pass_the_filters_for_every_ability() -> None:
    requests, abilities = [], []
    for ability in REGISTRY.values():
        for i in range(5):
            keywords = ability.keyword_bank[i : i + 10]
            requests.append(
                prompt_request(f"{ability.name}-{i}", ability, keywords, ability.prompt_examples, 10, i)
            )
            abilities.append(ability)
    results = backend().run_many(requests)
    for ability, result in zip(abilities, results, strict=True):
        assert result.ok, result.reason
        parsed = parse_prompt(result.parsed.prompt)
        assert check_prompt(parsed, ability, ability.keyword_bank, FilterConfig()) is None, parsed.raw


def test_pairs_keywords_and_determinism() -> None:
    colour = REGISTRY["colour"]
    requests = [pair_request(f"p-{r}", colour, r, colour.keyword_bank[:8], 10, 1) for r in RELATIONS]
    requests.append(keyword_request(colour, 7, 0, seed=0))
    first, again = backend().run_many(requests), backend().run_many(requests)
    assert [r.text for r in first] == [r.text for r in again]
    difference = first[1].parsed
    assert parse_prompt(difference.prompt_1).subject != parse_prompt(difference.prompt_2).subject
    keywords = first[-1].parsed.keywords
    assert len(keywords) == 7 and set(keywords) <= set(colour.keyword_bank)


def test_dialogue_templates_answer_every_kind_and_are_marked() -> None:
    raw = "((teal bicycle)), brick wall, soft light, 8k"
    base = {"ability": "colour", "raw_prompt": raw, "kind": "single"}
    records = [
        Record(id="c0", caption="x", provenance={**base, "split": "train"}),
        Record(id="e0", caption="x", provenance={**base, "split": "eval"}),
        *(
            Record(
                id=f"p-{m}",
                caption="x",
                provenance={**base, "kind": "pair", "pair_id": "p", "relation": "logical", "member": m},
            )
            for m in (0, 1)
        ),
    ]
    jobs = plan_jobs(records, multi_turn_fraction=1.0, seed=0)
    engine = backend()
    results = engine.run_many([job_request(j, REGISTRY, LengthLimit(), 3, 0) for j in jobs])
    assert {j.kind for j in jobs} == {"caption", "qa", "multi_turn", "multi_image", "eval"}
    for job, result in zip(jobs, results, strict=True):
        assert result.ok, (job.kind, result.reason)
        assert "teal bicycle" in result.text
        assert result.model == "template"
    assert engine.describe() == {"backend": "template", "model": "template"}
    multi_turn = next(r for j, r in zip(jobs, results, strict=True) if j.kind == "multi_turn")
    assert len(multi_turn.parsed.turns) == 3
    evaluation = next(r for j, r in zip(jobs, results, strict=True) if j.kind == "eval")
    assert evaluation.parsed.answer


def test_eval_template_answers_every_question_type() -> None:
    raw = "((teal bicycle)), brick wall, soft light, 8k"
    record = Record(
        id="e0", caption="x", provenance={"ability": "colour", "raw_prompt": raw, "split": "eval"}
    )
    [job] = plan_jobs([record], 0.0, 0)
    jobs = [dataclasses.replace(job, question_type=t) for t in ("wh", "yes_no", "either_or")]
    results = backend().run_many([job_request(j, REGISTRY, LengthLimit(), 3, 0) for j in jobs])
    outcomes = [to_dialogue(j, r, LengthLimit(), {}) for j, r in zip(jobs, results, strict=True)]
    wh, yes_no, either = outcomes
    assert "teal" in wh.answer_keywords
    assert yes_no.answer_keywords in (["yes"], ["no"])
    assert len(either.choices) == 2 and either.answer_keywords[0] in either.choices


def test_interleaved_template_writes_a_picture_per_turn() -> None:
    request = interleaved_request("interleaved-00000", "make tea", InterleavedConfig(), 10, seed=0)
    [result] = backend().run_many([request])
    parsed = parse_reply(result.parsed, InterleavedConfig())
    assert parsed.picture_turns == (0, 1, 2) and all("make tea" in p for p in parsed.pictures)
    assert [q.count("<image>") for q, _ in parsed.turns] == [1, 1, 1]
