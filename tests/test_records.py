from pathlib import Path

import pytest

from synthvlm.errors import InputError
from synthvlm.records import (
    MAX_ID_BYTES,
    VARIANT_SUFFIX_BYTES,
    Record,
    check_id,
    read_manifest,
    write_manifest,
)


def _recs() -> list[Record]:
    return [
        Record(
            id="a1",
            caption="a cat",
            seed=3,
            image_uri="/x/a1.jpg",
            scores={"clip": 0.3},
            provenance={"m": "sdxl"},
        ),
        Record(id="b2", caption="a dog"),
    ]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_manifest_round_trip(tmp_path: Path, suffix: str):
    uri = str(tmp_path / f"m.{suffix}")
    assert write_manifest(uri, _recs()) == 2
    assert read_manifest(uri) == _recs()


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("", "empty"),
        ("../etc", "path separator"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("a..b", "'..'"),
        ("tab\there", "control character"),
        (".hidden", "starts with '.'"),
        ("x" * 201, "longer than"),
        ("文" * 67, "longer than 200 bytes in UTF-8 \\(201 bytes, 67 characters\\)"),
    ],
)
def test_bad_ids_rejected(bad: str, reason: str):
    with pytest.raises(ValueError, match=reason):
        check_id(bad)


def test_duplicate_ids_rejected_on_write_and_read(tmp_path: Path):
    uri = str(tmp_path / "m.jsonl")
    with pytest.raises(InputError, match="duplicate id 'a1'"):
        write_manifest(uri, [_recs()[0], _recs()[0]])
    assert not Path(uri).exists()
    line = _recs()[0].model_dump_json()
    Path(uri).write_text(line + "\n\n" + line + "\n")
    with pytest.raises(InputError) as exc:
        read_manifest(uri)
    assert (exc.value.line, exc.value.field) == (3, "id")
    assert "first at line 1" in str(exc.value)


def test_read_manifest_names_line_and_field(tmp_path: Path):
    uri = tmp_path / "m.jsonl"
    uri.write_text('{"id": "ok", "caption": "fine"}\n{"id": "x/y", "caption": "bad id"}\n')
    with pytest.raises(InputError) as exc:
        read_manifest(str(uri))
    assert (exc.value.line, exc.value.field) == (2, "id")
    assert str(uri) in str(exc.value)


def test_id_limit_counts_utf8_bytes_and_reserve():
    # 100 characters, 300 bytes: fine for len(), too long for a file name (255 bytes on most file systems).
    with pytest.raises(ValueError, match="300 bytes"):
        check_id("文" * 100)
    assert check_id("文" * 66) == "文" * 66  # 198 bytes
    room = MAX_ID_BYTES - VARIANT_SUFFIX_BYTES
    assert check_id("x" * room, reserve_bytes=VARIANT_SUFFIX_BYTES)
    with pytest.raises(ValueError, match=f"longer than {room} bytes"):
        check_id("x" * (room + 1), reserve_bytes=VARIANT_SUFFIX_BYTES)
    check_id("x" * room + "~9999999")  # the longest variant of an accepted caption id still fits


def test_read_manifest_accepts_a_utf8_bom(tmp_path: Path):
    uri = tmp_path / "m.jsonl"
    uri.write_bytes(b"\xef\xbb\xbf" + "".join(r.model_dump_json() + "\n" for r in _recs()).encode())
    assert read_manifest(str(uri)) == _recs()


def test_corrupt_parquet_manifest_names_the_file(tmp_path: Path):
    uri = tmp_path / "m.parquet"
    write_manifest(str(uri), _recs())
    uri.write_bytes(uri.read_bytes()[:-20])  # truncated: the footer is gone
    with pytest.raises(InputError, match=f"{uri}: not a readable Parquet file"):
        read_manifest(str(uri))
