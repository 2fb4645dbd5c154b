"""Manifests read column-wise (pyarrow), for the CPU stages that touch every record (select, export, report).

`records.read_manifest` builds and validates one pydantic `Record` per record: about 40 us each, most of
the time of a stage that only sorts a million scores. `read_columns` reads a whole file into columns
(`pyarrow.json.read_json` for JSONL, the Parquet table as stored) and checks the rules of `Record` once per
column: the field set, each field's type, ids (`records.check_id`), captions not blank, score values are
numbers, ids unique in the file.

Validation stays exactly as strict as `read_manifest`, with the same errors, by construction: a file whose
columns do not pass every vectorised check, or that is not in a shape the checks understand (a JSON line
pyarrow cannot parse, values of one field with mixed types, a null where a field may only be absent,
scores whose keys differ between records, ...), is read by `read_manifest` instead, which raises the
error it always raised (file, line or row, field) or, when the file is valid after all, returns its
records, and the columns are made from them. Only valid files in the common shape take the fast path.

Each record also keeps its JSON text (`lines`): for a JSONL file its own line, otherwise the record as
`write_manifest` writes it. Writing those lines (`write_lines`) writes the same records without building
them; `records` builds `Record`s for the few rows a stage needs as objects, with read_manifest's rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from synthvlm import storage
from synthvlm.records import (
    MAX_ID_BYTES,
    Record,
    _fmt,
    _record_or_error,
    read_manifest,
    read_parquet_table,
    strip_bom,
    write_manifest,
)

if TYPE_CHECKING:
    import pyarrow as pa

FIELDS = frozenset(Record.model_fields)  # id, caption, seed, image_uri, scores, provenance
SOURCE_ID_KEY = "source_id"  # = ranking.SOURCE_ID_KEY (ranking imports records; no import cycle here)
# Characters Python's str.isspace() accepts (what makes a caption blank for Record: `not value.strip()`);
# tests check the list against str.isspace over all of Unicode.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_BLANK = "^[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]*$"  # RE2 syntax
_ID_CONTROL = r"[\x00-\x1f\x7f]"  # = records._CONTROL


class ManifestColumns:
    """One validated manifest, column-wise. Row i is the i-th record of the file."""

    def __init__(
        self,
        uri: str,
        *,
        table: pa.Table | None = None,
        lines: pa.Array | None = None,
        records: list[Record] | None = None,
        scores: pa.Table | None = None,
        provenance: pa.Table | None = None,
    ):
        self.uri = uri
        self._table = table  # fast path: id, caption, seed, image_uri as read (JSONL: also the structs)
        self._lines = lines  # fast path, JSONL: each record's own line, "\n" included
        self._records = records  # the record path
        self._scores = scores  # fast path: one column per score key
        self._provenance = provenance  # fast path, Parquet: the provenance objects parsed

    @property
    def fast(self) -> bool:
        """Whether the file was read column-wise (False: it went through read_manifest)."""
        return self._records is None

    def __len__(self) -> int:
        return len(self._records) if self._records is not None else self._table.num_rows

    @property
    def ids(self) -> pa.Array:
        import pyarrow as pa

        if self._records is not None:
            return pa.array([rec.id for rec in self._records], pa.string())
        return _array(self._table["id"])

    def column(self, name: str) -> list[Any]:
        """Python values of a top-level field ("id", "caption", "seed", "image_uri"), None where absent."""
        if name not in ("id", "caption", "seed", "image_uri"):
            raise ValueError(f"not a plain column: {name}")
        if self._records is not None:
            return [getattr(rec, name) for rec in self._records]
        if name not in self._table.column_names:
            return [None] * len(self)
        return self._table[name].to_pylist()

    def score(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(values as float64, whether the record has the key); values are 0 where it has not."""
        n = len(self)
        if self._records is not None:
            present = np.array([key in rec.scores for rec in self._records], dtype=bool)
            values = np.array([rec.scores.get(key, 0.0) for rec in self._records], dtype=np.float64)
            return values.reshape(n), present.reshape(n)
        if self._scores is None or key not in self._scores.column_names:
            return np.zeros(n), np.zeros(n, dtype=bool)
        import pyarrow as pa

        column = _array(self._scores[key]).cast(pa.float64(), safe=False)  # int64 -> float as pydantic does
        return column.to_numpy(zero_copy_only=False), np.ones(n, dtype=bool)

    def present_scores(self, key: str) -> np.ndarray:
        """The values of score `key` of the records that have it, in file order."""
        values, present = self.score(key)
        return values[present]

    def sources(self) -> pa.Array:
        """Each record's source id, as `ranking.source_id` gives it: provenance.source_id, else the id."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._records is not None:
            return pa.array([str(rec.provenance.get(SOURCE_ID_KEY, rec.id)) for rec in self._records])
        ids = self.ids
        child = self._provenance_child(SOURCE_ID_KEY)
        if child is None:  # no record has the key
            return ids
        if not pa.types.is_string(child.type) and not pa.types.is_large_string(child.type):
            return pa.array([str(rec.provenance.get(SOURCE_ID_KEY, rec.id)) for rec in self.records()])
        child = child.cast(pa.string())
        missing = np.flatnonzero(child.is_null().to_numpy(zero_copy_only=False))
        if len(missing) == 0:
            return child
        # A null here is a record without the key (its id is its source) or an explicit null (source
        # "None", as str(None) in ranking.source_id): only the record itself tells them apart.
        values = child.to_pylist()
        for row, rec in zip(missing, self.records(missing), strict=True):
            values[row] = str(rec.provenance.get(SOURCE_ID_KEY, rec.id))
        return pc.coalesce(pa.array(values, pa.string()), ids)

    def _provenance_child(self, key: str) -> pa.Array | None:
        if self._provenance is not None:  # Parquet: parsed into a table
            return _array(self._provenance[key]) if key in self._provenance.column_names else None
        if "provenance" not in self._table.column_names:
            return None
        provenance = _array(self._table["provenance"])
        if provenance.type.get_field_index(key) < 0:
            return None
        return provenance.field(key)

    def records(self, rows: Sequence[int] | np.ndarray | None = None) -> list[Record]:
        """`Record`s of `rows` (all when None), built and validated as read_manifest does."""
        if self._records is not None:
            return list(self._records) if rows is None else [self._records[int(i)] for i in rows]
        indices = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if self._lines is not None:
            lines = self._lines.take(indices).to_pylist()
            # Valid (checked at read): the number only names a record in an error that cannot happen.
            pairs = zip(indices, lines, strict=True)
            return [_record_from_line(self.uri, line, int(i) + 1) for i, line in pairs]
        out = []
        for i, row in zip(indices, self._table.take(indices).to_pylist(), strict=True):
            for key in ("scores", "provenance"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])  # checked at read
            out.append(_record_or_error(self.uri, int(i) + 1, row, "row"))
        return out

    def lines(self, rows: Sequence[int] | np.ndarray | None = None) -> pa.Array:
        """The JSON line ("\\n" included) of each of `rows` (all when None), as a binary array: a JSONL
        file's own lines, otherwise the records as write_manifest writes them."""
        import pyarrow as pa

        if self._lines is not None:
            return self._lines if rows is None else self._lines.take(np.asarray(rows, dtype=np.int64))
        body = [(rec.model_dump_json() + "\n").encode("utf-8") for rec in self.records(rows)]
        return pa.array(body, pa.large_binary())


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _record_from_line(uri: str, line: bytes, lineno: int) -> Record:
    return _record_or_error(uri, lineno, json.loads(line), "line")


def read_columns(uri: str) -> ManifestColumns:
    """Read and validate a manifest (JSONL or Parquet) column-wise; bad input raises read_manifest's
    InputError (file, line or row, field)."""
    fast = _read_jsonl(uri) if _fmt(uri) == "jsonl" else _read_parquet(uri)
    if fast is not None:
        return fast
    return ManifestColumns(uri, records=read_manifest(uri))


def read_scores(uri: str, score_key: str) -> np.ndarray:
    """The `score_key` scores of a manifest's records that have one, in file order (float64), after the
    validation of read_manifest: `[r.scores[k] for r in read_manifest(uri) if k in r.scores]`, fast."""
    return read_columns(uri).present_scores(score_key)


# --- JSONL ---------------------------------------------------------------------------------------------


def _read_jsonl(uri: str) -> ManifestColumns | None:
    """The columns of a JSONL manifest when every vectorised check passes, else None."""
    import pyarrow as pa
    import pyarrow.json as pj

    raw = strip_bom(storage.read_bytes(uri))
    if not raw.endswith(b"\n"):
        raw += b"\n"
    data = np.frombuffer(raw, np.uint8)
    ends = np.flatnonzero(data == ord("\n")) + 1  # line k is raw[starts[k]:ends[k]], "\n" included
    offsets = np.concatenate(([0], ends)).astype(np.int64)
    starts = offsets[:-1]
    if len(raw) == 1 or not (data[starts] == ord("{")).all():  # empty, or blank/odd lines: find the records
        keep = [k for k in range(len(starts)) if raw[starts[k] : ends[k]].strip()]
        if not keep:
            return None  # no record: read_manifest decides (an empty manifest is valid)
    else:
        keep = None
    all_lines = pa.Array.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(raw)]
    )
    lines = all_lines if keep is None else all_lines.take(pa.array(keep, pa.int64()))
    try:
        lines.cast(pa.large_string())  # valid UTF-8 (pyarrow's JSON reader does not check)
        table = pj.read_json(pa.BufferReader(raw))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != len(lines):  # two objects on one line
        return None
    scores = None
    if "scores" in table.column_names:
        scores = _struct_as_table(table["scores"])
        if scores is None:
            return None
    columns = ManifestColumns(uri, table=table, lines=lines, scores=scores)
    return columns if _valid(table, scores) else None


def _struct_as_table(column: pa.ChunkedArray) -> pa.Table | None:
    """A struct column as a table of its fields; None if any record lacks the object or a key (a null:
    absent and explicit null look alike here, and only the record path tells them apart)."""
    import pyarrow as pa

    array = _array(column)
    if not pa.types.is_struct(array.type) or array.null_count:
        return None
    fields = array.flatten()
    return pa.table({array.type.field(i).name: fields[i] for i in range(array.type.num_fields)})


# --- Parquet -------------------------------------------------------------------------------------------


def _read_parquet(uri: str) -> ManifestColumns | None:
    """The columns of a Parquet manifest written as write_manifest writes it (scores and provenance as JSON
    text) when every vectorised check passes, else None."""
    import pyarrow as pa

    table = read_parquet_table(uri)  # a corrupt file raises here, as in read_manifest
    scores = provenance = None
    for name in ("scores", "provenance"):
        if name not in table.column_names:
            continue
        column = _array(table[name])
        if not pa.types.is_string(column.type) or column.null_count:
            return None
        parsed = _json_objects(column)
        if parsed is None:
            return None
        if name == "scores":
            scores = parsed
        else:
            provenance = parsed
    plain = table.drop_columns([n for n in ("scores", "provenance") if n in table.column_names])
    if not _valid(plain, scores, extra=table.column_names):
        return None
    return ManifestColumns(uri, table=table, scores=scores, provenance=provenance)


def _json_objects(column: pa.Array) -> pa.Table | None:
    """JSON-object strings (one per row) parsed into a table, one column per key; None unless each is
    one object and every row has every key."""
    import pyarrow as pa
    import pyarrow.json as pj

    if len(column) == 0:
        return pa.table({})
    if any(column.to_numpy(zero_copy_only=False) == ""):
        return None
    body = "\n".join(column.to_pylist()).encode("utf-8") + b"\n"
    if body.count(b"\n") != len(column):  # a newline inside one of them
        return None
    try:
        parsed = pj.read_json(pa.BufferReader(body))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if parsed.num_rows != len(column):
        return None
    return parsed


# --- the checks ----------------------------------------------------------------------------------------


def _valid(table: pa.Table, scores: pa.Table | None, extra: Sequence[str] = ()) -> bool:
    """Whether every record passes Record's validation, checked column by column. False does not mean
    an error: the record path decides."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = set(table.column_names) | set(extra)
    if not names <= FIELDS or "id" not in names or "caption" not in names:
        return False
    ids, captions = _array(table["id"]), _array(table["caption"])
    if not (_is_string(ids.type) and _is_string(captions.type)) or ids.null_count or captions.null_count:
        return False
    if "seed" in table.column_names:
        kind = table.schema.field("seed").type
        if not (pa.types.is_int64(kind) or pa.types.is_null(kind)):
            return False
    if "image_uri" in table.column_names:
        kind = table.schema.field("image_uri").type
        if not (_is_string(kind) or pa.types.is_null(kind)):
            return False
    if "provenance" in table.column_names and not _is_string(table.schema.field("provenance").type):
        provenance = _array(table["provenance"])  # JSONL: must be objects; a null may be an explicit null
        if not pa.types.is_struct(provenance.type) or provenance.null_count:
            return False
    if scores is not None:
        for column in scores.columns:
            if not (pa.types.is_float64(column.type) or pa.types.is_int64(column.type)) or column.null_count:
                return False
    if len(ids) == 0:
        return True
    sizes = pc.binary_length(ids)
    bad_id = pc.or_(pc.less(sizes, 1), pc.greater(sizes, MAX_ID_BYTES))
    for pattern in ("/", "\\", ".."):
        bad_id = pc.or_(bad_id, pc.match_substring(ids, pattern))
    bad_id = pc.or_(bad_id, pc.match_substring_regex(ids, _ID_CONTROL))
    bad_id = pc.or_(bad_id, pc.starts_with(ids, "."))
    if pc.any(bad_id).as_py():
        return False
    if pc.any(pc.match_substring_regex(captions, _BLANK)).as_py():
        return False
    return pc.count_distinct(ids).as_py() == len(ids)  # duplicates: read_manifest names both lines


def _is_string(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


# --- writing -------------------------------------------------------------------------------------------


def write_lines(
    uri: str, lines: pa.Array | pa.ChunkedArray | Sequence[bytes], source: str = "records"
) -> int:
    """Write records given as JSON lines (from `ManifestColumns.lines`) to a manifest; returns the count.

    JSONL: the lines as they are (no record built); Parquet: the records built from them, as
    write_manifest writes them. Ids must be unique (the readers checked them)."""
    import pyarrow as pa

    values = lines.to_pylist() if isinstance(lines, (pa.Array, pa.ChunkedArray)) else list(lines)
    if _fmt(uri) == "parquet":
        return write_manifest(uri, [_record_from_line(source, line, i) for i, line in enumerate(values, 1)])
    storage.write_bytes(uri, b"".join(values), content_type="application/jsonl")
    return len(values)
