"""Test helper: a stage's returned (versioned) output was published at its stable path."""

from __future__ import annotations

import json

from synthvlm import storage
from synthvlm.stage import done_uri


def published(returned: str, stable: str) -> bool:
    """`stable` is a complete copy of `returned`, the fingerprint folder's output the stage returned."""
    if returned == stable or not storage.exists(done_uri(stable)):
        return False
    marker = json.loads(storage.read_text(done_uri(stable)))
    return marker.get("published_from") == returned and storage.read_bytes(returned) == storage.read_bytes(
        stable
    )
