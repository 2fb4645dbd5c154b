"""Multi-node training as a Kubeflow training-operator PyTorchJob (kubeflow.org/v1).

The `kubeflow` training SDK is not installed (it is not a dependency); the job is a plain manifest dict
created with the `kubernetes` client's CustomObjectsApi. Every pod runs `python -m synthvlm.train ...`,
which starts torchrun for its node (synthvlm.train.launch) from the operator's environment variables.

The job name is derived from the run's inputs, so a retried KFP task finds its job (HTTP 409 on create)
and follows it instead of starting a second one. `follow_pytorchjob` polls the job's conditions until
Succeeded (returns) or Failed (raises PyTorchJobFailed); `api` is anything with CustomObjectsApi's
`create_namespaced_custom_object` / `get_namespaced_custom_object`, which tests replace with a stub.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from synthvlm.config import StageConfig

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the training operator configures the container with this name
_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_TERMINAL = ("Succeeded", "Failed")


class PyTorchJobFailed(RuntimeError):
    """The PyTorchJob ended in the Failed condition (or disappeared while being followed)."""


class PyTorchJobConfig(StageConfig):
    """Where and how the multi-node PyTorchJob runs (set by the pipeline for a cluster)."""

    # Our choice: None = the namespace of the pod creating the job (the KFP step's), else "default".
    namespace: str | None = None
    # Our choice: None = the project's training image (synthvlm.images.image_for("train")).
    image: str | None = None
    # The extended resource GPUs are requested by (GKE / NVIDIA device plugin name).
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    service_account: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # Our choice: pods restart on failure (preemption) up to 3 times; each restart resumes from the
    # last checkpoint.
    backoff_limit: int = Field(3, ge=0)
    # Our choice: DataLoader workers pass batches through /dev/shm; a container's 64 MB is too small.
    shm_size: str = "64Gi"
    poll_s: float = Field(30.0, gt=0)
    # Our choice: None = follow until the job ends.
    timeout_s: float | None = Field(None, gt=0)


def job_name(stage: str, key: str) -> str:
    """A DNS-1123 name, the same for the same run inputs (`key`)."""
    return f"synthvlm-{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def current_namespace(default: str = "default") -> str:
    path = Path(_NAMESPACE_FILE)
    return path.read_text().strip() if path.is_file() else default


def _pod_template(
    config: PyTorchJobConfig, image: str, command: Sequence[str], gpus_per_node: int, labels: dict[str, str]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted(config.env.items())],
        "resources": {"limits": {config.gpu_resource: gpus_per_node}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}}],
    }
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
    config: PyTorchJobConfig,
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


def custom_objects_api():  # pragma: no cover - needs a cluster
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


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


def _failure_message(job: dict[str, Any]) -> str:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return "no message"


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
    """Poll until the job succeeds (returns the job object) or fails (raises PyTorchJobFailed)."""
    started = clock()
    last_state = None
    while True:
        try:
            job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:
            if _status_code(exc) == 404:
                raise PyTorchJobFailed(f"PyTorchJob {namespace}/{name} was deleted while running") from exc
            raise
        state = job_state(job)
        if state != last_state:
            log.info("PyTorchJob %s/%s: %s", namespace, name, state or "pending")
            last_state = state
        if state == "Succeeded":
            return job
        if state == "Failed":
            raise PyTorchJobFailed(f"PyTorchJob {namespace}/{name} failed: {_failure_message(job)}")
        if timeout_s is not None and clock() - started > timeout_s:
            raise TimeoutError(
                f"PyTorchJob {namespace}/{name} still {state or 'pending'} after {timeout_s} s"
            )
        sleep(poll_s)


def run_pytorchjob(api: Any, manifest: dict[str, Any], config: PyTorchJobConfig) -> dict[str, Any]:
    """Create (or find) the job and follow it to the end."""
    name = create_pytorchjob(api, manifest)
    return follow_pytorchjob(
        api, manifest["metadata"]["namespace"], name, poll_s=config.poll_s, timeout_s=config.timeout_s
    )
