"""Named lmms-eval tasks (MME, MMBench, POPE, ScienceQA-IMG, VQAv2, GQA, ...) through lmms-eval itself.

For public benchmarks the official task definitions, prompts and scorers are what published numbers
use, so we run lmms-eval rather than re-implementing each one. A benchmark written `lmms_eval:<task>`
(e.g. `lmms_eval:mme`) in the evaluate stage's list goes here. lmms-eval is a heavy dependency (datasets,
many model backends, its own pins) and downloads its datasets from the Hugging Face hub, so it lives in
the eval image only; anywhere else this mode fails at once with `LMMSEvalUnavailable`, before any model
is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from synthvlm.errors import SynthVLMError

log = logging.getLogger(__name__)

LMMS_PREFIX = "lmms_eval:"
LMMS_PACKAGE = "lmms_eval"


class LMMSEvalUnavailable(SynthVLMError):
    """lmms-eval tasks were requested where the lmms_eval package is not installed."""


def is_lmms_task(benchmark: str) -> bool:
    return benchmark.startswith(LMMS_PREFIX)


def task_name(benchmark: str) -> str:
    """'lmms_eval:mme' -> 'mme'."""
    name = benchmark.removeprefix(LMMS_PREFIX).strip()
    if not name:
        raise ValueError(f"no task name in {benchmark!r}; write e.g. '{LMMS_PREFIX}mme'")
    return name


def lmms_eval_available() -> bool:
    return importlib.util.find_spec(LMMS_PACKAGE) is not None


def require_lmms_eval(tasks: Sequence[str]) -> None:
    """Raise a clear error when lmms-eval tasks are requested but the package is missing."""
    if lmms_eval_available():
        return
    raise LMMSEvalUnavailable(
        f"the lmms_eval benchmark mode (tasks: {', '.join(tasks)}) needs the `lmms_eval` Python package, "
        "which is installed only in the eval image (run this step in that container), not in this "
        "environment. Locally, install it with `pip install lmms-eval`, or evaluate on JSONL benchmarks "
        "instead."
    )


def flatten_results(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lmms-eval's {"results": {task: {"acc,none": 0.7, "alias": ...}}} -> {task: {"acc": 0.7}}.

    The ",none" filter suffix is dropped; other filters stay ("exact_match,flexible-extract" ->
    "exact_match.flexible-extract"); non-numeric entries (aliases, sample lists) are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        flat: dict[str, float] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            metric, _, filter_name = str(key).partition(",")
            name = metric if filter_name in ("", "none") else f"{metric}.{filter_name}"
            flat[name] = float(value)
        out[str(task)] = flat
    return out


def run_lmms_eval(
    model_path: str,
    tasks: Sequence[str],
    *,
    model_backend: str = "llava_hf",
    batch_size: int = 1,
    device: str | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lmms-eval tasks on a local checkpoint folder or hub name; returns {task: {metric: value}}."""
    require_lmms_eval(tasks)
    evaluator = importlib.import_module(f"{LMMS_PACKAGE}.evaluator")
    log.info("lmms-eval: %s on %s (backend %s)", ", ".join(tasks), model_path, model_backend)
    results = evaluator.simple_evaluate(
        model=model_backend,
        model_args=f"pretrained={model_path}",
        tasks=list(tasks),
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=False,
    )
    if results is None:  # non-zero ranks of a distributed run get nothing back
        return {}
    return flatten_results(results)
