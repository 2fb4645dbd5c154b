"""The StableLLaVA abilities registry: one YAML data file per ability, validated with pydantic.

StableLLaVA (v1 §5.1, v2 §4) builds data per *ability* (colour, animal, ..., abnormal images for joke
understanding), each with its own keyword-generation instruction, cautions for the prompt template
(Fig. 4 "[Ability-specific cautions]"), task-specific restrictions (v2 §4.4), in-context examples
(v1 §4.3: five shown at the outset) and, for the offline template backend, seed keyword banks.
The bundled files live in synthvlm/data/abilities/; a user can point `abilities_dir` at a folder of
their own files. A bad file fails with the file name and the dotted field.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.stablellava.emphasis import contains_phrase, parse_prompt

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "abilities"
# v1 §5.1: the twelve abilities plus abnormal images (joke understanding, v2 §4.1).
ABILITY_NAMES: tuple[str, ...] = (
    "colour",
    "animal",
    "plant",
    "vehicle",
    "food",
    "clothes",
    "furniture",
    "hair",
    "profession",
    "scene",
    "action",
    "art_style",
    "abnormal",
)
MIN_PROMPT_EXAMPLES = 5  # v1 §4.3: "we present five examples to ChatGPT at the outset"
MAX_EXAMPLE_KEYWORDS = 10  # v2 §4.4: prompts have no more than ten keywords

QuestionType = Literal["yes_no", "wh", "either_or"]
QUESTION_TYPES: tuple[QuestionType, ...] = ("yes_no", "wh", "either_or")  # v1 Fig. 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


class Restrictions(_Strict):
    """v2 §4.4 "Task-Specific Restrictions": a note for the prompt template plus checkable word rules."""

    note: str = ""  # added to the prompt template after the cautions
    required_any: list[str] = Field(default_factory=list)  # the prompt must contain one of these words
    forbidden: list[str] = Field(default_factory=list)  # the prompt must contain none of these


class DialogueExample(_Strict):
    """An in-context example for the dialogue templates: prompt -> caption and one Q&A."""

    prompt: str
    caption: str
    question_type: QuestionType
    question: str
    answer: str


class EvalExample(_Strict):
    """An in-context example for the evaluation template (v1 Fig. 5), with keyword answers (v1 §5.2)."""

    prompt: str
    question: str
    answer: str
    answer_keywords: list[str] = Field(min_length=1)


class TemplateBank(_Strict):
    """How the offline template backend builds prompts: `subject_pattern` filled with a bank keyword."""

    subject_pattern: str  # e.g. "(({keyword} {subject}))"; must start with "((" and use {keyword}
    subjects: list[str] = Field(default_factory=list)  # fills {subject}
    scenes: list[str] = Field(min_length=1)

    @field_validator("subject_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        if "{keyword}" not in value:
            raise ValueError("must contain {keyword}")
        if not value.startswith("(("):
            raise ValueError("must start with '((' (the key keyword comes first, double-bracketed)")
        return value


class Ability(_Strict):
    """One ability's data file."""

    name: str
    label: str  # fills [Ability] in the Fig. 4 / Fig. 5 templates
    noun: str  # what the template backend's questions ask about ("colour", "piece of furniture")
    keyword_instruction: str  # how the LLM should list this ability's keywords (v2 §4.3)
    cautions: str  # Fig. 4 [Ability-specific cautions]
    # What dialogues about this ability should focus on, e.g. for abnormal images "what is funny or
    # abnormal" (v1 §4.2); added to the dialogue templates. Empty = nothing ability-specific.
    dialogue_focus: str = ""
    restrictions: Restrictions = Restrictions()
    prompt_examples: list[str] = Field(min_length=MIN_PROMPT_EXAMPLES)
    dialogue_examples: list[DialogueExample] = Field(min_length=1)
    eval_examples: list[EvalExample] = Field(min_length=1)
    keyword_bank: list[str] = Field(min_length=MIN_PROMPT_EXAMPLES)
    template: TemplateBank

    _blank = field_validator("name", "label", "noun", "keyword_instruction", "cautions")(_non_blank)

    @field_validator("keyword_bank")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        for keyword in value:
            if not keyword.strip() or "," in keyword:
                raise ValueError(f"keyword {keyword!r} is empty or contains a comma")
        return [k.strip() for k in value]

    @field_validator("prompt_examples")
    @classmethod
    def _prompts(cls, value: list[str]) -> list[str]:
        for prompt in value:
            problem = example_prompt_problem(prompt)
            if problem:
                raise ValueError(f"prompt example {prompt!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _examples_use_the_bank(self) -> Ability:
        for prompt in self.prompt_examples:
            emphasized = parse_prompt(prompt).emphasized
            if not any(contains_phrase(e, k) for e in emphasized for k in self.keyword_bank):
                raise ValueError(
                    f"prompt example {prompt!r}: its double-bracketed keyword contains no keyword_bank entry"
                )
        return self


def example_prompt_problem(prompt: str) -> str | None:
    """Why a seed prompt example breaks the prompt rules it is meant to teach, or None."""
    parsed = parse_prompt(prompt)
    if not parsed.keywords:
        return "no keywords"
    if len(parsed.keywords) > MAX_EXAMPLE_KEYWORDS:
        return f"{len(parsed.keywords)} keywords (at most {MAX_EXAMPLE_KEYWORDS})"
    if parsed.emphasis[0] < 2:
        return "the first keyword is not double-bracketed"
    return None


def load_ability(uri: str) -> Ability:
    """Read and validate one ability file; errors name the file and the field."""
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(uri, f"cannot read ability file: {exc}") from None
    except yaml.YAMLError as exc:
        raise InputError(uri, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(uri, f"top level must be a mapping, got {type(data).__name__}")
    try:
        ability = Ability.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise InputError(uri, err["msg"].removeprefix("Value error, ") + more, field=field) from None
    stem = Path(uri).name.removesuffix(".yaml")
    if ability.name != stem:
        raise InputError(uri, f"name {ability.name!r} must match the file name {stem!r}", field="name")
    return ability


def load_registry(directory: str | None = None) -> dict[str, Ability]:
    """All `*.yaml` abilities of `directory` (None = the bundled ones), by name, in file-name order."""
    if directory is None:
        return dict(_bundled())
    return _load_dir(directory)


@lru_cache(maxsize=1)
def _bundled() -> tuple[tuple[str, Ability], ...]:
    registry = _load_dir(str(BUNDLED_DIR))
    missing = [name for name in ABILITY_NAMES if name not in registry]
    if missing:
        raise InputError(str(BUNDLED_DIR), f"bundled abilities missing: {missing}")
    return tuple((name, registry[name]) for name in ABILITY_NAMES)


def _load_dir(directory: str) -> dict[str, Ability]:
    uris = storage.list_uris(directory, ".yaml")
    if not uris:
        raise InputError(directory, "no ability files (*.yaml) found")
    return {ability.name: ability for ability in map(load_ability, uris)}


def select_abilities(registry: dict[str, Ability], names: list[str] | None, source: str) -> list[Ability]:
    """The abilities named (all of the registry when None), in the order given; unknown names fail."""
    if names is None:
        return list(registry.values())
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise InputError(
            source, f"unknown abilities {unknown}; available: {sorted(registry)}", field="abilities"
        )
    return [registry[n] for n in dict.fromkeys(names)]


def ability_by_label(label: str, registry: dict[str, Ability] | None = None) -> Ability | None:
    """The ability whose label (or name) is `label`, or None."""
    for ability in (registry or load_registry()).values():
        if label.strip().lower() in (ability.label.lower(), ability.name.lower()):
            return ability
    return None
