"""The offline "template" LLM backend: deterministic answers built from templates, no model, no network.

It exists for the demo preset and for tests: every LLM stage runs end to end offline, and the same
request always gets the same answer. Nothing it writes is an LLM's output, and it says so: results are
`TemplateResult`s (`model="template"`, `backend="template"`, never `cached`), `describe()` gives
{"backend": "template", "model": "template"} for provenance, and `metrics()` has `llm_template_backend=1`.

How a request is answered, by its `task` (`LLMRequest.task`):
1. a template registered for the task returns the reply text (for a request with a `schema`: a JSON
   object of that schema, validated exactly like a real reply; a mismatch is a "schema" rejection);
2. no template, but a `schema`: `fill_schema` fills the schema deterministically from the request's
   words (strings are word windows of the prompt, numbers respect the field's bounds, Literals pick one
   value, lists get their minimum length or 3 items);
3. neither: rejected (reject_kind "error") naming the task and the registered tasks.

Registry API, for the stages that own the prompts (e.g. synthvlm.stablellava registers one generator per
task name such as "stablellava.prompt.color"):

    from synthvlm.llm.template_backend import register_template, request_text, stable_choice

    def color_prompt(request: LLMRequest) -> str:   # the reply text (JSON when request.schema is set)
        words = request_text(request).split()
        return json.dumps({"prompt": f"a {stable_choice(COLOURS, request.id)} car"})

    register_template("stablellava.prompt.color", color_prompt)

Register at import time of the module that builds the requests, so the template exists whenever that
stage runs. A template must depend on the request only (id, seed, messages); for choices use
`stable_choice` / `stable_int` (sha256), not Python's per-process salted `hash()` or `random`.
Registering a different function under a taken name raises, unless `replace=True` (re-registering the
same function, e.g. after a module reload, is fine).
"""

from __future__ import annotations

import hashlib
import re
import threading
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from synthvlm.llm.client import LLMRequest, LLMResult, RejectKind, metrics_from_counts

TEMPLATE_BACKEND = "template"
TEMPLATE_MODEL = "template"

TemplateFn = Callable[[LLMRequest], str]
T = TypeVar("T")

_templates: dict[str, TemplateFn] = {}
_lock = threading.Lock()
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
_DEFAULT_LIST_ITEMS = 3  # our choice: a short but non-trivial list
_PHRASE_WORDS = 8  # our choice: long enough to read as a phrase of the prompt


# ---- registry ---------------------------------------------------------------------------------------


def register_template(task: str, fn: TemplateFn, *, replace: bool = False) -> TemplateFn:
    """Answer requests whose `task` is `task` with `fn(request) -> reply text`. Returns `fn`."""
    if not task or not task.strip():
        raise ValueError("template task name is empty")
    with _lock:
        current = _templates.get(task)
        if current is not None and not replace and not _same_function(current, fn):
            raise ValueError(
                f"a different template is already registered for task {task!r} "
                f"({current.__module__}.{current.__qualname__}); pass replace=True to override it"
            )
        _templates[task] = fn
    return fn


def unregister_template(task: str) -> None:
    with _lock:
        _templates.pop(task, None)


def get_template(task: str | None) -> TemplateFn | None:
    if task is None:
        return None
    with _lock:
        return _templates.get(task)


def registered_tasks() -> list[str]:
    with _lock:
        return sorted(_templates)


def _qualified_name(fn: TemplateFn) -> tuple[str | None, str | None]:
    return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def _same_function(a: TemplateFn, b: TemplateFn) -> bool:
    """The same object, or the same module-level function defined again (a reloaded module)."""
    module, qualname = _qualified_name(a)
    defined_at_top = module is not None and qualname is not None and "<" not in qualname  # no lambdas
    return a is b or (defined_at_top and _qualified_name(b) == (module, qualname))


# ---- helpers for templates ----------------------------------------------------------------------------


def request_text(request: LLMRequest, role: str = "user") -> str:
    """The text of the request's messages with `role`, joined by newlines (text parts of multi-part
    contents included)."""
    parts: list[str] = []
    for message in request.messages:
        if message.get("role") != role:
            continue
        content = message.get("content")
        if isinstance(content, list):
            parts.extend(str(p["text"]) for p in content if isinstance(p, dict) and "text" in p)
        elif content is not None:
            parts.append(str(content))
    return "\n".join(parts)


def stable_int(*keys: object) -> int:
    """A 64-bit integer from the keys, the same in every process (sha256 of their reprs)."""
    digest = hashlib.sha256("\x1f".join(repr(k) for k in keys).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def stable_choice(options: Sequence[T], *keys: object) -> T:
    """One of `options`, chosen by the keys (deterministic)."""
    if not options:
        raise ValueError("stable_choice needs at least one option")
    return options[stable_int(*keys) % len(options)]


def request_key(request: LLMRequest) -> tuple[object, ...]:
    """What identifies a request's answer: task, id, seed and the messages' text."""
    return (request.task, request.id, request.seed, request_text(request), request_text(request, "system"))


# ---- generic schema filling ---------------------------------------------------------------------------


def fill_schema(schema: type[BaseModel], request: LLMRequest) -> BaseModel:
    """A valid instance of `schema` built deterministically from the request's words.

    Raises TypeError for field types it cannot build and pydantic's ValidationError when a field's
    constraints (patterns, validators) reject what it built: register a template for such tasks.
    """
    words = _WORD.findall(request_text(request)) or ["template"]
    return schema.model_validate(_fill_model(schema, words, request_key(request)))


def _fill_model(model: type[BaseModel], words: list[str], key: tuple[object, ...]) -> dict[str, Any]:
    return {
        name: _fill_value(field.annotation, list(field.metadata), words, (*key, name), name)
        for name, field in model.model_fields.items()
    }


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, attr, None)
            if value is not None:
                out[attr] = value
    return out


def _fill_value(annotation: Any, metadata: list[Any], words: list[str], key: tuple[object, ...], name: str):
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _fill_value(args[0], [*metadata, *args[1:]], words, key, name)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _fill_value(inner[0], metadata, words, key, name) if inner else None
    if origin is Literal:
        return stable_choice(args, *key)
    bounds = _bounds(metadata)
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return _fill_model(annotation, words, key)
        if issubclass(annotation, Enum):
            return stable_choice(list(annotation), *key).value
        if annotation is bool:
            return stable_int(*key) % 2 == 0
        if annotation is int:
            return _fill_int(bounds, key)
        if annotation is float:
            return _fill_float(bounds, key)
        if annotation is str:
            return _fill_str(bounds, words, key)
    if origin in (list, set, frozenset, tuple) or annotation in (list, set, frozenset, tuple):
        return _fill_sequence(origin or annotation, args, bounds, words, key, name)
    if origin is dict or annotation is dict:
        return {}
    if annotation is Any:
        return _fill_str({}, words, key)
    raise TypeError(f"fill_schema cannot build field {name!r} of type {annotation!r}; register a template")


def _fill_int(bounds: dict[str, Any], key: tuple[object, ...]) -> int:
    low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else 1)
    high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else max(low, 10))
    return low + stable_int(*key) % (high - low + 1) if high >= low else low


def _fill_float(bounds: dict[str, Any], key: tuple[object, ...]) -> float:
    low = float(bounds.get("ge", bounds.get("gt", 0.0)))
    high = float(bounds.get("le", bounds.get("lt", low + 1.0)))
    # Strictly inside (low, high) so that gt/lt bounds hold as well; two decimals read well.
    return round(low + (high - low) * (0.05 + 0.9 * (stable_int(*key) % 1000) / 1000), 2)


def _fill_str(bounds: dict[str, Any], words: list[str], key: tuple[object, ...]) -> str:
    start = stable_int(*key) % len(words)
    window = (words[start:] + words[:start])[:_PHRASE_WORDS]
    text = " ".join(window)
    while len(text) < bounds.get("min_length", 1):
        text = f"{text} {text}"
    return text[: bounds["max_length"]] if "max_length" in bounds else text


def _fill_sequence(
    kind: Any,
    args: tuple[Any, ...],
    bounds: dict[str, Any],
    words: list[str],
    key: tuple[object, ...],
    name: str,
):
    if kind is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[int, str, ...]
        return tuple(_fill_value(a, [], words, (*key, i), name) for i, a in enumerate(args))
    item = args[0] if args else str
    count = max(bounds.get("min_length", 0), min(_DEFAULT_LIST_ITEMS, bounds.get("max_length", 10**9)))
    items = [_fill_value(item, [], words, (*key, i), name) for i in range(count)]
    return kind(items) if kind in (set, frozenset, tuple) else items


# ---- the backend ----------------------------------------------------------------------------------------


@dataclass
class TemplateResult(LLMResult):
    """An `LLMResult` produced by the template backend (never by a model)."""

    model: str = TEMPLATE_MODEL
    backend: str = TEMPLATE_BACKEND


class TemplateBackend:
    """Answers `LLMRequest`s from registered templates (see the module docstring), in input order."""

    name = TEMPLATE_BACKEND
    model = TEMPLATE_MODEL

    def __init__(self, *, default_cache_dir: str | None = None) -> None:
        # Accepted like OpenAIBackend's and ignored: a template answer is deterministic and free, so
        # caching it would save nothing (and results must never say `cached`).
        del default_cache_dir
        self._counts: Counter[str] = Counter()

    def run_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        results: list[LLMResult] = []
        for request in requests:
            result = self._answer(request)
            self._account(result)
            results.append(result)
        return results

    def metrics(self) -> dict[str, int | float]:
        """The same keys as `LLMClient.metrics` (no requests, tokens or cost), plus llm_template_backend=1."""
        counts = self._counts
        out = metrics_from_counts(counts, 0.0)
        out["llm_template_backend"] = 1
        return out

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "model": self.model}

    def _answer(self, request: LLMRequest) -> LLMResult:
        template = get_template(request.task)
        try:
            if template is not None:
                text = template(request)
            elif request.schema is not None:
                parsed = fill_schema(request.schema, request)
                return TemplateResult(
                    id=request.id, text=parsed.model_dump_json(), parsed=parsed, finish_reason="stop"
                )
            else:
                return _rejected(
                    request,
                    "error",
                    f"no template registered for task {request.task!r} (registered: {registered_tasks()})",
                )
        except Exception as exc:  # a broken template must not sink the batch, as with a real LLM
            return _rejected(request, "error", f"template failed: {type(exc).__name__}: {exc}"[:500])
        if not isinstance(text, str):
            return _rejected(request, "error", f"template returned {type(text).__name__}, not str")
        if request.schema is None:
            return TemplateResult(id=request.id, text=text, finish_reason="stop")
        try:
            parsed = request.schema.model_validate_json(text)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            kind: RejectKind = (
                "invalid_json" if any(e["type"] == "json_invalid" for e in errors) else "schema"
            )
            detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in errors)
            return _rejected(request, kind, f"template reply does not match the schema: {detail}"[:500], text)
        return TemplateResult(id=request.id, text=text, parsed=parsed, finish_reason="stop")

    def _account(self, result: LLMResult) -> None:
        self._counts["items"] += 1
        if result.ok:
            self._counts["produced"] += 1
        else:
            self._counts["rejected"] += 1
            self._counts[f"rejected_{result.reject_kind}"] += 1


def _rejected(request: LLMRequest, kind: RejectKind, reason: str, text: str | None = None) -> TemplateResult:
    return TemplateResult(id=request.id, text=text, reject_kind=kind, reason=reason)
