"""Column-wise manifest reading: the same records and the same errors as read_manifest, faster."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from synthvlm.errors import InputError
from synthvlm.manifest_table import PY_WHITESPACE, read_columns, read_scores, write_lines
from synthvlm.ranking import source_id
from synthvlm.records import Record, read_manifest, write_manifest


def _recs(n: int = 5) -> list[Record]:
    return [
        Record(
            id=f"r{i}",
            caption=f"caption {i} é",
            seed=i,
            image_uri=f"/data/r{i}.jpg",
            scores={"clip": i / 7, "llm": float(i)},
            provenance={"source_id": f"s{i % 2}", "generation": {"steps": 60, "revision": None}},
        )
        for i in range(n)
    ]


def test_whitespace_list_is_pythons() -> None:
    python = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert python == PY_WHITESPACE


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_valid_manifest_is_read_column_wise(tmp_path: Path, suffix: str) -> None:
    uri = str(tmp_path / f"m.{suffix}")
    write_manifest(uri, _recs())
    columns = read_columns(uri)
    assert columns.fast
    assert columns.records() == read_manifest(uri) == _recs()
    assert columns.ids.to_pylist() == [r.id for r in _recs()]
    assert columns.column("caption") == [r.caption for r in _recs()]
    assert columns.column("seed") == list(range(5))
    assert columns.sources().to_pylist() == [source_id(r) for r in _recs()]
    np.testing.assert_array_equal(read_scores(uri, "clip"), [r.scores["clip"] for r in _recs()])
    assert read_scores(uri, "absent").tolist() == []
    assert [Record.model_validate_json(line) for line in columns.lines().to_pylist()] == _recs()
    assert columns.records([3, 1]) == [_recs()[3], _recs()[1]]


def test_written_lines_are_the_records(tmp_path: Path) -> None:
    source = str(tmp_path / "in.jsonl")
    write_manifest(source, _recs())
    columns = read_columns(source)
    for name in ("out.jsonl", "out.parquet"):
        write_lines(str(tmp_path / name), columns.lines([4, 0]))
        assert read_manifest(str(tmp_path / name)) == [_recs()[4], _recs()[0]]
    assert (tmp_path / "out.jsonl").read_bytes() == Path(source).read_bytes().splitlines(keepends=True)[4] + (
        Path(source).read_bytes().splitlines(keepends=True)[0]
    )


GOOD = '{"id": "ok", "caption": "fine", "scores": {"clip": 0.5}, "provenance": {}}'


@pytest.mark.parametrize(
    "line",
    [
        '{"id": "x/y", "caption": "c"}',
        '{"id": "a\\\\b", "caption": "c"}',
        '{"id": "a..b", "caption": "c"}',
        '{"id": ".hidden", "caption": "c"}',
        '{"id": "", "caption": "c"}',
        '{"id": "tab\\there", "caption": "c"}',
        '{"id": "del\\u007f", "caption": "c"}',
        '{"id": "' + "x" * 201 + '", "caption": "c"}',
        '{"id": "' + "文" * 67 + '", "caption": "c"}',
        '{"id": 5, "caption": "c"}',
        '{"caption": "no id"}',
        '{"id": "n", "caption": null}',
        '{"id": "n", "caption": "  \\u3000"}',
        '{"id": "n", "caption": "\\u001c"}',
        '{"id": "n", "caption": ""}',
        '{"id": "n", "caption": "c", "extra": 1}',
        '{"id": "n", "caption": "c", "seed": 1.5}',
        '{"id": "n", "caption": "c", "seed": "7x"}',
        '{"id": "n", "caption": "c", "image_uri": 3}',
        '{"id": "n", "caption": "c", "scores": null}',
        '{"id": "n", "caption": "c", "scores": {"clip": null}}',
        '{"id": "n", "caption": "c", "scores": {"clip": "high"}}',
        '{"id": "n", "caption": "c", "scores": {"clip": [1]}}',
        '{"id": "n", "caption": "c", "scores": [0.5]}',
        '{"id": "n", "caption": "c", "provenance": null}',
        '{"id": "n", "caption": "c", "provenance": [1]}',
        '{"id": "ok", "caption": "duplicate"}',
        '{"id": "n", "caption": "c"} {"id": "m", "caption": "c"}',
        '{"id": "n", "caption": "c",}',
        '["not", "an", "object"]',
        "3",
    ],
)
def test_bad_records_raise_read_manifests_error(tmp_path: Path, line: str) -> None:
    uri = tmp_path / "m.jsonl"
    uri.write_text(GOOD + "\n" + line + "\n" + GOOD.replace('"ok"', '"ok2"') + "\n", encoding="utf-8")
    with pytest.raises(InputError) as expected:
        read_manifest(str(uri))
    with pytest.raises(InputError) as got:
        read_columns(str(uri))
    assert str(got.value) == str(expected.value)
    assert (
        (got.value.line, got.value.field)
        == (expected.value.line, expected.value.field)
        == (2, got.value.field)
    )


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "a", "caption": "\xff"}\n',  # not UTF-8
        b'{"id": "a", "caption": "c"}\n{"id": "b", "caption": NaN}\n',
        b'{"id": "a", "caption": "c", "id": "b"}\n',  # a key twice
        b'{"id": "a", "caption": "c", "scores": {"clip": 1e400}}\n{"id": "a", "caption": "c"}\n',
    ],
)
def test_bad_bytes_raise_read_manifests_error(tmp_path: Path, raw: bytes) -> None:
    uri = tmp_path / "m.jsonl"
    uri.write_bytes(raw)
    try:
        read_manifest(str(uri))
    except InputError as exc:
        with pytest.raises(InputError) as got:
            read_columns(str(uri))
        assert str(got.value) == str(exc)
    else:
        assert read_columns(str(uri)).records() == read_manifest(str(uri))


@pytest.mark.parametrize(
    ("body", "fast"),
    [
        ("\ufeff" + GOOD + "\n", True),  # a byte-order mark
        ("\n\n" + GOOD + "\n   \n" + GOOD.replace('"ok"', '"b"') + "\n\n", True),  # blank lines
        (GOOD + "\r\n" + GOOD.replace('"ok"', '"b"') + "\r\n", True),  # Windows line ends
        (GOOD, True),  # no final newline
        ("", False),  # empty
        ('{"id": "a", "caption": "c", "scores": {"clip": 1}}\n', True),  # an int score is a float
        ('{"id": "a", "caption": "c", "scores": {"clip": Infinity}}\n', True),  # valid; select rejects it
        ('{"id": "a", "caption": "  spaced  "}\n', True),
        # Valid, but beyond what the vectorised checks tell apart: read record by record.
        (
            '{"id": "a", "caption": "c", "scores": {"clip": 0.1}}\n'
            '{"id": "b", "caption": "c", "scores": {}}\n',
            False,
        ),
        (
            '{"id": "a", "caption": "c"}\n'
            '{"id": "b", "caption": "c", "seed": null, "provenance": {"x": 1}}\n',
            False,
        ),
        (
            '{"id": "a", "caption": "c", "provenance": {"v": 1}}\n'
            '{"id": "b", "caption": "c", "provenance": {"v": "s"}}\n',  # a provenance value's type changes
            False,
        ),
    ],
)
def test_unusual_but_valid_files_give_read_manifests_records(tmp_path: Path, body: str, fast: bool) -> None:
    uri = tmp_path / "m.jsonl"
    uri.write_bytes(body.encode("utf-8"))
    expected = read_manifest(str(uri))
    columns = read_columns(str(uri))
    assert columns.fast is fast
    assert columns.records() == expected
    assert [Record.model_validate_json(line) for line in columns.lines().to_pylist()] == expected
    values, present = columns.score("clip")
    assert present.tolist() == ["clip" in r.scores for r in expected]
    assert [v for v, p in zip(values.tolist(), present, strict=True) if p] == [
        r.scores["clip"] for r in expected if "clip" in r.scores
    ]


def test_source_ids_absent_and_explicit_null(tmp_path: Path) -> None:
    uri = tmp_path / "m.jsonl"
    lines = [
        {"id": "a", "caption": "c", "provenance": {"source_id": "s"}},
        {"id": "b", "caption": "c", "provenance": {}},  # its own source
        {"id": "c", "caption": "c", "provenance": {"source_id": None}},  # str(None), as source_id() gives
        {"id": "d", "caption": "c", "provenance": {"source_id": 7}},
    ]
    for keep in (3, 4):
        uri.write_text("".join(json.dumps(line) + "\n" for line in lines[:keep]))
        expected = [source_id(r) for r in read_manifest(str(uri))]
        assert read_columns(str(uri)).sources().to_pylist() == expected


def test_parquet_errors_are_read_manifests(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = str(tmp_path / "m.parquet")
    for table in (
        pa.table({"id": ["a", "b"], "caption": ["c", "c"], "scores": ['{"clip": 1.0}', "{bad"]}),
        pa.table({"id": ["a", "a/b"], "caption": ["c", "c"]}),
        pa.table({"id": ["a", "b"], "caption": ["c", " "]}),
        pa.table({"id": ["a", "b"], "caption": ["c", "c"], "scores": ['{"clip": 1.0}', '{"clip": "x"}']}),
    ):
        pq.write_table(table, uri)
        with pytest.raises(InputError) as expected:
            read_manifest(uri)
        with pytest.raises(InputError) as got:
            read_columns(uri)
        assert str(got.value) == str(expected.value)
