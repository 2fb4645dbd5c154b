from pathlib import Path

import pytest

from synthvlm import storage
from synthvlm.errors import CredentialsError, InputError


def test_local_round_trip_and_listing(tmp_path: Path):
    uri = str(tmp_path / "a" / "b" / "data.bin")
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert Path(uri).stat().st_mode & 0o777 == storage._FILE_MODE  # like open(), not mkstemp's 0600
    storage.write_text(str(tmp_path / "a" / "note.txt"), "héllo")
    assert storage.read_text(str(tmp_path / "a" / "note.txt")) == "héllo"
    assert storage.list_uris(str(tmp_path / "a")) == [
        str(tmp_path / "a/b/data.bin"),
        str(tmp_path / "a/note.txt"),
    ]
    assert storage.list_uris(str(tmp_path / "a"), suffix=".txt") == [str(tmp_path / "a/note.txt")]
    storage.delete(uri)
    assert not storage.exists(uri)


def test_local_write_is_atomic_on_failure(tmp_path: Path, monkeypatch):
    """A write that dies halfway leaves the old content and no temp file behind."""
    uri = str(tmp_path / "out.txt")
    storage.write_text(uri, "complete v1")

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(uri, "v2 that never lands")
    assert storage.read_text(uri) == "complete v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_gcs_round_trip_against_emulator(gcs_emulator: str, tmp_path: Path):
    uri = storage.join(gcs_emulator, "run1", "images", "x.jpg")
    storage.write_bytes(uri, b"jpeg bytes", content_type="image/jpeg")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"jpeg bytes"
    local = tmp_path / "m.jsonl"
    local.write_text('{"a": 1}\n')
    storage.upload_file(str(local), storage.join(gcs_emulator, "run1", "m.jsonl"))
    with storage.local_copy(storage.join(gcs_emulator, "run1", "m.jsonl")) as path:
        assert Path(path).read_text() == '{"a": 1}\n'
    assert storage.list_uris(storage.join(gcs_emulator, "run1")) == [
        "gs://test-bucket/run1/images/x.jpg",
        "gs://test-bucket/run1/m.jsonl",
    ]
    assert storage.list_uris(storage.join(gcs_emulator, "run1"), suffix=".jsonl") == [
        "gs://test-bucket/run1/m.jsonl"
    ]
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is gone is not an error


def test_split_and_join():
    assert storage.split_gcs("gs://b/x/y.txt") == ("b", "x/y.txt")
    assert storage.join("gs://b/", "/x/", "y") == "gs://b/x/y"
    with pytest.raises(InputError, match="gs:///nobucket: not a gs:// URI with a bucket name"):
        storage.split_gcs("gs:///nobucket")


def test_missing_credentials_say_how_to_provide_them(no_gcp_credentials):
    with pytest.raises(CredentialsError) as exc:
        storage.exists("gs://some-bucket/caps.jsonl")
    msg = str(exc.value)
    assert "cannot access gs://some-bucket: no Google Cloud credentials found" in msg
    assert "GOOGLE_APPLICATION_CREDENTIALS" in msg and "Workload Identity" in msg
    with pytest.raises(CredentialsError, match="cannot access gs://some-bucket:"):
        storage.list_uris("gs://some-bucket/runs")
