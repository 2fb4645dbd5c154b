"""Read and write local paths and gs:// URIs with one small API.

gs:// goes through google-cloud-storage (its retry policy and transfer helpers); an object upload is
atomic by itself. Local writes go to a temporary file in the same directory and are renamed into
place, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path

from synthvlm.errors import CredentialsError, InputError

GCS_PREFIX = "gs://"


def _file_mode() -> int:
    """The mode open() would give a new file (mkstemp's 0600 would hide data from other readers)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def is_gcs(uri: str) -> bool:
    return uri.startswith(GCS_PREFIX)


def split_gcs(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, name = uri[len(GCS_PREFIX) :].partition("/")
    if not bucket:
        # An InputError (not a ValueError): a mistyped URI is bad input, shown without a traceback.
        raise InputError(uri, "not a gs:// URI with a bucket name (expected gs://BUCKET/PATH)")
    return bucket, name


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/', for local paths and gs:// alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@lru_cache(maxsize=1)
def _client():  # pragma: no cover - trivial
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError as exc:  # raised before any request: say how to provide them
        raise CredentialsError(detail=str(exc)) from None


def _gcs_client(uri: str):
    """The client, or a CredentialsError naming the bucket of `uri` (the object touched first may be a
    marker such as `<input>.done`, which would puzzle the user)."""
    try:
        return _client()
    except CredentialsError as exc:
        raise CredentialsError(GCS_PREFIX + split_gcs(uri)[0], detail=exc.detail) from None


def reset_client() -> None:
    """Forget the cached client (tests switch STORAGE_EMULATOR_HOST)."""
    _client.cache_clear()


def _blob(uri: str):
    bucket, name = split_gcs(uri)
    return _gcs_client(uri).bucket(bucket).blob(name)


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        return _blob(uri).download_as_bytes(retry=_retry())
    return Path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write atomically: the object/file appears complete or not at all."""
    if is_gcs(uri):
        # if_generation_match is not set: rewriting the same deterministic output is fine, and
        # DEFAULT_RETRY only retries uploads that are idempotent in this sense.
        _blob(uri).upload_from_string(data, content_type=content_type, retry=_retry())
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TEMP_SUFFIX = ".tmp"  # a local write's temp file: ".{name}.{random}.tmp" next to its target


def remove_interrupted_writes(folder: str, owned: Callable[[str], bool] | None = None) -> list[str]:
    """Delete the temp files that local writes killed mid-way left in `folder` (only those whose target
    file name passes `owned`, when given); returns their paths. Object uploads leave none."""
    if is_gcs(folder) or not Path(folder).is_dir():
        return []
    removed = []
    for entry in os.scandir(folder):
        if not (entry.name.startswith(".") and entry.name.endswith(_TEMP_SUFFIX)):
            continue
        target = entry.name[1:].rsplit(".", 2)[0]  # ".{name}.{random}.tmp" -> name (mkstemp: no dots)
        if owned is None or owned(target):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.path)
    return removed


def write_text(uri: str, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
    write_bytes(uri, text.encode("utf-8"), content_type=content_type)


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """Yield a local path with the content of `uri` (downloaded to a temp file for gs://)."""
    if not is_gcs(uri):
        yield uri
        return
    suffix = Path(split_gcs(uri)[1]).suffix
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"data{suffix}")
        _blob(uri).download_to_filename(local, retry=_retry())
        yield local


def upload_file(local_path: str, uri: str, content_type: str | None = None) -> None:
    """Copy a local file to `uri` atomically."""
    if is_gcs(uri):
        _blob(uri).upload_from_filename(local_path, content_type=content_type, retry=_retry())
    else:
        write_bytes(uri, Path(local_path).read_bytes())


def exists(uri: str) -> bool:
    if is_gcs(uri):
        return _blob(uri).exists(retry=_retry())
    return Path(uri).exists()


def delete(uri: str) -> None:
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        with suppress(NotFound):
            _blob(uri).delete(retry=_retry())
    else:
        Path(uri).unlink(missing_ok=True)


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """All files/objects under directory `prefix` (recursive) whose name ends with `suffix`, sorted."""
    if is_gcs(prefix):
        bucket, name = split_gcs(prefix)
        name = name.rstrip("/") + "/" if name else ""
        blobs = _gcs_client(prefix).list_blobs(bucket, prefix=name, retry=_retry())
        return sorted(f"{GCS_PREFIX}{bucket}/{b.name}" for b in blobs if b.name.endswith(suffix))
    root = Path(prefix)
    if not root.exists():
        return []
    return sorted(
        str(p)
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(suffix) and not p.name.startswith(".")
    )


def is_remote(uri: str) -> bool:
    """An object-store URI (no local folders, no temp files, no renames)."""
    return is_gcs(uri)


def copy(source: str, target: str) -> None:
    """Copy one file/object atomically (server-side for gs:// to gs://)."""
    if is_gcs(source) and is_gcs(target):
        src_bucket, src_name = split_gcs(source)
        dst_bucket, dst_name = split_gcs(target)
        bucket = _client().bucket(src_bucket)
        bucket.copy_blob(bucket.blob(src_name), _client().bucket(dst_bucket), dst_name, retry=_retry())
        return
    write_bytes(target, read_bytes(source))
