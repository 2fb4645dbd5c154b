"""One interface for every LLM stage, whoever answers: a real chat server or the offline templates.

    # config.backend: "openai" (default) or "template"; the cache: config.cache_dir, else this default
    backend = make_backend(config, default_cache_dir=storage.join(data_root, "llm-cache"))
    results = backend.run_many(requests)    # list[LLMResult], input order, each produced or rejected
    stats.extra.update(backend.metrics())   # flat llm_* numbers for the done marker / KFP Metrics
    provenance = backend.describe()         # {"backend": "openai", "model": "gpt-4o-mini"}

"openai" is `LLMClient` (OpenAI or any OpenAI-compatible server: vLLM, llama.cpp, Ollama), with its
concurrency bound, repair turn, response cache (on by default: `config.cache_dir`, else the
`default_cache_dir` the stage passes) and accounting. "template" (synthvlm.llm.template_backend) answers
offline and deterministically from templates registered per task name; it needs no key, no network and
no model, and everything it produces says so (`backend: "template"`, `model: "template"`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol, runtime_checkable

from synthvlm.llm.client import LLMClient, LLMConfig, LLMRequest, LLMResult

BackendName = Literal["openai", "template"]


class BackendConfig(LLMConfig):
    """`LLMConfig` plus the choice of backend. The other fields only matter for "openai"."""

    # our choice: the real LLM by default; "template" for the offline demo and tests (no key, no network).
    backend: BackendName = "openai"


@runtime_checkable
class Backend(Protocol):
    """What LLM stages call. `name` is the backend ("openai" / "template"), `model` what answered."""

    name: str
    model: str

    def run_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        """Answer every request; one result per request, in input order, produced or rejected."""
        ...

    def metrics(self) -> dict[str, int | float]:
        """Flat `llm_*` counters summed over this backend's calls (numbers only, for KFP Metrics)."""
        ...

    def describe(self) -> dict[str, str]:
        """{"backend": name, "model": model}: for record provenance and stage statistics."""
        ...


class OpenAIBackend:
    """The real LLM through `LLMClient`. Reads the API key from the environment when created."""

    name = "openai"

    def __init__(self, config: LLMConfig, *, default_cache_dir: str | None = None):
        self.client = LLMClient(config, default_cache_dir=default_cache_dir)
        self.model = config.model

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.client!r})"

    def run_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        return self.client.run_many(requests)

    def metrics(self) -> dict[str, int | float]:
        return self.client.metrics()

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "model": self.model}


def make_backend(config: LLMConfig, *, default_cache_dir: str | None = None) -> Backend:
    """The backend `config` selects; a plain `LLMConfig` (no `backend` field) means "openai".

    `default_cache_dir`: the response cache used when `config.cache_dir` is not set (stages pass
    `<data root>/llm-cache`); the template backend takes it too, and needs no cache.
    """
    name = getattr(config, "backend", "openai")
    if name == "template":
        from synthvlm.llm.template_backend import TemplateBackend

        return TemplateBackend(default_cache_dir=default_cache_dir)
    return OpenAIBackend(config, default_cache_dir=default_cache_dir)
