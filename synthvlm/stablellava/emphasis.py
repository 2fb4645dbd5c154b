"""Stable Diffusion prompt syntax: comma-separated keywords, `((x))` emphasis, and what the image model gets.

StableLLaVA (v1 §4.1, v2 §4.1) writes prompts as keywords separated by commas, the most important one
first and double-bracketed "for additional emphasis": "((crimson umbrella)), wet street, evening". The
bracket syntax is the AUTOMATIC1111 web UI's: each `(...)` multiplies the attention weight of its text by
1.1, each `[...]` divides it by 1.1, `(x:1.3)` sets 1.3. diffusers reads none of it (its CLIP tokenizer would
see "((" as literal tokens), so every record carries two forms:

- `plain` (the record's caption): brackets stripped, the emphasized keyword first. The CLIP alignment
  check scores this text, and it is what an image model without prompt weighting gets (`emphasis: strip`).
- `weighted` (`emphasis: weight`, the default): the same keywords in the prompt syntax of compel
  (https://github.com/damian0815/compel, the maintained prompt-weighting library for diffusers, SDXL
  included), `(crimson umbrella)1.21, wet street`, with the A1111 weights above. `weighted_embeddings`
  turns such prompts into SDXL `prompt_embeds` / `pooled_prompt_embeds` through compel.

The bracketed prompt is kept in the record's provenance (`raw_prompt`), because the dialogue templates
(Fig. 4 / Fig. 5) ask the LLM about "the keywords enclosed in the double brackets".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

EmphasisMode = Literal["weight", "strip"]
A1111_STEP = 1.1  # AUTOMATIC1111: "(x)" multiplies attention by 1.1, "[x]" divides by 1.1

_OPEN, _CLOSE = "([{", ")]}"
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]}]|$)")  # A1111 "(x:1.3)" weights
_BRACKETS = re.compile(r"[()\[\]{}]")
_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = " .;:!?\"'`"
_EXPLICIT_WEIGHT = re.compile(r":\s*(-?\d+(?:\.\d+)?)\s*$")
# compel reads a "+" or "-" at the end of a word as an up/down weight, and '"' as quoting: not ours.
_COMPEL_SPECIAL = re.compile(r'[+\-]+(?=[\s,]|$)|"')


def split_keywords(prompt: str) -> list[str]:
    """The raw keywords of a prompt: split at commas outside brackets, stripped, empties dropped."""
    pieces: list[str] = []
    depth = 0
    current: list[str] = []
    for char in prompt:
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def emphasis_level(raw_keyword: str) -> int:
    """How many round-bracket pairs wrap the whole keyword: 'x' 0, '(x)' 1, '((x))' 2, '(( x:1.2 ))' 2."""
    text = raw_keyword.strip()
    level = 0
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
        level += 1
    return level


def _balanced(text: str, open_: str = "(", close: str = ")") -> bool:
    depth = 0
    for char in text:
        if char == open_:
            depth += 1
        elif char == close:
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def keyword_weight(raw_keyword: str) -> float:
    """The AUTOMATIC1111 attention weight of a keyword: '((x))' 1.21, '[x]' 1/1.1, '((x:1.3))' 1.43, 'x' 1.0.

    Only brackets that wrap the whole keyword count (as in `emphasis_level`); an explicit `:w` replaces
    the 1.1 of the bracket pair it sits in.
    """
    text = raw_keyword.strip()
    weight = 1.0
    while len(text) >= 2:
        if text[0] == "(" and text[-1] == ")" and _balanced(text[1:-1]):
            inner = text[1:-1].strip()
            explicit = _EXPLICIT_WEIGHT.search(inner)
            if explicit:
                weight *= float(explicit.group(1))
                inner = inner[: explicit.start()].strip()
            else:
                weight *= A1111_STEP
        elif text[0] == "[" and text[-1] == "]" and _balanced(text[1:-1], "[", "]"):
            inner = text[1:-1].strip()
            weight /= A1111_STEP
        else:
            break
        text = inner
    return round(weight, 4)


def keyword_text(raw_keyword: str) -> str:
    """The keyword without brackets or weights, whitespace collapsed: '((Red  panda:1.2))' -> 'Red panda'."""
    text = _WEIGHT.sub("", raw_keyword)
    text = _BRACKETS.sub(" ", text)
    return _SPACES.sub(" ", text).strip(_EDGE_PUNCT + " ")


def normalize(text: str) -> str:
    """Comparison form of a keyword or phrase: lower case, whitespace collapsed, edge punctuation dropped."""
    return _SPACES.sub(" ", text.lower()).strip(_EDGE_PUNCT + " ")


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into keywords, each with its display text and emphasis level."""

    raw: str
    keywords: tuple[str, ...]  # display text, brackets removed
    emphasis: tuple[int, ...]  # bracket pairs around each keyword
    weights: tuple[float, ...] = ()  # A1111 attention weight of each keyword (keyword_weight)

    @property
    def normalized(self) -> tuple[str, ...]:
        return tuple(normalize(k) for k in self.keywords)

    @property
    def keyword_set(self) -> frozenset[str]:
        return frozenset(self.normalized)

    @property
    def emphasized(self) -> tuple[str, ...]:
        """Keywords in double (or more) brackets: the ones the paper puts first."""
        return tuple(k for k, e in zip(self.keywords, self.emphasis, strict=True) if e >= 2)

    @property
    def subject(self) -> str:
        """The first keyword, normalised: the key subject of the image."""
        return self.normalized[0] if self.keywords else ""

    @property
    def plain(self) -> str:
        """The prompt as diffusers gets it: keywords without brackets, joined by ', '."""
        return ", ".join(self.keywords)

    @property
    def weighted(self) -> str:
        """The prompt in compel's syntax: '(crimson umbrella)1.21, wet street' (weight 1: plain text)."""
        weights = self.weights or (1.0,) * len(self.keywords)
        return ", ".join(compel_fragment(k, w) for k, w in zip(self.keywords, weights, strict=True))

    def for_model(self, mode: EmphasisMode) -> str:
        """What the image model gets under `mode`: the weighted prompt or the plain one."""
        return self.weighted if mode == "weight" else self.plain


def compel_fragment(text: str, weight: float) -> str:
    """One keyword in compel's syntax; characters compel would read as syntax are dropped."""
    clean = _SPACES.sub(" ", _COMPEL_SPECIAL.sub(" ", text)).strip()
    return clean if weight == 1.0 else f"({clean}){weight:g}"


def parse_prompt(prompt: str) -> ParsedPrompt:
    raws = split_keywords(prompt)
    parts = [(keyword_text(r), emphasis_level(r), keyword_weight(r)) for r in raws]
    parts = [part for part in parts if part[0]]
    return ParsedPrompt(
        raw=prompt.strip(),
        keywords=tuple(text for text, _, _ in parts),
        emphasis=tuple(level for _, level, _ in parts),
        weights=tuple(weight for _, _, weight in parts),
    )


def weighted_embeddings(
    pipe: Any, prompts: Sequence[str], negative_prompt: str | None = None
) -> dict[str, Any]:
    """SDXL conditioning for compel-syntax prompts, as keyword arguments of a diffusers SDXL pipeline call:
    `pipe(**weighted_embeddings(pipe, prompts), ...)` instead of `pipe(prompt=prompts, ...)`.

    Uses compel's `CompelForSDXL` (both text encoders, pooled embeddings, prompts longer than 77 tokens).
    Without a negative prompt no negative embeddings are returned, so the pipeline keeps SDXL's zeroed
    negative conditioning (`force_zeros_for_empty_prompt`), as a call with `negative_prompt=None` does.
    """
    from compel import CompelForSDXL  # imported here: only generation with `emphasis: weight` needs it

    compel = CompelForSDXL(pipe, device=str(pipe.device))
    if negative_prompt:
        cond = compel(list(prompts), negative_prompt=[negative_prompt] * len(prompts))
    else:
        cond = compel(list(prompts))
    out = {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled_embeds}
    if cond.negative_embeds is not None:
        out["negative_prompt_embeds"] = cond.negative_embeds
        out["negative_pooled_prompt_embeds"] = cond.negative_pooled_embeds
    return out


def plain_prompt(prompt: str) -> str:
    """'((crimson umbrella)), wet street' -> 'crimson umbrella, wet street' (what the image model gets)."""
    return parse_prompt(prompt).plain


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` is in `text` as whole words (case-insensitive): 'red' in 'red car', not in 'bored'."""
    phrase = normalize(phrase)
    if not phrase:
        return False
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", normalize(text)) is not None
