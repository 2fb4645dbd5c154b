"""The LLM judge against the loopback fake OpenAI server (synthvlm.llm.fake_server)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from synthvlm.evaluation.judge import (
    PREDICTION_LABEL,
    REFERENCE_LABEL,
    JudgeTask,
    JudgeVerdict,
    judge_prompt,
    run_judge,
)
from synthvlm.llm import LLMClient, LLMConfig
from synthvlm.llm.fake_server import FakeLLMServer


def _field(prompt: str, label: str) -> str:
    return next(line.removeprefix(label) for line in prompt.splitlines() if line.startswith(label))


def rubric_judge(prompt: str) -> dict:
    """A stand-in judge: 5 for the reference verbatim, 3 when it contains it, 0 otherwise; 'bogus' gets 9."""
    reference = _field(prompt, REFERENCE_LABEL).lower()
    prediction = _field(prompt, PREDICTION_LABEL).lower()
    if prediction == "bogus":
        return {"reason": "out of range", "score": 9}
    score = 5 if prediction == reference else 3 if reference in prediction else 0
    return {"reason": f"compared {prediction!r} with {reference!r}", "score": score}


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(json_reply=rubric_judge) as fake:
        yield fake


def client_for(server: FakeLLMServer, **overrides) -> LLMClient:
    config = LLMConfig(base_url=server.base_url, model="judge", max_retries=0, timeout_s=5.0, **overrides)
    return LLMClient(config)


def test_judge_prompt_holds_question_reference_and_prediction() -> None:
    task = JudgeTask("q1", "What is it?", ["a cat", "a kitten"], " It is a cat. ")
    assert (
        judge_prompt(task)
        == "Question: What is it?\nReference answer: a cat / a kitten\nPredicted answer: It is a cat."
    )


def test_judge_scores_through_the_server(server: FakeLLMServer) -> None:
    tasks = [
        JudgeTask("exact", "What is it?", ["a red car"], "A red car"),
        JudgeTask("partial", "What is it?", ["red car"], "I see a red car parked"),
        JudgeTask("wrong", "What is it?", ["red car"], "a blue bicycle"),
    ]
    outcomes = run_judge(client_for(server), tasks)
    assert [(o.id, o.score) for o in outcomes] == [("exact", 5), ("partial", 3), ("wrong", 0)]
    assert "compared 'a red car' with 'a red car'" in outcomes[0].reason
    # The request carries the StableLLaVA rubric as system prompt and the JSON schema of the verdict.
    body = server.bodies[0]
    system = body["messages"][0]
    assert system["role"] == "system" and "Exact Correlation (5 points)" in system["content"]
    assert "Completely Inaccurate (0 points)" in system["content"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["reason", "score"]
    assert body["temperature"] == 1.0  # the LLMConfig default here; the stage's judge default is 0


def test_json_object_mode_also_works(server: FakeLLMServer) -> None:
    client = client_for(server, structured_output="json_object")
    [outcome] = run_judge(client, [JudgeTask("a", "Q?", ["yes"], "yes")])
    assert outcome.score == 5
    assert server.bodies[0]["response_format"] == {"type": "json_object"}


def test_out_of_range_score_is_a_failure_not_a_number(server: FakeLLMServer) -> None:
    # 9 violates score <= 5: the client repairs once, gets 9 again, and rejects the item.
    outcomes = run_judge(client_for(server), [JudgeTask("bad", "Q?", ["x"], "bogus")])
    assert outcomes[0].score is None and not outcomes[0].ok
    assert "judge failed (schema)" in outcomes[0].reason
    assert server.total_requests == 2  # the first reply and one repair turn


def test_broken_reply_fails_only_its_item(server: FakeLLMServer) -> None:
    tasks = [JudgeTask("ok", "Q?", ["cat"], "cat"), JudgeTask("broken", "Q2?", ["dog"], "dog")]
    server.script(judge_prompt(tasks[1]), "invalid_json", "invalid_json")
    outcomes = run_judge(client_for(server), tasks)
    assert outcomes[0].score == 5
    assert outcomes[1].score is None and "invalid_json" in outcomes[1].reason


def test_verdict_schema_bounds() -> None:
    assert JudgeVerdict.model_validate_json(json.dumps({"reason": "r", "score": 0})).score == 0
    with pytest.raises(ValueError):
        JudgeVerdict(reason="r", score=6)
    with pytest.raises(ValueError):
        JudgeVerdict(reason="r", score=-1)
