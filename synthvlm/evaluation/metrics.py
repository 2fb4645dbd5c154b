"""Answer parsing and metrics: VQA accuracy, multiple choice, yes/no (POPE), keyword match, breakdowns.

Everything here is pure and model-free: it turns (benchmark item, model output) pairs into per-item
scores (`ItemScore`) and per-item scores into metrics, overall and per ability.

- VQA: answers are normalized as the VQAv2 evaluation does (lowercase, punctuation, articles, number
  words -> digits, contractions without their apostrophe restored); one reference = exact match, several
  (human) references = min(#references equal to the answer / 3, 1).
- Multiple choice: the option letter is extracted from free text ("B", "(B) cat", "The answer is B",
  or the text of exactly one choice); CircularEval (MMBench) asks once per rotation of the choices and
  counts the item correct only when every rotation is.
- Yes/no: the first sentence decides (a leading yes/no, else a negation means no, else a 'yes' means
  yes, else unparsed). POPE metrics treat "yes" as the positive class; an unparsed answer is wrong and
  counts as "not yes" (POPE's own script would count it as yes).
- Keyword: correct when a reference keyword appears, as whole normalized words, in the answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from synthvlm.evaluation.benchmarks import OPTION_LETTERS, BenchmarkItem

YesNo = Literal["yes", "no"]
KeywordMode = Literal["any", "all"]

# ---- VQA normalization -----------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
# The VQAv2 evaluation maps number words up to ten (and "none", for counting questions) to digits.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Contractions whose apostrophe-less spelling is not itself an English word ("well", "its", "shed" are
# left alone): "dont" -> "don't", so both spellings compare equal.
_CONTRACTIONS_TEXT = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've
when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
"""
_CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTIONS_TEXT.split()}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)[.:]|[.:](?!\d)")  # keep "3.5" and "10:30", drop the rest
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-<>@`,?!*#%&~^|]")


def normalize_answer(text: str) -> str:
    """VQAv2-style normalization: 'The Two dogs!' -> '2 dogs', 'dont' -> "don't", '1,000' -> '1000'."""
    text = " ".join(text.lower().split())
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_POINT.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = word.strip("'")
        if not word or word in _ARTICLES:
            continue
        word = _NUMBER_WORDS.get(word, word)
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_score(prediction: str, references: Sequence[str]) -> float:
    """1/0 exact match against one reference; min(#equal references / 3, 1) against several (VQAv2)."""
    answer = normalize_answer(prediction)
    normalized = [normalize_answer(ref) for ref in references]
    if len(normalized) == 1:
        return float(answer == normalized[0])
    return min(sum(ref == answer for ref in normalized) / 3.0, 1.0)


# ---- multiple choice -------------------------------------------------------------------------------

_BARE_LETTER = re.compile(r"[\s(\[]*([A-Za-z])[\s)\].:,]*")  # the whole answer is a letter: any case
_STATED_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*[(\[]?([A-Z])(?![A-Za-z'])")
_LEADING_LETTER = re.compile(r"\s*[(\[]?([A-Z])(?:[).:\],]|\s*-\s)")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
# "A" and "I" are also words: sentence-initial "A cat", "I think".
_WORD_LETTER = re.compile(r"(?<![A-Za-z'])[AI] +(?!(?:and|or)\b)[a-z]")


def _letter_in_range(letter: str | None, n_choices: int) -> str | None:
    return letter if letter is not None and letter in OPTION_LETTERS[:n_choices] else None


def _letter_from_choice_text(prediction: str, choices: Sequence[str]) -> str | None:
    """The letter of the one choice whose text the answer contains (a choice inside another loses)."""
    answer = f" {normalize_answer(prediction)} "
    texts = [normalize_answer(choice) for choice in choices]
    found = [i for i, text in enumerate(texts) if text and f" {text} " in answer]
    longest = [i for i in found if not any(j != i and f" {texts[i]} " in f" {texts[j]} " for j in found)]
    distinct = {texts[i] for i in longest}
    return OPTION_LETTERS[longest[0]] if len(distinct) == 1 and len(longest) == 1 else None


def _names_letter(text: str, match: re.Match[str]) -> bool:
    """False when the matched 'A' or 'I' is the word ('A cat', 'I think'), not an option letter."""
    return match.group(1) not in "AI" or not _WORD_LETTER.match(text, match.start(1))


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter an answer picks, or None when it picks none or several."""
    n = len(choices)
    text = prediction.strip()
    match = _BARE_LETTER.fullmatch(text) or _STATED_LETTER.search(text) or _LEADING_LETTER.match(text)
    if match and _names_letter(text, match):
        return _letter_in_range(match.group(1).upper(), n)
    without_words = _WORD_LETTER.sub(" ", text)
    letters = {m for m in _STANDALONE_LETTER.findall(without_words) if m in OPTION_LETTERS[:n]}
    if len(letters) == 1:
        return letters.pop()
    if letters:
        return None  # several letters named: ambiguous
    return _letter_from_choice_text(prediction, choices)


def rotate_choices(choices: Sequence[str], correct: str, shift: int) -> tuple[list[str], str]:
    """Choices rotated left by `shift` and the correct answer's new letter (MMBench CircularEval)."""
    n = len(choices)
    rotated = [choices[(i + shift) % n] for i in range(n)]
    new_index = (OPTION_LETTERS.index(correct) - shift) % n
    return rotated, OPTION_LETTERS[new_index]


# ---- yes / no ----------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?\n]")
_NEGATIONS = frozenset(
    {"no", "not", "nope", "never", "none", "nothing", "nobody", "cannot", "neither", "nor"}
)


def parse_yes_no(text: str) -> YesNo | None:
    """'Yes, there is.' -> yes; 'There is no dog.' -> no; "I don't see one" -> no; 'A dog.' -> None."""
    for sentence in _SENTENCE_END.split(text):
        words = re.findall(r"[a-z']+", sentence.lower().replace("\u2019", "'"))
        if not words:
            continue
        if words[0] in ("yes", "no"):
            return words[0]  # type: ignore[return-value]
        if any(word in _NEGATIONS or word.endswith("n't") for word in words):
            return "no"
        if "yes" in words:
            return "yes"
        return None
    return None


def pope_metrics(predicted: Sequence[YesNo | None], gold: Sequence[YesNo]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class; None (unparsed) is never a "yes"."""
    if len(predicted) != len(gold):
        raise ValueError("predicted and gold answers differ in length")
    pairs = list(zip(predicted, gold, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p != "yes" and g == "yes" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "unparsed": float(sum(p is None for p in predicted)),
    }


# ---- keywords ----------------------------------------------------------------------------------------


def keyword_match(prediction: str, keywords: Sequence[str], mode: KeywordMode = "any") -> bool:
    """Whether the normalized answer contains any (or all) normalized keywords as whole words."""
    answer = f" {normalize_answer(prediction)} "
    hits = [f" {normalize_answer(k)} " in answer for k in keywords if normalize_answer(k)]
    if not hits:
        return False
    return any(hits) if mode == "any" else all(hits)


# ---- per-item scores and aggregation -------------------------------------------------------------------


@dataclass
class ItemScore:
    """The score of one item. `score` is in [0, 1] (None for judge-only items); `parsed` is the extracted
    letter or yes/no; judge fields are set when the item was sent to the LLM judge."""

    item_id: str
    type: str
    ability: str | None
    outputs: list[str]
    score: float | None = None
    parsed: str | None = None
    gold: str | None = None
    judge_score: int | None = None
    judge_reason: str | None = None
    judge_failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_item(item: BenchmarkItem, outputs: Sequence[str], keyword_mode: KeywordMode = "any") -> ItemScore:
    """Score the model's output(s) for one item (several outputs: one per CircularEval rotation)."""
    if not outputs:
        raise ValueError(f"no model output for item {item.id}")
    result = ItemScore(item_id=item.id or "", type=item.type, ability=item.ability, outputs=list(outputs))
    first = outputs[0]
    if item.type == "vqa":
        result.score = vqa_score(first, item.references)
    elif item.type == "multiple_choice":
        _score_choices(item, outputs, result)
    elif item.type == "yes_no":
        parsed = parse_yes_no(first)
        result.parsed, result.gold = parsed, item.references[0].strip().lower()
        result.score = float(parsed == result.gold)
    elif item.type == "keyword":
        result.score = float(keyword_match(first, item.references, keyword_mode))
    return result


def _score_choices(item: BenchmarkItem, outputs: Sequence[str], result: ItemScore) -> None:
    assert item.choices is not None
    correct = item.correct_letter
    letters = []
    for shift, output in enumerate(outputs):
        choices, expected = rotate_choices(item.choices, correct, shift)
        letter = extract_choice(output, choices)
        letters.append(letter)
        if letter != expected:
            result.score = 0.0
            break
    else:
        result.score = 1.0
    # Report the letter in the original order of the choices (first rotation).
    result.parsed, result.gold = letters[0], correct


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def type_metrics(scores: Sequence[ItemScore]) -> dict[str, float]:
    """Metrics of items of one type."""
    if not scores:
        return {}
    kind = scores[0].type
    out: dict[str, float] = {"n": float(len(scores))}
    if kind == "yes_no":
        out.update(pope_metrics([s.parsed for s in scores], [s.gold for s in scores]))  # type: ignore[misc]
    elif kind != "judge":
        out["accuracy"] = _mean(s.score or 0.0 for s in scores)
    if kind == "multiple_choice":
        out["unparsed"] = float(sum(s.parsed is None for s in scores))
    judged = [float(s.judge_score) for s in scores if s.judge_score is not None]
    failed = sum(s.judge_failed for s in scores)
    if judged:  # no mean when the judge scored nothing: a 0 would read as "all answers wrong"
        out["score" if kind == "judge" else "judge_score"] = _mean(judged)
    if judged or failed:
        out["judge_failed"] = float(failed)
    return out


def summarize(scores: Sequence[ItemScore]) -> dict[str, dict[str, float]]:
    """{item type: metrics} over `scores`."""
    by_type: dict[str, list[ItemScore]] = defaultdict(list)
    for score in scores:
        by_type[score.type].append(score)
    return {kind: type_metrics(group) for kind, group in sorted(by_type.items())}


def by_ability(scores: Sequence[ItemScore]) -> dict[str, dict[str, dict[str, float]]]:
    """{ability: {item type: metrics}}; items without an ability are left out."""
    groups: dict[str, list[ItemScore]] = defaultdict(list)
    for score in scores:
        if score.ability is not None:
            groups[score.ability].append(score)
    return {ability: summarize(group) for ability, group in sorted(groups.items())}
