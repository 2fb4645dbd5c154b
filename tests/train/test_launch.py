import json

from synthvlm.train.config import TrainConfig, TrainDataset, parse_datasets
from synthvlm.train.launch import NodeInfo, in_job_pod, in_worker_process, node_info, torchrun_command

DATASETS = [TrainDataset(uri="gs://b/synth.json", image_folder="gs://b", ratio=0.5)]


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_single_node_command_starts_one_process_per_gpu():
    config = TrainConfig(stage="sft", gpus_per_node=8)
    cmd = torchrun_command(config, DATASETS, "gs://b/out", python="/venv/bin/python")
    assert cmd[:4] == ["/venv/bin/python", "-m", "torch.distributed.run", "--nproc-per-node=8"]
    assert "--standalone" in cmd and "--nnodes=1" in cmd
    module = cmd.index("-m", 3)
    assert cmd[module + 1] == "synthvlm.train"
    assert TrainConfig.model_validate_json(_arg(cmd, "--config-json")) == config
    assert parse_datasets(_arg(cmd, "--datasets-json")) == DATASETS
    assert _arg(cmd, "--output-dir") == "gs://b/out"


def test_multi_node_command_uses_the_job_pod_environment():
    config = TrainConfig(stage="sft", gpus_per_node=8, num_nodes=4)
    env = {"PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456", "RANK": "9"}
    assert node_info(config, env) == NodeInfo(2, "job-master-0", 23456)
    cmd = torchrun_command(config, DATASETS, "gs://b/out", node=node_info(config, env))
    assert "--standalone" not in cmd
    for flag in ("--nnodes=4", "--node-rank=2", "--master-addr=job-master-0", "--master-port=23456"):
        assert flag in cmd


def test_trainjob_pods_are_job_pods():
    """Trainer v2's torch plugin: rank = Job completion index, master = node 0 of the JobSet, port 29500."""
    config = TrainConfig(stage="sft", gpus_per_node=8, num_nodes=3)
    env = {
        "PET_NNODES": "3",
        "PET_NPROC_PER_NODE": "auto",  # ignored: --nproc-per-node comes from gpus_per_node
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29500",
    }
    assert in_job_pod(env) and node_info(config, env) == NodeInfo(1, "job-node-0-0.job", 29500)
    assert "--nproc-per-node=8" in torchrun_command(
        config, DATASETS, "gs://b/out", node=node_info(config, env)
    )


def test_older_operator_variables_and_local_defaults():
    config = TrainConfig(num_nodes=2)
    old = {"RANK": "1", "MASTER_ADDR": "m", "MASTER_PORT": "1234", "WORLD_SIZE": "2"}
    assert node_info(config, old) == NodeInfo(1, "m", 1234)
    assert node_info(config, {}) == NodeInfo(0, "127.0.0.1", 29500)
    assert in_job_pod(old) and not in_job_pod({})
    assert in_worker_process({"LOCAL_RANK": "0"}) and not in_worker_process(old)


def test_worker_arguments_are_json():
    cmd = torchrun_command(TrainConfig(gpus_per_node=2), DATASETS, "/out")
    assert json.loads(_arg(cmd, "--datasets-json"))[0]["ratio"] == 0.5
