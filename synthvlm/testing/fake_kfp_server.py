"""A loopback stand-in for the Kubeflow Pipelines v2 REST API (the endpoints kfp.Client 2.17 calls to
upload a pipeline, upload a version, find a pipeline and its versions, get-or-create an experiment
and start a run).

It answers in a background thread (stdlib ThreadingHTTPServer), keeps what was uploaded or created in
memory, and records every request (method, path, query, headers, raw body) so tests can assert on what
the client sent. Answers use the API server's JSON (snake_case field names, grpc-gateway errors
`{"code": <grpc code>, "message": ...}`). Filters support the EQUALS predicate kfp.Client sends;
anything else is a 400, so a client change that relies on more shows up in tests.

Knobs: `token` (every request must carry `Authorization: Bearer <token>`, else `auth_failure_status`),
`public_healthz` (healthz answers without a token, as the API server does behind a port-forward;
`auth_failure_status=302` redirects to a login page instead, as Kubeflow behind Dex does),
`multi_user` (what healthz reports; pipelines and experiments are then kept per namespace and
experiments need one).

    with FakeKFPServer() as server:
        upload_pipeline(server.host, "pipeline.yaml", "synthvlm")
        server.requests_to("POST", "/apis/v2beta1/pipelines/upload")[0].form_parts()

`python -m synthvlm.testing.fake_kfp_server --port 8888` serves until interrupted (to try the CLI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import yaml

from synthvlm.testing.loopback import JsonAnswer, LoopbackServer, RecordedRequest, json_server

API = "/apis/v2beta1"

# grpc status codes the API server puts in its error bodies.
_GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 501: 12}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


LOGIN_LOCATION = "/dex/auth?client_id=kubeflow-oidc-authservice&state=fake"


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., tuple[int, dict[str, Any]]]


@dataclass
class _Store:
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)  # by pipeline_id
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by pipeline_id
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by experiment_id
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # by run_id


class FakeKFPServer(LoopbackServer):
    def __init__(
        self,
        *,
        token: str | None = None,
        public_healthz: bool = False,
        multi_user: bool = False,
        auth_failure_status: int = 401,
    ):
        super().__init__()
        self.token = token
        self.public_healthz = public_healthz
        self.multi_user = multi_user
        self.auth_failure_status = auth_failure_status
        self.requests: list[RecordedRequest] = []
        self.store = _Store()
        self._last_time = dt.datetime.min.replace(tzinfo=dt.UTC)
        self._lock = threading.Lock()
        self._routes = [
            _Route("GET", re.compile(rf"{API}/healthz"), self._healthz),
            _Route("POST", re.compile(rf"{API}/pipelines/upload"), self._upload_pipeline),
            _Route("POST", re.compile(rf"{API}/pipelines/upload_version"), self._upload_version),
            _Route("GET", re.compile(rf"{API}/pipelines"), self._list_pipelines),
            _Route("GET", re.compile(rf"{API}/pipelines/(?P<pipeline_id>[^/]+)"), self._get_pipeline),
            _Route(
                "GET", re.compile(rf"{API}/pipelines/(?P<pipeline_id>[^/]+)/versions"), self._list_versions
            ),
            _Route("GET", re.compile(rf"{API}/experiments"), self._list_experiments),
            _Route("POST", re.compile(rf"{API}/experiments"), self._create_experiment),
            _Route("POST", re.compile(rf"{API}/runs"), self._create_run),
            _Route("GET", re.compile(rf"{API}/runs/(?P<run_id>[^/]+)"), self._get_run),
        ]

    # ---- control ------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The URL to give kfp.Client(host=...)."""
        return self.root_url

    def _bind(self, port: int) -> ThreadingHTTPServer:
        return json_server(port)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # ---- dispatch (handler threads) -------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> JsonAnswer:
        with self._lock:
            self.requests.append(request)
            try:
                self._check_auth(request)
                for route in self._routes:
                    match = route.pattern.fullmatch(request.path)
                    if match and route.method == request.method:
                        status, payload = route.handler(request, **match.groupdict())
                        return status, payload, {}
                raise ApiError(404, f"no route for {request.method} {request.path}")
            except ApiError as exc:
                code = _GRPC_CODES.get(exc.status, 2)
                return exc.status, {"code": code, "message": exc.message, "details": []}, exc.headers
            except Exception as exc:  # a bug here must reach the test as an answer, not a hung socket
                return 500, {"code": 13, "message": f"fake KFP server error: {exc!r}", "details": []}, {}

    def _check_auth(self, request: RecordedRequest) -> None:
        if self.token is None or (self.public_healthz and request.path == f"{API}/healthz"):
            return
        if request.headers.get("authorization") != f"Bearer {self.token}":
            redirect = 300 <= self.auth_failure_status < 400
            headers = {"Location": LOGIN_LOCATION} if redirect else None
            raise ApiError(
                self.auth_failure_status, "Unauthenticated: missing or invalid bearer token", headers
            )

    # ---- endpoints (called with the lock held) ---------------------------------------------------------

    def _healthz(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        return 200, {"commit_sha": "fake", "tag_name": "2.5.0-fake", "multi_user": self.multi_user}

    def _upload_pipeline(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        file_name, spec = self._uploaded_spec(request)
        name = request.param("name") or request.param("display_name") or _stem(file_name)
        namespace = self._namespace(request.param("namespace"))
        if any(
            p["display_name"] == name and p["namespace"] == namespace for p in self.store.pipelines.values()
        ):
            raise ApiError(409, f"Failed to create a pipeline: pipeline named {name!r} already exists")
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": request.param("description") or "",
            "created_at": self._now(),
            "namespace": namespace,
        }
        self.store.pipelines[pipeline["pipeline_id"]] = pipeline
        # The API server names the first version after the pipeline.
        self.store.versions[pipeline["pipeline_id"]] = [
            self._new_version(pipeline["pipeline_id"], name, spec)
        ]
        return 200, pipeline

    def _upload_version(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        file_name, spec = self._uploaded_spec(request)
        pipeline_id = request.param("pipelineid") or ""
        if pipeline_id not in self.store.pipelines:
            raise ApiError(404, f"Pipeline {pipeline_id!r} not found")
        name = request.param("name") or request.param("display_name") or _stem(file_name)
        versions = self.store.versions[pipeline_id]
        if any(v["display_name"] == name for v in versions):
            raise ApiError(409, f"Failed to create a pipeline version: version named {name!r} already exists")
        version = self._new_version(pipeline_id, name, spec, request.param("description") or "")
        versions.append(version)
        return 200, version

    def _list_pipelines(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        namespace = self._namespace(request.param("namespace"))
        pipelines = [p for p in self.store.pipelines.values() if p["namespace"] == namespace]
        return 200, _page(request, pipelines, "pipelines")

    def _get_pipeline(self, request: RecordedRequest, pipeline_id: str) -> tuple[int, dict[str, Any]]:
        if pipeline_id not in self.store.pipelines:
            raise ApiError(404, f"Pipeline {pipeline_id!r} not found")
        return 200, self.store.pipelines[pipeline_id]

    def _list_versions(self, request: RecordedRequest, pipeline_id: str) -> tuple[int, dict[str, Any]]:
        if pipeline_id not in self.store.pipelines:
            raise ApiError(404, f"Pipeline {pipeline_id!r} not found")
        return 200, _page(request, self.store.versions[pipeline_id], "pipeline_versions")

    def _list_experiments(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        namespace = self._namespace(request.param("namespace"))
        experiments = [e for e in self.store.experiments.values() if e["namespace"] == namespace]
        return 200, _page(request, experiments, "experiments")

    def _create_experiment(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        body = _json_body(request)
        name = body.get("display_name") or ""
        if not name:
            raise ApiError(400, "Invalid input error: experiment display_name is empty")
        namespace = self._namespace(body.get("namespace"))
        if self.multi_user and not namespace:
            raise ApiError(400, "Invalid input error: experiment namespace is empty")
        if any(
            e["display_name"] == name and e["namespace"] == namespace for e in self.store.experiments.values()
        ):
            raise ApiError(409, f"Failed to create an experiment: {name!r} already exists")
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description") or "",
            "created_at": self._now(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
        }
        self.store.experiments[experiment["experiment_id"]] = experiment
        return 200, experiment

    def _create_run(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        body = _json_body(request)
        experiment_id = body.get("experiment_id") or ""
        if experiment_id not in self.store.experiments:
            raise ApiError(404, f"Experiment {experiment_id!r} not found")
        reference = body.get("pipeline_version_reference") or {}
        if not body.get("pipeline_spec"):
            self._check_version_reference(reference)
        if not body.get("display_name"):
            raise ApiError(400, "Invalid input error: run display_name is empty")
        run = {
            **body,
            "run_id": str(uuid.uuid4()),
            "created_at": self._now(),
            "state": "PENDING",
            "storage_state": "AVAILABLE",
        }
        self.store.runs[run["run_id"]] = run
        return 200, run

    def _get_run(self, request: RecordedRequest, run_id: str) -> tuple[int, dict[str, Any]]:
        if run_id not in self.store.runs:
            raise ApiError(404, f"Run {run_id!r} not found")
        return 200, self.store.runs[run_id]

    # ---- helpers ----------------------------------------------------------------------------------------

    def _check_version_reference(self, reference: dict[str, Any]) -> None:
        pipeline_id, version_id = reference.get("pipeline_id"), reference.get("pipeline_version_id")
        if pipeline_id not in self.store.pipelines:
            raise ApiError(404, f"Pipeline {pipeline_id!r} not found")
        if not any(v["pipeline_version_id"] == version_id for v in self.store.versions[pipeline_id]):
            raise ApiError(404, f"Pipeline version {version_id!r} of pipeline {pipeline_id!r} not found")

    def _namespace(self, namespace: str | None) -> str:
        # A single-user deployment ignores namespaces; everything lives in "".
        return (namespace or "") if self.multi_user else ""

    def _uploaded_spec(self, request: RecordedRequest) -> tuple[str | None, dict[str, Any]]:
        parts = request.form_parts()
        if "uploadfile" not in parts:
            raise ApiError(400, "Failed to read the uploaded file: no 'uploadfile' form field")
        file_name, content = parts["uploadfile"]
        try:
            documents = [d for d in yaml.safe_load_all(content) if d is not None]
        except yaml.YAMLError as exc:
            raise ApiError(400, f"Invalid pipeline spec: {exc}") from None
        # A compiled pipeline is the pipeline spec, then optionally a platform spec (kfp-kubernetes).
        if not documents or not isinstance(documents[0], dict) or "pipelineInfo" not in documents[0]:
            raise ApiError(400, "Invalid pipeline spec: no pipelineInfo (not a compiled KFP v2 pipeline)")
        if len(documents) > 2 or (len(documents) == 2 and "platforms" not in documents[1]):
            raise ApiError(400, "Invalid pipeline spec: expected a pipeline spec and at most a platform spec")
        if len(documents) == 1:
            return file_name, documents[0]
        return file_name, {"pipeline_spec": documents[0], "platform_spec": documents[1]}

    def _new_version(self, pipeline_id: str, name: str, spec: dict[str, Any], description: str = ""):
        return {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": self._now(),
            "pipeline_spec": spec,
        }

    def _now(self) -> str:
        # Strictly increasing, so "created_at desc" puts the newest first even within one clock tick.
        now = max(dt.datetime.now(dt.UTC), self._last_time + dt.timedelta(microseconds=1))
        self._last_time = now
        return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- listing: filter, sort, page ---------------------------------------------------------------------

_EQUALS = (1, "EQUALS")


def _page(request: RecordedRequest, items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    predicates = _predicates(request.param("filter"))
    selected = [item for item in items if _matches(item, predicates)]
    selected = _sorted(selected, request.param("sort_by") or "")
    size = int(request.param("page_size") or 20)
    start = int(request.param("page_token") or 0)
    page = selected[start : start + size]
    out: dict[str, Any] = {"total_size": len(selected)}
    if page:  # grpc-gateway leaves out empty lists; kfp.Client then sees None
        out[key] = page
    if start + size < len(selected):
        out["next_page_token"] = str(start + size)
    return out


def _predicates(filter_json: str | None) -> list[dict[str, Any]]:
    if not filter_json:
        return []
    try:
        predicates = json.loads(filter_json).get("predicates", [])
    except (json.JSONDecodeError, AttributeError):
        raise ApiError(400, f"Invalid filter: {filter_json!r}") from None
    for predicate in predicates:
        if predicate.get("operation") not in _EQUALS:
            raise ApiError(501, f"fake KFP server: only EQUALS filters are implemented, got {predicate}")
    return predicates


def _matches(item: dict[str, Any], predicates: list[dict[str, Any]]) -> bool:
    # filter.proto accepts the JSON name (stringValue) and the proto name (string_value).
    return all(item.get(p.get("key")) == p.get("string_value", p.get("stringValue")) for p in predicates)


def _sorted(items: list[dict[str, Any]], sort_by: str) -> list[dict[str, Any]]:
    if not sort_by:
        return list(items)
    field_name, _, order = sort_by.partition(" ")
    if order not in ("", "desc", "asc"):
        raise ApiError(400, f"Invalid sort_by: {sort_by!r}")
    return sorted(items, key=lambda item: str(item.get(field_name, "")), reverse=order == "desc")


# ---- HTTP plumbing -----------------------------------------------------------------------------------


def _json_body(request: RecordedRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _stem(file_name: str | None) -> str:
    base = (file_name or "pipeline").rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="serve a fake KFP v2 REST API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--token", help="require this bearer token")
    parser.add_argument("--multi-user", action="store_true")
    args = parser.parse_args(argv)
    server = FakeKFPServer(token=args.token, multi_user=args.multi_user).start(args.port)
    print(f"fake KFP API at {server.host} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
