"""Multi-node training as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org), through the `kubeflow` SDK.

The job: `TrainerClient.train` on the ClusterTrainingRuntime `config.runtime` ("torch-distributed") with a
CustomTrainerContainer (our image, num_nodes, the GPUs of one node, `config.env`), a deterministic Name,
our command (TrainerCommand / TrainerArgs) and a RuntimePatch on the runtime's "node" job for what the
SDK has no field for: node selector, tolerations, service account and a memory-backed /dev/shm.

What the pods run: `python -m synthvlm.train ...`, the same entry point as a PyTorchJob pod, not the
runtime's own command. Trainer's torch plugin puts torchrun's variables in every node container
(PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK from the Job completion index, PET_MASTER_ADDR =
<job>-node-0-0.<job>, PET_MASTER_PORT = 29500); synthvlm.train.launch sees PET_MASTER_ADDR, reads this
node's rank and the master from them and starts torchrun with one process per GPU. Keeping our launcher
(rather than running the runtime's torchrun) keeps one code path for both job APIs and the process count
tied to TrainConfig.gpus_per_node, which the batch plan depends on, instead of the runtime's "auto".

Idempotent: the name comes from the run's inputs, so a retried KFP step gets HTTP 409 on create and
follows the job it started before. Following polls `TrainerClient.get_job` (the SDK's Created / Running /
Complete / Failed) and logs each change; it is our loop rather than `wait_for_job_status` because that
one takes whole seconds, sleeps where tests cannot reach, has no "no timeout" and reports a failure
without its message, which we read from the TrainJob's Failed condition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from synthvlm.train.kubeflow import (
    SHM_MOUNT,
    ClusterJobConfig,
    TrainingJobFailed,
    failed_error,
    failure_message,
    shm_volume,
)

if TYPE_CHECKING:
    from kubeflow.trainer import CustomTrainerContainer, TrainerClient
    from kubeflow.trainer.options import RuntimePatch
    from kubeflow.trainer.types.types import TrainJob
    from kubernetes.client import Configuration

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The runtime's replicated job and container that run the trainer (Trainer's constants.Node).
NODE = "node"
COMPLETE, FAILED = "Complete", "Failed"


def trainer_client(namespace: str, configuration: Configuration | None = None) -> TrainerClient:
    """An SDK client for `namespace`; `configuration` None = in-cluster service account or kube-config."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=configuration))


def trainer_container(
    config: ClusterJobConfig, image: str, num_nodes: int, gpus_per_node: int
) -> CustomTrainerContainer:
    """Our image on `num_nodes` nodes of `gpus_per_node` GPUs, with `config.env` (nothing else)."""
    from kubeflow.trainer import CustomTrainerContainer

    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError("num_nodes and gpus_per_node must be >= 1")
    return CustomTrainerContainer(
        image=image,
        num_nodes=num_nodes,
        # A string: the SDK's Quantity model writes an int as a float ("8.0").
        resources_per_node={config.gpu_resource: str(gpus_per_node)},
        env=dict(config.env) or None,
    )


def node_patch(config: ClusterJobConfig, labels: dict[str, str]) -> RuntimePatch:
    """Scheduling, identity and /dev/shm of the runtime's node pods."""
    from kubeflow.trainer import options as o

    pod = o.PodSpecPatch(
        service_account_name=config.service_account,
        node_selector=dict(config.node_selector) or None,
        tolerations=[dict(t) for t in config.tolerations] or None,
        volumes=[shm_volume(config)],
        containers=[o.ContainerPatch(name=NODE, volume_mounts=[dict(SHM_MOUNT)])],
    )
    template = o.PodTemplatePatch(metadata={"labels": dict(labels)}, spec=pod)
    job = o.ReplicatedJobPatch(name=NODE, template=o.JobTemplatePatch(spec=o.JobSpecPatch(template=template)))
    return o.RuntimePatch(
        training_runtime_spec=o.TrainingRuntimeSpecPatch(
            template=o.JobSetTemplatePatch(spec=o.JobSetSpecPatch(replicated_jobs=[job]))
        )
    )


def trainjob_options(
    name: str, command: Sequence[str], args: Sequence[str], config: ClusterJobConfig, labels: dict[str, str]
) -> list[Any]:
    from kubeflow.trainer import options as o

    return [
        o.Name(name),
        o.Labels(dict(labels)),
        o.TrainerCommand(list(command)),
        o.TrainerArgs(list(args)),
        node_patch(config, labels),
    ]


def _status_code(exc: BaseException | None) -> int | None:
    # The SDK wraps the kubernetes ApiException in a RuntimeError; the HTTP status is on the cause.
    return getattr(exc, "status", None)


def submit_trainjob(
    client: TrainerClient,
    namespace: str,
    name: str,
    *,
    runtime: str,
    trainer: CustomTrainerContainer,
    options: list[Any],
) -> None:
    """Create the TrainJob; an existing one of the same name (a retried step) is kept and followed."""
    try:
        created = client.train(runtime=runtime, trainer=trainer, options=options)
    except RuntimeError as exc:
        if _status_code(exc.__cause__) != 409:
            raise
        log.info("TrainJob %s/%s already exists; following it", namespace, name)
        return
    if created != name:  # the SDK names the job itself when the Name option is lost
        raise RuntimeError(f"the SDK created TrainJob {created!r}, expected {name!r}")
    log.info("created TrainJob %s/%s on runtime %s", namespace, name, runtime)


def _get_job(client: TrainerClient, namespace: str, name: str) -> TrainJob:
    try:
        return client.get_job(name)
    except RuntimeError as exc:
        if _status_code(exc.__cause__) == 404:
            raise TrainingJobFailed(f"TrainJob {namespace}/{name} was deleted while running") from exc
        raise


def _progress(job: TrainJob) -> str:
    steps = ", ".join(f"{s.name} {s.status or 'Pending'}" for s in sorted(job.steps, key=lambda s: s.name))
    return f"{job.status} ({steps})" if steps else job.status


def read_failure(configuration: Configuration | None, namespace: str, name: str) -> str:
    """The Failed condition's reason and message (the SDK's TrainJob carries only the status)."""
    from kubernetes import client

    try:
        api = client.CustomObjectsApi(client.ApiClient(configuration))
        return failure_message(api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except Exception as exc:  # the job failed either way; a missing message must not hide that
        return f"no message (reading the TrainJob failed: {exc})"


def follow_trainjob(
    client: TrainerClient,
    namespace: str,
    name: str,
    *,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    failure: Callable[[], str] = lambda: "no message",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TrainJob:
    """Poll until the job completes (returns it) or fails (raises TrainingJobFailed with `failure()`)."""
    started, last = clock(), None
    while True:
        job = _get_job(client, namespace, name)
        progress = _progress(job)
        if progress != last:
            log.info("TrainJob %s/%s: %s", namespace, name, progress)
            last = progress
        if job.status == COMPLETE:
            return job
        if job.status == FAILED:
            raise failed_error(KIND, namespace, name, failure())
        if timeout_s is not None and clock() - started > timeout_s:
            raise TimeoutError(f"TrainJob {namespace}/{name} still {job.status} after {timeout_s} s")
        sleep(poll_s)


def run_trainjob(
    name: str,
    command: Sequence[str],
    args: Sequence[str],
    *,
    num_nodes: int,
    gpus_per_node: int,
    config: ClusterJobConfig,
    namespace: str,
    image: str,
    labels: dict[str, str] | None = None,
    configuration: Configuration | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TrainJob:
    """Create (or find) the TrainJob `name` and follow it to the end."""
    labels = {"app.kubernetes.io/part-of": "synthvlm", **(labels or {})}
    client = trainer_client(namespace, configuration)
    submit_trainjob(
        client,
        namespace,
        name,
        runtime=config.runtime,
        trainer=trainer_container(config, image, num_nodes, gpus_per_node),
        options=trainjob_options(name, command, args, config, labels),
    )
    return follow_trainjob(
        client,
        namespace,
        name,
        poll_s=config.poll_s,
        timeout_s=config.timeout_s,
        failure=lambda: read_failure(configuration, namespace, name),
        sleep=sleep,
        clock=clock,
    )
