import pytest
from pydantic import ValidationError

from synthvlm.train.kubeflow import (
    CONTAINER_NAME,
    ClusterJobConfig,
    TrainingJobFailed,
    create_pytorchjob,
    follow_pytorchjob,
    job_name,
    job_state,
    pytorchjob_manifest,
    run_pytorchjob,
)


class ApiError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


class StubApi:
    """CustomObjectsApi stand-in: records creates, answers gets from a list of job states."""

    def __init__(self, states, create_status=None):
        self.states = list(states)
        self.created = []
        self.gets = 0
        self.create_status = create_status

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        if self.create_status:
            raise ApiError(self.create_status)
        self.created.append((namespace, body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(state, Exception):
            raise state
        return {"metadata": {"name": name}, "status": {"conditions": conditions(state)}}


def conditions(state):
    order = ["Created", "Running", state] if state not in ("Created", "Running", None) else ["Created", state]
    out = [{"type": t, "status": "True"} for t in order if t]
    if state == "Failed":
        out[-1].update(reason="PyTorchJobFailed", message="pod job-worker-0 exited with code 1")
    return out


def manifest(num_nodes=3, **cfg):
    return pytorchjob_manifest(
        "synthvlm-sft-abc",
        ["python", "-m", "synthvlm.train", "--output-dir", "gs://b/out"],
        num_nodes=num_nodes,
        gpus_per_node=8,
        config=ClusterJobConfig(**cfg),
        namespace="ml",
        image="ghcr.io/synthvlm/synthvlm-train:1",
    )


def test_manifest_has_a_master_and_workers_with_gpus():
    job = manifest(
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="trainer",
        env={"NCCL_DEBUG": "WARN"},
    )
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"] == {
        "name": "synthvlm-sft-abc",
        "namespace": "ml",
        "labels": {"app.kubernetes.io/part-of": "synthvlm"},
    }
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8" and spec["runPolicy"]["backoffLimit"] == 3
    replicas = spec["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == CONTAINER_NAME == "pytorch"
    assert container["image"] == "ghcr.io/synthvlm/synthvlm-train:1"
    assert container["command"][:3] == ["python", "-m", "synthvlm.train"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["serviceAccountName"] == "trainer"
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert "Worker" not in manifest(num_nodes=1)["spec"]["pytorchReplicaSpecs"]


def test_job_names_are_stable_dns_labels():
    name = job_name("pretrain", "inputs")
    assert name == job_name("pretrain", "inputs") != job_name("pretrain", "other")
    assert len(name) <= 63 and name.replace("-", "").isalnum() and name.islower()


def test_follow_until_succeeded():
    api = StubApi([None, "Created", "Running", "Running", "Succeeded"])
    sleeps = []
    job = run_pytorchjob(api, manifest(), ClusterJobConfig(poll_s=0.001))
    assert api.created[0][0] == "ml" and job_state(job) == "Succeeded"
    assert api.gets == 5
    follow_pytorchjob(api, "ml", "x", poll_s=5, sleep=sleeps.append)
    assert sleeps == []  # already succeeded: no wait


def test_failed_job_raises_with_the_operator_message():
    api = StubApi(["Running", "Failed"])
    with pytest.raises(TrainingJobFailed, match="exited with code 1") as failed:
        follow_pytorchjob(api, "ml", "synthvlm-sft-abc", sleep=lambda s: None)
    assert "PyTorchJob ml/synthvlm-sft-abc failed" in str(failed.value)
    assert "kubectl delete pytorchjob -n ml synthvlm-sft-abc" in str(failed.value)


def test_existing_job_is_followed_not_duplicated_and_other_errors_propagate():
    api = StubApi(["Succeeded"], create_status=409)
    assert create_pytorchjob(api, manifest()) == "synthvlm-sft-abc"
    with pytest.raises(ApiError):
        create_pytorchjob(StubApi(["Succeeded"], create_status=403), manifest())


def test_deleted_job_and_timeout():
    with pytest.raises(TrainingJobFailed, match="deleted"):
        follow_pytorchjob(StubApi([ApiError(404)]), "ml", "x", sleep=lambda s: None)
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(TimeoutError, match="Running"):
        follow_pytorchjob(
            StubApi(["Running"]), "ml", "x", poll_s=10, timeout_s=25, sleep=sleep, clock=lambda: now[0]
        )


def test_cluster_config_defaults_to_a_trainjob_and_keeps_rendezvous_variables_out():
    config = ClusterJobConfig()
    assert (config.api, config.runtime) == ("trainjob", "torch-distributed")
    with pytest.raises(ValidationError, match="PET_MASTER_ADDR"):
        ClusterJobConfig(env={"PET_MASTER_ADDR": "x", "NCCL_DEBUG": "WARN"})
    with pytest.raises(ValidationError):
        ClusterJobConfig(api="mpijob")
