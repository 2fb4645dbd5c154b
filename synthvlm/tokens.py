"""What CLIP-style text encoders drop: token counts past their context, and chunks that fit it.

CLIP's text encoder sees 77 tokens: a start token, 75 caption tokens, an end token (open_clip
`SimpleTokenizer`: the sequence is cut at 77 and its last token replaced by end-of-text; diffusers
tokenizes SDXL prompts with `truncation=True, max_length=77`). Everything after that is dropped
silently: two captions that differ only after token 75 get the same text embedding. The functions here
count what is dropped, so manifests can say so, and split a long caption into chunks that each fit,
for scoring modes that see the whole caption (`synthvlm.scoring`, `long_captions: chunk_mean`).

Only CPU tokenizers are involved (no torch, no models): the counts are cheap next to any encoder call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
_WHITESPACE = re.compile(r"\s+")


def open_clip_counter(tokenizer: Any) -> tuple[Callable[[str], int], int]:
    """(caption tokens of a text without start/end tokens, how many of them fit) for an open_clip tokenizer.

    `SimpleTokenizer` (the CLIP BPE of OpenAI CLIP, ViT-*/openai, LAION, TINY_CLIP) is counted exactly, its
    reduction masks included (they too keep context - 2 tokens). Tokenizers wrapping a Hugging Face one
    (SigLIP, CLIPA, ...) are counted with that tokenizer, special tokens included on both sides.
    """
    context = int(getattr(tokenizer, "context_length", 0) or 0)
    if context <= 0:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no context_length")
    encode = getattr(tokenizer, "encode", None)
    if encode is not None and hasattr(tokenizer, "sot_token_id"):
        return (lambda text: len(encode(text))), context - 2  # start and end tokens take 2 places
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None:
        return hf_counter(hf, context)
    raise ValueError(f"cannot count tokens of {type(tokenizer).__name__}")


def hf_counter(tokenizer: Any, context: int | None = None) -> tuple[Callable[[str], int], int]:
    """(tokens of a text with the special tokens, how many fit) for a transformers tokenizer.

    `context` defaults to the tokenizer's `model_max_length` (77 for SDXL's two CLIP tokenizers).
    """
    limit = int(context or tokenizer.model_max_length)

    def count(text: str) -> int:
        # verbose=False: no "sequence length is longer than the specified maximum" warning per call
        return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])

    return count, limit


def dropped(count: Callable[[str], int], limit: int, text: str) -> int:
    """How many tokens of `text` an encoder that keeps `limit` of them never sees."""
    return max(0, count(text) - limit)


def hf_dropped(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens each text loses to a transformers tokenizer's truncation at its model_max_length."""
    count, limit = hf_counter(tokenizer)
    return [dropped(count, limit, text) for text in texts]


def chunk_text(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """`text` in consecutive pieces that each fit `limit` tokens: whole sentences packed greedily, a sentence
    longer than `limit` split between words. A text that fits is returned as is (one chunk).

    Only a single "word" longer than `limit` tokens (a long URL, a run of symbols) can still be cut; callers
    count that with `dropped`. Whitespace between pieces is normalised to one space.
    """
    if count(text) <= limit:
        return [text]
    units: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        if not sentence.strip():
            continue
        if count(sentence) <= limit:
            units.append(sentence.strip())
        else:
            units.extend(_WHITESPACE.split(sentence.strip()))
    chunks: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current} {unit}" if current else unit
        if current and count(candidate) > limit:
            chunks.append(current)
            current = unit
        else:
            current = candidate
    if current:
        chunks.append(current)
    return chunks


DROPPED_TOKENS_KEY = "dropped_tokens"


def dropped_token_counts(provenances: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Per text encoder, how many records lost tokens to it (0 where a record says none were lost).

    Reads what the stages record: `generation.dropped_tokens` ({encoder: tokens}, SDXL's text encoders) and
    `<score_key>_scorer.dropped_tokens` (the CLIP scorer's text encoder, named `<score_key>_scorer`).
    """
    counts: dict[str, int] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, int | float):
            counts[name] = counts.get(name, 0) + (1 if value > 0 else 0)

    for provenance in provenances:
        generation = provenance.get("generation")
        if isinstance(generation, Mapping) and isinstance(generation.get(DROPPED_TOKENS_KEY), Mapping):
            for name, value in generation[DROPPED_TOKENS_KEY].items():
                add(str(name), value)
        for key, value in provenance.items():
            if key.endswith("_scorer") and isinstance(value, Mapping) and DROPPED_TOKENS_KEY in value:
                add(key, value[DROPPED_TOKENS_KEY])
    return counts
