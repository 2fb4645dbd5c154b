"""An LLM stage under the DEFAULT config (no llm.cache_dir set), killed with SIGKILL part-way and rerun,
against a loopback server that counts requests per item: no item whose answer was stored before the kill
is asked again, and the rerun completes.

The stage is `synthvlm curate` (the LLM caption judge, one request per caption) run as a CLI subprocess
with its output at `<dir>/curated.jsonl`, so its response cache is the default for a stage run without
a data root: `<dir>/llm-cache` (the pipeline's components pass `<data root>/llm-cache`). An answer the
server sent but the child had not yet written to the cache when it died may be asked again: that is at
most the requests in flight (counted and bounded below).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from synthvlm.llm.fake_server import FakeLLMServer
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stages.curate import CAPTION_MARKER

N_CAPTIONS = 40
CONCURRENCY = 2  # llm.max_concurrency: few requests in flight, so the kill lands between answers
LATENCY_S = 0.1  # per answer: 2 in flight -> ~20 answers/s, ~2 s for all 40
KILL_AFTER = 12  # answers sent before the kill: well inside the run, whatever the child's start-up time
KEY_ENV = "SYNTHVLM_TEST_RESUME_UNSET_KEY"  # unset: the self-hosted server gets no key


def caption_of(prompt: str) -> str:
    return prompt.rsplit(CAPTION_MARKER, 1)[-1].strip()


class CountingJudge:
    """The fake server's reply: "Yes." plus the caption, so a cache entry on disk names its item; it
    also records which captions were answered (called just before the answer is sent)."""

    def __init__(self) -> None:
        self.answered: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, prompt: str) -> str:
        caption = caption_of(prompt)
        with self._lock:
            self.answered.append(caption)
        return f"Yes. {caption}"


def curate_cli(server: FakeLLMServer, captions: str, output: Path) -> list[str]:
    """`synthvlm curate` writing `output` (curated.jsonl in the --output folder)."""
    llm = {
        "base_url": server.base_url,
        "model": "judge-model",
        "api_key_env": KEY_ENV,
        "max_concurrency": CONCURRENCY,
        "timeout_s": 30,
    }
    sets = [f"judge.llm.{key}={value}" for key, value in llm.items()]  # no cache_dir: the default
    sets += ["heuristics.enabled=false", "dedup.near=false", "clip.enabled=false", "sample_size=null"]
    cli = [sys.executable, "-m", "synthvlm.cli", "curate"]
    args = [*cli, "--input", captions, "--output", str(output.parent)]
    return args + [arg for item in sets for arg in ("--set", item)]


def cached_captions(cache_dir: Path) -> set[str]:
    entries = [p for p in cache_dir.rglob("*.json") if not p.name.startswith(".")]
    return {json.loads(p.read_text())["content"].removeprefix("Yes. ") for p in entries}


@pytest.mark.slow  # two stage subprocesses (~20 s each: the curate stage imports torch)
def test_killed_llm_stage_never_asks_a_stored_answer_again(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    captions = [f"Photo {i:02d} of a quiet harbour with small boats at dawn." for i in range(N_CAPTIONS)]
    source = str(tmp_path / "captions.jsonl")
    write_manifest(source, [Record(id=f"c{i:02d}", caption=c) for i, c in enumerate(captions)])
    output = data_root / "curate" / "curated.jsonl"
    cache_dir = output.parent / "llm-cache"  # the default for a stage run without a data root
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    judge = CountingJudge()

    with FakeLLMServer(latency_s=LATENCY_S, text_reply=judge) as server:
        args = curate_cli(server, source, output)
        killed_log = tmp_path / "killed.log"
        log = killed_log.open("w")
        child = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(judge.answered) < KILL_AFTER and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert child.poll() is None, "the child ended before the kill:\n" + killed_log.read_text()
            assert len(judge.answered) >= KILL_AFTER, "the child asked too little in 120 s"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            log.close()
        asked_before = Counter(server.requests_by_prompt)
        answered_before = set(judge.answered)
        stored = cached_captions(cache_dir)  # what the dead child had written: nothing more can appear

        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        asked_after = Counter(server.requests_by_prompt) - asked_before

    by_caption_before = Counter({caption_of(p): n for p, n in asked_before.items()})
    by_caption_after = Counter({caption_of(p): n for p, n in asked_after.items()})
    re_asked = set(by_caption_before) & set(by_caption_after)
    print(
        f"\nkill test: {len(by_caption_before)} asked and {len(answered_before)} answered before the kill, "
        f"{len(stored)} stored in the cache; rerun asked {sum(by_caption_after.values())} "
        f"({len(re_asked)} asked before the kill, {len(stored & set(by_caption_after))} of them stored)"
    )

    # The kill landed mid-way (a few answers sent may not have been written yet) ...
    assert KILL_AFTER - 2 * CONCURRENCY <= len(stored) < N_CAPTIONS - 2 * CONCURRENCY
    assert stored <= answered_before and all(n == 1 for n in by_caption_before.values())
    assert not stored & set(by_caption_after)  # ... and nothing stored is asked again
    assert set(by_caption_after) == set(captions) - stored  # everything else is asked, once
    assert all(n == 1 for n in by_caption_after.values())
    # Re-asked: only requests in flight at the kill, or answered but not yet written (at most one per
    # concurrency slot each: the answer is written after the slot is freed for the next request).
    assert len(re_asked) <= 2 * CONCURRENCY
    assert [r.caption for r in read_manifest(str(output))] == captions  # the rerun completed: all judged Yes
    assert len(cached_captions(cache_dir)) == N_CAPTIONS
