"""Progress lines: done/total, rate and ETA at a fixed interval (pods), a last line at the end."""

from __future__ import annotations

import logging

from synthvlm.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "synthvlm.progress"]


def test_pod_mode_logs_done_total_rate_and_eta_at_a_fixed_interval(caplog) -> None:
    clock = Clock()
    with (
        caplog.at_level(logging.INFO, logger="synthvlm.progress"),
        Progress("generate shard 1/8", 1000, "images", interval_s=30, bar=False, clock=clock) as progress,
    ):
        for _ in range(100):  # 10 images every 5 s: 2 images/s
            clock.now += 5
            progress.update(10)
    lines = _lines(caplog)
    assert lines[0] == "generate shard 1/8: 0/1,000 images (0.0%), ETA unknown"
    # One line per 30 s of work (not per batch), then the last one.
    assert len(lines) == 1 + 500 // 30 + 1
    assert lines[1] == "generate shard 1/8: 60/1,000 images (6.0%), 2 images/s, ETA 7m 50s"
    assert lines[-1] == "generate shard 1/8: 1,000/1,000 images (100.0%), 2 images/s, done in 8m 20s"


def test_resumed_work_counts_towards_done_but_not_the_rate(caplog) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="synthvlm.progress"):
        progress = Progress("score", 100, "images", done=50, interval_s=0, bar=False, clock=clock)
        clock.now += 10
        progress.update(10)
    assert _lines(caplog)[-1] == "score: 60/100 images (60.0%), 1 images/s, ETA 40s"


def test_durations_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (4.2, 95, 3725, 39 * 3600 + 60)] == [
        "4s",
        "1m 35s",
        "1h 2m",
        "39h 1m",
    ]
