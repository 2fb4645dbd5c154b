"""upload_pipeline / submit_run through the real kfp.Client against a loopback KFP v2 REST server."""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from pathlib import Path

import kfp
import pytest

from synthvlm.kfp_client import (
    COOKIES_ENV,
    TOKEN_ENV,
    TOKEN_PATH_ENV,
    KFPAuth,
    KFPAuthError,
    KFPError,
    KFPNotFoundError,
    KFPUnreachableError,
    submit_run,
    upload_pipeline,
)
from synthvlm.kfp_support import compile_all
from synthvlm.run_config import SynthVLMRunConfig, to_pipeline_arguments
from synthvlm.testing.fake_kfp_server import FakeKFPServer

API = "/apis/v2beta1"
SECRET = "kfp-token-7d41e9-do-not-leak"


@pytest.fixture(autouse=True)
def isolated_kfp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, endpoints or kfp context of the machine running the tests."""
    for name in (
        TOKEN_ENV,
        TOKEN_PATH_ENV,
        COOKIES_ENV,
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_UI_ENDPOINT",
        "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real synthvlm pipeline, compiled."""
    return compile_all(str(tmp_path_factory.mktemp("compiled")), ["synthvlm"])[0]


@pytest.fixture
def server():
    with FakeKFPServer() as fake:
        yield fake


@pytest.fixture
def arguments() -> dict:
    return to_pipeline_arguments(SynthVLMRunConfig(data_root="gs://bucket/run-1", num_shards=4))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- upload


def test_first_upload_creates_the_pipeline_with_the_yaml_and_name(server, package, capsys):
    result = upload_pipeline(server.host, package, "synthvlm")

    (request,) = server.requests_to("POST", f"{API}/pipelines/upload")
    assert request.param("name") == "synthvlm"
    file_name, content = request.form_parts()["uploadfile"]
    assert file_name == "synthvlm.yaml"
    assert content == Path(package).read_bytes()
    assert b"pipelineInfo" in content

    (pipeline,) = server.store.pipelines.values()
    (version,) = server.store.versions[pipeline["pipeline_id"]]
    assert result["new_pipeline"] is True
    assert result["pipeline_id"] == pipeline["pipeline_id"]
    assert result["version_id"] == version["pipeline_version_id"]
    assert result["url"] == (
        f"{server.host}/#/pipelines/details/{pipeline['pipeline_id']}/version/{version['pipeline_version_id']}"
    )
    assert capsys.readouterr().out == ""  # kfp.Client's own "Pipeline details: ..." prints are swallowed


def test_upload_again_adds_a_version_named_by_time_and_content(server, package):
    first = upload_pipeline(server.host, package, "synthvlm")
    second = upload_pipeline(server.host, package, "synthvlm")
    third = upload_pipeline(server.host, package, "synthvlm", version="v3")

    assert second["new_pipeline"] is False and third["new_pipeline"] is False
    assert first["pipeline_id"] == second["pipeline_id"] == third["pipeline_id"]
    assert len(server.store.pipelines) == 1
    assert len({first["version_id"], second["version_id"], third["version_id"]}) == 3
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:8]
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-{digest}", second["version_name"])
    assert third["version_name"] == "v3"

    uploads = server.requests_to("POST", f"{API}/pipelines/upload_version")
    assert [r.param("name") for r in uploads] == [second["version_name"], "v3"]
    assert all(r.param("pipelineid") == first["pipeline_id"] for r in uploads)
    assert all(r.form_parts()["uploadfile"][1] == Path(package).read_bytes() for r in uploads)
    assert len(server.requests_to("POST", f"{API}/pipelines/upload")) == 1


def test_upload_of_a_missing_package_says_to_compile(server, tmp_path):
    with pytest.raises(KFPError, match="not found; compile it first"):
        upload_pipeline(server.host, str(tmp_path / "nope.yaml"), "synthvlm")
    assert server.requests == []


# ---------------------------------------------------------------- submit


def test_submit_runs_the_newest_version_with_the_arguments(server, package, arguments, capsys):
    upload_pipeline(server.host, package, "synthvlm")
    newest = upload_pipeline(server.host, package, "synthvlm", version="v2")

    first = submit_run(server.host, "synthvlm", arguments, run_name="run one")
    second = submit_run(server.host, "synthvlm", arguments)

    bodies = [r.json() for r in server.requests_to("POST", f"{API}/runs")]
    assert len(bodies) == 2
    for body in bodies:
        assert body["runtime_config"]["parameters"] == arguments
        assert body["pipeline_version_reference"] == {
            "pipeline_id": newest["pipeline_id"],
            "pipeline_version_id": newest["version_id"],
        }
    assert bodies[0]["display_name"] == "run one"
    assert bodies[1]["display_name"].startswith("synthvlm ")

    (experiment_request,) = server.requests_to("POST", f"{API}/experiments")  # created once, then reused
    assert experiment_request.json()["display_name"] == "synthvlm"
    (experiment,) = server.store.experiments.values()
    assert all(body["experiment_id"] == experiment["experiment_id"] for body in bodies)

    assert first["run_id"] in server.store.runs and second["run_id"] in server.store.runs
    assert first["version_id"] == newest["version_id"] and first["version_name"] == "v2"
    assert first["url"] == f"{server.host}/#/runs/details/{first['run_id']}"
    assert capsys.readouterr().out == ""


def test_submit_a_named_version_and_experiment(server, package, arguments):
    old = upload_pipeline(server.host, package, "synthvlm")  # first version: named after the pipeline
    upload_pipeline(server.host, package, "synthvlm", version="v2")

    result = submit_run(server.host, "synthvlm", arguments, experiment="ablations", version="synthvlm")

    body = server.requests_to("POST", f"{API}/runs")[0].json()
    assert body["pipeline_version_reference"]["pipeline_version_id"] == old["version_id"]
    assert result["version_id"] == old["version_id"]
    assert [e["display_name"] for e in server.store.experiments.values()] == ["ablations"]


def test_submit_an_unknown_version_lists_the_newest(server, package, arguments, caplog):
    upload_pipeline(server.host, package, "synthvlm", version="ignored-for-a-new-pipeline")
    assert "'ignored-for-a-new-pipeline' not used" in caplog.text
    upload_pipeline(server.host, package, "synthvlm", version="v2")
    with pytest.raises(KFPNotFoundError, match=r"no version 'v9'; newest versions: 'v2', 'synthvlm'"):
        submit_run(server.host, "synthvlm", arguments, version="v9")
    assert server.requests_to("POST", f"{API}/runs") == []


def test_submit_an_unknown_pipeline_says_to_upload(server, arguments):
    with pytest.raises(KFPNotFoundError) as caught:
        submit_run(server.host, "synthvlm", arguments)
    message = str(caught.value)
    assert "no pipeline named 'synthvlm'" in message
    assert server.host in message
    assert f"synthvlm upload --host {server.host}" in message
    assert server.requests_to("POST", f"{API}/experiments") == []


def test_multi_user_needs_a_namespace_and_uses_it(package, arguments):
    with FakeKFPServer(multi_user=True) as server:
        upload_pipeline(server.host, package, "synthvlm", namespace="team-a")
        with pytest.raises(KFPError, match="multi-user.*--namespace"):
            submit_run(server.host, "synthvlm", arguments)

        result = submit_run(server.host, "synthvlm", arguments, namespace="team-a")

        assert server.requests_to("POST", f"{API}/pipelines/upload")[0].param("namespace") == "team-a"
        assert server.requests_to("POST", f"{API}/experiments")[0].json()["namespace"] == "team-a"
        assert result["run_id"] in server.store.runs
        with pytest.raises(KFPNotFoundError, match="in namespace 'team-b'"):
            submit_run(server.host, "synthvlm", arguments, namespace="team-b")


# ---------------------------------------------------------------- errors


def test_unreachable_host_fails_at_once_with_what_to_do(package):
    host = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(KFPUnreachableError) as caught:
        upload_pipeline(host, package, "synthvlm", timeout_s=2)
    message = str(caught.value)
    assert f"cannot reach Kubeflow Pipelines at {host}" in message
    assert "refused" in message.lower()
    assert "port-forward" in message

    with pytest.raises(KFPUnreachableError) as caught:  # a user:password in the URL is never shown
        upload_pipeline(host.replace("//", "//alice:pw-9f3e@"), package, "synthvlm", timeout_s=2)
    assert "pw-9f3e" not in str(caught.value) and "***@127.0.0.1" in str(caught.value)


def test_host_without_scheme_is_refused_before_any_request(package):
    with pytest.raises(KFPError, match="http:// or https://"):
        upload_pipeline("localhost:8080", package, "synthvlm")


@pytest.mark.parametrize("public_healthz", [False, True], ids=["behind-proxy", "api-server"])
def test_missing_token_is_a_clear_unauthenticated_error(package, public_healthz):
    with FakeKFPServer(token=SECRET, public_healthz=public_healthz) as server:
        with pytest.raises(KFPAuthError) as caught:
            upload_pipeline(server.host, package, "synthvlm")
        message = str(caught.value)
        assert server.host in message and "401" in message
        assert "sent no credentials" in message
        assert TOKEN_ENV in message and TOKEN_PATH_ENV in message
        assert server.store.pipelines == {}


def test_wrong_token_is_refused_and_never_shown(package, caplog, capsys):
    wrong = "wrong-token-3b9a-do-not-leak"
    server = FakeKFPServer(token=SECRET, public_healthz=True, auth_failure_status=403)
    with server, caplog.at_level(logging.DEBUG), pytest.raises(KFPAuthError) as caught:
        upload_pipeline(server.host, package, "synthvlm", auth=KFPAuth(token=wrong))
    message = str(caught.value)
    assert "403" in message and "sent a bearer token" in message
    captured = capsys.readouterr()
    for text in (message, caplog.text, captured.out, captured.err, repr(KFPAuth(token=wrong))):
        assert wrong not in text


def test_token_from_env_is_sent_as_bearer(package, arguments, monkeypatch, caplog, capsys):
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    with FakeKFPServer(token=SECRET) as server, caplog.at_level(logging.DEBUG):
        upload_pipeline(server.host, package, "synthvlm")
        submit_run(server.host, "synthvlm", arguments)
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err


def test_token_file_is_read_per_request_and_a_missing_one_is_named(package, monkeypatch, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    monkeypatch.setenv(TOKEN_PATH_ENV, str(token_file))
    with FakeKFPServer(token=SECRET) as server:
        upload_pipeline(server.host, package, "synthvlm")
        assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {SECRET}"}

        monkeypatch.setenv(TOKEN_PATH_ENV, str(tmp_path / "missing"))
        with pytest.raises(KFPAuthError, match=f"cannot read the token file {tmp_path / 'missing'}"):
            upload_pipeline(server.host, package, "synthvlm")


def test_cookies_from_env_are_sent(server, package, monkeypatch):
    monkeypatch.setenv(COOKIES_ENV, "oauth2_proxy_kubeflow=abc123")
    upload_pipeline(server.host, package, "synthvlm")
    assert {r.headers.get("cookie") for r in server.requests} == {"oauth2_proxy_kubeflow=abc123"}


def test_redirect_to_a_login_page_is_an_unauthenticated_error(package):
    server = FakeKFPServer(token=SECRET, auth_failure_status=302)
    with server, pytest.raises(KFPAuthError, match="redirected to /dex/auth .*wants a login") as caught:
        upload_pipeline(server.host, package, "synthvlm")
    assert "state=" not in str(caught.value)  # the login URL's query is left out


@pytest.mark.filterwarnings("ignore::FutureWarning")  # kfp.Client's "only works with KFP >= 2.0.0-beta.2"
def test_fake_server_refuses_filters_it_does_not_implement(server):
    client = kfp.Client(host=server.host)
    with pytest.raises(kfp.client.client.kfp_server_api.ApiException) as caught:
        client.list_pipelines(filter='{"predicates": [{"operation": "IS_SUBSTRING", "key": "display_name"}]}')
    assert caught.value.status == 501


def test_a_version_name_taken_is_a_clear_conflict(server, package):
    upload_pipeline(server.host, package, "synthvlm")
    upload_pipeline(server.host, package, "synthvlm", version="v2")
    with pytest.raises(KFPError, match="uploading version 'v2' .*409 Conflict.*choose another name"):
        upload_pipeline(server.host, package, "synthvlm", version="v2")
