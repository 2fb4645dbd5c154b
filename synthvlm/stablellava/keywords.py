"""Ability keyword banks: "we independently generate ability-related keywords such as color categories
with ChatGPT, and utilize them as a reference during the prompting process" (v2 §4.3, v1 §4.3).

Each request asks for a batch of keywords of one ability and shows a different random handful of the
data file's seed keywords as the kind wanted, asking for others: parallel requests then spread out
instead of all returning the most common colours. Replies are cleaned (brackets, commas, length,
non-visual words), de-duplicated case-insensitively, and merged with the seed bank.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.llm import LLMRequest
from synthvlm.stablellava.abilities import Ability
from synthvlm.stablellava.emphasis import keyword_text, normalize
from synthvlm.stablellava.filters import NON_VISUAL, Verdict, words_found
from synthvlm.stablellava.prompts import input_block

TASK_KEYWORDS = "stablellava.keywords"
MAX_KEYWORD_WORDS = 6  # our choice: a keyword is a short phrase; longer ones are sentences
SHOWN_SEED_KEYWORDS = 5  # our choice: enough to show the kind of keyword, few enough to not anchor on them

KEYWORD_TOO_LONG = "keyword too long"
KEYWORD_EMPTY = "keyword empty"


class KeywordReply(BaseModel):
    """The JSON the LLM returns: a list of keywords."""

    keywords: list[str]


def keyword_text_request(ability: Ability, count: int, shown: Sequence[str]) -> str:
    return (
        f"As an AI visual assistant, your task is to list {count} distinct {ability.label} keywords for "
        f"prompts of a text-to-image generator. {ability.keyword_instruction} Cover a wide and diverse "
        "range rather than only the most common ones, and only things that can be seen in an image.\n"
        f"Keywords of this kind are, for example: {', '.join(shown)}. List other ones.\n\n"
        '#Requirements for outputs\nReply with a JSON object {"keywords": ["...", "..."]}.\n\n'
        + input_block(ability=ability.name, count=count)
    )


def keyword_request(ability: Ability, count: int, index: int, seed: int) -> LLMRequest:
    """Request `index` of an ability; the seed keywords it shows depend on (seed, ability, index)."""
    rng = random.Random(f"{seed}/{ability.name}/{index}")
    shown = rng.sample(ability.keyword_bank, min(SHOWN_SEED_KEYWORDS, len(ability.keyword_bank)))
    request_seed = random.Random(f"seed/{seed}/{ability.name}/{index}").getrandbits(31)
    return LLMRequest.from_prompt(
        f"keywords-{ability.name}-{index:04d}",
        keyword_text_request(ability, count, shown),
        schema=KeywordReply,
        seed=request_seed,
        task=TASK_KEYWORDS,
    )


def clean_keyword(raw: str, nonvisual_words: Sequence[str]) -> tuple[str | None, Verdict | None]:
    """A usable keyword from an LLM reply item (brackets and commas removed), or why there is none."""
    text = keyword_text(raw.replace(",", " "))
    if not text:
        return None, Verdict(KEYWORD_EMPTY, f"{raw!r} is empty after cleaning")
    if len(text.split()) > MAX_KEYWORD_WORDS:
        return None, Verdict(KEYWORD_TOO_LONG, f"{text!r} has more than {MAX_KEYWORD_WORDS} words")
    hits = words_found(text, nonvisual_words)
    if hits:
        return None, Verdict(NON_VISUAL, f"{text!r}: non-visual words {', '.join(hits)}")
    return text, None


def merge_keywords(*lists: Sequence[str]) -> list[str]:
    """Concatenate, keeping the first spelling of each keyword (case-insensitive duplicates dropped)."""
    seen: dict[str, str] = {}
    for keywords in lists:
        for keyword in keywords:
            seen.setdefault(normalize(keyword), keyword)
    return list(seen.values())


def write_banks(uri: str, banks: Mapping[str, Sequence[str]], provenance: Mapping[str, object]) -> None:
    body = {"abilities": {name: list(words) for name, words in banks.items()}, "provenance": dict(provenance)}
    storage.write_text(uri, json.dumps(body, ensure_ascii=False, indent=1), content_type="application/json")


def read_banks(uri: str) -> dict[str, list[str]]:
    """{ability: keywords} from a keywords stage output; errors name the file and field."""
    try:
        data = json.loads(storage.read_text(uri))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(uri, f"cannot read keyword banks: {exc}") from None
    banks = data.get("abilities") if isinstance(data, dict) else None
    if not isinstance(banks, dict):
        raise InputError(uri, "expected an object with an 'abilities' mapping", field="abilities")
    for name, words in banks.items():
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise InputError(uri, "must be a list of non-empty strings", field=f"abilities.{name}")
    return {name: list(words) for name, words in banks.items()}
