"""The backend abstraction and the offline template backend (registry, schema filling, determinism)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from synthvlm.llm import LLMConfig, LLMRequest
from synthvlm.llm.backend import Backend, BackendConfig, OpenAIBackend, make_backend
from synthvlm.llm.fake_server import FakeLLMServer
from synthvlm.llm.template_backend import (
    TEMPLATE_MODEL,
    TemplateBackend,
    TemplateResult,
    fill_schema,
    get_template,
    register_template,
    registered_tasks,
    request_text,
    stable_choice,
    unregister_template,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY_ENV = "SYNTHVLM_TEST_TEMPLATE_KEY"


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


class Inner(BaseModel):
    label: str
    weight: float = Field(gt=0, lt=1)


class Everything(BaseModel):
    title: str = Field(max_length=12)
    count: int = Field(ge=3, le=5)
    ratio: float
    flag: bool
    kind: Literal["photo", "painting", "sketch"]
    colour: Colour
    tags: list[str] = Field(min_length=4)
    inner: Inner
    maybe: int | None
    pairs: list[Inner]


class Prompt(BaseModel):
    prompt: str
    keywords: list[str] = Field(max_length=3)


@pytest.fixture
def scratch_task():
    """A unique task name, unregistered after the test."""
    names: list[str] = []

    def make(name: str) -> str:
        names.append(name)
        return name

    yield make
    for name in names:
        unregister_template(name)


def upper_template(request: LLMRequest) -> str:
    return request_text(request).upper()


def test_registered_template_answers_its_task_and_says_it_is_a_template(scratch_task) -> None:
    task = scratch_task("test.upper")
    register_template(task, upper_template)
    backend = TemplateBackend()

    results = backend.run_many([LLMRequest.from_prompt("a", "hello there", task=task)])

    [result] = results
    assert isinstance(result, TemplateResult)
    assert result.ok and result.text == "HELLO THERE" and result.parsed is None
    assert (result.model, result.backend, result.cached) == ("template", "template", False)
    assert result.prompt_tokens == 0 and result.completion_tokens == 0
    assert backend.describe() == {"backend": "template", "model": "template"}
    metrics = backend.metrics()
    assert metrics["llm_items"] == 1 and metrics["llm_produced"] == 1 and metrics["llm_rejected"] == 0
    assert metrics["llm_template_backend"] == 1 and metrics["llm_requests"] == 0


def test_registry_refuses_a_second_function_for_a_task_unless_replaced(scratch_task) -> None:
    task = scratch_task("test.registry")
    register_template(task, upper_template)
    register_template(task, upper_template)  # the same function again (e.g. a reloaded module): fine
    assert task in registered_tasks() and get_template(task) is upper_template

    with pytest.raises(ValueError, match="already registered"):
        register_template(task, lambda request: "other")
    register_template(task, str.lower, replace=True)
    assert get_template(task) is str.lower

    unregister_template(task)
    assert get_template(task) is None and task not in registered_tasks()
    with pytest.raises(ValueError, match="empty"):
        register_template(" ", upper_template)


def test_two_lambdas_are_not_the_same_template(scratch_task) -> None:
    task = scratch_task("test.lambdas")
    register_template(task, lambda request: "one")
    with pytest.raises(ValueError, match="already registered"):
        register_template(task, lambda request: "two")


def test_structured_template_replies_are_validated_like_llm_replies(scratch_task) -> None:
    good, bad_fields, not_json, wrong_type = (
        scratch_task(n) for n in ("test.good", "test.bad_fields", "test.not_json", "test.wrong_type")
    )
    register_template(good, lambda r: json.dumps({"prompt": f"a {r.id}", "keywords": ["x", "y"]}))
    register_template(bad_fields, lambda r: json.dumps({"prompt": "p", "keywords": ["1", "2", "3", "4"]}))
    register_template(not_json, lambda r: "Sure! {prompt:")
    register_template(wrong_type, lambda r: 42)  # type: ignore[arg-type, return-value]
    tasks = [good, bad_fields, not_json, wrong_type]
    requests = [LLMRequest.from_prompt(f"id{i}", "p", schema=Prompt, task=t) for i, t in enumerate(tasks)]
    backend = TemplateBackend()

    ok, too_many, broken, not_str = backend.run_many(requests)

    assert ok.ok and ok.parsed == Prompt(prompt="a id0", keywords=["x", "y"])
    assert too_many.reject_kind == "schema" and "keywords" in too_many.reason
    assert broken.reject_kind == "invalid_json" and broken.text == "Sure! {prompt:"
    assert not_str.reject_kind == "error" and "int" in not_str.reason
    metrics = backend.metrics()
    assert metrics["llm_rejected"] == 3 and metrics["llm_rejected_schema"] == 1
    assert metrics["llm_rejected_invalid_json"] == 1 and metrics["llm_rejected_error"] == 1


def test_a_failing_template_rejects_its_item_only(scratch_task) -> None:
    task = scratch_task("test.raises")

    def broken(request: LLMRequest) -> str:
        if request.id == "bad":
            raise KeyError("no bank for this ability")
        return "fine"

    register_template(task, broken)
    results = TemplateBackend().run_many(
        [LLMRequest.from_prompt(i, "x", task=task) for i in ("ok1", "bad", "ok2")]
    )

    assert [r.ok for r in results] == [True, False, True]
    assert results[1].reject_kind == "error" and "KeyError" in results[1].reason
    assert [r.id for r in results] == ["ok1", "bad", "ok2"]


def test_unknown_task_without_schema_is_rejected_naming_the_task() -> None:
    [result] = TemplateBackend().run_many([LLMRequest.from_prompt("a", "hi", task="test.nobody")])
    assert result.reject_kind == "error" and "test.nobody" in result.reason


def test_fill_schema_respects_types_and_bounds() -> None:
    text = "A watercolor painting of a harbor with small fishing boats"
    request = LLMRequest.from_prompt("r1", text)

    filled = fill_schema(Everything, request)

    assert isinstance(filled, Everything)  # validated by pydantic, so every bound holds
    assert 3 <= filled.count <= 5 and len(filled.title) <= 12 and len(filled.tags) == 4
    assert 0 < filled.inner.weight < 1 and len(filled.pairs) == 3
    assert filled.kind in ("photo", "painting", "sketch") and filled.colour in Colour
    prompt_words = set(text.split())
    assert set(" ".join(filled.tags).split()) <= prompt_words  # strings come from the request's words


def test_fill_schema_is_deterministic_and_depends_on_the_request() -> None:
    def fill(id_: str, text: str) -> Everything:
        return fill_schema(Everything, LLMRequest.from_prompt(id_, text))

    text = "A black sports car parked in front of a modern glass building at night"
    assert fill("a", text) == fill("a", text)
    others = [fill(f"id-{i}", text) for i in range(8)]
    assert len({o.model_dump_json() for o in others}) > 1  # the id takes part in the choices


def test_unregistered_structured_task_is_filled_from_the_schema() -> None:
    request = LLMRequest.from_prompt("q", "Write a prompt about a red fox in snow", schema=Prompt, task=None)

    [result] = TemplateBackend().run_many([request])

    assert result.ok and isinstance(result.parsed, Prompt)
    assert json.loads(result.text) == result.parsed.model_dump()
    assert len(result.parsed.keywords) <= 3


def test_template_answers_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from synthvlm.llm.template_backend import fill_schema, stable_choice\n"
        "from synthvlm.llm import LLMRequest\n"
        "from tests.llm.test_template_backend import Everything\n"
        "r = LLMRequest.from_prompt('x', 'a lighthouse on a rocky cliff at dusk')\n"
        "print(fill_schema(Everything, r).model_dump_json())\n"
        "print(stable_choice(list('abcdefgh'), 'k', 1))\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = [child.communicate(timeout=60)[0].splitlines() for child in children]

    assert all(child.returncode == 0 for child in children)
    here = fill_schema(Everything, LLMRequest.from_prompt("x", "a lighthouse on a rocky cliff at dusk"))
    expected = [here.model_dump_json(), stable_choice(list("abcdefgh"), "k", 1)]
    assert outputs == [expected, expected]


def test_make_backend_picks_template_without_any_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = make_backend(BackendConfig(backend="template"))  # api.openai.com would need a key
    assert isinstance(backend, TemplateBackend) and isinstance(backend, Backend)
    assert backend.model == TEMPLATE_MODEL


def test_openai_backend_wraps_the_client_and_does_not_send_the_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with FakeLLMServer(text_reply=lambda prompt: f"reply to {prompt}") as server:
        config = BackendConfig(
            base_url=server.base_url, model="fake-model", api_key_env=KEY_ENV, max_retries=0
        )
        backend = make_backend(config)
        results = backend.run_many([LLMRequest.from_prompt("a", "hello", task="caption_judge")])
        plain = make_backend(LLMConfig(base_url=server.base_url, model="m2", api_key_env=KEY_ENV))

    assert isinstance(backend, OpenAIBackend) and isinstance(plain, OpenAIBackend)
    assert results[0].ok and results[0].text == "reply to hello"
    assert "task" not in server.bodies[0] and server.bodies[0]["model"] == "fake-model"
    assert backend.describe() == {"backend": "openai", "model": "fake-model"}
    assert backend.metrics()["llm_requests"] == 1 and "llm_template_backend" not in backend.metrics()
    assert plain.describe()["model"] == "m2"


def test_request_task_is_optional_and_backward_compatible() -> None:
    old_style = LLMRequest(id="a", messages=({"role": "user", "content": "x"},))
    assert old_style.task is None and LLMRequest.from_prompt("a", "x").task is None
    assert LLMRequest.from_prompt("a", "x", task="t").task == "t"
    multi = LLMRequest(
        id="m",
        messages=(
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url"}]},
            {"role": "user", "content": "part two"},
        ),
    )
    assert request_text(multi) == "part one\npart two" and request_text(multi, "system") == "be brief"
