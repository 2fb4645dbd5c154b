"""Dataset records and their manifests (JSONL or Parquet).

A record is everything needed to find and regenerate one sample: id, caption (or SD prompt), seed,
image URI, scores and provenance (model id + revision, scheduler, steps, ...). Ids become file
names, so they are validated; a manifest never holds the same id twice.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synthvlm import storage
from synthvlm.errors import InputError

MAX_ID_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_id(value: Any) -> str:
    """Return `value` if it is a safe record id, else raise ValueError saying why."""
    if not isinstance(value, str):
        raise ValueError(f"id must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError("id is empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"id is longer than {MAX_ID_LENGTH} characters")
    if "/" in value or "\\" in value:
        raise ValueError(f"id {value!r} contains a path separator")
    if ".." in value:
        raise ValueError(f"id {value!r} contains '..'")
    if _CONTROL.search(value):
        raise ValueError(f"id {value!r} contains a control character")
    if value.startswith("."):
        raise ValueError(f"id {value!r} starts with '.' (hidden file name)")
    return value


class Record(BaseModel):
    """One sample of a dataset manifest."""

    model_config = ConfigDict(extra="forbid")

    id: str
    caption: str = Field(description="caption (SynthVLM) or Stable Diffusion prompt (StableLLaVA)")
    seed: int | None = None
    image_uri: str | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return check_id(value)

    @field_validator("caption")
    @classmethod
    def _non_empty_caption(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("caption is empty")
        return value


def _fmt(uri: str) -> str:
    if uri.endswith(".jsonl"):
        return "jsonl"
    if uri.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"manifest must end with .jsonl or .parquet: {uri}")


def write_manifest(uri: str, records: Iterable[Record]) -> int:
    """Write records atomically; rejects duplicate ids. Returns the number written."""
    records = list(records)
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise InputError(uri, f"duplicate id {rec.id!r}", field="id")
        seen.add(rec.id)
    if _fmt(uri) == "jsonl":
        body = "".join(rec.model_dump_json() + "\n" for rec in records)
        storage.write_text(uri, body, content_type="application/jsonl")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [rec.model_dump() for rec in records]
        table = pa.table(
            {
                "id": [r["id"] for r in rows],
                "caption": [r["caption"] for r in rows],
                "seed": pa.array([r["seed"] for r in rows], type=pa.int64()),
                "image_uri": pa.array([r["image_uri"] for r in rows], type=pa.string()),
                # JSON columns keep the schema stable when score/provenance keys vary by stage.
                "scores": [json.dumps(r["scores"], sort_keys=True) for r in rows],
                "provenance": [json.dumps(r["provenance"], sort_keys=True) for r in rows],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(uri, buf.getvalue(), content_type="application/vnd.apache.parquet")
    return len(records)


def _record_or_error(uri: str, line: int, data: Any, unit: str) -> Record:
    if not isinstance(data, dict):
        raise InputError(uri, f"expected a JSON object, got {type(data).__name__}", line=line, unit=unit)
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise InputError(uri, msg, line=line, field=field, unit=unit) from None


def iter_jsonl(uri: str, raw: bytes) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; bad UTF-8 or JSON raises an InputError naming
    the file and the line."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                uri, f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=lineno
            ) from None
        except json.JSONDecodeError as exc:
            raise InputError(uri, f"malformed JSON: {exc.msg} (column {exc.colno})", line=lineno) from None


def read_manifest(uri: str) -> list[Record]:
    """Read and validate a manifest; errors name the file, line (1-based; Parquet: row) and field."""
    numbered: list[tuple[int, Record]] = []
    if _fmt(uri) == "jsonl":
        unit = "line"
        for lineno, data in iter_jsonl(uri, storage.read_bytes(uri)):
            numbered.append((lineno, _record_or_error(uri, lineno, data, unit)))
    else:
        import pyarrow.parquet as pq

        unit = "row"
        with storage.local_copy(uri) as path:
            table = pq.read_table(path)
        for row_no, row in enumerate(table.to_pylist(), start=1):
            for key in ("scores", "provenance"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
            numbered.append((row_no, _record_or_error(uri, row_no, row, unit)))
    seen: dict[str, int] = {}
    for lineno, rec in numbered:
        if rec.id in seen:
            msg = f"duplicate id {rec.id!r} (first at {unit} {seen[rec.id]})"
            raise InputError(uri, msg, line=lineno, field="id", unit=unit)
        seen[rec.id] = lineno
    return [rec for _, rec in numbered]
