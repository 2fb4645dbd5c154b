from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from synthvlm.errors import InputError
from synthvlm.stablellava.abilities import (
    ABILITY_NAMES,
    BUNDLED_DIR,
    load_ability,
    load_registry,
    select_abilities,
)
from synthvlm.stablellava.emphasis import parse_prompt
from synthvlm.stablellava.filters import FilterConfig, check_prompt


def bundled(name: str) -> dict:
    return yaml.safe_load((BUNDLED_DIR / f"{name}.yaml").read_text())


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_registry_loads_all_13_abilities() -> None:
    registry = load_registry()
    assert tuple(registry) == ABILITY_NAMES
    assert len(registry) == 13
    for ability in registry.values():
        assert len(ability.prompt_examples) >= 5  # v1 §4.3: five examples at the outset
        assert ability.dialogue_examples and ability.eval_examples and ability.keyword_bank


@pytest.mark.parametrize("name", ABILITY_NAMES)
def test_seed_examples_pass_the_prompt_filters(name: str) -> None:
    # The examples teach the rules; an example that breaks them would teach the LLM to break them.
    ability = load_registry()[name]
    for prompt in ability.prompt_examples:
        assert check_prompt(parse_prompt(prompt), ability, ability.keyword_bank, FilterConfig()) is None, (
            prompt
        )


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    data = bundled("colour")
    del data["cautions"]
    uri = write(tmp_path, "colour", data)
    with pytest.raises(InputError) as err:
        load_ability(uri)
    assert err.value.file == uri and err.value.field == "cautions"
    assert "colour.yaml" in str(err.value)


def test_bad_example_prompt_is_rejected_with_its_field(tmp_path: Path) -> None:
    data = bundled("animal")
    data["prompt_examples"][2] = "axolotl, ((aquarium)), clear water"  # key keyword not first
    with pytest.raises(InputError) as err:
        load_ability(write(tmp_path, "animal", data))
    assert err.value.field == "prompt_examples"
    assert "not double-bracketed" in str(err.value)


def test_unknown_field_and_name_mismatch_are_rejected(tmp_path: Path) -> None:
    data = bundled("food")
    data["colour_of_plate"] = "white"
    with pytest.raises(InputError) as err:
        load_ability(write(tmp_path, "food", data))
    assert err.value.field == "colour_of_plate"
    with pytest.raises(InputError, match="must match the file name"):
        load_ability(write(tmp_path, "dishes", bundled("food")))


def test_not_yaml_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="mapping"):
        load_ability(str(path))


def test_custom_directory_and_selection(tmp_path: Path) -> None:
    write(tmp_path, "vehicle", bundled("vehicle"))
    registry = load_registry(str(tmp_path))
    assert list(registry) == ["vehicle"]
    with pytest.raises(InputError, match="unknown abilities"):
        select_abilities(registry, ["vehicle", "spaceship"], "config")
    assert [a.name for a in select_abilities(load_registry(), ["hair", "colour"], "config")] == [
        "hair",
        "colour",
    ]
