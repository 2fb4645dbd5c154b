"""The LLaVA data format's shared pieces: the image token, LLaVA's brief-description instructions, and
image paths relative to the image folder (LLaVA's `--image_folder`)."""

from __future__ import annotations

import hashlib
import json
import os
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
    return ImageRoot(data_root).relative(image_uri)


class ImageRoot:
    """A data root (LLaVA's --image_folder), resolved once; `relative` then costs no file-system call for
    an image under it.

    Local paths: the image path is made absolute and normalised as text ("a/../b" is "b"), then matched
    against the root as given and as resolved (symlinks followed), once for all images. Only an image
    matching neither is resolved itself (an image path through another symlink to the root), so an export
    of N images under the root makes no per-image system call. Under a symlink inside the root, the
    relative path goes through the symlink, which is where a reader of the image folder finds the file.
    """

    def __init__(self, data_root: str):
        self.data_root = data_root
        self.gcs = storage.is_remote(data_root)  # gs:// or s3://
        if self.gcs:
            self.prefixes: tuple[str, ...] = (data_root.rstrip("/") + "/",)
            return
        given = os.path.abspath(data_root)
        resolved = str(Path(data_root).resolve())
        self.resolved = Path(resolved)
        self.prefixes = tuple(dict.fromkeys(p.rstrip(os.sep) + os.sep for p in (given, resolved)))

    def relative(self, image_uri: str) -> str | None:
        """`image_uri` relative to the root as a POSIX path, or None when it is not inside it."""
        if storage.is_remote(image_uri) != self.gcs:  # another store or bucket: prefix check below
            return None
        if self.gcs:
            root = self.prefixes[0]
            if not image_uri.startswith(root):
                return None
            rel = PurePosixPath(image_uri[len(root) :])
            # Object names are not normalised: "a/../b" is a literal object name, never a path into root.
            if not rel.parts or any(part in ("..", ".") for part in rel.parts):
                return None
            return rel.as_posix()
        path = os.path.abspath(image_uri)
        for prefix in self.prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                rel = path[len(prefix) :]
                return rel if os.sep == "/" else rel.replace(os.sep, "/")
        try:  # another spelling of the root (a symlink to it): resolve this one image
            rel_local = Path(image_uri).resolve().relative_to(self.resolved)
        except ValueError:
            return None
        return rel_local.as_posix() if rel_local.parts else None
