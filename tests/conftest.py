"""Shared fixtures. Tests never touch a model hub or the network (only loopback servers they start)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run tiny models: OpenMP threads across a busy 2-core runner spin more than they help (measured
# 2-3x slower). Subprocesses (local pipeline runs, kill/resume tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gcs_emulator():
    """An in-process GCS emulator on loopback with bucket 'test-bucket'; yields 'gs://test-bucket'."""
    from gcp_storage_emulator.server import create_server

    from synthvlm import storage

    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="test-bucket")
    server.start()
    port = server._api._httpd.server_port  # the emulator has no public accessor for an ephemeral port
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    storage.reset_client()
    try:
        yield "gs://test-bucket"
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        storage.reset_client()


@pytest.fixture(scope="session")
def s3_server():
    """An in-process S3 (moto) on loopback with bucket 'test-bucket', reached through AWS_ENDPOINT_URL and
    dummy AWS_* credentials (subprocesses inherit them); yields 's3://test-bucket'."""
    from moto.server import ThreadedMotoServer

    from synthvlm import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,  # nothing from the developer's ~/.aws
    }
    unset = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE")
    old = {name: os.environ.get(name) for name in (*env, *unset)}
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(env)
    storage.reset_client()
    storage._s3_client().create_bucket(Bucket="test-bucket")
    try:
        yield "s3://test-bucket"
    finally:
        server.stop()
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.reset_client()


@pytest.fixture
def no_gcp_credentials(tmp_path, monkeypatch):
    """No credentials anywhere google.auth looks, and no wait on a GCE metadata server (no network)."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud ADC file
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # refused at once if it is asked anyway
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    from synthvlm import storage

    storage.reset_client()
    yield
    storage.reset_client()  # the next test builds its client from its own environment
