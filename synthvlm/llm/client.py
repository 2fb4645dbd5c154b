"""One client for OpenAI and OpenAI-compatible chat servers (vLLM, llama.cpp server, Ollama).

What it adds on top of `openai.AsyncOpenAI`:
- bounded concurrency (one asyncio.Semaphore per batch),
- structured output validated with a pydantic model, with exactly one repair turn on truncated or invalid
  JSON, then a rejection with a reason,
- `complete_many`: every request ends as a produced or a rejected `LLMResult`, in input order; only
  problems that concern the whole run (bad key, no permission, unknown model/endpoint) raise,
- a persistent response cache (see cache.py), on by default, so a rerun re-asks nothing already
  answered: in `LLMConfig.cache_dir`, else in the `default_cache_dir` the stage passes
  (`<data root>/llm-cache`); `LLMConfig.cache=False` turns it off,
- token / request / cost accounting for stage metrics.

What a cache entry is keyed on (cache.py hashes it): the model name, the messages, the sampling parameters
(temperature, max_tokens, seed) and the response format / JSON schema: everything in the request body,
nothing else. So a changed prompt or temperature asks again, and settings that only change how we send
(max_concurrency, timeout_s, max_retries) do not. The endpoint URL is deliberately not in the key: it says
where the server is, not what answers (the model name does), and one server is reached by several URLs
(an in-cluster Service, a port-forward, replicas behind a load balancer); a rerun from elsewhere must not
re-ask everything. The flip side: if you swap the weights behind an unchanged model name (llama.cpp's
server ignores the name), change `llm.model` or `llm.cache_dir`, or set `llm.cache=false`. The API key is
not in the key either (rotating a key changes no answer), nor anywhere in the cache.

Retries are the openai library's own (`max_retries`): it retries connection errors, timeouts, 408, 409,
429 and 5xx with exponential backoff (0.5 s doubling, capped at 8 s, with jitter), and when the server
sends `Retry-After` / `retry-after-ms` of at most 2 minutes it waits exactly that long instead (a longer
Retry-After is not retried: the item is rejected, and a rerun asks again). We count the retries it makes
from the `x-stainless-retry-count` header it puts on every attempt. (Checked against openai 3.54.0.)
A 200 answer that is not a usable completion (no `choices`, a choice without `message`, a message without
content) is a server fault the library does not retry: we ask again ourselves, up to `max_retries` times
with a short backoff, then reject the item as "api_error" ("malformed response: no choices ...").

The API key is read from the environment variable named by `LLMConfig.api_key_env`; it is handed to the
openai client only, and never logged, cached, or put in a result or metric.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx2
import openai
from openai.lib import type_to_response_format_param
from pydantic import BaseModel, Field, ValidationError

from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError, SynthVLMError
from synthvlm.llm.cache import ResponseCache, cache_key
from synthvlm.progress import Progress

log = logging.getLogger(__name__)

RejectKind = Literal["api_error", "truncated", "invalid_json", "schema", "refusal", "error"]

# Sent when no key is configured for a self-hosted server (vLLM's and llama.cpp's docs use this value).
NO_KEY_PLACEHOLDER = "EMPTY"
_REASON_CHARS = 500
# Our choice: the openai library's own backoff for a malformed answer (0.5 s doubling, capped at 8 s).
MALFORMED_BACKOFF_S = 0.5
MALFORMED_BACKOFF_MAX_S = 8.0


class LLMConfig(StageConfig):
    """Where and how to call the LLM. The API key itself is never a field: only the variable's name."""

    # None = api.openai.com (or $OPENAI_BASE_URL); e.g. http://vllm:8000/v1 for a self-hosted server.
    base_url: str | None = None
    # The papers used ChatGPT (gpt-3.5-turbo era); our choice: its current low-cost successor.
    model: str = "gpt-4o-mini"
    # Name of the environment variable holding the key (set from a Kubernetes secret in the cluster).
    api_key_env: str = "OPENAI_API_KEY"
    # Our choice: enough to keep a hosted API or one vLLM replica busy without tripping rate limits.
    max_concurrency: int = Field(16, ge=1)
    # Our choice: retries per HTTP call by the openai library (its default is 2; batch jobs can wait longer).
    max_retries: int = Field(5, ge=0)
    # Our choice: per HTTP attempt; a 1K-token reply takes ~10-30 s on a busy hosted model.
    timeout_s: float = Field(60.0, gt=0)
    # The papers give none; the OpenAI API default, which keeps generated prompts diverse.
    temperature: float = Field(1.0, ge=0, le=2)
    # Our choice: StableLLaVA dialogues are filtered at 500 characters (~150 tokens); prompts are shorter.
    max_tokens: int | None = Field(1024, ge=1)
    # Structured replies: "json_schema" (OpenAI, vLLM, llama.cpp, Ollama >= 0.5) or plain "json_object" mode
    # for servers without schema support (the prompt must then describe the JSON and say "JSON").
    structured_output: Literal["json_schema", "json_object"] = "json_schema"
    # Our choice: on, so a rerun never pays for an answer twice; False turns the cache off (e.g. to sample
    # fresh answers to unchanged requests).
    cache: bool = True
    # Response cache directory, local path or gs:// URI; None = the stage's default, <data root>/llm-cache.
    cache_dir: str | None = None
    # USD per 1,000 tokens, for cost accounting only; 0 = not tracked (self-hosted).
    price_per_1k_input: float = Field(0.0, ge=0)
    price_per_1k_output: float = Field(0.0, ge=0)


@dataclass(frozen=True)
class LLMRequest:
    """One chat request. `seed` is sent to the server and is part of the cache key, so several samples
    of the same messages are cached separately. `task` names the kind of request (e.g. "caption_judge"):
    the offline template backend picks its generator by it (synthvlm.llm.template_backend); it is never
    sent to the server and is not part of the cache key."""

    id: str
    messages: Sequence[Mapping[str, Any]]
    schema: type[BaseModel] | None = None
    seed: int | None = None
    task: str | None = None

    @classmethod
    def from_prompt(
        cls,
        id: str,
        prompt: str,
        *,
        system: str | None = None,
        schema: type[BaseModel] | None = None,
        seed: int | None = None,
        task: str | None = None,
    ) -> LLMRequest:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return cls(id=id, messages=tuple(messages), schema=schema, seed=seed, task=task)


@dataclass
class LLMResult:
    """The outcome of one request: produced (`ok`) or rejected with `reject_kind` and `reason`."""

    id: str
    text: str | None = None
    parsed: BaseModel | None = None
    finish_reason: str | None = None
    reject_kind: RejectKind | None = None
    reason: str | None = None
    repaired: bool = False
    cached: bool = False  # every call this result needed was answered from the cache
    prompt_tokens: int = 0  # tokens billed by this run (0 for cached calls)
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.reject_kind is None


class LLMAccessError(SynthVLMError):
    """The endpoint refuses every request (bad key, no permission, unknown model or URL): stop the run."""


class _MalformedResponse(Exception):
    """The server answered (HTTP 200) with something that is not a usable chat completion."""


@dataclass
class _Completion:
    """The part of one chat completion we use, as stored in the cache."""

    content: str | None
    finish_reason: str | None
    refusal: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    def to_entry(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "finish_reason": self.finish_reason,
            "refusal": self.refusal,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
        }

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> _Completion:
        return cls(entry.get("content"), entry.get("finish_reason"), entry.get("refusal"), cached=True)

    @classmethod
    def from_response(cls, response: Any) -> _Completion:
        """Raises _MalformedResponse for an answer without a usable first choice (the openai library
        builds its objects without validation: a body with `"choices": []` arrives as an empty list)."""
        if isinstance(response, str | bytes):  # a non-JSON body (e.g. a proxy's HTML page)
            raise _MalformedResponse("not a chat completion (a non-JSON body)")
        choices = getattr(response, "choices", None)
        if not choices or not isinstance(choices, list):
            raise _MalformedResponse("no choices")
        message = getattr(choices[0], "message", None)
        if message is None:
            raise _MalformedResponse("no message in the first choice")
        content = getattr(message, "content", None)
        refusal = getattr(message, "refusal", None)
        finish_reason = getattr(choices[0], "finish_reason", None)
        # None content is an answer only when something says why (a refusal, a cut-off, the filter).
        if content is None and not refusal and finish_reason not in ("length", "content_filter"):
            raise _MalformedResponse(f"a message without content (finish_reason={finish_reason})")
        usage = getattr(response, "usage", None)
        return cls(
            content=content,
            finish_reason=finish_reason,
            refusal=refusal,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
        )


@dataclass
class _Problem:
    kind: RejectKind
    detail: str


@dataclass
class _Batch:
    """Per-call state of one complete_many run."""

    api: openai.AsyncOpenAI
    semaphore: asyncio.Semaphore
    progress: Progress  # done/total, rate and ETA: a bar on a terminal, a line every 30 s in pods


METRIC_COUNTS = (
    "items",
    "produced",
    "rejected",
    "requests",
    "retries",
    "cache_hits",
    "repairs",
    "prompt_tokens",
    "completion_tokens",
)


def metrics_from_counts(counts: Mapping[str, int], cost_usd: float) -> dict[str, int | float]:
    """Stage metrics of an LLM backend: the METRIC_COUNTS, the cost, and one count per reject kind."""
    out: dict[str, int | float] = {f"llm_{name}": counts[name] for name in METRIC_COUNTS}
    out["llm_cost_usd"] = round(cost_usd, 6)
    out.update({f"llm_{k}": v for k, v in sorted(counts.items()) if k.startswith("rejected_")})
    return out


class LLMClient:
    """Batch chat completions with bounded concurrency, validation, repair, caching and accounting."""

    def __init__(self, config: LLMConfig, *, default_cache_dir: str | None = None):
        """`default_cache_dir`: the cache to use when `config.cache_dir` is not set (stages pass
        `<data root>/llm-cache`); `config.cache=False` turns the cache off either way."""
        self.config = config
        self._api_key = _read_api_key(config)
        cache_dir = (config.cache_dir or default_cache_dir) if config.cache else None
        self._cache = ResponseCache(cache_dir) if cache_dir else None
        self._counts: Counter[str] = Counter()
        # Once per client (a stage makes one): where answers are kept is what decides what a rerun re-asks.
        if cache_dir:
            log.info("llm: response cache %s (answers found there are not asked again)", cache_dir)
        elif not config.cache:
            log.info("llm: response cache off (llm.cache=false): every request is sent")
        else:
            log.warning("llm: no response cache directory: a rerun asks every request again")

    def __repr__(self) -> str:  # never show the key
        return f"LLMClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    # ---- public API -------------------------------------------------------------------------------

    async def complete_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        """Answer every request; results come back in input order, each produced or rejected.

        Pass chunks of a few thousand requests: all of a chunk's tasks exist at once. Raises
        LLMAccessError when the endpoint refuses the run as a whole.
        """
        requests = list(requests)
        async with self._open_api() as api:
            progress = Progress(f"llm {self.config.model}", len(requests), "requests")
            batch = _Batch(api, asyncio.Semaphore(self.config.max_concurrency), progress)
            try:
                with progress:
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(self._complete_one(batch, r)) for r in requests]
            except* LLMAccessError as errors:
                raise errors.exceptions[0] from None
        log.info(
            "llm: %d answered (%d from the cache, %d rejected so far)",
            len(tasks),
            self._counts["cache_hits"],
            self._counts["rejected"],
        )
        return [task.result() for task in tasks]

    def run_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        """Synchronous `complete_many` for stage code that is not async."""
        return asyncio.run(self.complete_many(requests))

    def metrics(self) -> dict[str, int | float]:
        """Counters for stage metrics (flat numbers, prefixed `llm_`), summed over this client's batches.

        requests = HTTP requests sent (retries included), retries = the library's re-sends, cache_hits =
        calls answered from the cache, repairs = repair turns, tokens = billed tokens (not cached ones).
        retries also counts our own re-asks of malformed answers.
        """
        counts = self._counts
        cost = (
            counts["prompt_tokens"] * self.config.price_per_1k_input
            + counts["completion_tokens"] * self.config.price_per_1k_output
        ) / 1000.0
        return metrics_from_counts(counts, cost)

    # ---- internals ----------------------------------------------------------------------------------

    def _open_api(self) -> openai.AsyncOpenAI:
        # A fresh client per batch: httpx connections belong to the event loop that opened them, and
        # stage code may call run_many (asyncio.run) several times.
        limit = self.config.max_concurrency
        http_client = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=limit, max_keepalive_connections=limit),
            event_hooks={"request": [self._on_http_request]},
        )
        return openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=self.config.base_url,
            max_retries=self.config.max_retries,
            timeout=self.config.timeout_s,
            http_client=http_client,
        )

    async def _on_http_request(self, request: httpx2.Request) -> None:
        self._counts["requests"] += 1
        if request.headers.get("x-stainless-retry-count", "0") != "0":
            self._counts["retries"] += 1

    async def _complete_one(self, batch: _Batch, request: LLMRequest) -> LLMResult:
        try:
            result = await self._produce(batch, request)
        except LLMAccessError:
            raise
        except Exception as exc:  # one bad item must not sink the batch
            log.warning("llm request %s failed unexpectedly: %s", request.id, _short(repr(exc)))
            result = LLMResult(
                id=request.id, reject_kind="error", reason=_short(f"{type(exc).__name__}: {exc}")
            )
        self._account(result)
        batch.progress.update()
        return result

    async def _produce(self, batch: _Batch, request: LLMRequest) -> LLMResult:
        messages = [dict(m) for m in request.messages]
        first = await self._call_or_problem(batch, request, messages)
        if isinstance(first, _Problem):
            return _rejected(request, first)
        if request.schema is None:
            return _produced(request, first, parsed=None, calls=[first])
        parsed, problem = _validate(first, request.schema)
        if problem is None:
            return _produced(request, first, parsed, calls=[first])
        if problem.kind == "refusal":
            return _rejected(request, problem, calls=[first])

        self._counts["repairs"] += 1
        repair = [*messages, {"role": "assistant", "content": first.content or ""}, _repair_turn(problem)]
        second = await self._call_or_problem(batch, request, repair)
        if isinstance(second, _Problem):
            return _rejected(request, _Problem(second.kind, f"repair failed: {second.detail}"), calls=[first])
        parsed, second_problem = _validate(second, request.schema)
        if second_problem is None:
            result = _produced(request, second, parsed, calls=[first, second])
            result.repaired = True
            return result
        detail = f"{second_problem.detail} (after one repair; first reply: {problem.detail})"
        return _rejected(request, _Problem(second_problem.kind, detail), calls=[first, second])

    async def _call_or_problem(
        self, batch: _Batch, request: LLMRequest, messages: list[dict[str, Any]]
    ) -> _Completion | _Problem:
        try:
            return await self._call(batch, request, messages)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise LLMAccessError(
                f"LLM endpoint {self.config.base_url or 'OpenAI'} refused the request "
                f"(HTTP {exc.status_code}, {type(exc).__name__}); check the model name, URL and "
                f"the key in ${self.config.api_key_env}"
            ) from None
        except openai.APIError as exc:
            return _Problem("api_error", _describe_api_error(exc, self.config.max_retries))
        except _MalformedResponse as exc:
            detail = f"malformed response: {exc} (gave up after {self.config.max_retries} retries)"
            return _Problem("api_error", _short(detail))

    async def _call(self, batch: _Batch, request: LLMRequest, messages: list[dict[str, Any]]) -> _Completion:
        params = self._params(request)
        # The key is the whole request body: a changed prompt, model, sampling parameter or schema asks
        # again; the URL, the key and how we send (concurrency, timeout, retries) are not in it (module doc).
        key = cache_key({"messages": messages, **params})
        if self._cache is not None:
            entry = await asyncio.to_thread(self._cache.get, key)
            if entry is not None:
                self._counts["cache_hits"] += 1
                return _Completion.from_entry(entry)
        completion = await self._ask(batch, request, messages, params)
        if self._cache is not None:
            await asyncio.to_thread(self._cache.put, key, completion.to_entry())
        return completion

    async def _ask(
        self, batch: _Batch, request: LLMRequest, messages: list[dict[str, Any]], params: dict[str, Any]
    ) -> _Completion:
        """One completion from the server. A malformed answer is a transient server fault: asked again
        up to max_retries times with backoff; then _MalformedResponse propagates (never cached)."""
        # The slot stays held through the retry sleeps (the library's and ours): under 429s, or a server
        # answering garbage, that is the backpressure we want.
        async with batch.semaphore:
            for attempt in range(self.config.max_retries + 1):
                response = await batch.api.chat.completions.create(messages=messages, **params)
                try:
                    return _Completion.from_response(response)
                except _MalformedResponse as exc:
                    if attempt == self.config.max_retries:
                        raise
                    self._counts["retries"] += 1
                    log.warning("llm request %s: malformed response (%s); asking again", request.id, exc)
                    await asyncio.sleep(_malformed_backoff(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")  # for type checkers

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        """Everything sent besides the messages (model, sampling parameters, response format); also the
        rest of the cache key. No URL and no API key: see the module docstring."""
        params: dict[str, Any] = {"model": self.config.model, "temperature": self.config.temperature}
        # max_tokens rather than max_completion_tokens: every compatible server understands it.
        if self.config.max_tokens is not None:
            params["max_tokens"] = self.config.max_tokens
        if request.seed is not None:
            params["seed"] = request.seed
        if request.schema is not None:
            params["response_format"] = self._response_format(request.schema)
        return params

    def _response_format(self, schema: type[BaseModel]) -> dict[str, Any]:
        if self.config.structured_output == "json_object":
            return {"type": "json_object"}
        return _strict_schema_format(schema)

    def _account(self, result: LLMResult) -> None:
        counts = self._counts
        counts["items"] += 1
        counts["prompt_tokens"] += result.prompt_tokens
        counts["completion_tokens"] += result.completion_tokens
        if result.ok:
            counts["produced"] += 1
        else:
            counts["rejected"] += 1
            counts[f"rejected_{result.reject_kind}"] += 1


@functools.lru_cache(maxsize=64)
def _strict_schema_format(schema: type[BaseModel]) -> dict[str, Any]:
    """openai's own conversion to a strict JSON schema (additionalProperties false, all fields required);
    computed once per model class (it costs ~0.7 ms, as much as the rest of a request)."""
    return dict(type_to_response_format_param(schema))


def _malformed_backoff(attempt: int) -> float:
    """Seconds before re-asking after a malformed answer: doubling, capped, with the library's jitter
    (so a batch that all got garbage at once does not come back at once)."""
    delay = min(MALFORMED_BACKOFF_S * 2**attempt, MALFORMED_BACKOFF_MAX_S)
    return delay * (1 - 0.25 * random.random())


def _read_api_key(config: LLMConfig) -> str:
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if config.base_url is None:
        raise ConfigError(
            f"the OpenAI API needs a key: set the environment variable {config.api_key_env} "
            "(or point llm.base_url at a self-hosted server)"
        )
    log.info("$%s is not set: sending no key to %s", config.api_key_env, config.base_url)
    return NO_KEY_PLACEHOLDER


def _validate(completion: _Completion, schema: type[BaseModel]) -> tuple[BaseModel | None, _Problem | None]:
    if completion.refusal:
        return None, _Problem("refusal", _short(f"model refused: {completion.refusal}"))
    if completion.finish_reason == "content_filter":
        return None, _Problem("refusal", "reply stopped by the content filter")
    if completion.finish_reason == "length":
        return None, _Problem("truncated", "reply cut off at max_tokens (finish_reason=length)")
    if not completion.content:
        return None, _Problem("invalid_json", "empty reply")
    try:
        return schema.model_validate_json(completion.content), None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        kind: RejectKind = "invalid_json" if any(e["type"] == "json_invalid" for e in errors) else "schema"
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in errors)
        return None, _Problem(kind, _short(detail))


def _repair_turn(problem: _Problem) -> dict[str, str]:
    if problem.kind == "truncated":
        text = (
            "Your reply was cut off before the JSON was complete. Reply again with a shorter, complete "
            "JSON object that follows the requested format, and nothing else."
        )
    else:
        text = (
            f"Your reply was not valid: {problem.detail}. Reply again with only a JSON object that "
            "follows the requested format, and nothing else."
        )
    return {"role": "user", "content": text}


def _describe_api_error(exc: openai.APIError, max_retries: int) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out (gave up after {max_retries} retries)"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection failed (gave up after {max_retries} retries)"
    if isinstance(exc, openai.APIStatusError):
        return _short(f"HTTP {exc.status_code} {type(exc).__name__}: {exc.message}")
    return _short(f"{type(exc).__name__}: {exc}")


def _produced(
    request: LLMRequest, completion: _Completion, parsed: BaseModel | None, calls: list[_Completion]
) -> LLMResult:
    result = LLMResult(
        id=request.id, text=completion.content, parsed=parsed, finish_reason=completion.finish_reason
    )
    _add_usage(result, calls)
    return result


def _rejected(request: LLMRequest, problem: _Problem, calls: Sequence[_Completion] = ()) -> LLMResult:
    last = calls[-1] if calls else None
    result = LLMResult(
        id=request.id,
        text=last.content if last else None,
        finish_reason=last.finish_reason if last else None,
        reject_kind=problem.kind,
        reason=problem.detail,
    )
    _add_usage(result, calls)
    return result


def _add_usage(result: LLMResult, calls: Sequence[_Completion]) -> None:
    result.prompt_tokens = sum(c.prompt_tokens for c in calls if not c.cached)
    result.completion_tokens = sum(c.completion_tokens for c in calls if not c.cached)
    result.cached = bool(calls) and all(c.cached for c in calls)


def _short(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
