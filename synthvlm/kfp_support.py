"""The glue between stages and KFP: metrics from completion markers, compile, and local runs.

Components call `stage_metrics` (no KFP import needed there); the CLI calls `compile_all` and
`run_local`. Nothing outside this module and components/ and pipelines/ imports kfp.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from synthvlm import stage
from synthvlm.any_uid import ensure_any_uid
from synthvlm.console import QuietConsole, strip_ansi
from synthvlm.errors import SynthVLMError, TaskFailedError
from synthvlm.runner import RUN_RECORD_KEYS

log = logging.getLogger(__name__)

PIPELINE_MODULES = {
    "synthvlm": "pipelines.synthvlm_pipeline",
    "stablellava": "pipelines.stablellava_pipeline",
    "train": "pipelines.train_pipeline",
    "end-to-end": "pipelines.end_to_end_pipeline",
    "stablellava-end-to-end": "pipelines.stablellava_end_to_end_pipeline",
}


def setup_logging() -> None:
    """Logging for a component, and a last log line naming its error if it fails (report_errors)."""
    logging.basicConfig(
        level=os.environ.get("SYNTHVLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    report_errors()
    # Before any model or cache is touched: a usable HOME, caches and user name under any UID.
    for change in ensure_any_uid():
        log.warning("any-UID fallback: %s", change)


# ---------------------------------------------------------------- errors of component processes

# Set by run_local: the file where a failing component records its error, for the run's last line.
ERROR_LOG_ENV = "SYNTHVLM_ERROR_LOG"
ERROR_PREFIX = "synthvlm error: "


def one_line(text: str) -> str:
    """A multi-line message on one line: 'N problems:\n  a\n  b' -> 'N problems: a; b'."""
    out = ""
    for line in (part.strip() for part in text.splitlines()):
        if not line:
            continue
        if out:
            out += " " if out.endswith(":") else "; "
        out += line
    return out


def _function_name() -> str | None:
    """The component function this process runs (kfp's executor gets it as --function_to_execute)."""
    argv = sys.argv
    for i, arg in enumerate(argv[:-1]):
        if arg == "--function_to_execute":
            return argv[i + 1]
    return None


def report_errors() -> None:
    """Install a sys.excepthook for component processes: an error we raise on purpose (SynthVLMError)
    ends the log with `synthvlm error: <message>` and no traceback; any other keeps its traceback and
    gets the same last line. Under run_local the error is also recorded for the run's last line."""
    if getattr(sys.excepthook, "_synthvlm", False):
        return  # already installed (setup_logging may run more than once in a process)
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        ours = isinstance(exc, SynthVLMError)
        if not ours:
            previous(exc_type, exc, tb)  # unexpected: the traceback is what a developer needs
        message = str(exc) if ours else f"{exc_type.__name__}: {exc}"
        print(f"{ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
        path = os.environ.get(ERROR_LOG_ENV)
        if not path:
            return
        record = {
            "function": _function_name(),
            "message": message,
            "bad_input": ours and getattr(exc, "exit_code", 2) == 2,
        }
        try:  # one short line per failed task; O_APPEND keeps parallel tasks' lines whole
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError:
            pass  # never hide the task's own error behind a failure to record it

    hook._synthvlm = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _failed_task(kfp_message: str) -> str | None:
    """The innermost failed task named in kfp.local's RuntimeError, if any."""
    text = strip_ansi(kfp_message)
    match = re.search(r"Inner task failed: '([^']+)'", text) or re.search(r"Task '([^']+)' finished", text)
    return match.group(1) if match else None


def _recorded_errors(path: str) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line (a task killed mid-write): the others still count
    return records


def task_failure(kfp_error: RuntimeError, error_log: str) -> TaskFailedError:
    """kfp.local's RuntimeError as an error naming the failed task and repeating its own message."""
    task = _failed_task(str(kfp_error))
    records = _recorded_errors(error_log)
    if task is not None:
        # kfp names a task after its component function ("load_captions" -> "load-captions", "-2" for
        # a second use): prefer the record of that function, else the last error recorded.
        matching = [
            r
            for r in records
            if r.get("function")
            and re.fullmatch(re.escape(str(r["function"]).replace("_", "-")) + r"(-\d+)?", task)
        ]
        records = matching or records
    if not records:  # killed, or failed before our hook: what kfp said, without colour codes
        detail = one_line(strip_ansi(str(kfp_error)))
        return TaskFailedError(task, f"{detail} (its error is in the log above)", bad_input=False)
    record = records[-1]
    return TaskFailedError(task, one_line(str(record["message"])), bad_input=bool(record.get("bad_input")))


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
    """Log the numeric statistics of each finished output (summed over shards) into a KFP Metrics artifact,
    with its billed time (billed_gpu_seconds / billed_vcpu_seconds: wall seconds x accelerators requested)
    and cost_usd at the reports' default prices (synthvlm.billing.Prices)."""
    from synthvlm.billing import billed_metrics

    total: dict[str, float] = {}
    for uri in output_uris:
        stats = stage.read_stats(uri)
        values = {**numeric_metrics(stats), **billed_metrics([stats])}
        for name, value in values.items():
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
        _stable_header(path)
        written.append(path)
    return written


_HEADER_DEFAULT = re.compile(r"^(#\s+\w+: \w+ \[Default: )(.*)(\])$")


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _stable_header(path: str) -> None:
    """kfp writes mapping defaults into the YAML's comment header in protobuf map order, which changes
    from process to process: sort their keys, so compiling twice gives the same bytes."""
    import ast

    lines = Path(path).read_text().split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break  # the header ends where the YAML starts
        match = _HEADER_DEFAULT.match(line)
        if match and match[2][:1] in "[{":
            try:
                value = ast.literal_eval(match[2])
            except (ValueError, SyntaxError):
                continue
            lines[i] = f"{match[1]}{_sorted_keys(value)!r}{match[3]}"
    Path(path).write_text("\n".join(lines))


def run_local(name: str, arguments: dict[str, Any], pipeline_root: str, *, verbose: bool = False) -> None:
    """Run a pipeline with kfp.local's SubprocessRunner in this Python environment.

    Unless `verbose`, the console shows one line per task start and end plus our own log lines
    (synthvlm.console.QuietConsole); a failed task's whole output is still shown.
    """
    with contextlib.ExitStack() as stack:
        if not verbose:
            console = QuietConsole(sys.stdout)
            stack.enter_context(contextlib.redirect_stdout(console))
            stack.callback(console.close_partial)
            # kfp.local logs through the root logger, partly outside its own handler (ParallelFor
            # iterations): send all of it through the console, in kfp's own line format.
            stack.enter_context(_root_logging_to(console))
            stack.enter_context(warnings.catch_warnings())
            # kfp.local's notes that local runs ignore display names, images and GPU settings.
            warnings.filterwarnings("ignore", module=r"kfp\.local")
        _run_local(name, arguments, pipeline_root)


@contextlib.contextmanager
def _root_logging_to(stream: Any) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d - %(levelname)s - %(message)s", "%H:%M:%S")
    )
    root.handlers[:] = [handler]
    try:
        yield
    finally:
        root.handlers[:] = saved


# SYNTHVLM_LOCAL_RUNNER=docker runs each task in its component's image (kfp.local.DockerRunner; the
# images must exist locally under the references synthvlm.images gives), with no network unless
# SYNTHVLM_DOCKER_NETWORK names one, as SYNTHVLM_DOCKER_USER ("uid:gid", default: the image's user). The
# folder holding pipeline_root (the run's data root, see cli.cmd_run) is mounted at the same path; it
# must be writable by that user (e.g. group 0 with umask 002 for "uid:0", as tests/containers does).
LOCAL_RUNNER_ENV = "SYNTHVLM_LOCAL_RUNNER"


def _local_runner(pipeline_root: str) -> Any:
    from kfp import local

    kind = os.environ.get(LOCAL_RUNNER_ENV, "subprocess")
    if kind == "subprocess":
        return local.SubprocessRunner(use_venv=False)
    if kind != "docker":
        raise SynthVLMError(f"{LOCAL_RUNNER_ENV}={kind!r}: expected 'subprocess' or 'docker'")
    from docker.types import Mount

    data_root = os.path.dirname(os.path.abspath(pipeline_root))
    # Made here, not by dockerd (which would make a missing bind source root's, mode 755).
    os.makedirs(pipeline_root, exist_ok=True)
    run_args: dict[str, Any] = {
        "network_mode": os.environ.get("SYNTHVLM_DOCKER_NETWORK", "none"),
        "mounts": [Mount(target=data_root, source=data_root, type="bind")],
    }
    if user := os.environ.get("SYNTHVLM_DOCKER_USER"):
        run_args["user"] = user
    return local.DockerRunner(**run_args)


def _run_local(name: str, arguments: dict[str, Any], pipeline_root: str) -> None:
    from kfp import local

    local.init(runner=_local_runner(pipeline_root), pipeline_root=pipeline_root, raise_on_error=True)
    previous = os.environ.get(ERROR_LOG_ENV)
    with tempfile.TemporaryDirectory(prefix="synthvlm-errors-") as tmp:
        error_log = os.path.join(tmp, "errors.jsonl")
        os.environ[ERROR_LOG_ENV] = error_log  # task subprocesses inherit it (report_errors)
        try:
            pipeline_module(name).pipeline(**arguments)
        except RuntimeError as exc:
            # The failed task's own message, on the run's last line (not only deep in the log above).
            raise task_failure(exc, error_log) from None
        finally:
            if previous is None:
                os.environ.pop(ERROR_LOG_ENV, None)
            else:
                os.environ[ERROR_LOG_ENV] = previous
