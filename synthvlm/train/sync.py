"""Checkpoints on local disk, mirrored to a gs:// (or any storage) folder so a restarted pod resumes.

The Trainer writes `checkpoint-<step>/` folders under a local directory. After each save the newest one
is uploaded to `<remote>/checkpoint-<step>/` and then marked complete with `<remote>/checkpoint-<step>.done`
(synthvlm.stage's marker), so a reader never takes a half-uploaded checkpoint; older remote checkpoints
beyond the keep limit are deleted (marker first). A run with a remote resumes from the newest complete
remote checkpoint, downloaded unless this disk already has it.

A local checkpoint counts as complete once `trainer_state.json` is in it: the Trainer writes that file
after the weights, optimizer and scheduler.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from synthvlm import storage
from synthvlm.stage import DONE_SUFFIX, StageStats, mark_done

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(name: str) -> int | None:
    match = _CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


def local_checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `folder`, oldest first, as (step, path)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child.name)
        if step is not None and (child / TRAINER_STATE).is_file():
            found.append((step, str(child)))
    return sorted(found)


def last_local_checkpoint(folder: str) -> str | None:
    checkpoints = local_checkpoints(folder)
    return checkpoints[-1][1] if checkpoints else None


def upload_folder(local_dir: str, uri: str) -> int:
    """Copy every file under `local_dir` to `uri` (same relative paths); returns the file count."""
    count = 0
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), storage.join(uri, path.relative_to(local_dir).as_posix()))
            count += 1
    return count


def download_folder(uri: str, local_dir: str, replace: bool = True) -> int:
    """Copy every file under `uri` into `local_dir`, which appears only once complete (rename).

    replace=False keeps a `local_dir` that another process published meanwhile (several ranks may race
    to download the same model); the copy made here is then dropped.
    """
    target = Path(local_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    prefix = uri.rstrip("/") + "/"
    try:
        uris = storage.list_uris(uri)
        for file_uri in uris:
            rel = file_uri[len(prefix) :] if file_uri.startswith(prefix) else Path(file_uri).name
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(storage.read_bytes(file_uri))
        if target.exists() and replace:
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not target.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process published it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return len(uris)


def remote_checkpoints(remote: str) -> list[tuple[int, str]]:
    """Complete (marked) checkpoints under `remote`, oldest first, as (step, uri)."""
    found = []
    for marker in storage.list_uris(remote, suffix=DONE_SUFFIX):
        ckpt_uri = marker[: -len(DONE_SUFFIX)]
        step = checkpoint_step(ckpt_uri.rstrip("/").rsplit("/", 1)[-1])
        if step is not None:
            found.append((step, ckpt_uri))
    return sorted(found)


def delete_remote_checkpoint(ckpt_uri: str) -> None:
    storage.delete(ckpt_uri + DONE_SUFFIX)  # unmark first: a partly deleted checkpoint is never "complete"
    for file_uri in storage.list_uris(ckpt_uri):
        storage.delete(file_uri)


def push_checkpoint(local_ckpt: str, remote: str, keep: int) -> str:
    """Upload one local checkpoint, mark it complete, delete remote ones beyond the newest `keep`."""
    name = Path(local_ckpt).name
    ckpt_uri = storage.join(remote, name)
    stats = StageStats(stage="train_checkpoint")
    stats.count_out = upload_folder(local_ckpt, ckpt_uri)
    mark_done(ckpt_uri, stats)
    log.info("uploaded %s to %s (%d files)", name, ckpt_uri, stats.count_out)
    for _, old in remote_checkpoints(remote)[:-keep]:
        delete_remote_checkpoint(old)
    return ckpt_uri


def pull_last_checkpoint(remote: str, local_root: str) -> str | None:
    """Local path of the newest complete remote checkpoint, downloaded unless already on this disk.

    The remote copy is the truth: a newer local checkpoint whose upload never finished is ignored, so
    every node of a multi-node run resumes from the same step.
    """
    remote_list = remote_checkpoints(remote)
    if not remote_list:
        return None
    step, ckpt_uri = remote_list[-1]
    local_path = os.path.join(local_root, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    if not (Path(local_path) / TRAINER_STATE).is_file():
        files = download_folder(ckpt_uri, local_path)
        log.info("downloaded checkpoint %s (%d files) to resume from", ckpt_uri, files)
    return local_path


class CheckpointSyncCallback(TrainerCallback):
    """After every Trainer save, the main process uploads the new checkpoint to `remote`."""

    def __init__(self, remote: str, keep: int):
        self.remote = remote
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            local = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(local):
                push_checkpoint(local, self.remote, self.keep)
            else:  # pragma: no cover - the Trainer always writes it before on_save
                log.warning("checkpoint %s not found after save; not uploaded", local)
        return control
