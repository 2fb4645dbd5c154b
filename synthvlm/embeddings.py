"""Image-embedding sidecars: `<manifest>.image_embeddings.npy`, one L2-normalised row per record.

The scoring stages write them (clip_score, generate's score_in_pod); select reads them to drop near
duplicates without running CLIP again.
"""

from __future__ import annotations

import io

import numpy as np

from synthvlm import storage
from synthvlm.errors import InputError

EMBEDDINGS_SUFFIX = ".image_embeddings.npy"


def embeddings_uri(manifest_uri: str) -> str:
    """The image-embedding sidecar of a scored manifest (row i = record i)."""
    return manifest_uri + EMBEDDINGS_SUFFIX


def write_embeddings(manifest_uri: str, embeddings: np.ndarray) -> None:
    """Store L2-normalised image embeddings (float16: cosines to ~1e-3) next to `manifest_uri`."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(embeddings, dtype=np.float16), allow_pickle=False)
    storage.write_bytes(embeddings_uri(manifest_uri), buf.getvalue(), content_type="application/octet-stream")


def read_embeddings(manifest_uri: str, count: int) -> np.ndarray:
    """The sidecar of `manifest_uri`; it must have one row per record."""
    uri = embeddings_uri(manifest_uri)
    if not storage.exists(uri):
        raise InputError(
            manifest_uri,
            f"no image embeddings ({uri} missing): score with save_embeddings on, or unset dedup_threshold",
        )
    embeddings = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    if embeddings.ndim != 2 or len(embeddings) != count:
        raise InputError(uri, f"expected {count} rows (one per record), got shape {embeddings.shape}")
    return embeddings
