"""LLM access for the caption-judging and prompt/dialogue-writing stages."""

from synthvlm.llm.cache import ResponseCache, cache_key
from synthvlm.llm.client import LLMAccessError, LLMClient, LLMConfig, LLMRequest, LLMResult

__all__ = [
    "LLMAccessError",
    "LLMClient",
    "LLMConfig",
    "LLMRequest",
    "LLMResult",
    "ResponseCache",
    "cache_key",
]
