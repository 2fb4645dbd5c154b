from __future__ import annotations

import random

from synthvlm.stablellava.abilities import load_registry
from synthvlm.stablellava.prompts import (
    PAIR_EXAMPLES,
    RELATIONS,
    TASK_PAIR,
    TASK_PROMPT,
    ExamplePool,
    PairReply,
    PromptReply,
    input_block,
    pair_request,
    prompt_request,
    read_input,
    sd_prompt_text,
)

REGISTRY = load_registry()


def test_fig4_template_is_filled_with_the_ability() -> None:
    ability = REGISTRY["abnormal"]
    text = sd_prompt_text(
        ability, ["snowman in a desert", "cow on a rooftop"], ability.prompt_examples[:5], 10
    )
    assert text.startswith("As an AI visual assistant specializing in prompt design")
    assert "related to the abnormal keywords" in text  # [Ability]
    assert ability.cautions in text  # [Ability-specific cautions]
    assert "choose the keywords from these examples: snowman in a desert, cow on a rooftop" in text
    assert sum(line.startswith("Prompt: ") for line in text.splitlines()) == 5  # [Prompt examples]
    assert "double brackets" in text and "at most 10 keywords" in text and "growing" in text


def test_requests_carry_task_schema_and_seed() -> None:
    ability = REGISTRY["colour"]
    request = prompt_request("r1", ability, ["teal"], ability.prompt_examples, 10, seed=7)
    assert (request.task, request.schema, request.seed) == (TASK_PROMPT, PromptReply, 7)
    pair = pair_request("r2", ability, "logical", ["teal"], 10, seed=8)
    assert (pair.task, pair.schema) == (TASK_PAIR, PairReply)
    text = pair.messages[-1]["content"]
    assert "one pair prompt" in text and "logically related" in text
    assert PAIR_EXAMPLES["logical"][0].prompt_1 in text


def test_input_block_round_trips() -> None:
    text = "instructions\n#Input in the middle\nignored\n" + input_block(
        ability="art_style", keywords=["pixel art", "mosaic"], question_type="yes_no"
    )
    assert read_input(text) == {
        "ability": "art_style",
        "keywords": "pixel art, mosaic",
        "question_type": "yes_no",
    }
    assert read_input("no block") == {}


def test_every_relation_has_examples_and_criteria() -> None:
    assert set(PAIR_EXAMPLES) == set(RELATIONS)


def test_pool_fills_to_size_then_replaces_a_fraction() -> None:
    pool = ExamplePool([f"seed{i}" for i in range(5)], size=8)
    rng = random.Random(0)
    assert pool.refresh(["new0", "new1", "new2"], 0.25, rng) == 3  # fills 5 -> 8, nothing left to substitute
    assert len(pool.examples) == 8
    changed = pool.refresh([f"later{i}" for i in range(5)], 0.25, rng)
    assert changed == 2  # round(0.25 * 8)
    assert len(pool.examples) == 8
    assert sum(e.startswith("later") for e in pool.examples) == 2
    assert pool.refresh(list(pool.examples), 0.25, rng) == 0  # already in the pool: nothing new


def test_pool_is_deterministic_given_a_seed() -> None:
    def run() -> list[str]:
        pool = ExamplePool([f"seed{i}" for i in range(20)], size=20)
        for round_no in range(5):
            rng = random.Random(f"42/{round_no}")
            pool.refresh([f"r{round_no}-{i}" for i in range(10)], 0.25, rng)
        return pool.examples

    assert run() == run()
    assert sum(e.startswith("seed") for e in run()) < 20  # seeds were substituted over time
