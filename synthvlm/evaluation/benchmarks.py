"""Benchmarks as JSONL: one question per line, validated with pydantic.

A line holds `image` (a path or URI, or a list of them for multi-image questions), `question`, the
reference `answer` (or `answers`: several human answers for VQA, several acceptable keywords for keyword
matching), `type` (how the answer is scored, see `ItemType`), and optionally `id`, `ability` (for the
per-ability breakdown) and `choices` (multiple choice only). Relative image paths are relative to the
benchmark file. Every problem is reported with the file, the line and the field.

    {"image": "img/cat.jpg", "question": "What animal is this?", "answers": ["cat", "cat", "kitten"],
     "type": "vqa", "ability": "animal"}
    {"image": "img/cat.jpg", "question": "Which animal?", "choices": ["dog", "cat"], "answer": "B",
     "type": "multiple_choice"}
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.records import check_id, iter_jsonl

# How an answer is scored (metrics.py):
#   vqa              normalized exact match; with several answers VQAv2's min(#matching answers / 3, 1)
#   multiple_choice  option letter extracted from the answer (MMBench / ScienceQA-IMG style)
#   yes_no           answer parsed to yes/no; POPE accuracy, precision, recall, F1, yes-ratio
#   keyword          correct when the answer contains a reference keyword (StableLLaVA real-image benchmark)
#   judge            0-5 score from an LLM judge with the StableLLaVA rubric (open-ended answers)
ItemType = Literal["vqa", "multiple_choice", "yes_no", "keyword", "judge"]
ITEM_TYPES: tuple[str, ...] = ("vqa", "multiple_choice", "yes_no", "keyword", "judge")

OPTION_LETTERS = string.ascii_uppercase
MIN_CHOICES = 2
# A bundled benchmark name: the same string in compiled YAML, containers and checkouts.
BUNDLED_PREFIX = "bundled:"
_BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"


class FieldProblem(ValueError):
    """A problem found by a check across fields, naming the field to fix (for the InputError)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def choice_letter(reference: str, choices: list[str]) -> str | None:
    """The option letter a reference answer names: a letter ('B', 'b', '(B)') or a choice's exact text."""
    text = reference.strip().strip("().").strip()
    letters = OPTION_LETTERS[: len(choices)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    folded = [c.strip().casefold() for c in choices]
    if folded.count(text.casefold()) == 1:
        return letters[folded.index(text.casefold())]
    return None


class BenchmarkItem(BaseModel):
    """One benchmark question (a JSONL line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None  # default: "<benchmark name>-<line number>"
    image: str | list[str]
    question: str
    answer: str | None = None
    answers: list[str] | None = None
    type: ItemType
    ability: str | None = None
    choices: list[str] | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value)

    @field_validator("image")
    @classmethod
    def _images_given(cls, value: str | list[str]) -> str | list[str]:
        images = [value] if isinstance(value, str) else value
        if not images:
            raise ValueError("no image given")
        if any(not image.strip() for image in images):
            raise ValueError("empty image path")
        return value

    @field_validator("question")
    @classmethod
    def _non_empty_question(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("question is empty")
        return value

    @field_validator("ability")
    @classmethod
    def _non_empty_ability(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("ability is empty (leave it out instead)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkItem:
        answer_field = "answer" if self.answer is not None else "answers"
        if (self.answer is None) == (self.answers is None):
            raise FieldProblem("answer", "give exactly one of 'answer' or 'answers'")
        if not self.references or any(not ref.strip() for ref in self.references):
            raise FieldProblem(answer_field, "empty reference answer")
        if self.type == "multiple_choice":
            self._check_multiple_choice()
        elif self.choices is not None:
            raise FieldProblem("choices", f"'choices' is only for multiple_choice items, not {self.type}")
        if self.type == "yes_no":
            bad = [ref for ref in self.references if ref.strip().casefold() not in ("yes", "no")]
            if bad:
                msg = f"yes_no reference answers must be 'yes' or 'no', got {bad[0]!r}"
                raise FieldProblem(answer_field, msg)
        return self

    def _check_multiple_choice(self) -> None:
        choices = self.choices
        if choices is None or not MIN_CHOICES <= len(choices) <= len(OPTION_LETTERS):
            msg = f"multiple_choice items need {MIN_CHOICES} to {len(OPTION_LETTERS)} choices"
            raise FieldProblem("choices", msg)
        if any(not choice.strip() for choice in choices):
            raise FieldProblem("choices", "empty choice")
        if len(self.references) != 1:
            raise FieldProblem("answers", "multiple_choice items take one reference 'answer'")
        if choice_letter(self.references[0], choices) is None:
            raise FieldProblem(
                "answer",
                f"answer {self.references[0]!r} is neither an option letter "
                f"({OPTION_LETTERS[0]}-{OPTION_LETTERS[len(choices) - 1]}) nor one of the choices",
            )

    @property
    def references(self) -> list[str]:
        return [self.answer] if self.answer is not None else list(self.answers or [])

    @property
    def images(self) -> list[str]:
        return [self.image] if isinstance(self.image, str) else list(self.image)

    @property
    def correct_letter(self) -> str:
        """The correct option letter (multiple choice only)."""
        if self.type != "multiple_choice" or self.choices is None:
            raise ValueError(f"item {self.id} is not multiple choice")
        letter = choice_letter(self.references[0], self.choices)
        assert letter is not None  # checked by the validator
        return letter


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its name, where it came from, and its items with resolved image URIs."""

    name: str
    uri: str
    items: list[BenchmarkItem]


def benchmark_name(uri: str) -> str:
    """'gs://b/evals/pope.jsonl' -> 'pope'."""
    return uri.rsplit("/", 1)[-1].removeprefix(BUNDLED_PREFIX).removesuffix(".jsonl")


def resolve_benchmark_uri(uri: str) -> str:
    """'bundled:eval_fixtures/colors.jsonl' -> the file shipped in synthvlm/data; other URIs as given."""
    if uri.startswith(BUNDLED_PREFIX):
        return str(_BUNDLED_DIR / uri.removeprefix(BUNDLED_PREFIX))
    return uri


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def resolve_image(image: str, benchmark_uri: str) -> str:
    """Absolute paths and URIs stay; relative paths are taken relative to the benchmark file."""
    if "://" in image or image.startswith("/"):
        return image
    return storage.join(_parent(benchmark_uri), image)


def _item_or_error(uri: str, lineno: int, data: object, name: str) -> BenchmarkItem:
    if not isinstance(data, dict):
        raise InputError(uri, f"expected a JSON object, got {type(data).__name__}", line=lineno)
    try:
        item = BenchmarkItem.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        cause = err.get("ctx", {}).get("error")
        field = cause.field if isinstance(cause, FieldProblem) else ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise InputError(uri, msg, line=lineno, field=field or None) from None
    images = [resolve_image(image, uri) for image in item.images]
    return item.model_copy(
        update={
            "id": item.id or f"{name}-{lineno}",
            "image": images[0] if isinstance(item.image, str) else images,
        }
    )


def parse_benchmark(uri: str, raw: bytes, name: str) -> list[BenchmarkItem]:
    """Validate the JSONL bytes of a benchmark; the first problem raises an InputError naming the line."""
    items: list[BenchmarkItem] = []
    first_line: dict[str, int] = {}
    for lineno, data in iter_jsonl(uri, raw):
        item = _item_or_error(uri, lineno, data, name)
        assert item.id is not None
        if item.id in first_line:
            msg = f"duplicate id {item.id!r} (first at line {first_line[item.id]})"
            raise InputError(uri, msg, line=lineno, field="id")
        first_line[item.id] = lineno
        items.append(item)
    if not items:
        raise InputError(uri, "no benchmark items (the file is empty)")
    return items


def load_benchmark(uri: str, *, name: str | None = None, limit: int | None = None) -> Benchmark:
    """Read and validate a benchmark JSONL (local, gs:// or 'bundled:...'); `limit` keeps the first N."""
    name = name or benchmark_name(uri)
    path = resolve_benchmark_uri(uri)
    if not path.endswith(".jsonl"):
        raise InputError(uri, "a benchmark must be a .jsonl file")
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise InputError(uri, "benchmark file not found") from None
    items = parse_benchmark(path, raw, name)
    return Benchmark(name=name, uri=uri, items=items[:limit] if limit is not None else items)
