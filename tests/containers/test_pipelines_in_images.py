"""The demo pipelines, task by task in their own images (kfp.local.DockerRunner), no network, any UID.

Run by `make test-containers` (scripts/test_containers.sh builds the images first); skipped elsewhere,
so `make test` needs no Docker. SYNTHVLM_CONTAINER_TESTS=1 enables them; the images are the ones
synthvlm.images names under SYNTHVLM_IMAGE_REGISTRY / SYNTHVLM_IMAGE_TAG, which must exist locally.
SYNTHVLM_CONTAINER_USERS (default "1000:0 1000890000:0") lists the users each pipeline runs as: the
image's uid 1000, then an arbitrary uid with group 0 and no passwd entry (OpenShift's restricted policy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthvlm.records import read_manifest

REPO = Path(__file__).resolve().parents[2]
ENABLED = os.environ.get("SYNTHVLM_CONTAINER_TESTS") == "1"
USERS = os.environ.get("SYNTHVLM_CONTAINER_USERS", "1000:0 1000890000:0").split()
SMALL = ("generate.steps=2", "generate.height=64", "generate.width=64")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ENABLED, reason="container tests: run `make test-containers` (needs Docker)"),
]


def _run(pipeline: str, output: Path, user: str, *sets: str) -> subprocess.CompletedProcess:
    # The data root must be writable by the task's user: group 0 (every task runs with gid 0), and
    # umask 002 so that the folders kfp.local makes on this side are group-writable too.
    output.mkdir(mode=0o775)
    output.chmod(0o775)
    cmd = [sys.executable, "-m", "synthvlm.cli", "run", pipeline, "--local", "--preset", "demo"]
    cmd += ["--output", str(output)]
    for item in (*SMALL, *sets):
        cmd += ["--set", item]
    env = {**os.environ, "SYNTHVLM_LOCAL_RUNNER": "docker", "SYNTHVLM_DOCKER_USER": user}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800, umask=0o002)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "Found image" in proc.stdout or "SUCCESS" in proc.stdout
    return proc


def _owned_by(root: Path, user: str) -> None:
    """Outputs were written inside the containers, as `user`."""
    uid = int(user.split(":")[0])
    assert uid in {p.stat().st_uid for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=USERS)
def user(request) -> str:
    return request.param


def test_synthvlm(tmp_path: Path, user: str):
    root = tmp_path / "run"
    _run("synthvlm", root, user, "max_captions=6", "select.k=3")
    dataset = json.loads((root / "export" / "llava_pretrain.json").read_text())
    assert len(dataset) == 3
    for sample in dataset:
        assert (root / sample["image"]).is_file()
        assert sample["conversations"][0]["value"].startswith("<image>\n")
    manifest = read_manifest(str(root / "export" / "manifest.jsonl"))
    assert [r.id for r in manifest] == [s["id"] for s in dataset]
    assert (root / "report.html").is_file()
    _owned_by(root, user)


def test_stablellava(tmp_path: Path, user: str):
    root = tmp_path / "run"
    _run("stablellava", root, user)
    export = root / "stablellava" / "export"
    sft = json.loads((export / "stablellava_sft.json").read_text())
    assert sft and all(isinstance(s.get("image", ""), str) for s in sft)  # LLaVA-1.5: one image per sample
    interleaved = json.loads((export / "stablellava_sft_interleaved.json").read_text())
    assert any(len(s["image"]) > 1 for s in interleaved)
    for sample in interleaved:
        assert all((root / image).is_file() for image in sample["image"])
    evals = [json.loads(line) for line in (export / "stablellava_eval.jsonl").read_text().splitlines()]
    assert evals and all(item.get("answer") or item.get("answers") for item in evals)
    assert (root / "stablellava" / "report.html").is_file()
    _owned_by(root, user)


def test_end_to_end(tmp_path: Path, user: str):
    root = tmp_path / "run"
    _run("end-to-end", root, user, "max_captions=6", "select.k=4")
    assert len(json.loads((root / "export" / "llava_pretrain.json").read_text())) == 4
    pointer = json.loads((root / "train" / "sft" / "model.latest.json").read_text())
    model = Path(pointer["published_from"])
    assert (model / "config.json").is_file()
    assert "colors" in json.dumps(json.loads((root / "eval" / "sft.json").read_text()))
    assert (root / "eval" / "sft.html").is_file()
    _owned_by(root, user)
