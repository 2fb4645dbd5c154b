"""Stable Diffusion prompt syntax: comma-separated keywords, `((x))` emphasis, and the plain text we render.

StableLLaVA (v2 §4.1) writes prompts as keywords separated by commas, the most important one first and
double-bracketed for emphasis: "((crimson umbrella)), wet street, evening". That bracket syntax belongs
to the AUTOMATIC1111 web UI; diffusers has no prompt weighting of its own (it needs compel, which we do
not use), and its CLIP tokenizer would read "((" as literal tokens.

Our choice: strip the brackets for generation and keep the emphasized keyword first. Tokens early in a
Stable Diffusion prompt steer the image more than later ones, and the prompt filter rejects prompts
whose first keyword is not the double-bracketed one (filters.py), so "first" carries the emphasis.
The bracketed prompt is kept in the record's provenance (`raw_prompt`), because the dialogue templates
(Fig. 4 / Fig. 5) ask the LLM about "the keywords enclosed in the double brackets".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPEN, _CLOSE = "([{", ")]}"
_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]}]|$)")  # A1111 "(x:1.3)" weights
_BRACKETS = re.compile(r"[()\[\]{}]")
_SPACES = re.compile(r"\s+")
_EDGE_PUNCT = " .;:!?\"'`"


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


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


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


def parse_prompt(prompt: str) -> ParsedPrompt:
    raws = split_keywords(prompt)
    pairs = [(keyword_text(r), emphasis_level(r)) for r in raws]
    pairs = [(text, level) for text, level in pairs if text]
    return ParsedPrompt(
        raw=prompt.strip(),
        keywords=tuple(text for text, _ in pairs),
        emphasis=tuple(level for _, level in pairs),
    )


def plain_prompt(prompt: str) -> str:
    """'((crimson umbrella)), wet street' -> 'crimson umbrella, wet street' (what the image model gets)."""
    return parse_prompt(prompt).plain


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `phrase` is in `text` as whole words (case-insensitive): 'red' in 'red car', not in 'bored'."""
    phrase = normalize(phrase)
    if not phrase:
        return False
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", normalize(text)) is not None
