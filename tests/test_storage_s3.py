"""s3:// storage against moto's S3 server on loopback: every storage function, atomic writes, clear errors,
the stage runner's versions/markers/publishing, a CLI stage run and a local pipeline run on s3://."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import CredentialsError, InputError, S3CredentialsError, SynthVLMError
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, done_uri

REPO = Path(__file__).resolve().parents[1]
SYNTHVLM = [sys.executable, "-m", "synthvlm.cli"]
MIB = 1 << 20


@pytest.fixture
def s3(s3_server: str, request) -> str:
    """A fresh prefix per test under the session's bucket."""
    return storage.join(s3_server, request.node.name.replace("[", "-").rstrip("]"))


def _client():
    return storage._s3_client()


def test_round_trip_listing_copy_and_delete(s3: str, tmp_path: Path) -> None:
    uri = storage.join(s3, "images", "x.jpg")
    storage.write_bytes(uri, b"jpeg bytes", content_type="image/jpeg")
    assert storage.exists(uri) and storage.is_remote(uri)
    assert storage.read_bytes(uri) == b"jpeg bytes"
    bucket, key = storage.split_s3(uri)
    assert _client().head_object(Bucket=bucket, Key=key)["ContentType"] == "image/jpeg"
    storage.write_text(storage.join(s3, "note.txt"), "héllo")
    assert storage.read_text(storage.join(s3, "note.txt")) == "héllo"

    local = tmp_path / "m.jsonl"
    local.write_text('{"a": 1}\n')
    storage.upload_file(str(local), storage.join(s3, "m.jsonl"), content_type="application/jsonl")
    with storage.local_copy(storage.join(s3, "m.jsonl")) as path:
        assert path.endswith(".jsonl") and Path(path).read_text() == '{"a": 1}\n'
    assert not Path(path).exists()  # the download is cleaned up
    with storage.local_copy(str(local)) as path:
        assert path == str(local)  # local paths are used in place

    storage.copy(storage.join(s3, "m.jsonl"), storage.join(s3, "copies", "m.jsonl"))  # server-side
    storage.copy(storage.join(s3, "note.txt"), str(tmp_path / "down" / "note.txt"))  # s3 -> local
    storage.copy(str(local), storage.join(s3, "copies", "up.jsonl"))  # local -> s3
    assert (tmp_path / "down" / "note.txt").read_text() == "héllo"
    assert storage.read_bytes(storage.join(s3, "copies", "up.jsonl")) == local.read_bytes()

    assert storage.list_uris(s3) == [
        f"{s3}/copies/m.jsonl",
        f"{s3}/copies/up.jsonl",
        f"{s3}/images/x.jpg",
        f"{s3}/m.jsonl",
        f"{s3}/note.txt",
    ]
    assert storage.list_uris(s3 + "/", suffix=".jsonl") == [
        f"{s3}/copies/m.jsonl",
        f"{s3}/copies/up.jsonl",
        f"{s3}/m.jsonl",
    ]
    assert storage.list_uris(storage.join(s3, "images", "x")) == []  # a folder prefix, not a name prefix
    assert storage.list_uris(storage.join(s3, "nothing-here")) == []
    assert storage.remove_interrupted_writes(s3) == []  # object uploads leave no temp files

    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is gone is not an error
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError), storage.local_copy(uri):
        pass


def test_many_objects_are_listed_across_pages(s3: str) -> None:
    for i in range(1005):  # list_objects_v2 pages hold 1000 keys
        _client().put_object(Bucket="test-bucket", Key=f"{storage.split_s3(s3)[1]}/k/{i:04d}.json", Body=b"")
    uris = storage.list_uris(storage.join(s3, "k"), suffix=".json")
    assert len(uris) == 1005 and uris[0].endswith("/k/0000.json") and uris[-1].endswith("/k/1004.json")


def test_uris_and_client_settings(s3_server: str) -> None:
    assert storage.split_s3("s3://b/x/y.txt") == ("b", "x/y.txt")
    assert storage.split_remote("s3://b/x") == ("b", "x") and storage.split_remote("gs://g/y") == ("g", "y")
    assert storage.join("s3://b/", "/x/", "y") == "s3://b/x/y"
    with pytest.raises(InputError, match="s3:///nobucket: not an s3:// URI with a bucket name"):
        storage.split_s3("s3:///nobucket")
    client = _client()
    assert client.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]  # botocore read it itself
    assert client.meta.config.s3["addressing_style"] == "path"  # MinIO service names: no bucket DNS
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.request_checksum_calculation == "when_required"


def test_a_failed_put_leaves_the_old_object(s3: str) -> None:
    uri = storage.join(s3, "out.txt")
    storage.write_text(uri, "complete v1")

    def drop(**_kwargs):
        raise ConnectionAbortedError("connection dropped mid-upload")

    _client().meta.events.register("before-send.s3.PutObject", drop)
    try:
        with pytest.raises(ConnectionAbortedError):
            storage.write_text(uri, "v2 that never lands")
        with pytest.raises(ConnectionAbortedError):
            storage.write_text(storage.join(s3, "new.txt"), "never lands")
    finally:
        _client().meta.events.unregister("before-send.s3.PutObject", drop)
    assert storage.read_text(uri) == "complete v1"
    assert storage.list_uris(s3) == [uri]


@pytest.fixture
def small_parts(monkeypatch):
    """Multipart uploads from 5 MiB (S3's smallest part) so a test file of a few MiB has several parts."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=1)
    monkeypatch.setattr(storage, "_s3_transfer_config", lambda: config)


def test_a_big_upload_is_multipart_and_a_failed_part_leaves_nothing_visible(
    s3: str, tmp_path: Path, small_parts
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MIB))
    uri = storage.join(s3, "ckpt", "model.safetensors")
    storage.upload_file(str(big), uri)
    bucket, key = storage.split_s3(uri)
    assert "-3" in _client().head_object(Bucket=bucket, Key=key)["ETag"]  # three parts
    with storage.local_copy(uri) as path:
        assert Path(path).read_bytes() == big.read_bytes()

    parts = []

    def fail_second_part(**_kwargs):
        parts.append(1)
        if len(parts) == 2:
            raise ConnectionAbortedError("connection dropped mid-upload")

    _client().meta.events.register("before-send.s3.UploadPart", fail_second_part)
    try:
        with pytest.raises(ConnectionAbortedError):
            storage.upload_file(str(big), storage.join(s3, "ckpt", "other.safetensors"))
    finally:
        _client().meta.events.unregister("before-send.s3.UploadPart", fail_second_part)
    assert storage.list_uris(s3) == [uri]
    # s3transfer aborted the multipart upload: no parts are left behind either.
    assert not _client().list_multipart_uploads(Bucket=bucket, Prefix=key.rpartition("/")[0]).get("Uploads")


KILLED_WRITER = """
import sys, time
from boto3.s3.transfer import TransferConfig
from synthvlm import storage
storage._s3_transfer_config = lambda: TransferConfig(
    multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1
)
def stall(**kwargs):
    if kwargs["params"]["PartNumber"] == 2:
        print("part 1 sent", flush=True)
        time.sleep(600)
storage._s3_client().meta.events.register("provide-client-params.s3.UploadPart", stall)
storage.upload_file(sys.argv[1], sys.argv[2])
"""


def test_a_killed_upload_leaves_nothing_visible(s3: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MIB))
    uri = storage.join(s3, "killed.bin")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(big), uri], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout.readline().strip() == "part 1 sent"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not storage.exists(uri) and storage.list_uris(s3) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    # Its first part is stored, as an unfinished upload only (a bucket lifecycle rule expires those).
    bucket, key = storage.split_s3(uri)
    assert [u["Key"] for u in _client().list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]] == [key]


def test_missing_bucket_names_the_uri(s3_server: str) -> None:
    uri = "s3://no-such-bucket/run/captions.jsonl"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    for call in (storage.read_bytes, lambda u: storage.write_text(u, "x"), storage.list_uris):
        with pytest.raises(InputError, match=f"s3://no-such-bucket: no such bucket at {endpoint}"):
            call(uri)
    assert not storage.exists(uri)  # HEAD cannot tell a missing bucket from a missing object


def test_missing_credentials_say_how_to_provide_them(s3_server: str, tmp_path: Path, monkeypatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait on an instance metadata service
    storage.reset_client()
    try:
        with pytest.raises(S3CredentialsError) as exc:
            storage.exists("s3://test-bucket/caps.jsonl")
        msg = str(exc.value)
        assert (
            f"cannot access s3://test-bucket at {os.environ['AWS_ENDPOINT_URL']}: no AWS credentials" in msg
        )
        assert "AWS_ACCESS_KEY_ID" in msg and "mlpipeline-minio-artifact" in msg
        assert isinstance(exc.value, CredentialsError) and isinstance(exc.value, SynthVLMError)
        with pytest.raises(S3CredentialsError, match="cannot access s3://test-bucket"):
            storage.list_uris("s3://test-bucket/runs")
    finally:
        monkeypatch.undo()
        storage.reset_client()


def test_refused_credentials_say_so(s3_server: str) -> None:
    from botocore.stub import Stubber

    with Stubber(_client()) as stub:
        stub.add_client_error("get_object", "InvalidAccessKeyId", "The key does not exist", 403)
        stub.add_client_error("head_object", "403", "Forbidden", 403)
        with pytest.raises(
            S3CredentialsError, match="cannot access s3://b at .*: the credentials were refused"
        ):
            storage.read_bytes("s3://b/x")
        with pytest.raises(S3CredentialsError, match="the credentials were refused"):
            storage.exists("s3://b/x")


@pytest.mark.parametrize(
    ("image_uri", "data_root", "expected"),
    [
        ("s3://b/run/images/a.jpg", "s3://b/run", "images/a.jpg"),
        ("s3://b/run/images/a.jpg", "s3://b/run/", "images/a.jpg"),
        ("s3://b/run/../a.jpg", "s3://b/run", None),  # object names are literal, never a way out
        ("s3://other/run/a.jpg", "s3://b/run", None),
        ("gs://b/run/a.jpg", "s3://b/run", None),
        ("s3://b/run/a.jpg", "gs://b/run", None),
        ("/data/run/a.jpg", "s3://b/run", None),
        ("s3://b/run/a.jpg", "/data/run", None),
    ],
)
def test_relative_image_path_on_s3(image_uri: str, data_root: str, expected: str | None) -> None:
    from synthvlm.llava_format import relative_image_path

    assert relative_image_path(image_uri, data_root) == expected


# --- the stage runner on s3:// ----------------------------------------------------------------------


class CountConfig(StageConfig):
    factor: int = 2


CALLS: list[str] = []


def _double(config: CountConfig, run: StageRun) -> StageStats:
    CALLS.append(run.fingerprint)
    numbers = [int(x) for x in storage.read_text(run.inputs["numbers"]).split()]
    storage.write_text(run.output, " ".join(str(n * config.factor) for n in numbers))
    storage.write_text(storage.join(run.dir, "side.txt"), f"made with factor {config.factor}")
    return StageStats("double", count_in=len(numbers), count_out=len(numbers))


DOUBLE = Stage(name="double", process=_double, sidecars=("side.txt",))


def test_runner_versions_markers_and_stable_copy(s3: str) -> None:
    CALLS.clear()
    src, out = storage.join(s3, "numbers.txt"), storage.join(s3, "out", "doubled.txt")
    storage.write_text(src, "1 2 3")
    first = run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out)
    assert first.startswith(f"{s3}/out/double-") and storage.exists(done_uri(first))
    assert run_stage(DOUBLE, CountConfig(factor=2), {"numbers": src}, out) == first and len(CALLS) == 1

    second = run_stage(DOUBLE, CountConfig(factor=3), {"numbers": src}, out)
    assert second != first and len(CALLS) == 2
    assert storage.read_text(first) == "2 4 6"  # the first version is still readable
    assert storage.read_text(out) == "3 6 9"  # the stable path holds the latest complete version
    assert storage.read_text(storage.join(s3, "out", "side.txt")) == "made with factor 3"
    marker = json.loads(storage.read_text(done_uri(out)))
    assert marker["published_from"] == second and marker["settings"] == {"factor": 3}

    storage.write_text(src, "1 x")  # a failing run publishes nothing and keeps the old version
    with pytest.raises(ValueError):
        run_stage(DOUBLE, CountConfig(factor=3), {"numbers": src}, out)
    assert storage.read_text(out) == "3 6 9"
    assert json.loads(storage.read_text(done_uri(out)))["published_from"] == second


def _shards(config: CountConfig, run: StageRun) -> StageStats:
    """One "shard" per number: how many is known only once the stage ran."""
    numbers = storage.read_text(run.inputs["numbers"]).split()
    for i, n in enumerate(numbers):
        storage.write_bytes(storage.join(run.dir, "webdataset", f"s-{i:06d}.tar"), n.encode() * config.factor)
    storage.write_text(run.output, str(len(numbers)))
    return StageStats("shards", count_in=len(numbers), count_out=len(numbers))


SHARDS = Stage(name="shards", process=_shards, sidecars=("webdataset/*.tar",))


def test_glob_sidecars_are_published_by_server_side_copy(s3: str) -> None:
    src, out = storage.join(s3, "numbers.txt"), storage.join(s3, "export", "count.txt")
    storage.write_text(src, "1 2 3")
    requests: list[tuple[str, str]] = []

    def record(model, params, **_kwargs) -> None:
        requests.append((model.name, params.get("Key", "")))

    _client().meta.events.register("provide-client-params.s3.*", record)
    try:
        first = run_stage(SHARDS, CountConfig(factor=2), {"numbers": src}, out)
        stable = storage.join(s3, "export", "webdataset")
        assert storage.list_uris(stable) == [f"{stable}/s-{i:06d}.tar" for i in range(3)]
        # Copied by the store itself: the shards were written (PUT) and copied, never read back.
        copied = sorted(key.rpartition("/")[2] for op, key in requests if op == "CopyObject")
        assert copied == ["count.txt", "s-000000.tar", "s-000001.tar", "s-000002.tar"]
        assert not [key for op, key in requests if op == "GetObject" and key.endswith(".tar")]
        assert storage.read_bytes(f"{stable}/s-000002.tar") == b"33"

        storage.write_text(src, "4 5")  # fewer shards: the third one of the first version is deleted
        second = run_stage(SHARDS, CountConfig(factor=2), {"numbers": src}, out)
    finally:
        _client().meta.events.unregister("provide-client-params.s3.*", record)
    assert storage.list_uris(stable) == [f"{stable}/s-000000.tar", f"{stable}/s-000001.tar"]
    assert storage.read_bytes(f"{stable}/s-000001.tar") == b"55"
    assert storage.read_bytes(storage.join(first.rpartition("/")[0], "webdataset", "s-000002.tar")) == b"33"
    assert json.loads(storage.read_text(done_uri(out)))["published_from"] == second


def test_a_big_server_side_copy_is_multipart(s3: str, small_parts) -> None:
    source, target = storage.join(s3, "v", "big.tar"), storage.join(s3, "big.tar")
    data = os.urandom(11 * MIB)
    storage.write_bytes(source, data)
    parts: list[int] = []

    def count(params, **_kwargs) -> None:
        parts.append(params["PartNumber"])

    _client().meta.events.register("provide-client-params.s3.UploadPartCopy", count)
    try:
        storage.link_or_copy(source, target)
    finally:
        _client().meta.events.unregister("provide-client-params.s3.UploadPartCopy", count)
    assert sorted(parts) == [1, 2, 3] and storage.read_bytes(target) == data


# --- commands and pipelines on s3:// ---------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the s3_server fixture's AWS_* variables are inherited
    return subprocess.run([*SYNTHVLM, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_cli_stage_writes_to_s3_and_skips_an_unchanged_rerun(s3: str) -> None:
    folder = storage.join(s3, "captions")
    out = storage.join(folder, "captions.jsonl")
    args = ("captions", "--preset", "demo", "--set", "max_records=4", "--output", folder)
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    published = proc.stdout.strip().splitlines()[-1]
    assert published.startswith(f"{s3}/captions/captions-")
    assert len(storage.read_text(out).splitlines()) == 4 and storage.exists(done_uri(out))
    assert storage.exists(done_uri(published))
    again = _cli(*args)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == published
    assert "unchanged" in again.stdout + again.stderr


def test_cli_names_a_missing_bucket_and_a_uri_without_one(s3_server: str) -> None:
    proc = _cli("captions", "--preset", "demo", "--output", "s3://no-such-bucket/run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "s3://no-such-bucket: no such bucket at http://127.0.0.1:" in proc.stderr
    proc = _cli("captions", "--preset", "demo", "--output", "s3:///run")
    assert proc.returncode == 2 and "not an s3:// URI with a bucket name" in proc.stderr


SMALL = ("max_captions=6", "select.k=3", "generate.steps=2", "generate.height=64", "generate.width=64")


@pytest.mark.slow
def test_local_pipeline_run_with_an_s3_data_root(s3: str) -> None:
    cmd = ["run", "synthvlm", "--local", "--preset", "demo", "--output", s3]
    for item in SMALL:
        cmd += ["--set", item]
    start = time.monotonic()
    proc = _cli(*cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dataset = json.loads(storage.read_text(storage.join(s3, "export", "llava_pretrain.json")))
    assert len(dataset) == 3
    for sample in dataset:
        assert storage.exists(storage.join(s3, sample["image"]))  # image paths relative to the s3 root
    assert storage.exists(done_uri(storage.join(s3, "report.html")))
    assert f"{s3}/report.html" in proc.stdout
    assert not any("kfp-local" in uri for uri in storage.list_uris(s3))  # kfp.local's files stay local
    print(f"s3 pipeline run: {time.monotonic() - start:.0f}s")


def test_iter_lines_reads_s3_in_ranges(s3: str, monkeypatch) -> None:
    lines = [
        json.dumps({"id": f"r{i}", "caption": "é" * (i % 5)}, ensure_ascii=False) + "\n" for i in range(40)
    ]
    uri = storage.join(s3, "lines", "m.jsonl")
    storage.write_text(uri, "".join(lines))
    monkeypatch.setattr(storage, "local_copy", None)  # never downloaded whole
    assert list(storage.iter_lines(uri, chunk_bytes=13)) == lines


@pytest.mark.slow
def test_sharded_curation_with_an_s3_data_root_equals_the_local_one(s3: str, tmp_path: Path) -> None:
    """The merge streams every remote shard at once, in ranges: same bytes as a local run."""
    from synthvlm.curation.sharded import curate_sharded
    from synthvlm.records import Record, write_manifest
    from synthvlm.stages.curate import CurateConfig

    words = ["red", "boat", "calm", "river", "small", "wooden", "house", "old", "tree", "city", "night"]
    records = [
        Record(
            id=f"c{i:03d}", caption="A " + " ".join(words[(i * 7 + j) % 11] for j in range(9 + i % 4)) + "."
        )
        for i in range(60)
    ]
    records += [r.model_copy(update={"id": r.id + "-copy"}) for r in records[:10]]  # exact duplicates
    cfg = CurateConfig.model_validate({"judge": {"enabled": False}, "sample_size": 5})
    local_source = tmp_path / "in.jsonl"
    write_manifest(str(local_source), records)
    remote_source = storage.join(s3, "curate", "in.jsonl")
    storage.upload_file(str(local_source), remote_source)
    here = curate_sharded(cfg, str(local_source), str(tmp_path / "out" / "curated.jsonl"), shards=3)
    there = curate_sharded(cfg, remote_source, storage.join(s3, "curate", "out", "curated.jsonl"), shards=3)
    assert storage.read_bytes(there) == Path(here).read_bytes()
    rejects = storage.read_bytes(there.rpartition("/")[0] + "/rejects.jsonl")
    assert rejects == (Path(here).parent / "rejects.jsonl").read_bytes()
    assert b"exact_duplicate" in rejects and b"not_sampled" in rejects
