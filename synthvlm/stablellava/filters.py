"""StableLLaVA's data filters (v2 §4.1, §4.4) and the train/eval keyword-matching check (v1 §5.2).

Every check returns a `Verdict` (a stable `reason` to count by, and a `detail` for a person) or None
when the item passes; the stages write every dropped item with its verdict to a rejects file.

Prompt filters, in the order they are applied:
- empty prompt; at most `max_keywords` keywords (v2 §4.4 "no more than ten keywords");
- repetition of keywords within the prompt (v2 §4.4 repetition rate; a keyword twice is a wasted slot);
- key subject first (v2 §4.1): the first keyword is double-bracketed and (optionally) contains one of the
  ability's keywords;
- non-visual words (v2 §4.1 "avoid prompts that are non-visual, such as the act of growing");
- task restrictions of the ability (v2 §4.4): a required word (e.g. a person for professions), no
  forbidden word;
- repetition across the dataset (`RepetitionTracker`): the same keyword set again, a near-duplicate of a
  prompt with the same key subject, or a key subject used more than `max_subject_repeats` times.
Image prompts inside interleaved dialogues (v2 App. C) get the ability-free checks (`check_image_prompt`).

Dialogue length (`LengthLimit`, v2 §4.4 "we also limit dialogues to 500 characters"): by default the whole
dialogue (every question and answer, image markers left out) counts; `per: answer` limits each answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from synthvlm.config import StageConfig
from synthvlm.stablellava.abilities import Ability
from synthvlm.stablellava.emphasis import ParsedPrompt, contains_phrase

# Reasons (stable strings: they become stats keys and KFP metric names).
EMPTY_PROMPT = "empty prompt"
TOO_MANY_KEYWORDS = "too many keywords"
REPEATED_KEYWORDS = "repeated keywords in prompt"
SUBJECT_NOT_FIRST = "key keyword not first"
NO_ABILITY_KEYWORD = "no ability keyword emphasized"
NON_VISUAL = "non-visual"
MISSING_REQUIRED = "restriction: required word missing"
FORBIDDEN_WORD = "restriction: forbidden word"
DUPLICATE_PROMPT = "duplicate prompt"
NEAR_DUPLICATE = "near-duplicate prompt"
SUBJECT_OVERUSED = "key subject over-used"
ANSWER_TOO_LONG = "answer too long"
DIALOGUE_TOO_LONG = "dialogue too long"
STRAY_IMAGE_MARKER = "image marker without a picture"
IMAGE_MARKER = "<image>"  # LLaVA's image token; left out of the dialogue length
OVERLAPS_EVAL = "overlaps eval item"

# v2 §4.1 names "the act of growing"; the rest are our choice: processes over time, thoughts and
# feelings, and the other senses (sound, smell, taste, touch) that an image cannot show.
DEFAULT_NONVISUAL_WORDS: tuple[str, ...] = (
    "growing",
    "grows",
    "grow",
    "thinking",
    "thought",
    "thoughts",
    "remembering",
    "imagining",
    "wondering",
    "believing",
    "hoping",
    "dreaming",
    "sound",
    "sounds",
    "noise",
    "noisy",
    "loud",
    "silence",
    "silent",
    "melody",
    "hearing",
    "listening",
    "smell",
    "smells",
    "smelling",
    "scent",
    "scented",
    "aroma",
    "odor",
    "odour",
    "fragrance",
    "fragrant",
    "taste",
    "tastes",
    "tasting",
    "flavor",
    "flavour",
    "becoming",
    "evolving",
    "tomorrow",
    "yesterday",
)


class FilterConfig(StageConfig):
    """Prompt filter settings."""

    max_keywords: int = Field(10, ge=1)  # v2 §4.4: "no more than ten keywords"
    # Our choice: a repeated keyword in one prompt adds nothing (repetition rate, v2 §4.4); 0 = none allowed.
    max_keyword_repetition: float = Field(0.0, ge=0, lt=1)
    # v2 §4.1: the key keyword comes first, double-bracketed; our choice: it must also contain one of the
    # ability's keywords (bank), so that a "colour" prompt really is about a colour.
    require_ability_keyword: bool = True
    # v2 §4.1 "the act of growing"; see DEFAULT_NONVISUAL_WORDS.
    nonvisual_words: list[str] = Field(default_factory=lambda: list(DEFAULT_NONVISUAL_WORDS))
    # Our choice: v2 §4.4 filters by repetition rate across the dataset without giving a number; a prompt
    # whose keyword set matches an accepted prompt with the same key subject at Jaccard >= this is dropped.
    near_duplicate_jaccard: float = Field(0.7, gt=0, le=1)
    # Our choice: at most this many accepted prompts per key subject (first keyword), so that common
    # keywords (v2 §4.3: "outputs frequently revolved around common color categories") cannot dominate.
    max_subject_repeats: int = Field(20, ge=1)


@dataclass(frozen=True)
class Verdict:
    """Why an item was dropped: `reason` is a stable category, `detail` says what exactly."""

    reason: str
    detail: str


def keyword_repetition_rate(keywords: Sequence[str]) -> float:
    """Share of keywords that repeat an earlier one: 1 - unique / total (0.0 for no keywords)."""
    return 1.0 - len(set(keywords)) / len(keywords) if keywords else 0.0


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def words_found(text: str, words: Iterable[str]) -> list[str]:
    """Those of `words` that occur in `text` as whole words or phrases (case-insensitive)."""
    return [w for w in words if contains_phrase(text, w)]


def check_prompt(
    parsed: ParsedPrompt, ability: Ability, ability_keywords: Sequence[str], config: FilterConfig
) -> Verdict | None:
    """The per-prompt filters, in order; the first failure wins. `ability_keywords`: the keyword bank."""
    if not parsed.keywords:
        return Verdict(EMPTY_PROMPT, "the prompt has no keywords")
    if len(parsed.keywords) > config.max_keywords:
        return Verdict(TOO_MANY_KEYWORDS, f"{len(parsed.keywords)} keywords > {config.max_keywords}")
    rate = keyword_repetition_rate(parsed.normalized)
    if rate > config.max_keyword_repetition:
        repeated = sorted(k for k, n in Counter(parsed.normalized).items() if n > 1)
        return Verdict(REPEATED_KEYWORDS, f"repetition rate {rate:.2f}: {', '.join(repeated)}")
    if parsed.emphasis[0] < 2:
        return Verdict(SUBJECT_NOT_FIRST, f"first keyword {parsed.keywords[0]!r} is not double-bracketed")
    if config.require_ability_keyword and not _has_ability_keyword(parsed.keywords[0], ability_keywords):
        return Verdict(
            NO_ABILITY_KEYWORD, f"first keyword {parsed.keywords[0]!r} names no {ability.label} keyword"
        )
    hits = words_found(parsed.plain, config.nonvisual_words)
    if hits:
        return Verdict(NON_VISUAL, f"non-visual words: {', '.join(hits)}")
    return check_restrictions(parsed, ability)


def _has_ability_keyword(first_keyword: str, ability_keywords: Sequence[str]) -> bool:
    return any(
        contains_phrase(first_keyword, k) or contains_phrase(k, first_keyword) for k in ability_keywords
    )


def check_restrictions(parsed: ParsedPrompt, ability: Ability) -> Verdict | None:
    """The ability's task-specific restrictions (v2 §4.4)."""
    rules = ability.restrictions
    if rules.required_any and not words_found(parsed.plain, rules.required_any):
        return Verdict(
            MISSING_REQUIRED, f"{ability.name} prompts need one of: {', '.join(rules.required_any)}"
        )
    forbidden = words_found(parsed.plain, rules.forbidden)
    if forbidden:
        return Verdict(FORBIDDEN_WORD, f"{ability.name} prompts must not contain: {', '.join(forbidden)}")
    return None


class RepetitionTracker:
    """Repetition across the dataset (v2 §4.4): exact repeats, near-duplicates, over-used subjects.

    Candidates are compared only with accepted prompts of the same key subject (first keyword), at most
    `max_subject_repeats` of them, so checking n prompts costs O(n * max_subject_repeats).
    """

    def __init__(self, config: FilterConfig):
        self.config = config
        self._sets: dict[frozenset[str], str] = {}  # keyword set -> id of the accepted prompt
        self._by_subject: defaultdict[str, list[tuple[str, frozenset[str]]]] = defaultdict(list)
        self._keyword_counts: Counter[str] = Counter()

    def check(self, parsed: ParsedPrompt) -> Verdict | None:
        keywords = parsed.keyword_set
        if keywords in self._sets:
            return Verdict(DUPLICATE_PROMPT, f"same keywords as {self._sets[keywords]}")
        same_subject = self._by_subject[parsed.subject]
        if len(same_subject) >= self.config.max_subject_repeats:
            return Verdict(
                SUBJECT_OVERUSED,
                f"key subject {parsed.subject!r} already used {len(same_subject)} times "
                f"(max_subject_repeats={self.config.max_subject_repeats})",
            )
        for other_id, other in same_subject:
            similarity = jaccard(keywords, other)
            if similarity >= self.config.near_duplicate_jaccard:
                return Verdict(NEAR_DUPLICATE, f"keyword Jaccard {similarity:.2f} with {other_id}")
        return None

    def add(self, record_id: str, parsed: ParsedPrompt) -> None:
        self._sets[parsed.keyword_set] = record_id
        self._by_subject[parsed.subject].append((record_id, parsed.keyword_set))
        self._keyword_counts.update(parsed.normalized)

    def dataset_repetition_rate(self) -> float:
        """Share of keyword occurrences among accepted prompts that repeat an earlier occurrence."""
        total = sum(self._keyword_counts.values())
        return 1.0 - len(self._keyword_counts) / total if total else 0.0


class LengthLimit(StageConfig):
    """The dialogue length limit (v2 §4.4)."""

    max_chars: int = Field(500, ge=1)  # v2 §4.4: "we also limit dialogues to 500 characters"
    # v2 §4.4 limits *dialogues*: by default the characters of all questions and answers of one dialogue
    # together (image markers not counted); "answer" is the looser alternative, each answer on its own.
    per: Literal["dialogue", "answer"] = "dialogue"

    def describe(self) -> str:
        """For request texts: what the LLM must keep short."""
        if self.per == "answer":
            return f"each answer has at most {self.max_chars} characters"
        return (
            "the whole conversation (all questions and answers together) has at most "
            f"{self.max_chars} characters"
        )


def dialogue_chars(pairs: Iterable[tuple[str, str]]) -> int:
    """Characters of a dialogue's (question, answer) pairs; `<image>` markers do not count."""
    return sum(len(" ".join(q.replace(IMAGE_MARKER, " ").split())) + len(a) for q, a in pairs)


def answer_length_problem(answers: Iterable[str], max_chars: int) -> Verdict | None:
    """Each answer at most `max_chars` (the `per: answer` reading of v2 §4.4)."""
    for answer in answers:
        if len(answer) > max_chars:
            return Verdict(ANSWER_TOO_LONG, f"an answer has {len(answer)} characters > {max_chars}")
    return None


def length_problem(pairs: Sequence[tuple[str, str]], limit: LengthLimit) -> Verdict | None:
    """v2 §4.4 "we also limit dialogues to 500 characters", per dialogue (default) or per answer."""
    if limit.per == "answer":
        return answer_length_problem((a for _, a in pairs), limit.max_chars)
    total = dialogue_chars(pairs)
    if total > limit.max_chars:
        return Verdict(DIALOGUE_TOO_LONG, f"the dialogue has {total} characters > {limit.max_chars}")
    return None


def check_image_prompt(parsed: ParsedPrompt, config: FilterConfig) -> Verdict | None:
    """The filters of `check_prompt` that do not depend on an ability: for the image prompts an interleaved
    dialogue writes (v2 App. C), whose subject is a step of a task, not an ability keyword."""
    if not parsed.keywords:
        return Verdict(EMPTY_PROMPT, "the image prompt has no keywords")
    if len(parsed.keywords) > config.max_keywords:
        return Verdict(TOO_MANY_KEYWORDS, f"{len(parsed.keywords)} keywords > {config.max_keywords}")
    rate = keyword_repetition_rate(parsed.normalized)
    if rate > config.max_keyword_repetition:
        return Verdict(REPEATED_KEYWORDS, f"repetition rate {rate:.2f}")
    hits = words_found(parsed.plain, config.nonvisual_words)
    if hits:
        return Verdict(NON_VISUAL, f"non-visual words: {', '.join(hits)}")
    return None


def find_eval_overlaps(
    eval_items: Mapping[str, ParsedPrompt], train_items: Mapping[str, ParsedPrompt], threshold: float
) -> dict[str, str]:
    """Training items that match an eval item by keywords: {train id: eval id}.

    v1 §5.2: "a keyword-matching process was implemented to verify that none of the validated [eval] data
    existed within our generated training dataset". Our definition of a match: the same key subject (first
    keyword) and a keyword-set Jaccard >= `threshold`. The caller drops the matching *training* items, so
    the (small, validated) eval set stays whole.
    """
    by_subject: defaultdict[str, list[tuple[str, frozenset[str]]]] = defaultdict(list)
    for eval_id, parsed in eval_items.items():
        by_subject[parsed.subject].append((eval_id, parsed.keyword_set))
    overlaps: dict[str, str] = {}
    for train_id, parsed in train_items.items():
        for eval_id, eval_set in by_subject.get(parsed.subject, ()):
            if jaccard(parsed.keyword_set, eval_set) >= threshold:
                overlaps[train_id] = eval_id
                break
    return overlaps
