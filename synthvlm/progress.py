"""Progress of long work (generation, scoring): done/total, rate and ETA.

On a terminal it is a tqdm bar. Elsewhere (a pod, whose output the KFP UI shows as logs; a test; a file)
it is one log line every `interval_s` seconds plus a last one at the end, so a log of a 15,625-batch
shard stays readable:

    generate shard 1/8: 1,200/125,000 images (1.0%), 3.21 images/s, ETA 10h 42m

`SYNTHVLM_PROGRESS=log` forces the log lines on a terminal too; `SYNTHVLM_PROGRESS_INTERVAL_S` sets the
interval (default 30 s, our choice: a few lines per minute of a long pod's log).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("synthvlm.progress")

DEFAULT_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """3725 -> '1h 2m', 95 -> '1m 35s', 4.2 -> '4s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _interval_from_env() -> float:
    raw = os.environ.get("SYNTHVLM_PROGRESS_INTERVAL_S", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def _use_bar() -> bool:
    return os.environ.get("SYNTHVLM_PROGRESS", "") != "log" and sys.stderr.isatty()


class Progress:
    """Counts work done against a total; reports it as a bar (terminal) or periodic log lines (pods).

    `done` is work finished before this run (a resumed shard): it counts towards done/total but not
    towards the rate, which measures this run only.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "items",
        *,
        done: int = 0,
        interval_s: float | None = None,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.done = self._start_done = done
        self.interval_s = _interval_from_env() if interval_s is None else interval_s
        self._clock = clock
        self._started = self._last_line = clock()
        self._bar: Any = None
        if _use_bar() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=label, unit=f" {unit}", dynamic_ncols=True)
        else:
            log.info("%s", self.line())

    def rate(self) -> float | None:
        elapsed = self._clock() - self._started
        new = self.done - self._start_done
        return new / elapsed if new > 0 and elapsed > 0 else None

    def line(self) -> str:
        """'generate shard 1/2: 120/1,000 images (12.0%), 3.21 images/s, ETA 4m 35s'."""
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        text = f"{self.label}: {self.done:,}/{self.total:,} {self.unit}{share}"
        rate = self.rate()
        if self.done >= self.total:
            elapsed = format_duration(self._clock() - self._started)
            speed = f", {rate:.3g} {self.unit}/s" if rate else ""
            return f"{text}{speed}, done in {elapsed}"
        if rate is None:
            return f"{text}, ETA unknown"
        eta = format_duration((self.total - self.done) / rate)
        return f"{text}, {rate:.3g} {self.unit}/s, ETA {eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last_line >= self.interval_s and self.done < self.total:
            self._last_line = now
            log.info("%s", self.line())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
