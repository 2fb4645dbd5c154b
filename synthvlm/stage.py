"""Completion markers and stage statistics, the pieces the stage runner (synthvlm.runner) writes with.

An output is complete when its `<output>.done` marker exists: the runner writes it after the output,
holding the stage's statistics (counts in/out, rejects by reason, seconds) and what made the output
(fingerprint, settings, inputs). Anything without a marker is unfinished: it is never published as
complete, and a rerun redoes it. Within a stage, the same markers commit smaller units of work (a
generation shard's parts), so a killed stage resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from synthvlm import storage

DONE_SUFFIX = ".done"


def done_uri(output_uri: str) -> str:
    return output_uri + DONE_SUFFIX


def is_done(output_uri: str) -> bool:
    return storage.exists(done_uri(output_uri))


def read_stats(output_uri: str) -> dict[str, Any]:
    return json.loads(storage.read_text(done_uri(output_uri)))


@dataclass
class StageStats:
    """Counts a stage reports; written into its completion marker and shown in reports/Metrics."""

    stage: str
    count_in: int = 0
    count_out: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "count_in": self.count_in,
            "count_out": self.count_out,
            "rejects": dict(self.rejects),
            "seconds": round(time.monotonic() - self.started, 3),
            **self.extra,
        }


def mark_done(output_uri: str, stats: StageStats) -> dict[str, Any]:
    """Publish `output_uri` as complete (call only after the output itself is written)."""
    data = stats.to_dict()
    storage.write_text(done_uri(output_uri), json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def require_done(output_uri: str) -> None:
    """Fail clearly when an upstream output is missing or unfinished."""
    if not is_done(output_uri):
        raise FileNotFoundError(
            f"{output_uri} is not marked complete ({done_uri(output_uri)} missing): "
            "the stage that writes it has not finished"
        )
