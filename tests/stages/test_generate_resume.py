"""A generation shard killed at random moments (SIGKILL: no cleanup of any kind) and rerun ends with
exactly the images of an uninterrupted run, each once, and reruns regenerate only unfinished work."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from synthvlm import stage, storage
from synthvlm.models.sdxl import TINY_SDXL
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stages import generate as gen
from synthvlm.stages.generate import GenerateConfig, generate, shard_manifest_uri

# The child process: the stage itself, logging to stderr so the test can follow its progress. It
# imports, then waits for a line on stdin: the next child's imports overlap with the current child's run.
DRIVER = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(name)s: %(message)s')\n"
    "logging.getLogger('synthvlm.stages.generate').setLevel(logging.DEBUG)\n"
    "from synthvlm.stages.generate import GenerateConfig, generate\n"
    "sys.stdin.readline()\n"
    "generate(GenerateConfig.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3])\n"
)
PROGRESS = re.compile(r"(\d+) images, (\d+) done earlier, (\d+) to generate")
KILL_SEEDS = (11, 12, 13)  # one SIGKILL per seed, at a random moment of the generation
CAPTIONS, IMAGES_PER_PROMPT = 10, 2
TOTAL = CAPTIONS * IMAGES_PER_PROMPT  # 20 images in 10 parts of 2


class Child:
    """The stage in a subprocess; its stderr is read on a thread, so the test can wait for a log line."""

    started_children: list[Child] = []

    def __init__(self, config: GenerateConfig, captions: str, out: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        args = [sys.executable, "-c", DRIVER, config.model_dump_json(), captions, out]
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self.started = threading.Event()  # the stage has decided what to generate
        self.painting = threading.Event()  # its first batch is painted: the model is loaded and warm
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Child.started_children.append(self)

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.close()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if PROGRESS.search(line) or "already done" in line:
                self.started.set()
            if "batch 1/" in line:
                self.painting.set()

    def progress(self) -> tuple[int, int, int]:
        (match,) = [m for m in map(PROGRESS.search, self.lines) if m]
        total, done, todo = map(int, match.groups())
        return total, done, todo

    def finish(self) -> int:
        code = self.process.wait(timeout=120)
        self._reader.join(timeout=10)
        return code


@pytest.fixture(autouse=True)
def no_leftover_children() -> Any:
    """A failed assertion must not leave a child waiting on stdin (it would run when the pipe closes)."""
    yield
    for child in Child.started_children:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(timeout=30)
    Child.started_children.clear()


def done_part_ids(out: str) -> list[str]:
    """Ids listed by the done markers of all committed parts (with repeats, if any)."""
    parts_dir = shard_manifest_uri(out, 0, 1).removesuffix(".jsonl") + ".parts"
    return [rid for uri in gen._done_parts(parts_dir).values() for rid in stage.read_stats(uri)["ids"]]


def test_sigkilled_shard_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch) -> None:
    captions = str(tmp_path / "captions.jsonl")
    write_manifest(captions, [Record(id=f"c{i:02d}", caption=f"picture number {i}") for i in range(CAPTIONS)])
    config = GenerateConfig(
        model=TINY_SDXL,
        steps=2,
        height=64,
        width=64,
        batch_size=2,
        device="cpu",
        images_per_prompt=IMAGES_PER_PROMPT,
    )
    reference_shard = generate(config, captions, str(tmp_path / "reference"))
    reference = read_manifest(reference_shard)
    # Painting time of the whole shard in this process; a child paints about as fast.
    duration = stage.read_stats(reference_shard)["generate_seconds"]

    root = str(tmp_path / "killed")
    out = gen.version_dir(config, captions, root)  # where this fingerprint's work goes
    shard = shard_manifest_uri(out, 0, 1)
    kills = 0
    upcoming = Child(config, captions, root)
    for seed in KILL_SEEDS:
        child, done_before = upcoming, set(done_part_ids(out))
        child.go()
        assert child.started.wait(timeout=90), "".join(child.lines)
        upcoming = Child(config, captions, root)  # imports while `child` runs; starts when told
        if stage.is_done(shard):  # the previous child finished before its kill: nothing left to kill
            child.finish()
            break
        total, done, todo = child.progress()
        assert (total, done, todo) == (TOTAL, len(done_before), TOTAL - len(done_before))
        if todo:
            assert child.painting.wait(timeout=90), "".join(child.lines)
        time.sleep(random.Random(seed).uniform(0, duration * todo / total))
        child.process.send_signal(signal.SIGKILL)
        kills += child.finish() == -signal.SIGKILL
    assert kills >= 2  # most kills land before the shard is complete

    done_before, was_done = set(done_part_ids(out)), stage.is_done(shard)
    upcoming.go()
    assert upcoming.finish() == 0, "".join(upcoming.lines[-20:])
    if not was_done:  # only what no committed part holds is painted again
        assert upcoming.progress() == (TOTAL, len(done_before), TOTAL - len(done_before))

    final = read_manifest(shard)
    assert [r.id for r in final] == [r.id for r in reference]
    assert [r.seed for r in final] == [r.seed for r in reference]
    assert sorted(done_part_ids(out)) == sorted(r.id for r in final)  # each image committed exactly once
    for rec in final:
        with Image.open(io.BytesIO(storage.read_bytes(rec.image_uri))) as image:
            image.load()
            assert image.size == (64, 64)
    visible = {str(p) for p in (Path(out) / "images").iterdir() if not p.name.startswith(".")}
    assert visible == {r.image_uri for r in final}  # no stray or half-written image under a real name
    stats = json.loads(storage.read_text(stage.done_uri(shard)))
    assert (stats["count_in"], stats["count_out"]) == (TOTAL, TOTAL)

    # A finished shard is skipped without loading a model.
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished shard loaded the model")

    monkeypatch.setattr(gen, "load_sdxl", no_load)
    assert generate(config, captions, root) == shard
