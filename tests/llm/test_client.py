"""LLMClient against a real loopback HTTP server (synthvlm.llm.fake_server), no patched client."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ValidationError

from synthvlm.errors import ConfigError
from synthvlm.llm import LLMAccessError, LLMClient, LLMConfig, LLMRequest, ResponseCache
from synthvlm.llm import client as client_module
from synthvlm.llm.fake_server import FakeLLMServer

KEY_ENV = "SYNTHVLM_TEST_LLM_KEY"
SECRET = "sk-test-5f1d2c-do-not-leak"
REPO_ROOT = Path(__file__).resolve().parents[2]


class Echo(BaseModel):
    echo: str
    n_chars: int


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def server(api_key: str):
    # hang_s: well past the fault test's 0.5 s client timeout.
    with FakeLLMServer(hang_s=1.5, retry_after_s=0.05, api_key=api_key) as fake:
        yield fake


def make_config(server: FakeLLMServer, **overrides) -> LLMConfig:
    settings = {
        "base_url": server.base_url,
        "model": "fake-model",
        "api_key_env": KEY_ENV,
        "max_concurrency": 8,
        "max_retries": 1,
        "timeout_s": 2.0,  # generous, so a loaded CI machine causes no spurious retries
        **overrides,
    }
    return LLMConfig(**settings)


def echo_requests(prompts: list[str], schema: type[BaseModel] | None = Echo) -> list[LLMRequest]:
    return [LLMRequest.from_prompt(f"id-{p}", p, schema=schema) for p in prompts]


def cache_files(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*.json") if not p.name.startswith(".")]


def test_concurrency_never_exceeds_the_bound(server: FakeLLMServer) -> None:
    server.latency_s = 0.02
    client = LLMClient(make_config(server, max_concurrency=4))
    prompts = [f"prompt {i}" for i in range(40)]

    results = client.run_many(echo_requests(prompts))

    assert [r.id for r in results] == [f"id-{p}" for p in prompts]
    assert all(
        r.ok and r.parsed == Echo(echo=p, n_chars=len(p)) for r, p in zip(results, prompts, strict=True)
    )
    assert 1 < server.max_in_flight <= 4
    assert server.total_requests == 40
    metrics = client.metrics()
    assert metrics["llm_requests"] == 40 and metrics["llm_produced"] == 40 and metrics["llm_retries"] == 0


def test_faults_end_produced_or_rejected_with_a_reason(server: FakeLLMServer, tmp_path: Path) -> None:
    scripts = {  # prompt -> server actions, first request first; unscripted requests are answered normally
        "ok": (),
        "rate-limited": ("429",),
        "server-error": ("500",),
        "slow": ("hang",),
        "truncated": ("truncated",),
        "not-json": ("invalid_json",),
        "wrong-fields": ("wrong_schema",),
        "truncated-twice": ("truncated", "truncated"),
        "not-json-twice": ("invalid_json", "invalid_json"),
        "always-500": ("500", "500"),
        "always-slow": ("hang", "hang"),
    }
    for prompt, actions in scripts.items():
        server.script(prompt, *actions)
    config = make_config(server, max_retries=1, timeout_s=0.5, cache_dir=str(tmp_path / "cache"))
    client = LLMClient(config)
    prompts = list(scripts)

    results = client.run_many(echo_requests(prompts))

    by_prompt = dict(zip(prompts, results, strict=True))
    produced = {"ok", "rate-limited", "server-error", "slow", "truncated", "not-json", "wrong-fields"}
    for prompt, result in by_prompt.items():
        assert result.id == f"id-{prompt}"
        if prompt in produced:
            assert result.ok, (prompt, result.reason)
            assert result.parsed == Echo(echo=prompt, n_chars=len(prompt))
            assert result.reason is None
        else:
            assert not result.ok and result.parsed is None
            assert result.reason, prompt
    assert {p for p, r in by_prompt.items() if r.repaired} == {"truncated", "not-json", "wrong-fields"}
    assert by_prompt["truncated-twice"].reject_kind == "truncated"
    assert "after one repair" in by_prompt["truncated-twice"].reason
    assert by_prompt["not-json-twice"].reject_kind == "invalid_json"
    assert by_prompt["always-500"].reject_kind == "api_error"
    assert "500" in by_prompt["always-500"].reason
    assert by_prompt["always-slow"].reject_kind == "api_error"
    assert "timed out" in by_prompt["always-slow"].reason

    # One request per scripted action (the library retried, or we repaired), plus the final good answer.
    expected_requests = {p: len(a) + (p in produced) for p, a in scripts.items()}
    assert dict(server.requests_by_prompt) == expected_requests
    metrics = client.metrics()
    assert metrics["llm_items"] == len(prompts)
    assert metrics["llm_produced"] + metrics["llm_rejected"] == len(prompts)
    assert metrics["llm_rejected"] == 4 and metrics["llm_rejected_api_error"] == 2
    assert metrics["llm_requests"] == server.total_requests
    assert metrics["llm_retries"] == 5  # 429, 500, hang, and one each for always-500 / always-slow
    assert metrics["llm_repairs"] == 5
    assert metrics["llm_prompt_tokens"] > 0 and metrics["llm_completion_tokens"] > 0

    # A rerun re-asks only what no answer was cached for: the two transport failures.
    server.clear_scripts()
    before = server.requests_by_prompt.copy()
    rerun = LLMClient(config).run_many(echo_requests(prompts))
    assert server.requests_by_prompt - before == {"always-500": 1, "always-slow": 1}
    for prompt, (first, second) in zip(prompts, zip(results, rerun, strict=True), strict=True):
        if prompt.startswith("always-"):
            assert second.ok and not second.cached
        else:
            assert (second.ok, second.reject_kind, second.text) == (first.ok, first.reject_kind, first.text)
            assert second.cached and second.prompt_tokens == 0


def test_retry_after_header_is_honoured(server: FakeLLMServer) -> None:
    # 0.6 s is above the library's own first backoff (at most 0.5 s), so only the header explains the wait.
    server.retry_after_s = 0.6
    server.script("busy", "429")
    client = LLMClient(make_config(server, max_retries=2))

    [result] = client.run_many(echo_requests(["busy"]))

    assert result.ok
    first, second = server.arrivals["busy"]
    assert second - first >= 0.59  # lower bound from the client's own sleep, not a speed measurement
    assert client.metrics()["llm_retries"] == 1


_CHILD = """
import sys
from synthvlm.llm import LLMClient, LLMConfig, LLMRequest
config = LLMConfig.model_validate_json(sys.argv[1])
prompts = [f"prompt {i}" for i in range(int(sys.argv[2]))]
LLMClient(config).run_many([LLMRequest.from_prompt(f"id-{p}", p) for p in prompts])
"""


def test_killed_run_restarts_without_reasking_answered_requests(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    n_prompts, n_answered = 30, 10
    cache_dir = tmp_path / "cache"
    config = make_config(server, max_concurrency=4, timeout_s=30, cache_dir=str(cache_dir))
    server.hold_after(n_answered)  # the server answers 10 requests, then stalls every later one
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, config.model_dump_json(), str(n_prompts)],
        cwd=REPO_ROOT,
        env=os.environ,
    )
    try:
        deadline = time.monotonic() + 60
        while (
            len(cache_files(cache_dir)) < n_answered and child.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert len(cache_files(cache_dir)) == n_answered, "the child did not cache the answered requests"
        assert child.poll() is None, "the child finished although the server stalls"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    server.release()
    answered = {json.loads(p.read_text())["content"].removeprefix("echo: ") for p in cache_files(cache_dir)}
    before = server.requests_by_prompt.copy()

    prompts = [f"prompt {i}" for i in range(n_prompts)]
    results = LLMClient(config).run_many([LLMRequest.from_prompt(f"id-{p}", p) for p in prompts])

    assert [r.text for r in results] == [f"echo: {p}" for p in prompts]
    new_requests = server.requests_by_prompt - before
    assert set(new_requests) == set(prompts) - answered  # nothing already answered is asked again
    assert all(count == 1 for count in new_requests.values())
    assert sum(r.cached for r in results) == n_answered


def test_larger_rerun_asks_only_new_requests(server: FakeLLMServer, tmp_path: Path) -> None:
    config = make_config(server, cache_dir=str(tmp_path / "cache"))
    first = [f"caption {i}" for i in range(10)]
    LLMClient(config).run_many(echo_requests(first, schema=None))
    assert server.total_requests == 10

    more = first + [f"caption {i}" for i in range(10, 20)]
    samples = [LLMRequest.from_prompt(f"s{seed}", "caption 0", seed=seed) for seed in (1, 2)]
    client = LLMClient(config)
    results = client.run_many(echo_requests(more, schema=None) + samples)

    assert all(r.ok for r in results)
    assert server.total_requests == 10 + 10 + 2  # seeds are part of the key: two new samples
    assert server.requests_by_prompt["caption 0"] == 3 and server.requests_by_prompt["caption 15"] == 1
    metrics = client.metrics()
    assert metrics["llm_cache_hits"] == 10 and metrics["llm_requests"] == 12
    assert sorted(b["seed"] for b in server.bodies if "seed" in b) == [1, 2]


def test_unreadable_cache_entry_is_asked_again(server: FakeLLMServer, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    config = make_config(server, cache_dir=str(cache_dir))
    prompts = ["a", "b", "c"]
    LLMClient(config).run_many(echo_requests(prompts))
    entries = sorted(cache_files(cache_dir))
    assert len(entries) == 3
    torn = entries[0]
    torn_prompt = json.loads(json.loads(torn.read_text())["content"])["echo"]
    torn.write_bytes(torn.read_bytes()[:10])  # as if a non-atomic copy had been cut off
    (torn.parent / f".{torn.name}.leftover.tmp").write_text("{partial")  # a killed writer's temp file

    results = LLMClient(config).run_many(echo_requests(prompts))

    assert all(r.ok for r in results)
    assert server.requests_by_prompt == {p: 1 + (p == torn_prompt) for p in prompts}
    assert ResponseCache(str(cache_dir)).get(torn.stem) is not None  # rewritten


def test_api_key_reaches_the_server_but_is_never_leaked(
    server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything: ours, openai's and the HTTP library's
    server.script("limited", "429")
    server.script("broken", "invalid_json", "invalid_json")
    server.script("down", "500", "500")
    cache_dir = tmp_path / "cache"
    config = make_config(server, cache_dir=str(cache_dir))
    client = LLMClient(config)

    results = client.run_many(echo_requests(["fine", "limited", "broken", "down"]))

    assert [r.ok for r in results] == [True, True, False, False]
    assert server.authorization_headers and set(server.authorization_headers) == {f"Bearer {SECRET}"}
    assert "Retrying request" in caplog.text  # the library's retry logging was captured ...
    assert SECRET not in caplog.text  # ... and holds no key
    assert SECRET not in repr(results) + repr(client) + json.dumps(client.metrics())
    assert SECRET not in config.model_dump_json()
    files = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert files and not any(SECRET.encode() in p.read_bytes() for p in files)


def test_wrong_key_stops_the_run(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    client = LLMClient(make_config(server, max_retries=3))

    with pytest.raises(LLMAccessError, match=KEY_ENV) as excinfo:
        client.run_many(echo_requests([f"p{i}" for i in range(5)]))

    assert "sk-wrong" not in str(excinfo.value)
    assert server.total_requests <= 5  # 401 is not retried


def test_key_is_never_a_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        LLMConfig(api_key="sk-inline")  # type: ignore[call-arg]
    monkeypatch.delenv("SYNTHVLM_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="SYNTHVLM_UNSET_KEY"):
        LLMClient(LLMConfig(api_key_env="SYNTHVLM_UNSET_KEY"))  # api.openai.com needs a key


def test_self_hosted_server_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTHVLM_UNSET_KEY", raising=False)
    with FakeLLMServer() as keyless:
        client = LLMClient(make_config(keyless, api_key_env="SYNTHVLM_UNSET_KEY"))
        [result] = client.run_many(echo_requests(["hello"], schema=None))
    assert result.ok and result.text == "echo: hello"


def test_structured_output_modes_send_the_schema_or_json_mode(server: FakeLLMServer) -> None:
    LLMClient(make_config(server)).run_many(echo_requests(["strict"]))
    LLMClient(make_config(server, structured_output="json_object")).run_many(echo_requests(["loose"]))

    strict, loose = server.bodies
    schema_format = strict["response_format"]
    assert schema_format["type"] == "json_schema" and schema_format["json_schema"]["strict"] is True
    assert set(schema_format["json_schema"]["schema"]["required"]) == {"echo", "n_chars"}
    assert loose["response_format"] == {"type": "json_object"}
    assert strict["model"] == "fake-model" and strict["max_tokens"] == 1024


def test_one_broken_request_does_not_sink_the_batch(server: FakeLLMServer) -> None:
    broken = LLMRequest(id="broken", messages=({"role": "user", "content": object()},))
    results = LLMClient(make_config(server)).run_many([broken, *echo_requests(["fine"])])

    assert results[0].id == "broken" and results[0].reject_kind == "error" and results[0].reason
    assert results[1].ok


def test_progress_lines_carry_done_total_and_rate(server: FakeLLMServer, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="synthvlm.progress"):
        LLMClient(make_config(server)).run_many(echo_requests([f"p{i}" for i in range(6)]))
    lines = [r.getMessage() for r in caplog.records if r.name == "synthvlm.progress"]
    assert lines[0] == "llm fake-model: 0/6 requests (0.0%), ETA unknown"
    assert lines[-1].startswith("llm fake-model: 6/6 requests (100.0%), ") and "done in" in lines[-1]


# ---- the cache: on by default, keyed by what decides the answer -----------------------------------------


def test_cache_is_on_by_default_in_the_default_dir(
    server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="synthvlm.llm.client")
    default = tmp_path / "data" / "llm-cache"
    config = make_config(server)
    assert config.cache and config.cache_dir is None  # nothing set: the stage's default applies

    LLMClient(config, default_cache_dir=str(default)).run_many(echo_requests(["a", "b"]))
    rerun = LLMClient(config, default_cache_dir=str(default)).run_many(echo_requests(["a", "b"]))

    assert len(cache_files(default)) == 2 and all(r.cached for r in rerun)
    assert server.total_requests == 2
    assert [m for m in caplog.messages if "response cache" in m] == [
        f"llm: response cache {default} (answers found there are not asked again)"
    ] * 2  # once per client, naming the directory


def test_cache_dir_wins_over_the_default_and_cache_false_turns_it_off(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    default, explicit = tmp_path / "default", tmp_path / "explicit"
    LLMClient(make_config(server, cache_dir=str(explicit)), default_cache_dir=str(default)).run_many(
        echo_requests(["a"])
    )
    assert len(cache_files(explicit)) == 1 and not default.exists()

    off = make_config(server, cache=False, cache_dir=str(explicit))
    results = LLMClient(off, default_cache_dir=str(default)).run_many(echo_requests(["a", "b"]))

    assert not any(r.cached for r in results)  # "a" is in the cache, but asked again
    assert server.requests_by_prompt == {"a": 2, "b": 1}
    assert len(cache_files(explicit)) == 1 and not default.exists()  # nothing read or written


def test_changed_prompt_or_temperature_asks_again(server: FakeLLMServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    LLMClient(make_config(server), default_cache_dir=cache).run_many(echo_requests(["a cat"]))

    LLMClient(make_config(server), default_cache_dir=cache).run_many(echo_requests(["a cat."]))
    LLMClient(make_config(server, temperature=0.5), default_cache_dir=cache).run_many(
        echo_requests(["a cat"])
    )
    system = LLMRequest.from_prompt("s", "a cat", system="Be brief.", schema=Echo)
    LLMClient(make_config(server), default_cache_dir=cache).run_many([system])

    assert server.requests_by_prompt == {"a cat": 3, "a cat.": 1}  # base, temperature, system message
    assert [b["temperature"] for b in server.bodies] == [1.0, 1.0, 0.5, 1.0]


def test_settings_that_do_not_change_the_answer_hit_the_cache(
    server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = str(tmp_path / "cache")
    prompts = ["a", "b", "c"]
    LLMClient(make_config(server), default_cache_dir=cache).run_many(echo_requests(prompts))

    monkeypatch.setenv(KEY_ENV, "sk-rotated")  # a new key
    with FakeLLMServer() as elsewhere:  # the same model name behind another URL
        for overrides in (
            {"max_concurrency": 1, "timeout_s": 9.0, "max_retries": 4},
            {"price_per_1k_input": 0.5, "structured_output": "json_schema"},
            {"base_url": elsewhere.base_url},
        ):
            results = LLMClient(make_config(server, **overrides), default_cache_dir=cache).run_many(
                echo_requests(prompts)
            )
            assert all(r.ok and r.cached for r in results), overrides
        assert elsewhere.total_requests == 0
    assert server.total_requests == 3


# ---- malformed answers: retried like transient faults, then rejected with a reason ------------------------


def test_malformed_answers_are_asked_again_then_rejected(
    server: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MALFORMED_BACKOFF_S", 0.01)  # the wait itself: the next test
    scripts = {
        "empty-once": ("empty_choices",),
        "no-message-twice": ("no_message", "no_message"),
        "always-empty": ("empty_choices",) * 3,
        "always-no-message": ("no_message",) * 3,
    }
    for prompt, actions in scripts.items():
        server.script(prompt, *actions)
    cache_dir = tmp_path / "cache"
    client = LLMClient(make_config(server, max_retries=2), default_cache_dir=str(cache_dir))

    results = dict(zip(scripts, client.run_many(echo_requests(list(scripts))), strict=True))

    for prompt in ("empty-once", "no-message-twice"):
        assert results[prompt].ok and results[prompt].parsed == Echo(echo=prompt, n_chars=len(prompt))
    for prompt, what in (("always-empty", "no choices"), ("always-no-message", "no message")):
        assert results[prompt].reject_kind == "api_error"
        assert results[prompt].reason.startswith(f"malformed response: {what}")
        assert "gave up after 2 retries" in results[prompt].reason
    assert dict(server.requests_by_prompt) == {p: min(len(a) + 1, 3) for p, a in scripts.items()}
    assert client.metrics()["llm_retries"] == 1 + 2 + 2 + 2
    assert len(cache_files(cache_dir)) == 2  # only real answers are cached: a rerun asks the others

    server.clear_scripts()
    rerun = LLMClient(make_config(server, max_retries=2), default_cache_dir=str(cache_dir))
    assert all(r.ok for r in rerun.run_many(echo_requests(list(scripts))))
    assert rerun.metrics()["llm_cache_hits"] == 2 and rerun.metrics()["llm_requests"] == 2


def test_malformed_answer_is_asked_again_after_a_backoff(server: FakeLLMServer) -> None:
    server.script("garbled", "empty_choices")

    [result] = LLMClient(make_config(server, max_retries=1)).run_many(echo_requests(["garbled"]))

    assert result.ok
    first, second = server.arrivals["garbled"]
    assert second - first >= 0.75 * client_module.MALFORMED_BACKOFF_S  # the jittered first backoff


def test_malformed_answer_with_no_retries_is_rejected_at_once(server: FakeLLMServer) -> None:
    server.script("garbled", "empty_choices")

    [result] = LLMClient(make_config(server, max_retries=0)).run_many(echo_requests(["garbled"]))

    assert result.reject_kind == "api_error"
    assert result.reason == "malformed response: no choices (gave up after 0 retries)"
    assert server.total_requests == 1


@pytest.mark.parametrize(
    ("body", "malformed"),
    [
        ("<html>bad gateway</html>", "not a chat completion"),
        ({"choices": None}, "no choices"),
        ({"choices": ["junk"]}, "no message"),
        ({"choices": [{"message": {"content": None}, "finish_reason": "stop"}]}, "without content"),
        ({"choices": [{"message": {"content": None}, "finish_reason": "length"}]}, None),  # cut off
        ({"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]}, None),
    ],
)
def test_what_counts_as_a_malformed_answer(body: object, malformed: str | None) -> None:
    response = body if isinstance(body, str) else ChatCompletion.construct(**body)  # as openai builds it
    if malformed is None:
        assert client_module._Completion.from_response(response).content is None
    else:
        with pytest.raises(client_module._MalformedResponse, match=malformed):
            client_module._Completion.from_response(response)
