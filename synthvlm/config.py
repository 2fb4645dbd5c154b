"""Configuration: one pydantic model per stage, set from presets, a YAML file and `--set key=value`.

Every stage config derives from `StageConfig` (unknown keys are errors, not silently ignored).
`build_config` layers: defaults (from the papers) < preset < YAML file < `--set` overrides, and turns
any validation failure into a `ConfigError` naming the dotted field and the allowed values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synthvlm.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class StageConfig(BaseModel):
    """Base of every stage config: strict about unknown keys and non-finite numbers, validated on
    assignment."""

    # allow_inf_nan=False: `nan` (or `.nan` in YAML) passes every `ge`/`le` bound, and inf/nan would
    # reach stages (and the JSON handed to pipelines) as silently wrong thresholds.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )


def parse_set(item: str) -> tuple[list[str], Any]:
    """'generate.steps=60' -> (['generate', 'steps'], 60). Values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    if value is None:
        value = None if raw.strip() in ("null", "~") else raw
    return key.split("."), value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _explain(cls: type[BaseModel], exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(cls, [str(p) for p in err["loc"][:-1]])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            msg = f"unknown field; allowed fields: {allowed}"
        got = err.get("input")
        got_txt = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"config field '{field}': {msg}{got_txt}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def _model_at(cls: type[BaseModel], path: Sequence[str]) -> type[BaseModel] | None:
    current: Any = cls
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def load_yaml(path: str) -> dict[str, Any]:
    from synthvlm import storage

    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def build_config(
    cls: type[T],
    *,
    preset: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    sets: Sequence[str] = (),
) -> T:
    """Defaults < preset < config file < --set overrides, validated as a whole."""
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if preset:
        data = deep_merge(data, preset)
        sources.append("preset")
    if config_file:
        data = deep_merge(data, load_yaml(config_file))
        sources.append(config_file)
    for item in sets:
        path, value = parse_set(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[path[-1]] = value
    if sets:
        sources.append("--set " + " ".join(sets))
    return validate(cls, data, source=" < ".join(sources))


def validate(cls: type[T], data: Mapping[str, Any], source: str = "input") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _explain(cls, exc, source) from None


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_example(config: BaseModel, path: str) -> None:
    Path(path).write_text(dump_yaml(config))
