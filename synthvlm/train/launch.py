"""Launching the training processes: torchrun inside one pod, and the node identity inside a job pod.

`torchrun_command` builds the command that starts `gpus_per_node` processes of `python -m synthvlm.train`
(each one runs the train stage with LOCAL_RANK set). One node uses torchrun's standalone rendezvous;
several nodes use its static rendezvous on the master pod, with this node's rank and the master's address
taken from what the Kubeflow job controller puts in every pod's environment: PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT from Trainer v2's torch plugin (a TrainJob: rank = the Job completion
index, master <job>-node-0-0.<job>:29500) and from training-operator >= 1.7 (a PyTorchJob); RANK /
MASTER_ADDR / MASTER_PORT from older training operators.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from synthvlm.train.config import TrainConfig, TrainDataset


@dataclass(frozen=True)
class NodeInfo:
    node_rank: int
    master_addr: str
    master_port: int


def in_worker_process(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a process that torchrun (or another elastic launcher) started."""
    return "LOCAL_RANK" in (os.environ if environ is None else environ)


def in_job_pod(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a pod of a TrainJob or PyTorchJob (its controller sets the master's address)."""
    env = os.environ if environ is None else environ
    return "PET_MASTER_ADDR" in env or "MASTER_ADDR" in env


def node_info(config: TrainConfig, environ: Mapping[str, str] | None = None) -> NodeInfo:
    """This node's rank and the rendezvous address: from the job pod's environment, else node 0 locally."""
    env = os.environ if environ is None else environ
    rank = env.get("PET_NODE_RANK", env.get("RANK", "0"))
    addr = env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    port = env.get("PET_MASTER_PORT", env.get("MASTER_PORT", str(config.master_port)))
    return NodeInfo(int(rank), addr, int(port))


def worker_args(config: TrainConfig, datasets: Sequence[TrainDataset], output_dir: str) -> list[str]:
    """Arguments of `python -m synthvlm.train` that reproduce a train() call."""
    return [
        "--config-json",
        config.model_dump_json(),
        "--datasets-json",
        json.dumps([d.model_dump(mode="json") for d in datasets]),
        "--output-dir",
        output_dir,
    ]


def torchrun_command(
    config: TrainConfig,
    datasets: Sequence[TrainDataset],
    output_dir: str,
    *,
    node: NodeInfo | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command that starts this node's training processes (one per GPU)."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={config.gpus_per_node}"]
    if config.num_nodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
    else:
        node = node or node_info(config)
        cmd += [
            f"--nnodes={config.num_nodes}",
            f"--node-rank={node.node_rank}",
            f"--master-addr={node.master_addr}",
            f"--master-port={node.master_port}",
        ]
    return [*cmd, "-m", "synthvlm.train", *worker_args(config, datasets, output_dir)]
