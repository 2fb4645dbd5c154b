import errno
import os
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


def test_local_link_or_copy_shares_the_file_and_a_rewrite_replaces_only_one_path(tmp_path: Path):
    source, target = tmp_path / "v" / "shard.tar", tmp_path / "stable" / "shard.tar"
    storage.write_bytes(str(source), b"version 1")
    storage.write_bytes(str(target), b"an older version's shard")
    storage.link_or_copy(str(source), str(target))
    assert target.samefile(source) and target.read_bytes() == b"version 1"  # a hard link: no second copy
    storage.link_or_copy(str(source), str(target))  # already linked: nothing to do, no temp left
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.tar"]
    # Every write renames a new file into place: the other path keeps its bytes.
    storage.write_bytes(str(source), b"rewritten")
    assert target.read_bytes() == b"version 1" and not target.samefile(source)
    with pytest.raises(FileNotFoundError):
        storage.link_or_copy(str(tmp_path / "missing.tar"), str(target))
    assert target.read_bytes() == b"version 1"


def test_link_or_copy_copies_where_no_link_can_be_made(tmp_path: Path, monkeypatch):
    source, target = tmp_path / "a.tar", tmp_path / "out" / "a.tar"
    source.write_bytes(b"x" * 100_000)

    def cross_device(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    monkeypatch.setattr(storage, "read_bytes", None)  # the bytes never pass through Python
    storage.link_or_copy(str(source), str(target))
    assert target.read_bytes() == source.read_bytes() and not target.samefile(source)
    assert target.stat().st_mode & 0o777 == storage._FILE_MODE
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.tar"]
    storage.copy(str(source), str(tmp_path / "copy.tar"))  # copy: the kernel's copy, not a link either
    assert (tmp_path / "copy.tar").read_bytes() == source.read_bytes()
    assert not (tmp_path / "copy.tar").samefile(source)


def test_file_names_lists_one_folder(tmp_path: Path, gcs_emulator: str):
    for root in (str(tmp_path), storage.join(gcs_emulator, "names")):
        for rel in ("d/a.tar", "d/b.tar", "d/sub/c.tar", "d2/x.tar"):
            storage.write_bytes(storage.join(root, rel), b"x")
        assert storage.file_names(storage.join(root, "d")) == ["a.tar", "b.tar"]
        assert storage.file_names(storage.join(root, "d") + "/") == ["a.tar", "b.tar"]
        assert storage.file_names(storage.join(root, "nothing")) == []
    (tmp_path / "d" / ".a.tar.abc.tmp").write_bytes(b"half")  # a temp file is no file of the folder
    assert storage.file_names(str(tmp_path / "d")) == ["a.tar", "b.tar"]


def test_gcs_copy_is_server_side(gcs_emulator: str, monkeypatch):
    source = storage.join(gcs_emulator, "copy", "v", "shard.tar")
    storage.write_bytes(source, b"tar bytes")
    monkeypatch.setattr(storage, "read_bytes", None)  # rewritten by the server, never downloaded
    monkeypatch.setattr(storage, "local_copy", None)
    storage.link_or_copy(source, storage.join(gcs_emulator, "copy", "shard.tar"))
    storage.copy(source, storage.join(gcs_emulator, "copy", "b", "shard.tar"))
    monkeypatch.undo()
    assert storage.read_bytes(storage.join(gcs_emulator, "copy", "shard.tar")) == b"tar bytes"
    assert storage.read_bytes(storage.join(gcs_emulator, "copy", "b", "shard.tar")) == b"tar bytes"


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


def test_iter_lines_streams_remote_objects_in_ranges(tmp_path: Path, gcs_emulator: str, monkeypatch) -> None:
    text = 'first\n{"caption": "ünïcödé across a chunk"}\n\nx\r\nlast without newline'
    expected = ["first\n", '{"caption": "ünïcödé across a chunk"}\n', "\n", "x\r\n", "last without newline"]
    local = tmp_path / "lines.jsonl"
    local.write_bytes(text.encode())
    remote = storage.join(gcs_emulator, "lines", "lines.jsonl")
    storage.write_bytes(remote, text.encode())
    monkeypatch.setattr(storage, "local_copy", None)  # never downloaded whole
    monkeypatch.setattr(storage, "read_bytes", None)
    assert list(storage.iter_lines(str(local))) == expected
    for chunk in (1, 7, 1 << 20):  # multi-byte characters split between ranges come back whole
        assert list(storage.iter_lines(remote, chunk_bytes=chunk)) == expected
    storage.write_bytes(storage.join(gcs_emulator, "lines", "empty.jsonl"), b"")
    assert list(storage.iter_lines(storage.join(gcs_emulator, "lines", "empty.jsonl"))) == []
