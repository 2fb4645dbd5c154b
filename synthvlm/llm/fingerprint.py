"""LLM settings that cannot change an LLM stage's output, for the stages' fingerprints (synthvlm.runner)."""

from __future__ import annotations

# Field of LLMConfig -> why it is left out of a stage's fingerprint.
LLM_RUNTIME_FIELDS: dict[str, str] = {
    "max_concurrency": "how many requests are in flight, not what they ask",
    "max_retries": "retries of the same request",
    "timeout_s": "how long one attempt may take",
    "api_key_env": "where the key is read from",
    "cache_dir": "where answers are cached (the cache is keyed by the request itself)",
    "cache": "whether answers are cached, not what they are",
    "price_per_1k_input": "cost accounting only",
    "price_per_1k_output": "cost accounting only",
}


def llm_runtime_fields(prefix: str) -> dict[str, str]:
    """LLM_RUNTIME_FIELDS under a config path such as "llm" or "judge.llm"."""
    return {f"{prefix}.{name}": why for name, why in LLM_RUNTIME_FIELDS.items()}
