"""The LLaVA data format's shared pieces: the image token, LLaVA's brief-description instructions, and
image paths relative to the image folder (LLaVA's `--image_folder`)."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from synthvlm import storage

IMAGE_TOKEN = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN


@lru_cache(maxsize=1)
def brief_instructions() -> tuple[str, ...]:
    """LLaVA paper (Liu et al. 2023, Visual Instruction Tuning), Table 8: brief image description."""
    text = resources.files("synthvlm").joinpath("data/llava_brief_instructions.json").read_text("utf-8")
    return tuple(json.loads(text))


def brief_instruction(record_id: str, seed: int) -> str:
    """A brief-description instruction for `record_id`, the same on every machine and Python run."""
    # sha256 rather than hash(): Python salts str hashes per process (PYTHONHASHSEED).
    digest = hashlib.sha256(f"{seed}\x00{record_id}".encode()).digest()
    options = brief_instructions()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def human_turn(instruction: str, placement: Literal["before", "after"]) -> str:
    if placement == "before":
        return f"{IMAGE_TOKEN}\n{instruction}"
    return f"{instruction}\n{IMAGE_TOKEN}"


def relative_image_path(image_uri: str, data_root: str) -> str | None:
    """`image_uri` relative to `data_root` as a POSIX path, or None when it is not inside it."""
    if storage.is_gcs(image_uri) != storage.is_gcs(data_root):
        return None
    if storage.is_gcs(data_root):
        root = data_root.rstrip("/") + "/"
        if not image_uri.startswith(root):
            return None
        rel = PurePosixPath(image_uri[len(root) :])
        # gs:// names are not normalised: "a/../b" is a literal object name, never a path into root.
        if not rel.parts or any(part in ("..", ".") for part in rel.parts):
            return None
        return rel.as_posix()
    try:
        rel_local = Path(image_uri).resolve().relative_to(Path(data_root).resolve())
    except ValueError:
        return None
    return rel_local.as_posix() if rel_local.parts else None
