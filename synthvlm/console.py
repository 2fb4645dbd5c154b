"""A quiet console for `synthvlm run --local`: what a person needs, not KFP's executor dumps.

kfp.local prints, per task, its own log lines (start, status, an output dump) and the task subprocess's
whole output (the executor input as JSON, third-party warnings, our log lines). `QuietConsole` sits in
front of stdout while the pipeline runs and keeps:
- one line when a task starts and one when it ends, with its status and duration;
- our own log lines from the tasks (the stage runner's start/skip/done lines with counts, progress lines
  with done/total and ETA, warnings), without their timestamps;
- kfp's warnings and errors.
Everything else of a task is held back, and shown in full if the task fails, so an error is never
hidden. `synthvlm -v run ...` shows everything, as kfp prints it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# kfp.local's own lines: "20:32:48.530 - INFO - Executing task 'load-captions'"
_KFP_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - (?P<level>[A-Z]+) - (?P<message>.*)$")
# A task's log line in synthvlm.kfp_support.setup_logging's format.
_TASK_LOG = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)$"
)
_STARTED = re.compile(r"^Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"^Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_PIPELINE_DONE = re.compile(r"^Pipeline '(?P<name>[^']+)' finished with status (?P<status>\w+)")
_SKIPPED = re.compile(r"^Skipping (conditional )?task (?P<task>\S+)")


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes (kfp.local colours task names and statuses)."""
    return _ANSI.sub("", text)


def _is_ours(logger: str, level: str) -> bool:
    return logger.startswith("synthvlm") or level in ("WARNING", "ERROR", "CRITICAL")


class QuietConsole:
    """A text stream that condenses kfp.local's output (see the module docstring) into `out`."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic):
        self.out, self.clock = out, clock
        self._partial = ""
        self._started: dict[str, list[float]] = {}  # ParallelFor: several tasks of one name at once
        self._held: list[str] = []  # the current task's other lines, shown if it fails
        self._in_dump = False  # inside a multi-line kfp message (a task's outputs)

    # the TextIO surface print() and logging.StreamHandler use
    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False

    def close_partial(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _emit(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _line(self, raw: str) -> None:
        line = strip_ansi(raw).rstrip()
        kfp = _KFP_LINE.match(line)
        if kfp:
            self._in_dump = False
            self._kfp(kfp["level"], kfp["message"])
            return
        stripped = line.strip()
        task_log = _TASK_LOG.match(stripped)
        if task_log and _is_ours(task_log["logger"], task_log["level"]):
            self._in_dump = False
            level = "" if task_log["level"] == "INFO" else f"{task_log['level']}: "
            self._emit(f"    {level}{task_log['message']}")
        elif stripped.startswith("synthvlm error:"):
            self._emit(f"    {stripped}")
        elif not self._in_dump and stripped:
            self._held.append(raw)

    def _kfp(self, level: str, message: str) -> None:
        if started := _STARTED.match(message):
            self._started.setdefault(started["task"], []).append(self.clock())
            self._held = []
            self._emit(f"{started['task']} ...")
        elif finished := _FINISHED.match(message):
            task, status = finished["task"], finished["status"]
            starts = self._started.get(task) or [self.clock()]
            seconds = self.clock() - starts.pop(0)
            if status != "SUCCESS" and self._held:
                self._emit(f"--- everything task '{task}' printed ---")
                for held in self._held:
                    self._emit(held)
                self._emit("---")
            self._held = []
            self._emit(f"{task}: {status} in {seconds:.1f} s")
        elif message.startswith("Task '") and message.rstrip().endswith("outputs:"):
            self._in_dump = True  # the outputs dump that follows (artifacts, URIs): in `-v` only
        elif done := _PIPELINE_DONE.match(message):
            self._emit(f"pipeline {done['name']}: {done['status']}")
        elif skipped := _SKIPPED.match(message):
            self._emit(f"{skipped['task']}: skipped")
        elif level in ("WARNING", "ERROR", "CRITICAL"):
            self._emit(f"{level}: {message}")
        elif message.startswith("Running pipeline"):
            self._emit(message.replace("Running pipeline:", "pipeline").strip())
