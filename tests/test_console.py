"""The quiet console of local runs: task lines and our log lines kept, KFP's dumps dropped, a failed task's
whole output shown."""

from __future__ import annotations

import io

from synthvlm.console import QuietConsole

KFP_TASK = """\
20:32:48.551 - INFO - Executing task \x1b[96m'load-captions'\x1b[0m
20:32:48.551 - INFO - Streamed logs:

    [KFP Executor 2026-12-04 20:32:48,808 INFO]: Got executor_input:
    {
        "inputs": {"parameterValues": {"captions": "bundled:demo_captions.jsonl"}}
    }
    2026-12-04 20:33:23,446 INFO synthvlm.runner: captions: done in 0.0 s, 16 in, 6 out -> /d/captions.jsonl
    2026-12-04 20:33:23,447 INFO some.library: chatter
    2026-12-04 20:33:23,448 WARNING some.library: something worth knowing
    2026-12-04 20:33:23,449 INFO synthvlm.progress: generate shard 1/2: 3/8 images (37.5%), 2 images/s, ETA 3s
    /usr/lib/python3/site-packages/x.py:1: UserWarning: noise
      warnings.warn(

20:33:24.000 - INFO - Task \x1b[96m'load-captions'\x1b[0m finished with status \x1b[92mSTATUS\x1b[0m
20:33:24.001 - INFO - Task 'load-captions' outputs:
    Output: '/d/captions.jsonl'
    metrics: Metrics( name='metrics', uri='/d/kfp-local/x', metadata={} )
--------------------------------------------------------------------------------
"""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


def _run(text: str) -> list[str]:
    out = io.StringIO()
    console = QuietConsole(out, clock=Clock())
    for chunk in (text[:50], text[50:333], text[333:]):  # writes need not end at line ends
        console.write(chunk)
    console.close_partial()
    return out.getvalue().splitlines()


def test_a_successful_task_is_two_lines_plus_our_log_lines() -> None:
    lines = _run(KFP_TASK.replace("STATUS", "SUCCESS"))
    assert lines == [
        "load-captions ...",
        "    captions: done in 0.0 s, 16 in, 6 out -> /d/captions.jsonl",
        "    WARNING: something worth knowing",
        "    generate shard 1/2: 3/8 images (37.5%), 2 images/s, ETA 3s",
        "load-captions: SUCCESS in 1.5 s",
    ]


def test_a_failed_task_shows_everything_it_printed() -> None:
    lines = _run(KFP_TASK.replace("STATUS", "FAILURE"))
    assert lines[-1] == "load-captions: FAILURE in 1.5 s"
    assert any("Got executor_input" in line for line in lines)
    assert any("UserWarning: noise" in line for line in lines)
    assert not any("\x1b[" in line for line in lines)
