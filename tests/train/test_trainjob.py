"""The TrainJob path: the real `kubeflow` SDK (TrainerClient) against a loopback fake Kubernetes API over
HTTP. What is posted, how the job is followed, and what a retried step does."""

import json
import logging

import pytest
from kubernetes import client

from synthvlm.testing.fake_kube import FakeKubeServer
from synthvlm.train.config import TrainConfig
from synthvlm.train.kubeflow import ClusterJobConfig, TrainingJobFailed
from synthvlm.train.launch import NodeInfo, in_job_pod, node_info, torchrun_command
from synthvlm.train.trainjob import run_trainjob

NAME = "synthvlm-sft-0123456789ab"
COMMAND = ("python", "-m", "synthvlm.train")
ARGS = ["--config-json", '{"stage": "sft"}', "--datasets-json", "[]", "--output-dir", "gs://b/out"]
TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"


def cluster(**overrides):
    return ClusterJobConfig(**{"namespace": "ml", "poll_s": 0.01, **overrides})


def run(kube, config=None, *, num_nodes=3, **kwargs):
    kwargs.setdefault("sleep", lambda s: None)
    return run_trainjob(
        NAME,
        COMMAND,
        ARGS,
        num_nodes=num_nodes,
        gpus_per_node=8,
        config=config or cluster(),
        namespace="ml",
        image="ghcr.io/synthvlm/synthvlm-train:1",
        labels={"synthvlm/stage": "train-sft"},
        configuration=kube.configuration(),
        **kwargs,
    )


def node_pod_spec(job):
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the runtime's trainer job
    return node["template"]["spec"]["template"]


def test_the_sdk_posts_the_trainjob_and_follows_it_to_complete(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-pods")
    config = cluster(
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="trainer",
        env={"NCCL_DEBUG": "WARN"},
    )
    phases = ("Created", "Created", "Running", "Running", "Complete")
    with FakeKubeServer(phases=phases) as kube, caplog.at_level(logging.INFO, "synthvlm.train.trainjob"):
        job = run(kube, config)
        (body,) = kube.posted("trainjobs")
        raw = kube.requests_to("POST", TRAINJOBS)[0].body
        gets = len(kube.requests_to("GET", f"{TRAINJOBS}/{NAME}"))

    assert job.name == NAME and job.status == "Complete" and gets == len(phases)
    assert body["metadata"] == {
        "name": NAME,
        "labels": {"app.kubernetes.io/part-of": "synthvlm", "synthvlm/stage": "train-sft"},
    }
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    trainer = spec["trainer"]
    assert trainer["image"] == "ghcr.io/synthvlm/synthvlm-train:1" and trainer["numNodes"] == 3
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert (trainer["command"], trainer["args"]) == (list(COMMAND), ARGS)
    assert trainer["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]

    pod = node_pod_spec(body)
    assert pod["metadata"]["labels"]["synthvlm/stage"] == "train-sft"
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["spec"]["tolerations"] == [config.tolerations[0]]
    assert pod["spec"]["serviceAccountName"] == "trainer"
    assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert pod["spec"]["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]

    assert b"sk-not-for-pods" not in raw and b"OPENAI_API_KEY" not in raw  # only config.env reaches pods
    progress = [r.getMessage() for r in caplog.records if "TrainJob ml/" in r.getMessage()]
    assert progress[0] == f"created TrainJob ml/{NAME} on runtime torch-distributed"
    assert [p.split(": ", 1)[1].split(" ")[0] for p in progress[1:]] == ["Created", "Running", "Complete"]
    assert "node-2 Running" in progress[2]  # one line per change, with each node's pod phase


def test_job_pods_find_their_node_in_the_trainer_environment():
    """Trainer's torch plugin sets PET_* in every node (as the fake renders them); our launcher reads them."""
    with FakeKubeServer() as kube:
        run(kube)
        env = kube.node_env("ml", NAME, 2)
    config = TrainConfig(stage="sft", gpus_per_node=8, num_nodes=3)
    assert in_job_pod(env)
    assert node_info(config, env) == NodeInfo(2, f"{NAME}-node-0-0.{NAME}", 29500)
    cmd = torchrun_command(config, [], "gs://b/out", node=node_info(config, env))
    assert "--nproc-per-node=8" in cmd and "--nnodes=3" in cmd and "--node-rank=2" in cmd


def test_a_failed_job_raises_with_its_name_and_message():
    message = "jobset failed: pod node-1 OOMKilled"
    failing = FakeKubeServer(phases=("Created", "Running", "Failed"), failure_message=message)
    with failing as kube, pytest.raises(TrainingJobFailed) as failed:
        run(kube)
    text = str(failed.value)
    assert f"TrainJob ml/{NAME} failed: JobSetFailed: {message}" in text
    assert f"kubectl delete trainjob -n ml {NAME}" in text  # how to really retry


def test_an_existing_job_is_followed_not_created_again():
    earlier = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": NAME, "namespace": "ml"},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}},
    }
    with FakeKubeServer() as kube:
        kube.add_job("trainjobs", earlier, phases=("Running", "Running", "Complete"))
        job = run(kube, num_nodes=3)  # a retried step: the same name
        (stored,) = kube.created("trainjobs")
        posts = len(kube.posted("trainjobs"))
    assert job.status == "Complete" and job.num_nodes == 2  # the earlier job, followed to its end
    assert posts == 1 and stored["spec"]["trainer"] == {"numNodes": 2}  # the 409 left it untouched

    with FakeKubeServer() as kube:  # the same call twice: one job
        run(kube)
        run(kube)
        assert len(kube.created("trainjobs")) == 1 and len(kube.posted("trainjobs")) == 2


def test_other_create_errors_propagate_and_nothing_is_posted():
    with FakeKubeServer(trainer_version=None) as kube:  # no version ConfigMap: the SDK only warns
        with pytest.raises(RuntimeError, match="no-such-runtime"):
            run(kube, cluster(runtime="no-such-runtime"))
        assert kube.posted("trainjobs") == []


def test_timeout_and_a_job_deleted_while_followed():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with FakeKubeServer(phases=("Created", "Running")) as kube:
        with pytest.raises(TimeoutError, match=f"TrainJob ml/{NAME} still Running after 25"):
            run(kube, cluster(poll_s=10, timeout_s=25), sleep=sleep, clock=lambda: now[0])
        assert now[0] == 30  # polled at 0, 10, 20 and 30 s

    with FakeKubeServer(phases=("Running",)) as kube:
        api = client.CustomObjectsApi(client.ApiClient(kube.configuration()))

        def delete(seconds):
            api.delete_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", NAME)

        with pytest.raises(TrainingJobFailed, match="deleted while running"):
            run(kube, sleep=delete)


def test_the_fake_refuses_what_trainer_refuses():
    """Reserved torchrun variables (Trainer's webhook) and an existing name (409) are refused."""
    body = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": NAME},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "trainer": {"env": [{"name": "PET_NODE_RANK", "value": "0"}]},
        },
    }
    with FakeKubeServer() as kube:
        api = client.CustomObjectsApi(client.ApiClient(kube.configuration()))
        create = api.create_namespaced_custom_object
        with pytest.raises(client.ApiException) as refused:
            create("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", body)
        assert refused.value.status == 422 and "PET_NODE_RANK" in json.loads(refused.value.body)["message"]
        body["spec"]["trainer"] = {}
        create("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", body)
        with pytest.raises(client.ApiException) as exists:
            create("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", body)
        assert exists.value.status == 409
