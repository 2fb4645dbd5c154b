"""The train stage: done marker and idempotence, gs:// checkpoints surviving a lost disk, and how it
starts processes (torchrun for several GPUs, a TrainJob or PyTorchJob for several nodes)."""

import json

import pytest
from transformers import LlavaForConditionalGeneration

from synthvlm import storage
from synthvlm.errors import ConfigError
from synthvlm.runner import LATEST_SUFFIX
from synthvlm.stage import StageStats, is_done, mark_done, read_stats
from synthvlm.stages import train as train_stage
from synthvlm.stages.train import MODEL_DIR, ClusterJobConfig, TrainConfig, TrainDataset, model_uri, train
from synthvlm.testing.fake_kube import FakeKubeServer
from synthvlm.train.config import parse_datasets
from synthvlm.train.kubeflow import TrainingJobFailed
from synthvlm.train.sync import download_folder, remote_checkpoints
from synthvlm.train.trainer import LlavaTrainer
from tests.train.helpers import caption_samples, tiny_config, write_json


@pytest.fixture
def captions(tmp_path):
    return [
        TrainDataset(uri=write_json(tmp_path / "data" / "captions.json", caption_samples(tmp_path / "data")))
    ]


def latest(output_dir: str) -> dict:
    """The pointer the runner publishes at `<output_dir>/model.latest.json` (a model is not copied)."""
    return json.loads(storage.read_text(model_uri(output_dir) + LATEST_SUFFIX))


def test_train_writes_the_model_and_marker_then_skips_when_done(captions, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    out = train(tiny_config("pretrain"), captions, run_dir)
    version = out.removesuffix("/" + MODEL_DIR)
    assert version.startswith(run_dir + "/train-") and out == model_uri(version) and is_done(out)
    assert latest(run_dir)["published_from"] == out
    assert not storage.exists(model_uri(run_dir))  # no copy of the weights at the stable path
    stats = read_stats(out)
    # The runner names the stage "train"; which training stage it was is in the settings.
    assert (stats["stage"], stats["settings"]["stage"], stats["global_step"]) == ("train", "pretrain", 4)
    assert stats["count_in"] == 4 and stats["count_out"] == 8  # 4 steps x global batch 2
    assert (stats["template"], stats["learning_rate"]) == ("plain", 1e-2)
    LlavaForConditionalGeneration.from_pretrained(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished output was trained again")

    monkeypatch.setattr("synthvlm.train.trainer.run_training", must_not_run)
    assert train(tiny_config("pretrain"), captions, run_dir) == out
    # Logging and checkpoint scheduling cannot change the model: still the same version.
    assert train(tiny_config("pretrain", logging_steps=3, save_steps=1), captions, run_dir) == out

    # A changed learning rate trains again, into a new version; the old one stays readable.
    trained_in = []

    def fake_training(config, datasets, output_dir):
        trained_in.append(output_dir)
        storage.write_text(f"{model_uri(output_dir)}/config.json", "{}")
        return {"is_main_process": True, "samples_per_epoch": 4, "global_step": 4}

    monkeypatch.setattr("synthvlm.train.trainer.run_training", fake_training)
    second = train(tiny_config("pretrain", learning_rate=5e-3), captions, run_dir)
    assert trained_in == [second.removesuffix("/" + MODEL_DIR)] and second != out
    assert second.startswith(run_dir + "/train-") and read_stats(second)["learning_rate"] == 5e-3
    assert latest(run_dir)["published_from"] == second
    assert read_stats(out)["learning_rate"] == 1e-2
    LlavaForConditionalGeneration.from_pretrained(out)


def test_gcs_output_resumes_on_a_fresh_disk(captions, tmp_path, gcs_emulator, monkeypatch):
    output = f"{gcs_emulator}/train-{tmp_path.name}"
    original = LlavaTrainer.training_step

    def preempted_after_step_2(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("preempted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaTrainer, "training_step", preempted_after_step_2)
    config = tiny_config("sft", local_work_dir=str(tmp_path / "pod-1"))
    with pytest.raises(KeyboardInterrupt):
        train(config, captions, output)
    # Checkpoints live in the run's fingerprint folder.
    (version,) = {uri[len(output) + 1 :].split("/")[0] for uri in storage.list_uris(output)}
    assert version.startswith("train-")
    assert [step for step, _ in remote_checkpoints(f"{output}/{version}/checkpoints")] == [2]

    monkeypatch.setattr(LlavaTrainer, "training_step", original)
    config = tiny_config("sft", local_work_dir=str(tmp_path / "pod-2"))  # the pod restarted elsewhere
    out = train(config, captions, output)
    assert out == f"{output}/{version}/{MODEL_DIR}"  # local_work_dir is not part of the fingerprint
    assert latest(output)["published_from"] == out
    stats = read_stats(out)
    assert stats["resumed_from"] == "checkpoint-2" and stats["global_step"] == 4
    local = tmp_path / "downloaded"
    download_folder(out, str(local))
    assert LlavaForConditionalGeneration.from_pretrained(local).config.image_token_index > 0


def test_several_gpus_start_torchrun_with_the_same_call(captions, tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, check):
        seen["cmd"] = cmd
        out = model_uri(cmd[cmd.index("--output-dir") + 1])
        storage.write_text(f"{out}/config.json", "{}")
        mark_done(out, StageStats(stage="train_pretrain"))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(train_stage.subprocess, "run", fake_run)
    config = tiny_config("pretrain", gpus_per_node=4)
    out = train(config, captions, str(tmp_path / "run"))
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=4"]
    assert TrainConfig.model_validate_json(cmd[cmd.index("--config-json") + 1]) == config
    assert parse_datasets(cmd[cmd.index("--datasets-json") + 1]) == captions
    assert is_done(out)


def test_failed_torchrun_raises(captions, tmp_path, monkeypatch):
    monkeypatch.setattr(train_stage.subprocess, "run", lambda cmd, check: type("R", (), {"returncode": 1})())
    with pytest.raises(RuntimeError, match="status 1"):
        train(tiny_config("pretrain", gpus_per_node=2), captions, str(tmp_path / "run"))


def pod_command(job):
    """What the job's pods run: a TrainJob's trainer command + args, a PyTorchJob's Master command."""
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]["command"] + job["spec"]["trainer"]["args"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]


def publish_model(job):
    """What the job's pods would leave behind when it completes: the model and its done marker."""
    command = pod_command(job)
    out = model_uri(command[command.index("--output-dir") + 1])
    storage.write_text(f"{out}/config.json", "{}")
    mark_done(out, StageStats(stage="train_sft"))


@pytest.fixture
def outside_a_job_pod(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("PET_MASTER_ADDR", raising=False)


def multi_node(api):
    cluster = ClusterJobConfig(api=api, namespace="ml", image="registry/train:1", poll_s=0.01)
    return tiny_config("sft", gpus_per_node=8, num_nodes=2, cluster=cluster)


@pytest.mark.usefixtures("outside_a_job_pod")
def test_several_nodes_run_as_a_trainjob(captions, gcs_emulator, tmp_path):
    config = multi_node("trainjob")
    output = f"{gcs_emulator}/trainjob-{tmp_path.name}"
    with FakeKubeServer(on_complete=publish_model) as kube:
        out = train(config, captions, output, kube_config=kube.configuration())
        (job,) = kube.created("trainjobs")
        assert kube.created("pytorchjobs") == []
    assert is_done(out)
    assert job["metadata"]["namespace"] == "ml" and job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["image"], trainer["resourcesPerNode"]["limits"]) == (
        2,
        "registry/train:1",
        {"nvidia.com/gpu": "8"},
    )
    command = pod_command(job)
    assert command[:3] == ["python", "-m", "synthvlm.train"]
    assert TrainConfig.model_validate_json(command[command.index("--config-json") + 1]) == config
    assert parse_datasets(command[command.index("--datasets-json") + 1]) == captions

    failing = FakeKubeServer(phases=("Created", "Running", "Failed"), failure_message="worker-1 OOMKilled")
    with failing as kube, pytest.raises(TrainingJobFailed, match="TrainJob ml/synthvlm-sft-.* OOMKilled"):
        train(config, captions, f"{output}-2", kube_config=kube.configuration())


@pytest.mark.usefixtures("outside_a_job_pod")
def test_several_nodes_run_as_a_pytorchjob_on_training_operator_v1(captions, gcs_emulator, tmp_path):
    config = multi_node("pytorchjob")
    output = f"{gcs_emulator}/pytorchjob-{tmp_path.name}"
    with FakeKubeServer(on_complete=publish_model) as kube:
        out = train(config, captions, output, kube_config=kube.configuration())
        (job,) = kube.created("pytorchjobs")
        assert kube.created("trainjobs") == []
    assert is_done(out)
    assert (
        job["metadata"]["namespace"] == "ml" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    )
    command = pod_command(job)
    assert command[:3] == ["python", "-m", "synthvlm.train"]
    assert json.loads(command[command.index("--config-json") + 1])["num_nodes"] == 2

    failing = FakeKubeServer(phases=("Running", "Failed"), failure_message="worker-1 OOMKilled")
    with failing as kube, pytest.raises(TrainingJobFailed, match="PyTorchJob ml/.* OOMKilled"):
        train(config, captions, f"{output}-2", kube_config=kube.configuration())


def test_several_nodes_need_a_shared_output(captions, tmp_path):
    with pytest.raises(ConfigError, match="gs://"):
        train(tiny_config("sft", num_nodes=2), captions, str(tmp_path / "run"))


@pytest.mark.slow
def test_two_processes_on_cpu_through_torchrun(captions, tmp_path):
    """The real launch path: torchrun -> python -m synthvlm.train -> DDP (gloo) over 2 CPU processes."""
    config = tiny_config("pretrain", gpus_per_node=2, global_batch_size=4)
    out = train(config, captions, str(tmp_path / "run"))
    stats = read_stats(out)
    assert (stats["world_size"], stats["distributed"], stats["global_step"]) == (2, "ddp", 2)
    assert LlavaForConditionalGeneration.from_pretrained(out).config.image_token_index > 0
