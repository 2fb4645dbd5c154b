"""Multi-node training as a Kubeflow job: the settings and naming both job APIs share, and the
training-operator v1 PyTorchJob (kubeflow.org/v1).

`ClusterJobConfig.api` picks the API. The default, a Kubeflow Trainer v2 TrainJob, lives in
synthvlm.train.trainjob; this module keeps the PyTorchJob for clusters still on training-operator v1.
The PyTorchJob is a plain manifest dict created with the `kubernetes` client's CustomObjectsApi (the
`kubeflow` SDK only speaks Trainer v2). Every pod runs `python -m synthvlm.train ...`, which starts
torchrun for its node (synthvlm.train.launch) from the operator's environment variables.

The job name is derived from the run's inputs, so a retried KFP task finds its job (HTTP 409 on create)
and follows it instead of starting a second one. `follow_pytorchjob` polls the job's conditions until
Succeeded (returns) or Failed (raises TrainingJobFailed); `api` is anything with CustomObjectsApi's
`create_namespaced_custom_object` / `get_namespaced_custom_object`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from synthvlm.config import StageConfig

if TYPE_CHECKING:
    from kubernetes.client import Configuration

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the training operator configures the container with this name
SHM_VOLUME = "dshm"
SHM_MOUNT = {"name": SHM_VOLUME, "mountPath": "/dev/shm"}
# The torchrun rendezvous variables the job controllers set in every pod (Trainer v2's torch plugin
# rejects a TrainJob that sets the PET_ ones itself).
RESERVED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    | {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
)
_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_TERMINAL = ("Succeeded", "Failed")


class TrainingJobFailed(RuntimeError):
    """The cluster job (TrainJob or PyTorchJob) failed, or disappeared while being followed."""


class ClusterJobConfig(StageConfig):
    """Where and how a multi-node run's Kubeflow job runs (set by the pipeline for a cluster)."""

    # Our choice: "trainjob", Kubeflow Trainer v2 (trainer.kubeflow.org TrainJob, created with the
    # `kubeflow` SDK), the successor of the training operator. "pytorchjob" creates a training-operator
    # v1 PyTorchJob (kubeflow.org/v1) instead, for clusters that have not moved to Trainer v2.
    api: Literal["trainjob", "pytorchjob"] = "trainjob"
    # Kubeflow Trainer's PyTorch ClusterTrainingRuntime (the SDK's DEFAULT_TRAINING_RUNTIME); TrainJob only.
    runtime: str = "torch-distributed"
    # Our choice: None = the namespace of the pod creating the job (the KFP step's), else "default".
    namespace: str | None = None
    # Our choice: None = the project's training image (synthvlm.images.image_for("train")).
    image: str | None = None
    # The extended resource GPUs are requested by (GKE / NVIDIA device plugin name).
    gpu_resource: str = "nvidia.com/gpu"
    # Our choice: none; the pipeline sets them for its GPU node pool.
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # Our choice: None = the namespace's default service account.
    service_account: str | None = None
    # Our choice: only what is set here reaches the pods (never this process's environment: no secrets).
    env: dict[str, str] = Field(default_factory=dict)
    # Our choice: PyTorchJob pods restart on failure (preemption) up to 3 times; each restart resumes
    # from the last checkpoint. A TrainJob's restarts come from its runtime (JobSet failurePolicy).
    backoff_limit: int = Field(3, ge=0)
    # Our choice: DataLoader workers pass batches through /dev/shm; a container's 64 MB is too small.
    shm_size: str = "64Gi"
    # Our choice: a training job runs for hours; a status read every 30 s is cheap and timely enough.
    poll_s: float = Field(30.0, gt=0)
    # Our choice: None = follow until the job ends.
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("env")
    @classmethod
    def _no_rendezvous_env(cls, env: dict[str, str]) -> dict[str, str]:
        reserved = sorted(RESERVED_ENV & env.keys())
        if reserved:
            raise ValueError(f"{reserved} are set by the job controller for torchrun; leave them out")
        return env


def job_name(stage: str, key: str) -> str:
    """A DNS-1035 name (TrainJob names must be), the same for the same run inputs (`key`)."""
    return f"synthvlm-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def current_namespace(default: str = "default") -> str:
    path = Path(_NAMESPACE_FILE)
    return path.read_text().strip() if path.is_file() else default


def shm_volume(config: ClusterJobConfig) -> dict[str, Any]:
    """A memory-backed /dev/shm, larger than the container runtime's 64 MB."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}


def _pod_template(
    config: ClusterJobConfig, image: str, command: Sequence[str], gpus_per_node: int, labels: dict[str, str]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted(config.env.items())],
        "resources": {"limits": {config.gpu_resource: gpus_per_node}},
        "volumeMounts": [dict(SHM_MOUNT)],
    }
    spec: dict[str, Any] = {"containers": [container], "volumes": [shm_volume(config)]}
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [dict(t) for t in config.tolerations]
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def pytorchjob_manifest(
    name: str,
    command: Sequence[str],
    *,
    num_nodes: int,
    gpus_per_node: int,
    config: ClusterJobConfig,
    namespace: str,
    image: str,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A PyTorchJob with one Master and num_nodes - 1 Workers, each pod with gpus_per_node GPUs."""
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError("num_nodes and gpus_per_node must be >= 1")
    labels = {"app.kubernetes.io/part-of": "synthvlm", **(labels or {})}
    template = _pod_template(config, image, command, gpus_per_node, labels)
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if num_nodes > 1:
        replicas["Worker"] = {"replicas": num_nodes - 1, "restartPolicy": "OnFailure", "template": template}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            # cleanPodPolicy None keeps finished pods' logs for inspection.
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": config.backoff_limit},
            "nprocPerNode": str(gpus_per_node),
            "pytorchReplicaSpecs": replicas,
        },
    }


def custom_objects_api(configuration: Configuration | None = None) -> Any:
    """The CustomObjectsApi for `configuration`, else for the in-cluster service account or kube-config."""
    from kubernetes import client, config

    if configuration is None:  # pragma: no cover - needs a cluster
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.CustomObjectsApi(client.ApiClient(configuration))


def _status_code(exc: Exception) -> int | None:
    return getattr(exc, "status", None)


def create_pytorchjob(api: Any, manifest: dict[str, Any]) -> str:
    """Create the job; an existing job of the same name (a retried step) is kept and followed."""
    meta = manifest["metadata"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, manifest)
        log.info("created PyTorchJob %s/%s", meta["namespace"], meta["name"])
    except Exception as exc:
        if _status_code(exc) != 409:
            raise
        log.info("PyTorchJob %s/%s already exists; following it", meta["namespace"], meta["name"])
    return meta["name"]


def job_state(job: dict[str, Any]) -> str | None:
    """The terminal condition ("Succeeded"/"Failed") if reached, else the newest true condition type."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for condition in conditions:
        if condition.get("type") in _TERMINAL:
            return condition["type"]
    return conditions[-1].get("type") if conditions else None


def failure_message(job: dict[str, Any]) -> str:
    """'reason: message' of the job's true Failed condition (both APIs use that condition type)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status", "True") == "True":
            return f"{condition.get('reason') or ''}: {condition.get('message') or ''}".strip(": ")
    return "no message"


def failed_error(kind: str, namespace: str, name: str, message: str) -> TrainingJobFailed:
    # Same inputs, same job name: a KFP retry follows this failed job until it is deleted.
    return TrainingJobFailed(
        f"{kind} {namespace}/{name} failed: {message}. A retry with the same inputs follows this job; "
        f"delete it (kubectl delete {kind.lower()} -n {namespace} {name}) to train again from the last "
        "checkpoint."
    )


def follow_pytorchjob(
    api: Any,
    namespace: str,
    name: str,
    *,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll until the job succeeds (returns the job object) or fails (raises TrainingJobFailed)."""
    started = clock()
    last_state = None
    while True:
        try:
            job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            if _status_code(exc) == 404:
                raise TrainingJobFailed(f"PyTorchJob {namespace}/{name} was deleted while running") from exc
            raise
        state = job_state(job)
        if state != last_state:
            log.info("PyTorchJob %s/%s: %s", namespace, name, state or "pending")
            last_state = state
        if state == "Succeeded":
            return job
        if state == "Failed":
            raise failed_error(KIND, namespace, name, failure_message(job))
        if timeout_s is not None and clock() - started > timeout_s:
            raise TimeoutError(
                f"PyTorchJob {namespace}/{name} still {state or 'pending'} after {timeout_s} s"
            )
        sleep(poll_s)


def run_pytorchjob(
    api: Any,
    manifest: dict[str, Any],
    config: ClusterJobConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create (or find) the job and follow it to the end."""
    name = create_pytorchjob(api, manifest)
    return follow_pytorchjob(
        api,
        manifest["metadata"]["namespace"],
        name,
        poll_s=config.poll_s,
        timeout_s=config.timeout_s,
        sleep=sleep,
    )
