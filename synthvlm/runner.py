"""The one stage runner: fingerprints, skip/redo, versioned outputs, markers, stats and progress lines.

A stage is declared once (`Stage`): its name, its process function, the config fields that cannot change
its output (each with the reason), and the files it writes besides its main output. Callers (the CLI,
the KFP components, tests) run it with `run_stage(stage, config, inputs, output)`; no stage decides by
itself whether to skip.

Fingerprint = sha256 of (stage name, format version, the config's output-affecting settings in canonical
JSON, params: values besides the config that change the output, such as the data root that exported
image paths are relative to or the commit generation's weights resolve to, and the fingerprints of the
inputs). An input's fingerprint is the one in its completion marker, so a change upstream changes every
fingerprint downstream; a file no stage made (a user's captions file) is fingerprinted by its bytes.

Layout, for `output = <dir>/<relative path>` (`<dir>`: the stage's folder, by default the output's):
- `<dir>/<stage>-<fp16>/<relative path>` (+ sidecars) and its `.done` marker: the output made under those
  settings and inputs. It is never overwritten by other settings: every version stays readable, and
  per-item resume inside a stage (generation parts) only ever sees work made under the same fingerprint.
- `<dir>/<relative path>` (+ sidecars) and its `.done` marker: the stable path, a copy of the latest complete
  version. Its marker is removed before the copy and written after it, so a reader never takes a
  half-copied file for complete.
- Glob sidecars (`webdataset/*.tar`: files known only once the stage ran, such as an export's shards):
  every match in the version is published, by a hard link (local) or a server-side copy (gs://, s3://),
  so big files cost neither a read nor the disk twice; matches in the stable folder that the version lacks
  are deleted, so a stale file never passes for the new version's. The stable folder then holds the
  whole output (an export folder can be uploaded or read as it is).

On a rerun: same fingerprint and a complete version -> skip (one log line); otherwise compute into the
fingerprint's folder and publish. Temp files of writes a kill interrupted are removed first; long work
reports done/total, rate and ETA through `StageRun.progress` (synthvlm.progress).

KFP's cache never stands in for this: it cannot see the data root (pipelines/common.py turns it off for
every task).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from synthvlm import storage
from synthvlm.progress import Progress
from synthvlm.stage import StageStats, done_uri

log = logging.getLogger("synthvlm.runner")

C = TypeVar("C", bound=BaseModel)
Inputs = Mapping[str, str | Sequence[str] | None]

FINGERPRINT_CHARS = 16  # of the sha256 hex in folder names: 64 bits, no collision in any one data root
LATEST_SUFFIX = ".latest.json"  # pointer to the latest version of an output that is not copied
LLM_CACHE_DIR = "llm-cache"  # under the data root: answers outlive any one fingerprint
# What the runner writes into a marker besides the stage's statistics: what made the output, not counts.
RUN_RECORD_KEYS = frozenset(
    {
        "fingerprint",
        "format_version",
        "settings",
        "params",
        "inputs",
        "output",
        "excluded_from_fingerprint",
        "published_from",
    }
)


@dataclass
class StageRun:
    """What a process function gets besides its config: where its inputs are and where to write."""

    stage: str
    fingerprint: str
    inputs: Mapping[str, Any]  # as given to run_stage
    output: str  # the main output inside this fingerprint's folder
    dir: str  # this fingerprint's folder (write every other file of the stage under it)
    data_root: str  # shared, fingerprint-independent caches live here (the LLM response cache)
    context: Mapping[str, Any]  # run arguments that do not change the output (rank, loaded models)

    def path(self, relative: str) -> str:
        return storage.join(self.dir, relative)

    def progress(self, total: int, unit: str = "items", *, done: int = 0, label: str = "") -> Progress:
        """done/total, rate and ETA of this run's long work: a bar on a terminal, log lines in pods."""
        return Progress(f"{self.stage} {label}".strip(), total, unit, done=done)


@dataclass(frozen=True)
class Stage(Generic[C]):
    """A stage's declaration. `process` writes `run.output` (and the sidecars) and returns its stats."""

    name: str
    process: Callable[[C, StageRun], StageStats]
    # Config fields (dotted paths) left out of the fingerprint -> why they cannot change the output.
    excluded: Mapping[str, str] = field(default_factory=dict)
    # Other files the stage writes, relative to its folder: "{output}" is the output's relative path,
    # "{name}" its file name (plus run_stage's `names`). Copied to the stable paths when present. A glob
    # (`*`, `?`, `[...]`) in the file name ("webdataset/*.tar", no placeholders) stands for every matching
    # file of the version; those are linked rather than copied (write them once, never change them in place).
    sidecars: tuple[str, ...] = ()
    # Bump when the stage's output format or meaning changes: old outputs are then never reused.
    version: int = 1
    # False for outputs too big to copy (a model folder): the stable path then gets a pointer file,
    # `<output>.latest.json`, naming the latest complete version.
    publish_copy: bool = True

    def __post_init__(self) -> None:
        # Globs are matched in one folder, and take no placeholders (a filled-in name could hold `[`).
        for pattern in filter(is_glob, self.sidecars):
            if is_glob(pattern.rpartition("/")[0]) or "{" in pattern:
                raise ValueError(
                    f"sidecar {pattern!r}: a glob may only be in the file name, and takes no placeholders"
                )


def is_glob(pattern: str) -> bool:
    """A sidecar pattern that names files by a glob (matched with fnmatch) rather than one file."""
    return any(char in pattern for char in "*?[")


class NotComplete(FileNotFoundError):
    """An input that some stage should have completed has no completion marker."""


# --- fingerprints ------------------------------------------------------------------------------------


def settings_of(config: BaseModel, excluded: Mapping[str, str] | Sequence[str] = ()) -> dict[str, Any]:
    """The config as canonical JSON data, without the excluded (dotted) fields."""
    data = config.model_dump(mode="json")
    for dotted in excluded:
        node: Any = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def input_fingerprint(uri: str) -> str:
    """The fingerprint in `uri`'s completion marker, else the sha256 of its bytes ("absent" if missing)."""
    uri = uri.rstrip("/") or uri  # a folder output (a model) is marked as `<folder>.done`
    marker = done_uri(uri)
    if storage.exists(marker):
        stats = json.loads(storage.read_text(marker))
        if stats.get("fingerprint"):
            return str(stats["fingerprint"])
    if not storage.exists(uri) or (not storage.is_remote(uri) and Path(uri).is_dir()):
        return "absent"  # the stage itself reports the missing input, with its own message
    return "sha256:" + hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _input_fingerprints(inputs: Inputs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in sorted(inputs.items()):
        if value is None or value == "":
            out[name] = None
        elif isinstance(value, str):
            out[name] = {"uri": value, "fingerprint": input_fingerprint(value)}
        else:
            out[name] = [{"uri": uri, "fingerprint": input_fingerprint(uri)} for uri in value]
    return out


def _fingerprint_of(
    stage: Stage[Any], settings: Mapping[str, Any], inputs: Mapping[str, Any], params: Mapping[str, Any]
) -> str:
    # Input URIs are left out: the same bytes or the same upstream result under another name give the
    # same output. (A stage whose output depends on a path takes it as a param.)
    def fps(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            return [item["fingerprint"] for item in value]
        return value["fingerprint"]

    body = {
        "stage": stage.name,
        "format": stage.version,
        "settings": settings,
        "params": dict(params),
        "inputs": {name: fps(value) for name, value in inputs.items()},
    }
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def check_finite(data: Any, where: str = "config") -> None:
    """NaN or infinity can never be a meaningful setting (and would not survive canonical JSON)."""
    if isinstance(data, float) and not math.isfinite(data):
        from synthvlm.errors import ConfigError

        raise ConfigError(f"config field '{where}': must be a finite number (got {data!r})")
    if isinstance(data, dict):
        for key, value in data.items():
            check_finite(value, f"{where}.{key}" if where != "config" else str(key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            check_finite(value, f"{where}[{i}]")


# --- layout --------------------------------------------------------------------------------------------


def read_marker(output: str, marker: bool = True) -> dict[str, Any] | None:
    """The completion marker of `output` (or, with marker=False, the JSON file `output` itself)."""
    uri = done_uri(output) if marker else output
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def _clean_temp_files(directory: str, names: Sequence[str], globs: Sequence[str] = ()) -> None:
    """Remove temp files a killed write left for these files or glob patterns (relative to `directory`)."""
    for name, is_pattern in [*((n, False) for n in names), *((g, True) for g in globs)]:
        folder, _, file_name = storage.join(directory, name).rpartition("/")
        owned = (lambda n, p=file_name: fnmatch.fnmatchcase(n, p)) if is_pattern else file_name.__eq__
        for tmp in storage.remove_interrupted_writes(folder, owned=owned):
            log.info("removed %s, left by an interrupted write", tmp)


def _matches(directory: str, pattern: str) -> list[str]:
    """Paths relative to `directory` of the files a glob sidecar pattern matches (its folder only)."""
    folder, _, name_pattern = pattern.rpartition("/")
    names = storage.file_names(storage.join(directory, folder) if folder else directory)
    return [f"{folder}/{n}" if folder else n for n in names if fnmatch.fnmatchcase(n, name_pattern)]


def _published_marker(stage: Stage[Any], output: str) -> dict[str, Any] | None:
    """The marker of the version published at `output`: its `.done`, or its pointer for uncopied outputs."""
    if stage.publish_copy:
        return read_marker(output)
    return read_marker(output + LATEST_SUFFIX, marker=False)


def publish(
    vdir: str,
    root: str,
    relative: str,
    sidecars: Sequence[str],
    marker: Mapping[str, Any],
    *,
    copy: bool = True,
    globs: Sequence[str] = (),
) -> None:
    """Copy a complete version to the stable paths under `root`: marker off, files, then the marker.

    `globs`: glob sidecars (relative to the folders); their matches are linked (storage.link_or_copy) and
    the stable folder's matches that the version lacks are deleted."""
    stable = storage.join(root, relative)
    if not copy:
        body = {**marker, "published_from": storage.join(vdir, relative)}
        storage.write_text(stable + LATEST_SUFFIX, json.dumps(body, indent=2, sort_keys=True) + "\n")
        return
    storage.delete(done_uri(stable))
    _clean_temp_files(root, [relative, *sidecars], globs)  # left by a publish that was killed
    for pattern in globs:
        made = _matches(vdir, pattern)
        for match in made:
            storage.link_or_copy(storage.join(vdir, match), storage.join(root, match))
        for stale in sorted(set(_matches(root, pattern)) - set(made)):
            storage.delete(storage.join(root, stale))  # an older version's file must not pass for this one's
    # Copies, not links: a small file at the stable path (a JSON, a card) may be edited in place, which
    # through a link would change the version that its fingerprint vouches for.
    for rel in sidecars:
        source, target = storage.join(vdir, rel), storage.join(root, rel)
        if storage.exists(source):
            storage.copy(source, target)
        else:
            storage.delete(target)  # a sidecar of an older version must not pass for this one's
    storage.copy(storage.join(vdir, relative), stable)
    body = {**marker, "published_from": storage.join(vdir, relative)}
    storage.write_text(done_uri(stable), json.dumps(body, indent=2, sort_keys=True) + "\n")


# --- the runner -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where a stage's run under given settings and inputs writes, and its fingerprint."""

    fingerprint: str
    settings: dict[str, Any]
    params: dict[str, Any]
    inputs: dict[str, Any]  # name -> {uri, fingerprint} (or a list of them)
    root: str  # the stage's folder
    relative: str  # the main output, relative to root
    dir: str  # the fingerprint folder
    output: str  # the main output inside it
    sidecars: list[str]  # files, relative to root and dir
    globs: list[str] = field(default_factory=list)  # glob sidecars, relative to root and dir


def plan_stage(
    stage: Stage[C],
    config: C,
    inputs: Inputs,
    output: str,
    *,
    params: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    root: str | None = None,
) -> Plan:
    """The fingerprint and paths of a run, without running it (run_stage's arguments)."""
    params = dict(params or {})
    settings = settings_of(config, stage.excluded)
    check_finite(settings)
    check_finite(params, "params")
    input_fps = _input_fingerprints(inputs)
    fingerprint = _fingerprint_of(stage, settings, input_fps, params)
    root = (root or output.rstrip("/").rpartition("/")[0] or ".").rstrip("/")
    if not output.startswith(root + "/"):
        raise ValueError(f"output {output!r} is not under its stage folder {root!r}")
    relative = output[len(root) + 1 :]
    name = relative.rpartition("/")[2]
    vdir = storage.join(root, f"{stage.name}-{fingerprint[:FINGERPRINT_CHARS]}")
    fill = {"name": name, "output": relative, **(names or {})}
    sidecars = [pattern.format(**fill) for pattern in stage.sidecars if not is_glob(pattern)]
    globs = [pattern for pattern in stage.sidecars if is_glob(pattern)]
    return Plan(
        fingerprint,
        settings,
        params,
        input_fps,
        root,
        relative,
        vdir,
        storage.join(vdir, relative),
        sidecars,
        globs,
    )


def run_stage(
    stage: Stage[C],
    config: C,
    inputs: Inputs,
    output: str,
    *,
    params: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    data_root: str | None = None,
    names: Mapping[str, str] | None = None,
    root: str | None = None,
) -> str:
    """Run `stage` unless an output with the same fingerprint is complete; return the versioned output.

    `output`: the stable path of the main output (e.g. `<data_root>/select/selected.jsonl`).
    `params`: values besides the config that change the output (part of the fingerprint).
    `context`: run arguments that do not (shard rank, already loaded models).
    `data_root`: for fingerprint-independent caches (the LLM's answers); default: the stage's folder.
    `names`: file names that fill the stage's sidecar patterns (e.g. {"rejects": "rejects.jsonl"}).
    `root`: the stage's folder, which the fingerprint folder sits in and mirrors (default: the output's
    folder); the output and sidecars are paths relative to it.
    """
    plan = plan_stage(stage, config, inputs, output, params=params, names=names, root=root)
    params, settings, input_fps, fingerprint = plan.params, plan.settings, plan.inputs, plan.fingerprint
    root, relative, vdir, versioned, sidecars = plan.root, plan.relative, plan.dir, plan.output, plan.sidecars
    globs = plan.globs
    short = fingerprint[:FINGERPRINT_CHARS]

    done = read_marker(versioned)
    if done is not None and done.get("fingerprint") == fingerprint:
        stable = _published_marker(stage, output)
        if stable is None or stable.get("fingerprint") != fingerprint:
            publish(vdir, root, relative, sidecars, done, copy=stage.publish_copy, globs=globs)
        log.info("%s: unchanged (fingerprint %s), skipping: %s", stage.name, short, versioned)
        return versioned

    previous = _published_marker(stage, output)
    if previous is not None and previous.get("fingerprint"):
        changed = _changed_keys(previous, settings, input_fps, params)
        log.info(
            "%s: settings or inputs changed since %s (%s): computing fingerprint %s",
            stage.name,
            previous.get("fingerprint", "?")[:FINGERPRINT_CHARS],
            ", ".join(changed) or "format version",
            short,
        )
    else:
        log.info("%s: computing (fingerprint %s) -> %s", stage.name, short, versioned)
    _clean_temp_files(vdir, [relative, *sidecars], globs)
    if data_root is None:
        data_root = root
    run = StageRun(
        stage=stage.name,
        fingerprint=fingerprint,
        inputs=dict(inputs),
        output=versioned,
        dir=vdir,
        data_root=data_root,
        context=dict(context or {}),
    )
    started = time.monotonic()
    stats = stage.process(config, run)
    marker = {
        **stats.to_dict(),
        "stage": stage.name,
        "fingerprint": fingerprint,
        "format_version": stage.version,
        "settings": settings,
        "params": params,
        "excluded_from_fingerprint": dict(stage.excluded),
        "inputs": input_fps,
        "output": versioned,
        "seconds": round(time.monotonic() - started, 3),
    }
    storage.write_text(done_uri(versioned), json.dumps(marker, indent=2, sort_keys=True) + "\n")
    publish(vdir, root, relative, sidecars, marker, copy=stage.publish_copy, globs=globs)
    rejects = ", ".join(f"{k}: {v}" for k, v in sorted(stats.rejects.items()))
    log.info(
        "%s: done in %.1f s, %d in, %d out%s -> %s",
        stage.name,
        marker["seconds"],
        stats.count_in,
        stats.count_out,
        f" (rejected: {rejects})" if rejects else "",
        versioned,
    )
    return versioned


def _changed_keys(
    previous: Mapping[str, Any],
    settings: Mapping[str, Any],
    inputs: Mapping[str, Any],
    params: Mapping[str, Any],
) -> list[str]:
    """Names of what differs from the previous published version, for the log line."""
    changed = []
    old_settings = previous.get("settings", {})
    for key in sorted(set(old_settings) | set(settings)):
        if old_settings.get(key) != settings.get(key):
            changed.append(f"config.{key}")
    old_params = previous.get("params", {})
    for key in sorted(set(old_params) | set(params)):
        if old_params.get(key) != params.get(key):
            changed.append(key)
    old_inputs = previous.get("inputs", {})
    for key in sorted(set(old_inputs) | set(inputs)):
        if _fps(old_inputs.get(key)) != _fps(inputs.get(key)):
            changed.append(f"input {key}")
    return changed


def _fps(value: Any) -> Any:
    if isinstance(value, list):
        return [item.get("fingerprint") for item in value]
    return value.get("fingerprint") if isinstance(value, dict) else value


def describe(output: str) -> dict[str, Any]:
    """Fingerprint, settings and inputs of a complete output (for reports and `synthvlm` commands)."""
    marker = read_marker(output)
    if marker is None:
        raise NotComplete(f"{output} is not marked complete ({done_uri(output)} missing)")
    keys = ("stage", "fingerprint", "format_version", "settings", "params", "inputs", "output")
    return {key: marker.get(key) for key in keys}
