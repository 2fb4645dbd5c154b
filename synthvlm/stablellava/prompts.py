"""Stable Diffusion prompt generation: the Fig. 4 template, paired prompts (Fig. 7), in-context example pools.

The instruction texts follow the papers' templates (StableLLaVA v1 Fig. 4 "ChatGPT for SD Prompt
Generation", v2 Fig. 7 "ChatGPT for Paired prompt Generation") with their red, ability-specific parts
filled from the ability's data file: [Ability] <- `label`, [Ability-specific cautions] <- `cautions`
(+ the task restriction note), [Ability-specific keywords that are separately generated] <- a sample of
the keyword bank, [Ability-specific Prompt Examples] <- examples from the in-context pool. We add the
rules the paper states elsewhere (key keyword first and double-bracketed, at most ten keywords, nothing
non-visual: v2 §4.1, §4.4) and ask for a JSON reply (structured output).

Every request ends with an "#Input" block of `Key: value` lines (`input_block` / `read_input`): the LLM
reads it as the task's parameters, and the offline template backend (templates.py) parses it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from synthvlm.llm import LLMRequest
from synthvlm.stablellava.abilities import Ability

TASK_PROMPT = "stablellava.prompt"
TASK_PAIR = "stablellava.prompt_pair"
INPUT_HEADER = "#Input"
RELATIONS: tuple[str, ...] = ("similarity", "difference", "logical")  # v2 §4.2 and Appendix B


class PromptReply(BaseModel):
    """One SD prompt (the JSON the LLM returns)."""

    prompt: str


class PairReply(BaseModel):
    """Two SD prompts of a pair (v2 Fig. 7: "first, print the first prompt; second, the second prompt")."""

    prompt_1: str
    prompt_2: str


@dataclass(frozen=True)
class PairExample:
    prompt_1: str
    prompt_2: str
    caption: str  # what the multi-image dialogue template should say about the pair


# Original in-context examples for paired prompts and their captions (v2 Fig. 7 leaves them to the user).
PAIR_EXAMPLES: dict[str, tuple[PairExample, ...]] = {
    "similarity": (
        PairExample(
            "((golden retriever)), lying on a porch, afternoon sun, photorealistic",
            "((labrador retriever)), lying on a lawn, afternoon sun, photorealistic",
            "Both images show a retriever dog with light fur lying down and resting in warm afternoon sun.",
        ),
        PairExample(
            "((red tulip)), garden bed, morning dew, macro photography",
            "((red rose)), garden bed, morning dew, macro photography",
            "Both images show a single red flower in a garden bed, with drops of morning dew on the petals.",
        ),
    ),
    "difference": (
        PairExample(
            "((white ceramic mug)), wooden desk, morning light, highly detailed",
            "((black ceramic mug)), wooden desk, morning light, highly detailed",
            "The mug in the first image is white, while the mug in the second image is black; the desk and "
            "the light are the same.",
        ),
        PairExample(
            "((city bus)), busy street, daytime, realistic",
            "((tram)), busy street, daytime, realistic",
            "The first image shows a bus driving on the road, the second a tram running on rails along the "
            "same kind of busy street.",
        ),
    ),
    "logical": (
        PairExample(
            "((dark storm clouds)), over a wheat field, dramatic lighting, wide angle",
            "((flooded wheat field)), puddles, grey sky, wide angle",
            "The first image shows storm clouds gathering over a field, and the second shows the field "
            "flooded: the heavy rain from the clouds caused the flooding.",
        ),
        PairExample(
            "((cake batter in a mixing bowl)), kitchen counter, eggs and flour, soft light",
            "((baked chocolate cake)), kitchen counter, cooling rack, soft light",
            "The first image shows batter being prepared in a bowl and the second the finished cake: the "
            "batter was baked into the cake.",
        ),
    ),
}

# v2 Fig. 7 ("Paired prompts can be similar types of animals, plants, ... same object in different colors")
# and Appendix B (difference, logical relations), stated as criteria for each relation.
RELATION_CRITERIA: dict[str, str] = {
    "similarity": (
        "The two prompts show different subjects that share clear visual properties, such as similar "
        "types of animals, plants, furniture, vehicles or buildings, or the same setting."
    ),
    "difference": (
        "The two prompts show the same kind of subject in the same setting, differing in one clearly "
        "visible property, such as its colour, species, type or style."
    ),
    "logical": (
        "The two prompts show two situations that are logically related, such as cause and effect, "
        "before and after, or an object and its result."
    ),
}

_PROMPT_RULES = (
    "The prompts should consist of keywords separated by commas, optionally encompassing a wide range of "
    "terms, such as subjects (e.g., animals, humans, plants, vehicles), scenes (e.g., forest, beach, space "
    "station, castle), styles (e.g., realistic, abstract, impressionist, anime), and visual features (e.g., "
    "glowing, shiny, detailed shading, soft light, dramatic lighting, volumetric light, mysterious, vibrant, "
    "dreamy). Additionally, keywords like 'Details, intricate, highly detailed, fine carvings, 4k, 8k, high "
    "resolution' can be used to enhance image details. The images' content should always be logical and "
    "sensible."
)


def input_block(**fields: object) -> str:
    """The closing '#Input' section: one 'Key: value' line per field (keys: '_' -> ' ', capitalised)."""
    lines = [INPUT_HEADER]
    for key, value in fields.items():
        text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        lines.append(f"{key.replace('_', ' ').capitalize()}: {' '.join(text.split())}")
    return "\n".join(lines)


def read_input(text: str) -> dict[str, str]:
    """The fields of the last '#Input' section of a request text, keys lower case with '_' for spaces."""
    _, found, tail = text.rpartition(INPUT_HEADER)
    if not found:
        return {}
    fields: dict[str, str] = {}
    for line in tail.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip().lower().replace(" ", "_")] = value.strip()
    return fields


def _rules(ability: Ability, max_keywords: int) -> str:
    note = f" {ability.restrictions.note}" if ability.restrictions.note else ""
    return (
        f"{_PROMPT_RULES} {ability.cautions}{note}\n"
        f"Put the most important {ability.label} keyword first and enclose it in double brackets, like "
        f"((keyword)). Use at most {max_keywords} keywords. Do not use non-visual words or actions, such as "
        "growing, thinking, sounds or smells."
    )


def sd_prompt_text(
    ability: Ability, keywords: Sequence[str], examples: Sequence[str], max_keywords: int
) -> str:
    """v1 Fig. 4 (up), "ChatGPT for SD Prompt Generation", with the ability's parts filled in."""
    shown = "\n".join(f"Prompt: {e}" for e in examples)
    return (
        "As an AI visual assistant specializing in prompt design, your task is to create prompts for a "
        f"text-to-image generator related to the {ability.label} keywords.\n\n"
        f"#Requirements for prompt generation\n{_rules(ability, max_keywords)}\n\n"
        f"#Examples\nYou may choose the keywords from these examples: {', '.join(keywords)}\n"
        f"Illustrated outputs are shown below:\n{shown}\n\n"
        "#Requirements for outputs\nWrite one new prompt, different from the examples. Reply with a JSON "
        'object {"prompt": "<the prompt>"}.\n\n' + input_block(ability=ability.name, keywords=keywords)
    )


def prompt_request(
    request_id: str,
    ability: Ability,
    keywords: Sequence[str],
    examples: Sequence[str],
    max_keywords: int,
    seed: int,
) -> LLMRequest:
    text = sd_prompt_text(ability, keywords, examples, max_keywords)
    return LLMRequest.from_prompt(request_id, text, schema=PromptReply, seed=seed, task=TASK_PROMPT)


def pair_prompt_text(ability: Ability, relation: str, keywords: Sequence[str], max_keywords: int) -> str:
    """v2 Fig. 7 (top), "ChatGPT for Paired prompt Generation", for one relation and ability theme."""
    examples = "\n".join(f"Prompt 1: {e.prompt_1}\nPrompt 2: {e.prompt_2}" for e in PAIR_EXAMPLES[relation])
    return (
        "As an AI visual assistant, your responsibility is to create one pair prompt for a text-to-image "
        "generator. These models rely on prompts composed of keywords separated by commas, which can "
        f"optionally cover a wide variety of terms. The core theme of this pair is {ability.label}. "
        f"{RELATION_CRITERIA[relation]}\n\n"
        f"#Requirements for prompt generation\n{_rules(ability, max_keywords)}\n\n"
        f"#Examples\nYou may choose the keywords from these examples: {', '.join(keywords)}\n"
        f"Illustrated outputs are shown below:\n{examples}\n\n"
        "#Requirements for outputs\nThe final output should follow a structured format: first the first "
        'prompt, second the second prompt, as a JSON object {"prompt_1": "...", "prompt_2": "..."}.\n\n'
        + input_block(ability=ability.name, relation=relation, keywords=keywords)
    )


def pair_request(
    request_id: str, ability: Ability, relation: str, keywords: Sequence[str], max_keywords: int, seed: int
) -> LLMRequest:
    text = pair_prompt_text(ability, relation, keywords, max_keywords)
    return LLMRequest.from_prompt(request_id, text, schema=PairReply, seed=seed, task=TASK_PAIR)


class ExamplePool:
    """One ability's in-context examples for SD prompt generation.

    v1 §4.3: five examples are shown at the outset and the set grows to 20 curated outputs; v2 §4.3:
    "periodically substituting a portion of the original in-context examples with newly generated data".
    The pool starts from the data file's seed examples, fills up to `size` with accepted outputs, then each
    `refresh` replaces `fraction` of it with the newest accepted outputs. All choices come from the
    caller's seeded `random.Random`, so the sequence is the same on every run.
    """

    def __init__(self, seeds: Sequence[str], size: int):
        self.size = size
        self.examples: list[str] = list(dict.fromkeys(seeds))[:size]

    def sample(self, k: int, rng: random.Random) -> list[str]:
        return rng.sample(self.examples, min(k, len(self.examples)))

    def refresh(self, accepted: Sequence[str], fraction: float, rng: random.Random) -> int:
        """Add/substitute accepted outputs; returns how many entries changed."""
        new = [a for a in dict.fromkeys(accepted) if a not in self.examples]
        changed = 0
        while new and len(self.examples) < self.size:
            self.examples.append(new.pop(0))
            changed += 1
        count = min(len(new), round(fraction * self.size))
        for position, example in zip(rng.sample(range(len(self.examples)), count), new, strict=False):
            self.examples[position] = example
            changed += 1
        return changed


def sample_keywords(bank: Sequence[str], k: int, rng: random.Random) -> list[str]:
    """The keywords shown in one request (v2 §4.3: "utilize them as a reference during the prompting")."""
    return rng.sample(list(bank), min(k, len(bank)))
