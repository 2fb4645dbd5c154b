"""Load captions (JSONL, Parquet or CSV with `id` + `caption`) into a validated caption manifest.

This is the first stage of the SynthVLM path: everything downstream trusts its output, so every
problem in the input is reported with the file, the line (or Parquet row) and the field, and no
manifest is published when any record is bad.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import InputError, SynthVLMError
from synthvlm.records import (
    VARIANT_SUFFIX_BYTES,
    Record,
    check_id,
    read_parquet_table,
    strip_bom,
    write_manifest,
)
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats

log = logging.getLogger(__name__)

# A portable name for the bundled demo captions (the same in compiled YAML, containers and checkouts).
DEMO_CAPTIONS = "bundled:demo_captions.jsonl"
_BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"
REQUIRED_FIELDS = ("id", "caption")
MAX_REPORTED_PROBLEMS = 20


class CaptionsConfig(StageConfig):
    captions: str = Field(
        DEMO_CAPTIONS,
        description="captions file or URI (.jsonl, .parquet or .csv with columns id and caption)",
    )  # default: the 16 bundled demo captions (our choice: runs offline)
    max_records: int | None = Field(None, ge=1, description="keep only the first N captions (None = all)")


class InputErrors(SynthVLMError):
    """Several problems in one input file, each an InputError; all of them are reported at once."""

    def __init__(self, problems: list[InputError], truncated: bool):
        self.problems = problems
        more = f"\n  ... (stopped after {len(problems)} problems)" if truncated else ""
        super().__init__(
            f"{len(problems)} problem(s) in the captions input:\n  " + "\n  ".join(map(str, problems)) + more
        )


def _non_utf8_field(row: dict[str, Any]) -> str | None:
    """Name of the first field whose text held undecodable bytes (decoded with surrogateescape)."""
    for key, value in row.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return str(key)
    return None


def _rows_jsonl(uri: str, raw: bytes):
    # A leading BOM (Windows editors) is accepted, as for CSV; json.loads would reject it.
    for lineno, line in enumerate(strip_bom(raw).split(b"\n"), start=1):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield lineno, InputError(uri, f"malformed JSON: {exc.msg} (column {exc.colno})", line=lineno)
            continue
        if not isinstance(data, dict):
            yield lineno, InputError(uri, f"expected a JSON object, got {type(data).__name__}", line=lineno)
            continue
        yield lineno, data


def _csv_error(uri: str, exc: csv.Error, line: int) -> InputError:
    if "unexpected end of data" in str(exc):
        # Non-strict csv would swallow every later row into this field: rows lost without a word.
        msg = "unterminated quoted field: a '\"' opened in the row starting here is never closed"
    else:
        msg = f"malformed CSV: {exc}"
    return InputError(uri, msg, line=line)


def _rows_csv(uri: str, raw: bytes):
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    # strict: a stray or unterminated quote is an error rather than silently merged rows.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        yield 1, _csv_error(uri, exc, 1)
        return
    duplicates = [f for i, f in enumerate(header) if f in header[:i]]
    if duplicates:  # DictReader would keep the last one's value, silently
        yield 1, InputError(uri, f"duplicate column (columns found: {header})", line=1, field=duplicates[0])
        return
    missing = [f for f in REQUIRED_FIELDS if f not in header]
    if missing:
        yield 1, InputError(uri, f"missing column (columns found: {header})", line=1, field=missing[0])
        return
    while True:
        # The row starts after the last one read (csv's line_num is not advanced when it raises).
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, _csv_error(uri, exc, start)
            return  # what follows a broken quote cannot be split into rows reliably
        if None in row:  # more cells than header columns
            yield reader.line_num, InputError(uri, "more cells than header columns", line=reader.line_num)
            continue
        yield reader.line_num, {k: v for k, v in row.items() if v is not None}


def _rows_parquet(uri: str):
    table = read_parquet_table(uri)  # corrupt/truncated files and duplicate columns: InputError
    missing = [f for f in REQUIRED_FIELDS if f not in table.column_names]
    if missing:
        yield 0, InputError(uri, f"missing column (columns found: {table.column_names})", field=missing[0])
        return
    yield from enumerate(table.to_pylist(), start=1)


def _validate_row(uri: str, lineno: int, row: dict[str, Any], what: str, source: str) -> Record | InputError:
    def err(msg: str, field: str | None) -> InputError:
        return InputError(uri, msg, line=lineno, field=field, unit=what)

    bad = _non_utf8_field(row)
    if bad is not None:
        return err("not valid UTF-8 (undecodable byte)", bad)
    for field in REQUIRED_FIELDS:
        if field not in row or row[field] is None:
            return err("missing", field)
    record_id = row["id"]
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)  # numeric ids are common in CSV/Parquet exports
    try:
        check_id(record_id, reserve_bytes=VARIANT_SUFFIX_BYTES)  # room for generate's "~<n>"
    except ValueError as exc:
        return err(str(exc), "id")
    caption = row["caption"]
    if not isinstance(caption, str):
        return err(f"must be a string, got {type(caption).__name__}", "caption")
    if not caption.strip():
        return err("caption is empty", "caption")
    return Record(id=record_id, caption=caption.strip(), provenance={"source": source, what: lineno})


def resolve_captions_uri(uri: str) -> str:
    """'bundled:NAME' -> the file shipped in synthvlm/data; anything else unchanged."""
    if uri.startswith("bundled:"):
        return str(_BUNDLED_DIR / uri.removeprefix("bundled:"))
    return uri


def read_captions(uri: str) -> list[Record]:
    """Parse and validate a captions file; raises InputErrors listing every problem found."""
    given, uri = uri, resolve_captions_uri(uri)
    if not storage.is_remote(uri) and Path(uri).is_dir():  # checked first: a folder has no format
        raise InputError(uri, "is a directory; give a captions file (.jsonl, .csv or .parquet)")
    suffix = uri.rsplit(".", 1)[-1].lower()
    if suffix not in ("jsonl", "csv", "parquet"):
        raise InputError(uri, "unsupported captions format: use .jsonl, .csv or .parquet")
    if not storage.exists(uri):
        raise InputError(uri, "file not found")
    if suffix == "parquet":
        rows, what = _rows_parquet(uri), "row"
    else:
        try:
            raw = storage.read_bytes(uri)
        except OSError as exc:  # e.g. no read permission
            raise InputError(uri, f"cannot read: {exc.strerror or exc}") from None
        rows, what = (_rows_jsonl(uri, raw) if suffix == "jsonl" else _rows_csv(uri, raw)), "line"
    records: list[Record] = []
    problems: list[InputError] = []
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        result = row if isinstance(row, InputError) else _validate_row(uri, lineno, row, what, given)
        if isinstance(result, Record):
            if result.id in first_line:
                result = InputError(
                    uri,
                    f"duplicate id {result.id!r} (first at {what} {first_line[result.id]})",
                    line=lineno,
                    field="id",
                    unit=what,
                )
            else:
                first_line[result.id] = lineno
                records.append(result)
                continue
        problems.append(result)
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            raise InputErrors(problems, truncated=True)
    if problems:
        raise InputErrors(problems, truncated=False)
    if not records:
        raise InputError(uri, "no captions found")
    return records


def _process(config: CaptionsConfig, run: StageRun) -> StageStats:
    stats = StageStats("captions")
    records = read_captions(config.captions)
    stats.count_in = len(records)
    if config.max_records is not None:
        records = records[: config.max_records]
        stats.rejects["beyond max_records"] = stats.count_in - len(records)
    stats.count_out = write_manifest(run.output, records)
    log.info("captions: %d captions from %s", stats.count_out, config.captions)
    return stats


# Every setting changes the output (the file's path is in each record's provenance).
CAPTIONS = Stage(name="captions", process=_process)


def load_captions(config: CaptionsConfig, output_manifest: str) -> str:
    """Validate `config.captions` and write the caption manifest (published only if all input is valid).

    Returns the versioned manifest (a copy is published at `output_manifest`)."""
    return run_stage(CAPTIONS, config, {"captions": resolve_captions_uri(config.captions)}, output_manifest)
