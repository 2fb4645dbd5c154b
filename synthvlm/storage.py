"""Read and write local paths, gs:// and s3:// URIs with one small API.

gs:// goes through google-cloud-storage (its retry policy and transfer helpers), s3:// through boto3
(botocore's standard retry mode, s3transfer for big files); an object upload is atomic by itself: a
single PUT, or a multipart upload whose object appears only when it is completed (its parts are never
visible as an object). Local writes go to a temporary file in the same directory and are renamed into
place, so a reader never sees a half-written file. Copies never pass the bytes through Python: server-side
within a store, the kernel's copy between local paths, or (link_or_copy, for big files written once) a hard
link.

s3:// takes everything from the standard AWS settings: credentials from the default chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, IRSA, ...), the endpoint of an S3-compatible
store such as MinIO from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (botocore reads them itself).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from pathlib import Path

from synthvlm.errors import CredentialsError, InputError, S3CredentialsError

GCS_PREFIX = "gs://"
S3_PREFIX = "s3://"


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


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    if not bucket:
        raise InputError(uri, "not an s3:// URI with a bucket name (expected s3://BUCKET/PATH)")
    return bucket, key


def split_remote(uri: str) -> tuple[str, str]:
    """(bucket, object name) of a gs:// or s3:// URI; an InputError naming `uri` when it has no bucket."""
    return split_s3(uri) if is_s3(uri) else split_gcs(uri)


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/', for local paths, gs:// and s3:// alike."""
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
    """Forget the cached clients (tests switch STORAGE_EMULATOR_HOST / AWS_ENDPOINT_URL; a forked worker
    must not share its parent's connections)."""
    _client.cache_clear()
    _s3_client.cache_clear()


_S3_MAX_ATTEMPTS = 8  # our choice: like GCS's DEFAULT_RETRY, ride out a store restarting for a while


def _s3_endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=1)
def _s3_client():
    import boto3
    from botocore.config import Config

    options: dict = {"retries": {"mode": "standard", "max_attempts": _S3_MAX_ATTEMPTS}}
    if _s3_endpoint_from_env():
        # An S3-compatible store (MinIO, Ceph, ...): buckets as paths (a cluster-local service name has no
        # per-bucket DNS names), and checksums only where S3 requires them (older MinIO, such as the one
        # bundled with Kubeflow Pipelines, rejects botocore's default streaming CRC32 uploads).
        options["s3"] = {"addressing_style": "path"}
        if "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ:
            options["request_checksum_calculation"] = "when_required"
        if "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ:
            options["response_checksum_validation"] = "when_required"
    # The endpoint (AWS_ENDPOINT_URL[_S3]), region and credentials come from botocore's own lookup.
    return boto3.session.Session().client("s3", config=Config(**options))


# S3 error codes that mean the credentials are missing, wrong or not allowed (HEAD answers only "403").
_S3_REFUSED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Translate botocore errors about `uri`: a missing object -> FileNotFoundError (as for local paths),
    a missing bucket -> InputError naming the bucket, missing or refused credentials -> S3CredentialsError."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    bucket_uri = S3_PREFIX + split_s3(uri)[0]
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise S3CredentialsError(bucket_uri, detail=str(exc), endpoint=_s3_endpoint_from_env()) from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(errno.ENOENT, "no such object", uri) from None
        if code == "NoSuchBucket":
            where = _s3_client().meta.endpoint_url
            raise InputError(bucket_uri, f"no such bucket at {where} (create it, or fix the URI)") from None
        if code in _S3_REFUSED:
            raise S3CredentialsError(
                bucket_uri, detail=str(exc), refused=True, endpoint=_s3_client().meta.endpoint_url
            ) from None
        raise


def _s3_transfer_config():
    from boto3.s3.transfer import TransferConfig

    # The library's multipart thresholds and concurrency; a multipart object appears only once complete,
    # and s3transfer aborts the upload (its parts) when it fails.
    return TransferConfig()


def _blob(uri: str):
    bucket, name = split_gcs(uri)
    return _gcs_client(uri).bucket(bucket).blob(name)


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        return _blob(uri).download_as_bytes(retry=_retry())
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


# Our choice: one ranged request per MiB; a merge streaming 1000 remote files at once holds 1 GiB of them.
LINE_CHUNK_BYTES = 1 << 20


def _remote_size(uri: str) -> int:
    if is_gcs(uri):
        blob = _blob(uri)
        blob.reload(retry=_retry())
        return int(blob.size or 0)
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return int(_s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])


def _read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes start..end (inclusive) of a remote object."""
    if is_gcs(uri):
        return _blob(uri).download_as_bytes(start=start, end=end, retry=_retry())
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return _s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}")["Body"].read()


def iter_lines(uri: str, chunk_bytes: int = LINE_CHUNK_BYTES) -> Iterator[str]:
    """The lines of a UTF-8 text file, each with its newline, streamed: a remote object is read in ranged
    requests of `chunk_bytes`, never downloaded whole (many files can be open at once at no disk cost)."""
    if not is_remote(uri):
        with open(uri, encoding="utf-8", newline="\n") as handle:
            yield from handle
        return
    size, start, rest = _remote_size(uri), 0, b""
    while start < size:
        data = rest + _read_range(uri, start, min(size, start + chunk_bytes) - 1)
        start += chunk_bytes
        *lines, rest = data.split(b"\n")
        for line in lines:
            yield (line + b"\n").decode("utf-8")
    if rest:
        yield rest.decode("utf-8")


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write atomically: the object/file appears complete or not at all."""
    if is_gcs(uri):
        # if_generation_match is not set: rewriting the same deterministic output is fine, and
        # DEFAULT_RETRY only retries uploads that are idempotent in this sense.
        _blob(uri).upload_from_string(data, content_type=content_type, retry=_retry())
        return
    if is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {"ContentType": content_type} if content_type else {}
        with _s3_errors(uri):  # one PUT: the object is replaced whole or not at all
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return
    with AtomicWriter(uri) as out:
        out.file.write(data)


_TEMP_SUFFIX = ".tmp"  # a local write's temp file: ".{name}.{random}.tmp" next to its target


def _temp_beside(target: Path) -> tuple[int, str]:
    """A new temp file next to `target` (found by remove_interrupted_writes), with open()'s mode."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


class AtomicWriter:
    """A binary file streamed to `uri` that appears complete or not at all: written to a temp file beside a
    local target and renamed over it, or to a local temp file that is then uploaded (gs://, s3://), so
    output of any size is never held in memory. `commit()` publishes it, `discard()` drops it; as a context
    manager it commits unless the block raised."""

    def __init__(self, uri: str, content_type: str | None = None):
        self.uri, self.content_type = uri, content_type
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if is_remote(uri):
            self._tmpdir = tempfile.TemporaryDirectory(prefix="synthvlm-upload-")
            self.path = os.path.join(self._tmpdir.name, "data" + Path(uri).suffix)
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed by commit()/discard()
        else:
            fd, self.path = _temp_beside(Path(uri))
            self.file = os.fdopen(fd, "wb")

    def commit(self) -> int:
        """Publish the file; returns its size in bytes."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            size = os.path.getsize(self.path)
            if self._tmpdir is not None:
                upload_file(self.path, self.uri, content_type=self.content_type)
            else:
                os.replace(self.path, self.uri)
            return size
        finally:
            self.discard()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
        else:
            Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_lines(uri: str, lines: Iterable[str], content_type: str = "application/jsonl") -> int:
    """Write text lines (each with its newline) atomically, streamed, never all in memory; returns how
    many."""
    count = 0
    with AtomicWriter(uri, content_type) as out:
        for line in lines:
            out.file.write(line.encode("utf-8"))
            count += 1
    return count


def remove_interrupted_writes(folder: str, owned: Callable[[str], bool] | None = None) -> list[str]:
    """Delete the temp files that local writes killed mid-way left in `folder` (only those whose target
    file name passes `owned`, when given); returns their paths. Object uploads leave none."""
    if is_remote(folder) or not Path(folder).is_dir():
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
    """Yield a local path with the content of `uri` (downloaded to a temp file for gs:// and s3://)."""
    if not is_remote(uri):
        yield uri
        return
    bucket, name = split_remote(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"data{Path(name).suffix}")
        if is_s3(uri):
            with _s3_errors(uri):
                _s3_client().download_file(bucket, name, local, Config=_s3_transfer_config())
        else:
            _blob(uri).download_to_filename(local, retry=_retry())
        yield local


def upload_file(local_path: str, uri: str, content_type: str | None = None) -> None:
    """Copy a local file to `uri` atomically."""
    if is_gcs(uri):
        _blob(uri).upload_from_filename(local_path, content_type=content_type, retry=_retry())
    elif is_s3(uri):
        bucket, key = split_s3(uri)
        extra = {"ContentType": content_type} if content_type else None
        with _s3_errors(uri):  # multipart for big files (checkpoints): visible only once completed
            _s3_client().upload_file(local_path, bucket, key, ExtraArgs=extra, Config=_s3_transfer_config())
    else:
        _copy_local(local_path, uri)


def _copy_local(path: str, target: str) -> None:
    """Copy a local file to a local path atomically (temp file, then rename), the bytes copied by the
    kernel (shutil.copyfile uses sendfile on Linux), never held in memory."""
    dest = Path(target)
    fd, tmp = _temp_beside(dest)
    try:
        os.close(fd)
        shutil.copyfile(path, tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str) -> bool:
    if is_gcs(uri):
        return _blob(uri).exists(retry=_retry())
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            with _s3_errors(uri):
                _s3_client().head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True
    return Path(uri).exists()


def delete(uri: str) -> None:
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        with suppress(NotFound):
            _blob(uri).delete(retry=_retry())
    elif is_s3(uri):
        bucket, key = split_s3(uri)
        with suppress(FileNotFoundError), _s3_errors(uri):  # S3 answers 204 for a missing key anyway
            _s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def file_names(folder: str) -> list[str]:
    """Names of the files/objects directly in `folder` (not in its subfolders), sorted; local temp files
    (dot files) are left out, as in list_uris."""
    if is_remote(folder):
        bucket, name = split_remote(folder)
        name = name.rstrip("/") + "/" if name else ""
        if is_gcs(folder):  # a delimiter lists one level only: a stage folder's versions are not walked
            blobs = _gcs_client(folder).list_blobs(bucket, prefix=name, delimiter="/", retry=_retry())
            keys = [blob.name for blob in blobs]
        else:
            keys = []
            with _s3_errors(folder):
                pages = (
                    _s3_client()
                    .get_paginator("list_objects_v2")
                    .paginate(Bucket=bucket, Prefix=name, Delimiter="/")
                )
                for page in pages:
                    keys += [obj["Key"] for obj in page.get("Contents", ())]
        return sorted(key[len(name) :] for key in keys if key[len(name) :])
    if not Path(folder).is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """All files/objects under directory `prefix` (recursive) whose name ends with `suffix`, sorted."""
    if is_gcs(prefix):
        bucket, name = split_gcs(prefix)
        name = name.rstrip("/") + "/" if name else ""
        blobs = _gcs_client(prefix).list_blobs(bucket, prefix=name, retry=_retry())
        return sorted(f"{GCS_PREFIX}{bucket}/{b.name}" for b in blobs if b.name.endswith(suffix))
    if is_s3(prefix):
        bucket, name = split_s3(prefix)
        name = name.rstrip("/") + "/" if name else ""
        keys = []
        with _s3_errors(prefix):
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=name):
                keys += [obj["Key"] for obj in page.get("Contents", ()) if obj["Key"].endswith(suffix)]
        return sorted(f"{S3_PREFIX}{bucket}/{key}" for key in keys)
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
    return is_gcs(uri) or is_s3(uri)


def copy(source: str, target: str) -> None:
    """Copy one file/object atomically, never holding it in memory: server-side within gs:// and within
    s3://, by the kernel between local paths, through a local temp file between stores."""
    if is_gcs(source) and is_gcs(target):
        _gcs_rewrite(source, target)
        return
    if is_s3(source) and is_s3(target):
        src_bucket, src_key = split_s3(source)
        dst_bucket, dst_key = split_s3(target)
        # s3transfer's managed copy: CopyObject, or a multipart UploadPartCopy above its threshold (one
        # CopyObject stops at 5 GB); visible only once completed, like a PUT.
        with _s3_errors(source):
            _s3_client().copy(
                {"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key, Config=_s3_transfer_config()
            )
        return
    with local_copy(source) as path:
        if is_remote(target):
            upload_file(path, target)
        else:
            _copy_local(path, target)


def _gcs_rewrite(source: str, target: str) -> None:
    """A server-side copy in gs://. rewrite, not copy_blob: a big object (or one crossing locations or
    storage classes) takes several calls, each returning a token to continue; the target appears whole
    when the last call completes."""
    src, dst = _blob(source), _blob(target)
    token, _, _ = dst.rewrite(src, retry=_retry())
    while token is not None:
        token, _, _ = dst.rewrite(src, token=token, retry=_retry())


def link_or_copy(source: str, target: str) -> None:
    """Put `source`'s bytes at `target` without copying them through this process: a hard link between
    local paths (a copy where one cannot be made: another device, a file system without links, a file
    the kernel will not link for this user), a server-side copy within gs:// and within s3://.

    The link is made under a temp name and renamed into place, so `target` is replaced whole. Both paths
    then share one file: only for files that are replaced, never changed in place (every write here
    renames a new file into place, which leaves the other path's file as it was)."""
    if is_remote(source) or is_remote(target):
        copy(source, target)
        return
    src, dest = Path(source), Path(target)
    if dest.exists() and os.path.samefile(src, dest):
        return  # already linked (renaming a link onto its own file would do nothing and keep the temp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # storage's temp naming (".{name}.{random}.tmp"): remove_interrupted_writes finds a killed link's.
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
    try:
        os.link(src, tmp)
    except FileNotFoundError:
        raise
    except OSError:  # EXDEV, EPERM (fs.protected_hardlinks), EMLINK, no links on this file system
        _copy_local(source, target)
        return
    try:
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
