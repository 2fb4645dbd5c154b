"""Persistent cache of chat completions: one small JSON file per request key.

A key is the SHA-256 of everything that decides the answer (model, messages, sampling parameters,
response format / JSON schema, seed), never the endpoint URL or the API key (why: client.py's docstring).
The cache is on by default: `LLMConfig.cache_dir`, else the stage's `<data root>/llm-cache`
(`make_backend(..., default_cache_dir=...)`); `LLMConfig.cache=False` turns it off. Each entry is written with
`storage.write_bytes`, which is atomic for local paths (temp file + rename) and gs:// (an object upload),
so a run killed at any moment leaves complete entries or none. An entry that is nevertheless unreadable
(copied by hand, truncated by another tool) counts as a miss and is overwritten by the next answer.

Entries live under `<root>/<key[:2]>/<key>.json` so no directory grows past a few thousand files at 1M
requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from synthvlm import storage

log = logging.getLogger(__name__)

# Bump when the entry layout changes, so old entries are ignored rather than misread.
CACHE_FORMAT = 1


def cache_key(request: Mapping[str, Any]) -> str:
    """Stable hash of a request description (JSON-serialisable mapping)."""
    canonical = json.dumps(
        {"format": CACHE_FORMAT, **request}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Directory (local or gs://) of completed responses, one file per key."""

    def __init__(self, root: str):
        self.root = root

    def uri(self, key: str) -> str:
        return storage.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> dict[str, Any] | None:
        uri = self.uri(key)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _is_gcs_not_found(exc):
                return None
            raise
        try:
            entry = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            log.warning("ignoring unreadable cache entry %s (will ask again)", uri)
            return None
        if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
            log.warning("ignoring cache entry %s with an unknown layout (will ask again)", uri)
            return None
        return entry

    def put(self, key: str, entry: Mapping[str, Any]) -> None:
        payload = json.dumps({"format": CACHE_FORMAT, **entry}, ensure_ascii=False, sort_keys=True)
        storage.write_bytes(self.uri(key), payload.encode("utf-8"), content_type="application/json")


def _is_gcs_not_found(exc: Exception) -> bool:
    try:
        from google.api_core.exceptions import NotFound
    except ImportError:  # pragma: no cover - google-cloud-storage is a dependency
        return False
    return isinstance(exc, NotFound)
