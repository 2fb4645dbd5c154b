"""Rule-based caption quality filters (SynthVLM §3.1 "caption curation", first pass).

SynthVLM §3.1 removes "advertisements, overly repetitive descriptions, and captions with significant
grammatical errors". The thresholds here are those of data-juicer's LLaVA-1.5 pretraining caption recipe
(configs/data_juicer_recipes/llava-pretrain-refine.yaml: alphanumeric >= 0.60, character repetition
<= 0.09373663 over 10-grams, word repetition <= 0.03085751 over 10-grams, special characters in
[0.16534802, 0.42023757], no flagged words), the values this project's brief gives (rounded) for
SynthVLM's caption filter; the copy of the paper in shared/papers has no appendix that states them.
The definitions below follow data-juicer's (themselves from BigScience's BLOOM data tooling), so the
thresholds mean what they meant there. They are implemented here from those definitions.

Definitions, for a caption `text` of `len(text)` characters (Python str, i.e. code points):

- **alphanumeric ratio** = #{c in text : c.isalnum()} / len(text). Letters and digits of any script.
- **special-character ratio** = #{c in text : c is special} / len(text), where *special* means every
  character that is not a letter (Unicode category L*) or a combining mark (M*): whitespace, digits and
  other numbers, punctuation, symbols (emoji, currency, math), control characters. Whitespace counts:
  that is what makes the paper range [0.165, 0.420] sensible for normal English, where about one
  character in six is a space between words of ~5 letters ("A dog runs on the beach.": 5 spaces + 1
  period of 24 characters = 0.25). A caption of long words without punctuation falls below 0.165
  ("Photograph of mountains": 2/23 = 0.087), as does one long token; digits, symbols and markup push it
  above 0.42. data-juicer lists its special characters (ASCII punctuation, digits and whitespace plus a
  list of symbols and all emoji); the Unicode categories cover the same characters and a few more
  symbols, with no list to keep up to date.
- **words** (for word repetition and flagged words): `text` split on whitespace, lowercased, each word
  stripped of special characters at both ends ("Beach!" -> "beach", "--" -> dropped, and, digits being
  special, "2nd" -> "nd", "50%" -> dropped); empty words dropped.
- **character repetition ratio** (BLOOM's definition), over the len(text) - n + 1 character n-grams
  (n = 10; spaces and punctuation included, case kept): let c(g) be the count of each distinct n-gram g,
  D the number of distinct n-grams and R the number occurring more than once; with k = min(floor(sqrt(D)),
  R), the ratio is (sum of the k largest counts) / (number of n-grams). So only repeated n-grams count, and
  at most the sqrt(D) most frequent of them (a long text is not punished for many incidental repeats).
  0 when the text is shorter than n. Example, n = 3, "abcabcabc": 7 n-grams, counts abc 3, bca 2, cab 2;
  D = 3, k = min(1, 3) = 1, ratio = 3/7.
- **word repetition ratio**, over the word n-grams (n = 10 consecutive words): (sum of c(g) over the
  n-grams with c(g) > 1) / (number of n-grams), i.e. the fraction of n-gram occurrences that belong to an
  n-gram seen more than once. 0 when there are fewer than n words. Example, n = 2, "a b a b c": 2-grams
  "a b" x2, "b a", "b c" -> 2/4 = 0.5.
- **flagged-word ratio** = (occurrences of flagged words or phrases among the words) / (number of words);
  a multi-word entry of the list matches consecutive words. Threshold 0: any flagged word rejects.

Each check keeps a caption when min <= ratio <= max (inclusive, as data-juicer).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError

BUNDLED_PREFIX = "bundled:"
DEFAULT_FLAGGED_WORDS = "bundled:flagged_words.txt"
_BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"

# Reject reasons, in the order the checks run (a caption's reason is its first failed check).
ALNUM_LOW = "alnum_ratio_low"
CHAR_REPETITION_HIGH = "char_repetition_high"
WORD_REPETITION_HIGH = "word_repetition_high"
SPECIAL_CHARS_LOW = "special_char_ratio_low"
SPECIAL_CHARS_HIGH = "special_char_ratio_high"
FLAGGED_WORDS = "flagged_words"
REASONS = (
    ALNUM_LOW,
    CHAR_REPETITION_HIGH,
    WORD_REPETITION_HIGH,
    SPECIAL_CHARS_LOW,
    SPECIAL_CHARS_HIGH,
    FLAGGED_WORDS,
)


class HeuristicsConfig(StageConfig):
    """Thresholds of the rule-based caption filters (definitions in this module's docstring)."""

    enabled: bool = True  # SynthVLM §3.1: low-quality captions are removed first
    # data-juicer llava-pretrain-refine recipe (the brief's SynthVLM thresholds): alphanumeric >= 0.60.
    min_alnum_ratio: float = Field(0.60, ge=0, le=1)
    char_repetition_n: int = Field(10, ge=1)  # same recipe: character 10-grams
    max_char_repetition_ratio: float = Field(0.09373663, ge=0, le=1)  # same recipe (brief: 0.0937)
    word_repetition_n: int = Field(10, ge=1)  # same recipe: word 10-grams
    max_word_repetition_ratio: float = Field(0.03085751, ge=0, le=1)  # same recipe (brief: 0.0309)
    min_special_char_ratio: float = Field(0.16534802, ge=0, le=1)  # same recipe (brief: 0.165)
    max_special_char_ratio: float = Field(0.42023757, ge=0, le=1)  # same recipe (brief: 0.420)
    max_flagged_word_ratio: float = Field(0.0, ge=0, le=1)  # same recipe: no flagged word at all
    # Word list (one word or phrase a line, '#' comments); "bundled:NAME" = synthvlm/data/NAME. Our choice:
    # a short bundled English list of explicit terms; point this at a fuller list for production runs.
    flagged_words: str = DEFAULT_FLAGGED_WORDS

    @model_validator(mode="after")
    def _ordered_bounds(self) -> HeuristicsConfig:
        if self.min_special_char_ratio > self.max_special_char_ratio:
            raise ValueError("min_special_char_ratio must not exceed max_special_char_ratio")
        return self


# ---- the ratios ----------------------------------------------------------------------------------------


def is_special_char(char: str) -> bool:
    """Not a letter (L*) and not a combining mark (M*): whitespace, numbers, punctuation, symbols, ..."""
    return unicodedata.category(char)[0] not in "LM"


def alnum_ratio(text: str) -> float:
    return sum(c.isalnum() for c in text) / len(text) if text else 0.0


def special_char_ratio(text: str) -> float:
    return sum(is_special_char(c) for c in text) / len(text) if text else 0.0


def char_repetition_ratio(text: str, n: int = 10) -> float:
    """BLOOM's character n-gram repetition ratio (see the module docstring)."""
    total = len(text) - n + 1
    if total <= 0:
        return 0.0
    counts = sorted(Counter(text[i : i + n] for i in range(total)).values(), reverse=True)
    repeated = sum(1 for c in counts if c > 1)
    k = min(math.isqrt(len(counts)), repeated)
    return sum(counts[:k]) / total


def words(text: str) -> list[str]:
    """Whitespace-split, lowercased words stripped of special characters at both ends; no empty words."""
    out = []
    for raw in text.lower().split():
        start, end = 0, len(raw)
        while start < end and is_special_char(raw[start]):
            start += 1
        while end > start and is_special_char(raw[end - 1]):
            end -= 1
        if start < end:
            out.append(raw[start:end])
    return out


def _ngrams(items: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def word_repetition_ratio(text_or_words: str | Sequence[str], n: int = 10) -> float:
    """Fraction of word n-gram occurrences whose n-gram occurs more than once (module docstring)."""
    tokens = words(text_or_words) if isinstance(text_or_words, str) else text_or_words
    grams = _ngrams(tokens, n)
    if not grams:
        return 0.0
    return sum(c for c in Counter(grams).values() if c > 1) / len(grams)


class FlaggedWords:
    """A set of flagged words and phrases, matched against `words(text)` (phrases: consecutive words)."""

    def __init__(self, entries: Iterable[str]):
        by_length: dict[int, set[tuple[str, ...]]] = {}
        for entry in entries:
            tokens = tuple(words(entry))
            if tokens:
                by_length.setdefault(len(tokens), set()).add(tokens)
        self._by_length = by_length

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_length.values())

    def find(self, tokens: Sequence[str]) -> list[str]:
        """The flagged entries found among `tokens`, once per occurrence, in text order per length."""
        found = []
        for n, entries in sorted(self._by_length.items()):
            found.extend(" ".join(g) for g in _ngrams(tokens, n) if g in entries)
        return found

    @classmethod
    def from_text(cls, text: str) -> FlaggedWords:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        return cls(line for line in lines if line)

    @classmethod
    def load(cls, uri: str) -> FlaggedWords:
        """Read a word list: a local path, gs:// URI or "bundled:NAME" (synthvlm/data/NAME)."""
        path = str(_BUNDLED_DIR / uri.removeprefix(BUNDLED_PREFIX)) if uri.startswith(BUNDLED_PREFIX) else uri
        try:
            return cls.from_text(storage.read_text(path))
        except FileNotFoundError:
            raise ConfigError(f"config field 'flagged_words': file not found: {uri}") from None


# ---- the filter ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextStats:
    """The heuristic measurements of one caption."""

    alnum_ratio: float
    char_repetition_ratio: float
    word_repetition_ratio: float
    special_char_ratio: float
    flagged_word_ratio: float
    flagged: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flagged"] = list(self.flagged)
        return data


class HeuristicFilter:
    """Measures captions and names the checks they fail, under one `HeuristicsConfig`."""

    def __init__(self, config: HeuristicsConfig, flagged: FlaggedWords | None = None):
        self.config = config
        self.flagged = flagged if flagged is not None else FlaggedWords.load(config.flagged_words)

    def measure(self, text: str) -> TextStats:
        cfg = self.config
        tokens = words(text)
        flagged = self.flagged.find(tokens)
        return TextStats(
            alnum_ratio=alnum_ratio(text),
            char_repetition_ratio=char_repetition_ratio(text, cfg.char_repetition_n),
            word_repetition_ratio=word_repetition_ratio(tokens, cfg.word_repetition_n),
            special_char_ratio=special_char_ratio(text),
            flagged_word_ratio=len(flagged) / len(tokens) if tokens else 0.0,
            flagged=tuple(flagged),
        )

    def failures(self, stats: TextStats) -> list[str]:
        """The reasons (REASONS order) this caption is rejected for; empty = keep."""
        cfg = self.config
        checks = (
            (ALNUM_LOW, stats.alnum_ratio < cfg.min_alnum_ratio),
            (CHAR_REPETITION_HIGH, stats.char_repetition_ratio > cfg.max_char_repetition_ratio),
            (WORD_REPETITION_HIGH, stats.word_repetition_ratio > cfg.max_word_repetition_ratio),
            (SPECIAL_CHARS_LOW, stats.special_char_ratio < cfg.min_special_char_ratio),
            (SPECIAL_CHARS_HIGH, stats.special_char_ratio > cfg.max_special_char_ratio),
            (FLAGGED_WORDS, stats.flagged_word_ratio > cfg.max_flagged_word_ratio),
        )
        return [reason for reason, failed in checks if failed]

    def check(self, text: str) -> tuple[TextStats, list[str]]:
        stats = self.measure(text)
        return stats, self.failures(stats)
