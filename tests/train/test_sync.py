import json
from pathlib import Path

import pytest

from synthvlm import storage
from synthvlm.train.sync import (
    TRAINER_STATE,
    download_folder,
    last_local_checkpoint,
    local_checkpoints,
    pull_last_checkpoint,
    push_checkpoint,
    remote_checkpoints,
)


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> str:
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(bytes([step]) * 10)
    (folder / "sub" / "extra.txt").write_text(f"step {step}")
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return str(folder)


def test_local_checkpoints_skip_unfinished_ones(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 12, complete=False)  # crashed while saving
    (tmp_path / "checkpoint-x").mkdir()
    assert [step for step, _ in local_checkpoints(str(tmp_path))] == [2, 10]
    assert last_local_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    assert last_local_checkpoint(str(tmp_path / "missing")) is None


@pytest.fixture(params=["local", "gcs"])
def remote(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "remote")
    bucket = request.getfixturevalue("gcs_emulator")
    return f"{bucket}/sync-{tmp_path.name}/checkpoints"


def test_push_prune_and_pull(tmp_path, remote):
    local = tmp_path / "work"
    for step in (2, 4, 6):
        push_checkpoint(fake_checkpoint(local, step), remote, keep=2)
    assert [step for step, _ in remote_checkpoints(remote)] == [4, 6]
    assert not storage.exists(storage.join(remote, "checkpoint-2", "weights.bin"))

    fresh = tmp_path / "fresh-disk"  # a restarted pod
    path = pull_last_checkpoint(remote, str(fresh))
    assert path == str(fresh / "checkpoint-6")
    assert (fresh / "checkpoint-6" / "sub" / "extra.txt").read_text() == "step 6"
    assert (fresh / "checkpoint-6" / "weights.bin").read_bytes() == bytes([6]) * 10
    assert last_local_checkpoint(str(fresh)) == path

    fake_checkpoint(fresh, 8)  # saved here but never uploaded: the remote decides, for every node alike
    assert pull_last_checkpoint(remote, str(fresh)) == path
    assert pull_last_checkpoint(f"{remote}-empty", str(fresh)) is None


def test_a_checkpoint_without_its_marker_is_ignored(tmp_path, remote):
    local = tmp_path / "work"
    push_checkpoint(fake_checkpoint(local, 2), remote, keep=3)
    # an upload that died before its marker
    storage.upload_file(
        str(local / "checkpoint-2" / "weights.bin"), storage.join(remote, "checkpoint-9", "weights.bin")
    )
    assert [step for step, _ in remote_checkpoints(remote)] == [2]
    assert pull_last_checkpoint(remote, str(tmp_path / "fresh")).endswith("checkpoint-2")


def test_download_folder_replaces_a_stale_copy(tmp_path):
    source = Path(fake_checkpoint(tmp_path / "src", 3))
    target = tmp_path / "dst"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    assert download_folder(str(source), str(target)) == 3
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == [
        "extra.txt",
        TRAINER_STATE,
        "weights.bin",
    ]
