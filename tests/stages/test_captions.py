import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthvlm.errors import InputError
from synthvlm.records import read_manifest
from synthvlm.stage import is_done, read_stats
from synthvlm.stages.captions import DEMO_CAPTIONS, CaptionsConfig, InputErrors, load_captions, read_captions
from tests.published import published

GOOD = b'{"id": "c1", "caption": "a red bicycle"}\n'


def test_bundled_demo_captions_load():
    records = read_captions(DEMO_CAPTIONS)
    assert len(records) == 16
    assert len({r.id for r in records}) == 16


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_load_to_a_manifest(tmp_path: Path, fmt: str):
    src = tmp_path / f"caps.{fmt}"
    rows = [{"id": "c1", "caption": " a red bicycle "}, {"id": "c2", "caption": "two dogs"}]
    if fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        src.write_text("id,caption,extra\nc1, a red bicycle ,x\nc2,two dogs,y\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), src)
    out = str(tmp_path / "out" / "captions.jsonl")
    assert published(load_captions(CaptionsConfig(captions=str(src), max_records=1), out), out)
    records = read_manifest(out)
    assert [(r.id, r.caption) for r in records] == [("c1", "a red bicycle")]
    assert read_stats(out)["count_in"] == 2 and read_stats(out)["count_out"] == 1


# (file content, expected line, expected field, words in the message)
BAD_JSONL = {
    "malformed line": (GOOD + b'{"id": "c2", "caption": "unterminated\n', 2, None, "malformed JSON"),
    "empty caption": (GOOD + b'{"id": "c2", "caption": "   "}\n', 2, "caption", "caption is empty"),
    "duplicate id": (GOOD + b"\n" + GOOD, 3, "id", "duplicate id 'c1' (first at line 1)"),
    "id with ../": (GOOD + b'{"id": "../c2", "caption": "x"}\n', 2, "id", "path separator"),
    "missing column": (GOOD + b'{"id": "c2", "text": "x"}\n', 2, "caption", "missing"),
    "non-UTF-8 byte": (
        GOOD + b'{"id": "c2", "caption": "caf\xe9 au lait"}\n',
        2,
        "caption",
        "not valid UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_names_file_line_field_and_publishes_nothing(tmp_path: Path, case: str):
    content, line, field, words = BAD_JSONL[case]
    src = tmp_path / "caps.jsonl"
    src.write_bytes(content)
    out = str(tmp_path / "out" / "captions.jsonl")
    with pytest.raises(InputErrors) as exc:
        load_captions(CaptionsConfig(captions=str(src)), out)
    [problem] = exc.value.problems
    assert (problem.file, problem.line, problem.field) == (str(src), line, field)
    assert words in str(problem)
    assert f"{src}, line {line}" in str(exc.value)
    assert not Path(out).exists() and not is_done(out)


def test_bad_csv_cases(tmp_path: Path):
    src = tmp_path / "caps.csv"
    src.write_text("id,text\nc1,hello\n")
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    assert (exc.value.problems[0].line, exc.value.problems[0].field) == (1, "caption")
    src.write_bytes(b"id,caption\nc1,fine\nc2,\xff\xfe bad\nc1,again\n")
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    found = [(p.line, p.field) for p in exc.value.problems]
    assert found == [(3, "caption"), (4, "id")]  # every problem is reported, not just the first


def test_parquet_missing_column_and_bad_row(tmp_path: Path):
    src = tmp_path / "caps.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "c1", "text": "x"}]), src)
    with pytest.raises(InputErrors, match="missing column"):
        read_captions(str(src))
    pq.write_table(pa.Table.from_pylist([{"id": "c1", "caption": "x"}, {"id": "a/b", "caption": "y"}]), src)
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    assert f"{src}, row 2, field 'id'" in str(exc.value)


def test_unsupported_or_missing_file(tmp_path: Path):
    with pytest.raises(InputError, match="unsupported captions format"):
        read_captions(str(tmp_path / "caps.txt"))
    with pytest.raises(InputError, match="file not found"):
        read_captions(str(tmp_path / "caps.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no captions found"):
        read_captions(str(tmp_path / "empty.jsonl"))


def test_csv_duplicate_column_and_unterminated_quote(tmp_path: Path):
    src = tmp_path / "caps.csv"
    src.write_text("id,caption,caption\nc1,a,b\n")
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    [problem] = exc.value.problems
    assert (problem.line, problem.field) == (1, "caption") and "duplicate column" in str(problem)
    # Non-strict csv reads this as 2 rows, c2's caption swallowing c3 and c4: rows lost without a word.
    src.write_text('id,caption\nc1,a cat\nc2,"a dog\nc3,a cow\nc4,a pig\n')
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    [problem] = exc.value.problems
    assert problem.line == 3 and "unterminated quoted field" in str(problem)
    src.write_text('id,caption\nc1,"a cat"s\n')  # text after a closing quote
    with pytest.raises(InputErrors, match=r"line 2: malformed CSV"):
        read_captions(str(src))
    src.write_text('id,caption\nc1,"a cat\non two lines"\nc2,a "quoted" word\n')  # both are valid
    assert [r.caption for r in read_captions(str(src))] == ["a cat\non two lines", 'a "quoted" word']


def test_jsonl_with_a_utf8_bom_is_accepted(tmp_path: Path):
    src = tmp_path / "caps.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + GOOD)
    assert [r.id for r in read_captions(str(src))] == ["c1"]


def test_directory_and_corrupt_parquet_are_input_errors(tmp_path: Path):
    folder = tmp_path / "caps.jsonl"  # a folder with a captions-like name
    folder.mkdir()
    with pytest.raises(InputError, match=f"{folder}: is a directory"):
        read_captions(str(folder))
    src = tmp_path / "caps.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "c1", "caption": "x"}]), src)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # truncated
    with pytest.raises(InputError, match=f"{src}: not a readable Parquet file"):
        read_captions(str(src))


def test_caption_id_too_long_in_bytes_leaves_room_for_variants(tmp_path: Path):
    src = tmp_path / "caps.csv"
    src.write_text("id,caption\n" + "文" * 100 + ",a cat\nc2," + "x" * 193 + "\n")  # 300 bytes; 193 is fine
    with pytest.raises(InputErrors) as exc:
        read_captions(str(src))
    [problem] = exc.value.problems
    assert (problem.line, problem.field) == (2, "id")
    assert "id is longer than 192 bytes in UTF-8 (300 bytes, 100 characters)" in str(problem)
