import math
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field

from synthvlm.config import StageConfig, build_config, parse_set
from synthvlm.errors import ConfigError


class Inner(StageConfig):
    mode: Literal["top_k", "threshold"] = "top_k"
    k: int = Field(10, ge=1)


class Outer(StageConfig):
    name: str = "x"
    inner: Inner = Field(default_factory=Inner)


def test_layers_defaults_preset_file_and_sets(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  k: 5\nname: from-file\n")
    cfg = build_config(
        Outer, preset={"name": "preset", "inner": {"mode": "threshold"}}, config_file=str(cfg_file)
    )
    assert (cfg.name, cfg.inner.mode, cfg.inner.k) == ("from-file", "threshold", 5)
    cfg = build_config(Outer, config_file=str(cfg_file), sets=["inner.k=7", "name=cli"])
    assert (cfg.name, cfg.inner.k) == ("cli", 7)


def test_set_parses_yaml_scalars():
    assert parse_set("a.b=60") == (["a", "b"], 60)
    assert parse_set("a=0.25") == (["a"], 0.25)
    assert parse_set("a=gs://b/x") == (["a"], "gs://b/x")
    assert parse_set("a=null") == (["a"], None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_set("novalue")


def test_bad_value_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as exc:
        build_config(Outer, sets=["inner.mode=best"])
    msg = str(exc.value)
    assert "inner.mode" in msg and "'top_k'" in msg and "'threshold'" in msg and "'best'" in msg
    with pytest.raises(ConfigError, match=r"inner\.k.*greater than or equal to 1"):
        build_config(Outer, sets=["inner.k=0"])


def test_unknown_field_lists_allowed_fields():
    with pytest.raises(ConfigError, match=r"inner\.kk': unknown field; allowed fields: k, mode"):
        build_config(Outer, sets=["inner.kk=3"])


def test_bad_config_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        build_config(Outer, config_file=str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(Outer, config_file=str(tmp_path / "missing.yaml"))


class Numbers(StageConfig):
    threshold: float = 0.5
    weights: dict[str, float] = Field(default_factory=dict)
    inner: Inner = Field(default_factory=Inner)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_numbers_are_rejected_naming_the_field(value: str):
    # nan passes every ge/le bound (all comparisons are False): it must be refused outright.
    with pytest.raises(ConfigError, match="config field 'threshold': Input should be a finite number"):
        build_config(Numbers, sets=[f"threshold={value}"])
    with pytest.raises(ConfigError, match=r"config field 'weights\.clip': Input should be a finite number"):
        build_config(Numbers, sets=[f"weights.clip={value}"])


def test_non_finite_numbers_in_a_yaml_file_are_rejected(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("threshold: .nan\n")
    with pytest.raises(ConfigError, match="config field 'threshold'"):
        build_config(Numbers, config_file=str(cfg_file))


def _non_finite(value: Any, path: str = "") -> list[str]:
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("pipeline", ["synthvlm", "stablellava", "train", "end-to-end"])
def test_defaults_and_presets_are_finite(pipeline: str):
    from synthvlm.run_config import preset, run_config_class

    # model_construct: every default (the train configs need datasets to validate), no validation.
    assert _non_finite(run_config_class(pipeline).model_construct().model_dump()) == []
    assert _non_finite({name: preset(name, pipeline) for name in ("demo", "paper")}) == []


def test_nested_run_config_field_named_for_nan():
    from synthvlm.run_config import SynthVLMRunConfig

    with pytest.raises(
        ConfigError, match=r"config field 'select\.threshold': Input should be a finite number"
    ):
        build_config(SynthVLMRunConfig, sets=["select.threshold=nan"])
