from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

import pytest

from synthvlm.errors import SynthVLMError
from synthvlm.evaluation.lmms import (
    LMMSEvalUnavailable,
    flatten_results,
    is_lmms_task,
    lmms_eval_available,
    require_lmms_eval,
    run_lmms_eval,
    task_name,
)


@pytest.fixture
def no_lmms_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    """lmms_eval unimportable, whether or not this environment has it (a None entry blocks an import)."""
    monkeypatch.setitem(sys.modules, "lmms_eval", None)


@pytest.fixture
def fake_lmms_eval(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in lmms_eval package whose simple_evaluate records its arguments."""
    calls: list[dict] = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {
            "results": {
                task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 0.25}
                for task in kwargs["tasks"]
            },
            "config": {"model": kwargs["model"]},
        }

    package, evaluator = ModuleType("lmms_eval"), ModuleType("lmms_eval.evaluator")
    package.__spec__ = ModuleSpec("lmms_eval", None)
    evaluator.__spec__ = ModuleSpec("lmms_eval.evaluator", None)
    evaluator.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    package.evaluator = evaluator  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lmms_eval", package)
    monkeypatch.setitem(sys.modules, "lmms_eval.evaluator", evaluator)
    return calls


def test_missing_package_fails_with_a_clear_message(no_lmms_eval: None) -> None:
    assert not lmms_eval_available()
    with pytest.raises(LMMSEvalUnavailable) as info:
        require_lmms_eval(["mme", "pope"])
    message = str(info.value)
    assert "lmms_eval" in message and "eval image" in message and "mme, pope" in message
    assert isinstance(info.value, SynthVLMError)  # the CLI prints it without a traceback
    with pytest.raises(LMMSEvalUnavailable):
        run_lmms_eval("/models/x", ["mme"])


def test_runs_tasks_through_simple_evaluate(fake_lmms_eval: list[dict]) -> None:
    results = run_lmms_eval("/models/llava", ["mme", "pope"], batch_size=4, device="cuda", limit=10)
    assert fake_lmms_eval == [
        {
            "model": "llava_hf",
            "model_args": "pretrained=/models/llava",
            "tasks": ["mme", "pope"],
            "batch_size": 4,
            "device": "cuda",
            "limit": 10,
            "log_samples": False,
        }
    ]
    assert results["mme"] == {"acc": 0.5, "acc_stderr": 0.1, "exact_match.strict": 0.25}


def test_flatten_results_keeps_numbers_only() -> None:
    raw = {"results": {"gqa": {"alias": "gqa", "exact_match,none": 0.6, "flag": True, "n": 3}}}
    assert flatten_results(raw) == {"gqa": {"exact_match": 0.6, "n": 3.0}}
    assert flatten_results({}) == {}


def test_task_names() -> None:
    assert is_lmms_task("lmms_eval:mme") and not is_lmms_task("gs://b/mme.jsonl")
    assert task_name("lmms_eval: pope ") == "pope"
    with pytest.raises(ValueError, match="no task name"):
        task_name("lmms_eval:")
