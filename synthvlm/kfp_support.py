"""The glue between stages and KFP: metrics from completion markers, compile, and local runs.

Components call `stage_metrics` (no KFP import needed there); the CLI calls `compile_all` and
`run_local`. Nothing outside this module and components/ and pipelines/ imports kfp.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from synthvlm import stage

log = logging.getLogger(__name__)

PIPELINE_MODULES = {
    "synthvlm": "pipelines.synthvlm_pipeline",
    "stablellava": "pipelines.stablellava_pipeline",
    "train": "pipelines.train_pipeline",
    "end-to-end": "pipelines.end_to_end_pipeline",
}


# What the stage runner records in a marker besides the stage's statistics (synthvlm.runner).
RUN_RECORD_KEYS = frozenset(
    {"settings", "params", "inputs", "excluded_from_fingerprint", "format_version", "fingerprint", "output"}
)


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SYNTHVLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def numeric_metrics(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a stage's statistics to the numbers KFP Metrics can show (rejects.<reason> included)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if not prefix and key in RUN_RECORD_KEYS:
            continue  # settings and inputs, not measurements
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numeric_metrics(value, prefix=f"{name}."))
    return out


def log_stage_metrics(metrics: Any, *output_uris: str) -> dict[str, float]:
    """Log the numeric statistics of each finished output (summed over shards) into a KFP Metrics artifact."""
    total: dict[str, float] = {}
    for uri in output_uris:
        for name, value in numeric_metrics(stage.read_stats(uri)).items():
            total[name] = total.get(name, 0.0) + value
    for name, value in sorted(total.items()):
        metrics.log_metric(name, value)
    return total


def pipeline_module(name: str):
    if name not in PIPELINE_MODULES:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINE_MODULES))}")
    return importlib.import_module(PIPELINE_MODULES[name])


def compile_all(output_dir: str, names: list[str] | None = None) -> list[str]:
    """Compile each pipeline to `<output_dir>/<name>.yaml`."""
    from kfp import compiler

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or sorted(PIPELINE_MODULES):
        module = pipeline_module(name)
        path = str(Path(output_dir) / f"{name}.yaml")
        compiler.Compiler().compile(module.pipeline, package_path=path)
        written.append(path)
    return written


def run_local(name: str, arguments: dict[str, Any], pipeline_root: str) -> None:
    """Run a pipeline with kfp.local's SubprocessRunner in this Python environment."""
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True
    )
    pipeline_module(name).pipeline(**arguments)
