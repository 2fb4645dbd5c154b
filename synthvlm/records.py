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

# Ids become file names (`<id>.jpg`, `<id>~3.webp`; local writes go through `.<name>.XXXXXXXX.tmp`) and
# most file systems allow 255 BYTES per name, so the limit is on UTF-8 bytes, not characters: 200 bytes
# leaves room for the extension and the temp-file affixes.
MAX_ID_BYTES = 200
# Caption ids also leave room for the variant suffix generate appends ("~" and up to 7 digits), so a
# long id fails at the captions step rather than at generate.
VARIANT_SUFFIX_BYTES = 8
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BOM = b"\xef\xbb\xbf"


def strip_bom(raw: bytes) -> bytes:
    """`raw` without a leading UTF-8 byte-order mark (Windows editors add one; it is not JSON)."""
    return raw.removeprefix(_BOM)


def check_id(value: Any, *, reserve_bytes: int = 0) -> str:
    """Return `value` if it is a safe record id, else raise ValueError saying why.

    `reserve_bytes`: bytes kept free for a suffix added later (VARIANT_SUFFIX_BYTES for caption ids)."""
    if not isinstance(value, str):
        raise ValueError(f"id must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError("id is empty")
    limit = MAX_ID_BYTES - reserve_bytes
    size = len(value.encode("utf-8", errors="surrogateescape"))
    if size > limit:
        raise ValueError(
            f"id is longer than {limit} bytes in UTF-8 ({size} bytes, {len(value)} characters): ids become "
            "image file names such as <id>~3.webp, and most file systems allow 255 bytes per name"
        )
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
    for lineno, line in enumerate(strip_bom(raw).split(b"\n"), start=1):
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


def read_parquet_table(uri: str):
    """The pyarrow Table of a Parquet file; a corrupt, truncated or non-Parquet file raises an InputError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.local_copy(uri) as path:
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise  # as for JSONL manifests: callers tell a missing input apart
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid & co.; OSError: unreadable or a folder
            detail = " ".join(str(exc).split())  # pyarrow's messages span lines
            raise InputError(uri, f"not a readable Parquet file: {detail}") from None
    names = table.column_names
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:  # to_pylist would keep only one of them, silently
        raise InputError(uri, "duplicate column", field=duplicates[0], unit="row")
    return table


def read_manifest(uri: str) -> list[Record]:
    """Read and validate a manifest; errors name the file, line (1-based; Parquet: row) and field."""
    numbered: list[tuple[int, Record]] = []
    if _fmt(uri) == "jsonl":
        unit = "line"
        for lineno, data in iter_jsonl(uri, storage.read_bytes(uri)):
            numbered.append((lineno, _record_or_error(uri, lineno, data, unit)))
    else:
        unit = "row"
        table = read_parquet_table(uri)
        for row_no, row in enumerate(table.to_pylist(), start=1):
            for key in ("scores", "provenance"):
                if isinstance(row.get(key), str):
                    try:
                        row[key] = json.loads(row[key])
                    except json.JSONDecodeError as exc:
                        msg = f"malformed JSON: {exc.msg} (column {exc.colno})"
                        raise InputError(uri, msg, line=row_no, field=key, unit=unit) from None
            numbered.append((row_no, _record_or_error(uri, row_no, row, unit)))
    seen: dict[str, int] = {}
    for lineno, rec in numbered:
        if rec.id in seen:
            msg = f"duplicate id {rec.id!r} (first at {unit} {seen[rec.id]})"
            raise InputError(uri, msg, line=lineno, field="id", unit=unit)
        seen[rec.id] = lineno
    return [rec for _, rec in numbered]
