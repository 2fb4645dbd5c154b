"""A loopback stand-in for the slice of the Kubernetes API that multi-node training uses: what the
`kubeflow` SDK's TrainerClient (Kubeflow Trainer v2) calls, and training-operator v1 PyTorchJobs through
the kubernetes client's CustomObjectsApi.

Served (JSON, Kubernetes `Status` bodies for errors):
- GET /api/v1/namespaces/{ns}/configmaps/{name}: `configmaps`, by default Trainer's public version
  ConfigMap (kubeflow-system/kubeflow-trainer-public) that TrainerClient reads when it starts;
- GET (get, list) of ClusterTrainingRuntimes: `runtimes`, by default a torch-distributed runtime like
  Trainer's manifest; namespaced TrainingRuntimes: none (404 / an empty list), so the SDK falls back to
  the cluster-scoped one as it does on a real cluster;
- POST, GET (get, list), DELETE of trainjobs (trainer.kubeflow.org/v1alpha1) and pytorchjobs
  (kubeflow.org/v1). A create is checked as the API server and Trainer's webhook would: kind, a DNS-1035
  name, the namespace, 409 AlreadyExists, the runtime reference, and no reserved PET_* variables;
- GET /api/v1/namespaces/{ns}/pods?labelSelector=jobset.sigs.k8s.io/jobset-name=<job>,...: a TrainJob's
  node pods (labels, container "node" with the job's resources and the PET_* variables Trainer's torch
  plugin sets, phase following the job).

Each job moves through `phases` (default Created -> Running -> Complete), one phase per GET of the job,
so tests advance it by polling and never depend on time. A TrainJob reports Running through its pods
(the SDK's rule), Complete / Failed through its conditions; a PyTorchJob through its conditions
(Created, Running, Succeeded, Failed). `on_complete(job)` runs when a job first reaches Complete (tests
publish the model there, as the pods would). Every request is recorded.

    with FakeKubeServer(phases=("Created", "Failed")) as kube:
        run_trainjob(..., configuration=kube.configuration())
        kube.created("trainjobs")[0]["spec"]["trainer"]["numNodes"]
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from synthvlm.testing.loopback import JsonAnswer, LoopbackServer, RecordedRequest, json_server

if TYPE_CHECKING:
    from kubernetes.client import Configuration

TRAINER = "trainer.kubeflow.org"
PHASES = ("Created", "Running", "Complete", "Failed")
# plural -> (group, version, kind) of the job resources served.
JOB_KINDS = {
    "trainjobs": (TRAINER, "v1alpha1", "TrainJob"),
    "pytorchjobs": ("kubeflow.org", "v1", "PyTorchJob"),
}
# Trainer's torch plugin: these are its to set (constants.TorchRunReservedEnvNames).
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
MASTER_PORT = 29500  # Trainer's constants.ContainerTrainerPort
DEFAULT_FAILURE = "jobset failed: job node-1 reached its backoff limit (pod exited with code 1)"
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_JOBSET_SELECTOR = re.compile(r"jobset\.sigs\.k8s\.io/jobset-name=([^,\s]+)")


def torch_distributed_runtime(name: str = "torch-distributed") -> dict[str, Any]:
    """A ClusterTrainingRuntime as Trainer's manifests install it (manifests/base/runtimes)."""
    node = {
        "name": "node",
        "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
        "command": ["/bin/bash", "-c", 'echo "Torch Distributed Runtime"; env | grep PET_'],
    }
    return {
        "apiVersion": f"{TRAINER}/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {
                                "metadata": {
                                    "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                                },
                                "spec": {"template": {"spec": {"containers": [node]}}},
                            },
                        }
                    ]
                }
            },
        },
    }


@dataclass
class StoredJob:
    plural: str
    body: dict[str, Any]
    phases: tuple[str, ...]
    gets: int = 0  # GETs so far; the phase is phases[gets - 1] (phases[0] before the first)
    completed: bool = False

    @property
    def phase(self) -> str:
        return self.phases[min(max(self.gets - 1, 0), len(self.phases) - 1)]


class KubeError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def body(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.status,
        }


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]


@dataclass
class _Store:
    jobs: dict[tuple[str, str, str], StoredJob] = field(default_factory=dict)  # (plural, namespace, name)
    configmaps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)  # ClusterTrainingRuntimes by name


class FakeKubeServer(LoopbackServer):
    def __init__(
        self,
        *,
        phases: Sequence[str] = ("Created", "Running", "Complete"),
        failure_message: str = DEFAULT_FAILURE,
        runtimes: Sequence[dict[str, Any]] | None = None,
        trainer_version: str | None = "v2.1.0",
        on_complete: Callable[[dict[str, Any]], None] | None = None,
    ):
        super().__init__()
        self.phases = _check_phases(phases)
        self.failure_message = failure_message
        self.on_complete = on_complete
        self.requests: list[RecordedRequest] = []
        self.store = _Store()
        for runtime in runtimes if runtimes is not None else [torch_distributed_runtime()]:
            self.store.runtimes[runtime["metadata"]["name"]] = runtime
        if trainer_version is not None:
            self.store.configmaps["kubeflow-system", "kubeflow-trainer-public"] = {
                "kubeflow_trainer_version": trainer_version
            }
        self._lock = threading.Lock()
        ns, name = "(?P<namespace>[^/]+)", "(?P<name>[^/]+)"
        jobs = f"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/{ns}/(?P<plural>trainjobs|pytorchjobs)"
        self._routes = [
            _Route("GET", re.compile(f"/api/v1/namespaces/{ns}/configmaps/{name}"), self._get_configmap),
            _Route("GET", re.compile(f"/api/v1/namespaces/{ns}/pods"), self._list_pods),
            _Route(
                "GET", re.compile(f"/apis/{TRAINER}/v1alpha1/clustertrainingruntimes"), self._list_runtimes
            ),
            _Route(
                "GET",
                re.compile(f"/apis/{TRAINER}/v1alpha1/clustertrainingruntimes/{name}"),
                self._get_runtime,
            ),
            _Route(
                "GET",
                re.compile(f"/apis/{TRAINER}/v1alpha1/namespaces/{ns}/trainingruntimes"),
                self._no_runtimes,
            ),
            _Route(
                "GET",
                re.compile(f"/apis/{TRAINER}/v1alpha1/namespaces/{ns}/trainingruntimes/{name}"),
                self._no_runtime,
            ),
            _Route("POST", re.compile(jobs), self._create_job),
            _Route("GET", re.compile(jobs), self._list_jobs),
            _Route("GET", re.compile(f"{jobs}/{name}"), self._get_job),
            _Route("DELETE", re.compile(f"{jobs}/{name}"), self._delete_job),
        ]

    # ---- control ------------------------------------------------------------------------------------

    def _bind(self, port: int) -> ThreadingHTTPServer:
        return json_server(port)

    def configuration(self) -> Configuration:
        """A kubernetes client Configuration pointing at this server (plain HTTP, no credentials)."""
        from kubernetes.client import Configuration

        configuration = Configuration()
        configuration.host = self.root_url
        return configuration

    def requests_to(self, method: str, pattern: str) -> list[RecordedRequest]:
        """Recorded requests with this method whose path fully matches the regex `pattern`."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(pattern, r.path)]

    def posted(self, plural: str) -> list[dict[str, Any]]:
        """Bodies POSTed for `plural`, accepted or not, in order."""
        return [r.json() for r in self.requests_to("POST", f"/apis/.*/{plural}")]

    def created(self, plural: str) -> list[dict[str, Any]]:
        """Stored objects of `plural`, as the server keeps them (metadata filled in)."""
        with self._lock:
            return [job.body for job in self.store.jobs.values() if job.plural == plural]

    def add_job(self, plural: str, body: dict[str, Any], phases: Sequence[str] | None = None) -> None:
        """Store a job as if created earlier (e.g. by a previous attempt of the step)."""
        with self._lock:
            namespace = body["metadata"]["namespace"]
            self._store_job(plural, namespace, json.loads(json.dumps(body)), phases)

    def node_env(self, namespace: str, job: str, index: int) -> dict[str, str]:
        """The torchrun variables of node `index`'s container, resolved as the kubelet would."""
        with self._lock:
            stored = self.store.jobs[("trainjobs", namespace, job)]
            return {e["name"]: e.get("value", str(index)) for e in _torch_env(stored.body)}

    # ---- dispatch (handler threads) -------------------------------------------------------------------

    def handle(self, request: RecordedRequest) -> JsonAnswer:
        status, payload = self._answer(request)
        return status, payload, {}

    def _answer(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        finished: dict[str, Any] | None = None
        with self._lock:
            self.requests.append(request)
            try:
                status, payload, finished = self._route(request)
            except KubeError as exc:
                return exc.status, exc.body()
            except Exception as exc:  # a bug here must reach the test as an answer, not a hung socket
                return 500, KubeError(500, "InternalError", f"fake kube server error: {exc!r}").body()
        if finished is not None and self.on_complete is not None:
            try:
                self.on_complete(finished)
            except Exception as exc:
                return 500, KubeError(500, "InternalError", f"on_complete failed: {exc!r}").body()
        return status, payload

    def _route(self, request: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        for route in self._routes:
            match = route.pattern.fullmatch(request.path)
            if match and route.method == request.method:
                answer = route.handler(request, **match.groupdict())
                return answer if len(answer) == 3 else (*answer, None)
        raise KubeError(404, "NotFound", f"the server could not find the requested resource ({request.path})")

    # ---- endpoints (called with the lock held) ---------------------------------------------------------

    def _get_configmap(self, request: RecordedRequest, namespace: str, name: str) -> tuple[int, dict]:
        data = self.store.configmaps.get((namespace, name))
        if data is None:
            raise KubeError(404, "NotFound", f'configmaps "{name}" not found')
        meta = {"name": name, "namespace": namespace}
        return 200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(data)}

    def _list_runtimes(self, request: RecordedRequest) -> tuple[int, dict]:
        items = list(self.store.runtimes.values())
        return 200, _list(f"{TRAINER}/v1alpha1", "ClusterTrainingRuntimeList", items)

    def _get_runtime(self, request: RecordedRequest, name: str) -> tuple[int, dict]:
        if name not in self.store.runtimes:
            raise KubeError(404, "NotFound", f'clustertrainingruntimes.{TRAINER} "{name}" not found')
        return 200, self.store.runtimes[name]

    def _no_runtimes(self, request: RecordedRequest, namespace: str) -> tuple[int, dict]:
        return 200, _list(f"{TRAINER}/v1alpha1", "TrainingRuntimeList", [])

    def _no_runtime(self, request: RecordedRequest, namespace: str, name: str) -> tuple[int, dict]:
        raise KubeError(404, "NotFound", f'trainingruntimes.{TRAINER} "{name}" not found')

    def _create_job(self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str):
        body = _json_object(request)
        _check_kind(body, plural, group, version)
        name = (body.get("metadata") or {}).get("name") or ""
        if not _DNS1035.fullmatch(name) or len(name) > 63:
            raise KubeError(
                422, "Invalid", f"metadata.name: Invalid value: {name!r}: must be a DNS-1035 label"
            )
        if body["metadata"].get("namespace") not in (None, namespace):
            raise KubeError(
                400, "BadRequest", "the namespace of the provided object does not match the request"
            )
        if (plural, namespace, name) in self.store.jobs:
            raise KubeError(409, "AlreadyExists", f'{plural}.{group} "{name}" already exists')
        if plural == "trainjobs":
            self._check_trainjob(body)
        return 201, self._store_job(plural, namespace, body, None).body

    def _list_jobs(self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str):
        items = [
            self._render(job)
            for (p, ns, _), job in self.store.jobs.items()
            if (p, ns) == (plural, namespace) and JOB_KINDS[p][:2] == (group, version)
        ]
        return 200, _list(f"{group}/{version}", f"{JOB_KINDS[plural][2]}List", items)

    def _get_job(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ):
        job = self._job(group, version, namespace, plural, name)
        job.gets += 1
        finished = None
        if job.phase == "Complete" and not job.completed:
            job.completed = True
            finished = json.loads(json.dumps(job.body))
        return 200, self._render(job), finished

    def _delete_job(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ):
        self._job(group, version, namespace, plural, name)
        del self.store.jobs[(plural, namespace, name)]
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}

    def _list_pods(self, request: RecordedRequest, namespace: str) -> tuple[int, dict]:
        selector = (request.query.get("labelSelector") or [""])[0]
        match = _JOBSET_SELECTOR.search(selector)
        job = self.store.jobs.get(("trainjobs", namespace, match.group(1))) if match else None
        return 200, _list("v1", "PodList", _node_pods(job) if job else [])

    # ---- helpers ----------------------------------------------------------------------------------------

    def _job(self, group: str, version: str, namespace: str, plural: str, name: str) -> StoredJob:
        job = self.store.jobs.get((plural, namespace, name))
        if job is None or JOB_KINDS[plural][:2] != (group, version):
            raise KubeError(404, "NotFound", f'{plural}.{group} "{name}" not found')
        return job

    def _check_trainjob(self, body: dict[str, Any]) -> None:
        spec = body.get("spec") or {}
        ref = spec.get("runtimeRef") or {}
        if ref.get("kind", "ClusterTrainingRuntime") != "ClusterTrainingRuntime" or ref.get("name") not in (
            self.store.runtimes
        ):
            raise KubeError(
                422, "Invalid", f"spec.runtimeRef: Invalid value: {ref}: ClusterTrainingRuntime not found"
            )
        reserved = sorted(
            {e.get("name") for e in (spec.get("trainer") or {}).get("env") or []} & set(RESERVED_ENV)
        )
        if reserved:
            raise KubeError(422, "Invalid", f"spec.trainer.env: must not have reserved envs: {reserved}")

    def _store_job(
        self, plural: str, namespace: str, body: dict[str, Any], phases: Sequence[str] | None
    ) -> StoredJob:
        meta = body.setdefault("metadata", {})
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            resourceVersion="1",
            generation=1,
        )
        job = StoredJob(plural, body, _check_phases(phases) if phases else self.phases)
        self.store.jobs[(plural, namespace, meta["name"])] = job
        return job

    def _render(self, job: StoredJob) -> dict[str, Any]:
        out = json.loads(json.dumps(job.body))
        if job.plural == "trainjobs":
            out["status"] = _trainjob_status(job, self.failure_message)
        else:
            out["status"] = {"conditions": _pytorchjob_conditions(job.phase, self.failure_message)}
        return out


# ---- rendering -------------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(api_version: str, kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
    }


def _num_nodes(body: dict[str, Any]) -> int:
    return int(((body.get("spec") or {}).get("trainer") or {}).get("numNodes") or 1)


def _trainjob_status(job: StoredJob, failure_message: str) -> dict[str, Any]:
    """Trainer v2: child JobSet counts while running, a Complete or Failed condition at the end."""
    nodes, phase = _num_nodes(job.body), job.phase
    counts = {"active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}
    if phase == "Created":
        return {}
    if phase == "Running":
        return {"jobsStatus": [{"name": "node", **counts, "active": nodes, "ready": nodes}]}
    if phase == "Complete":
        return {
            "jobsStatus": [{"name": "node", **counts, "succeeded": nodes}],
            "conditions": [_condition("Complete", "True", "JobSetCompleted", "jobset completed")],
        }
    return {
        "jobsStatus": [{"name": "node", **counts, "failed": 1, "active": nodes - 1}],
        "conditions": [_condition("Failed", "True", "JobSetFailed", failure_message)],
    }


def _pytorchjob_conditions(phase: str, failure_message: str) -> list[dict[str, Any]]:
    """training-operator v1: Created, Running, then Succeeded or Failed (Running turns False)."""
    created = _condition("Created", "True", "PyTorchJobCreated", "PyTorchJob is created.")
    running = _condition("Running", "True", "PyTorchJobRunning", "PyTorchJob is running.")
    if phase == "Created":
        return [created]
    if phase == "Running":
        return [created, running]
    running["status"] = "False"
    if phase == "Complete":
        return [
            created,
            running,
            _condition("Succeeded", "True", "PyTorchJobSucceeded", "PyTorchJob succeeded."),
        ]
    return [created, running, _condition("Failed", "True", "PyTorchJobFailed", failure_message)]


def _torch_env(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The variables Trainer's torch plugin adds to the node container (torch.go EnforceMLPolicy)."""
    name = body["metadata"]["name"]
    rank_ref = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    return [
        {"name": "PET_NNODES", "value": str(_num_nodes(body))},
        {"name": "PET_NPROC_PER_NODE", "value": "auto"},
        {"name": "PET_NODE_RANK", "valueFrom": rank_ref},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]


_POD_PHASE = {"Created": "Pending", "Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}


def _node_pods(job: StoredJob) -> list[dict[str, Any]]:
    """The JobSet's pods for the TrainJob's trainer nodes, in the job's phase."""
    body = job.body
    name, trainer = body["metadata"]["name"], (body.get("spec") or {}).get("trainer") or {}
    container = {
        "name": "node",
        "image": trainer.get("image") or "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime",
        "command": trainer.get("command"),
        "args": trainer.get("args"),
        "env": [*(trainer.get("env") or []), *_torch_env(body)],
        "resources": trainer.get("resourcesPerNode") or {},
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-node-0-{i}-{uuid.uuid4().hex[:5]}",
                "namespace": body["metadata"]["namespace"],
                "creationTimestamp": body["metadata"]["creationTimestamp"],
                "labels": {
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": str(i),
                    "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
                },
            },
            "spec": {"containers": [container]},
            "status": {"phase": _POD_PHASE[job.phase]},
        }
        for i in range(_num_nodes(body))
    ]


def _check_phases(phases: Sequence[str]) -> tuple[str, ...]:
    unknown = [p for p in phases if p not in PHASES]
    if not phases or unknown:
        raise ValueError(f"phases must be a non-empty sequence of {PHASES}, got {list(phases)}")
    return tuple(phases)


def _check_kind(body: dict[str, Any], plural: str, group: str, version: str) -> None:
    want_group, want_version, kind = JOB_KINDS[plural]
    if (group, version) != (want_group, want_version):
        raise KubeError(
            404, "NotFound", f"the server could not find the requested resource ({group}/{version})"
        )
    if body.get("apiVersion") != f"{group}/{version}" or body.get("kind") != kind:
        raise KubeError(
            400,
            "BadRequest",
            f"expected {group}/{version} {kind}, got {body.get('apiVersion')} {body.get('kind')}",
        )


def _json_object(request: RecordedRequest) -> dict[str, Any]:
    try:
        body = request.json()
    except json.JSONDecodeError as exc:
        raise KubeError(400, "BadRequest", f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise KubeError(400, "BadRequest", "request body must be a JSON object")
    return body
