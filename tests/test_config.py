from pathlib import Path
from typing import Literal

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
