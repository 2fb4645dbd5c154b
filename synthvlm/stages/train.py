"""Stage: train LLaVA-1.5, stage 1 (pretrain: projector) or stage 2 (SFT: projector + LLM).

`train(config, datasets, output_dir)` writes an HF-format model (weights, config, processor with the
tokenizer) to `{output_dir}/model`, then its done marker, and returns that URI. Checkpoints go to
`{output_dir}/checkpoints`; a rerun resumes from the newest one, and a finished output is not redone.

How the processes start depends on where it runs:
- inside a torchrun process (LOCAL_RANK set): this process trains (synthvlm.train.trainer);
- num_nodes > 1 outside a job pod: a Kubeflow job is created and followed, a Trainer v2 TrainJob
  (synthvlm.train.trainjob) or, with cluster.api "pytorchjob", a PyTorchJob (synthvlm.train.kubeflow);
  every pod of it runs this stage again (python -m synthvlm.train), which lands in the next case;
- several GPUs or nodes: torchrun starts one process per GPU on this node (synthvlm.train.launch);
- otherwise: one process, here.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from typing import TYPE_CHECKING

from synthvlm import storage
from synthvlm.errors import ConfigError
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, mark_done, read_stats, require_done
from synthvlm.train.config import STAGE_DEFAULTS, TrainConfig, TrainDataset, parse_datasets
from synthvlm.train.kubeflow import (
    ClusterJobConfig,
    current_namespace,
    custom_objects_api,
    job_name,
    pytorchjob_manifest,
    run_pytorchjob,
)
from synthvlm.train.launch import in_job_pod, in_worker_process, node_info, torchrun_command, worker_args

if TYPE_CHECKING:
    from kubernetes.client import Configuration

log = logging.getLogger(__name__)

MODEL_DIR = "model"
# What every pod of a multi-node job runs (synthvlm/train/__main__.py).
ENTRYPOINT = ("python", "-m", "synthvlm.train")

__all__ = [
    "STAGE_DEFAULTS",
    "ClusterJobConfig",
    "TrainConfig",
    "TrainDataset",
    "model_uri",
    "parse_datasets",
    "train",
]


def model_uri(output_dir: str) -> str:
    return storage.join(output_dir, MODEL_DIR)


def _as_datasets(datasets: Sequence[TrainDataset | str]) -> list[TrainDataset]:
    out = [d if isinstance(d, TrainDataset) else TrainDataset.from_spec(d) for d in datasets]
    if not out:
        raise ConfigError("train: at least one dataset is needed")
    return out


def train(
    config: TrainConfig,
    datasets: Sequence[TrainDataset | str],
    output_dir: str,
    *,
    kube_config: Configuration | None = None,
) -> str:
    """Train one stage on `datasets` (LLaVA JSON files); return the URI of the saved model folder.

    `kube_config` is the kubernetes client configuration a multi-node run creates its job with (None: the
    pod's service account, else kube-config); tests point it at a fake API server.
    """
    sets = _as_datasets(datasets)
    if in_worker_process() or in_job_pod():
        # Started by a run below for its fingerprint folder: train there, the runner is the caller's.
        return _dispatch(config, sets, output_dir, kube_config)
    inputs = {"datasets": [d.uri for d in sets], "init_from": config.init_from}
    return run_stage(
        TRAIN,
        config,
        inputs,
        model_uri(output_dir),
        root=output_dir,
        params={"datasets": [d.model_dump(mode="json", exclude={"uri"}) for d in sets]},
        context={"datasets": sets, "kube_config": kube_config},
    )


def _process(config: TrainConfig, run: StageRun) -> StageStats:
    out = _dispatch(config, run.context["datasets"], run.dir, run.context["kube_config"])
    done = read_stats(out)  # written by the main training process
    stats = StageStats(stage=done.get("stage", f"train_{config.stage}"))
    stats.count_in, stats.count_out = done.get("count_in", 0), done.get("count_out", 0)
    stats.extra = {k: v for k, v in done.items() if k not in ("stage", "count_in", "count_out", "seconds")}
    return stats


_SAME_TRAINING = "the same optimisation steps (global batch fixed), only scheduled differently"
TRAIN = Stage(
    name="train",
    process=_process,
    excluded={
        "per_device_batch_size": _SAME_TRAINING + " (gradient accumulation makes up the global batch)",
        "gradient_checkpointing": "recomputes activations instead of storing them: the same gradients",
        "dataloader_num_workers": "parallel loading of the same samples",
        "save_steps": "when checkpoints are written, not what is trained",
        "save_total_limit": "how many checkpoints are kept",
        "logging_steps": "how often progress is logged",
        "master_port": "the rendezvous port",
        "local_work_dir": "where checkpoints wait before upload",
        "cluster": "where the multi-node job's pods run",
    },
    publish_copy=False,  # a model folder: the stable path gets a pointer, not a copy of the weights
)


def _dispatch(
    config: TrainConfig, sets: list[TrainDataset], output_dir: str, kube_config: Configuration | None
) -> str:
    if config.num_nodes > 1 and not storage.is_remote(output_dir):
        raise ConfigError("train: num_nodes > 1 needs a gs:// or s3:// output_dir (the nodes share no disk)")
    if in_worker_process():
        return _train_here(config, sets, output_dir)
    if config.num_nodes > 1 and not in_job_pod():
        return _train_on_cluster(config, sets, output_dir, kube_config)
    if config.world_size > 1:
        return _launch_torchrun(config, sets, output_dir)
    return _train_here(config, sets, output_dir)


def _train_here(config: TrainConfig, datasets: list[TrainDataset], output_dir: str) -> str:
    from synthvlm.train.trainer import run_training  # torch/transformers only where training happens

    out = model_uri(output_dir)
    stats = StageStats(stage=f"train_{config.stage}")
    result = run_training(config, datasets, output_dir)
    if result.pop("is_main_process"):
        resolved = config.resolved()
        stats.count_in = result["samples_per_epoch"]
        stats.count_out = result["global_step"] * int(resolved.global_batch_size)  # type: ignore[arg-type]
        stats.extra.update(result)
        stats.extra.update(
            template=resolved.template,
            learning_rate=resolved.learning_rate,
            global_batch_size=resolved.global_batch_size,
        )
        mark_done(out, stats)
        log.info("trained %s: %s", config.stage, json.dumps(read_stats(out), sort_keys=True))
    return out


def _launch_torchrun(config: TrainConfig, datasets: list[TrainDataset], output_dir: str) -> str:
    out = model_uri(output_dir)
    cmd = torchrun_command(config, datasets, output_dir)
    log.info("starting %d training processes on this node: %s", config.gpus_per_node, " ".join(cmd[:8]))
    completed = subprocess.run(cmd, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"training processes exited with status {completed.returncode}")
    if node_info(config).node_rank == 0 or storage.is_remote(output_dir):
        require_done(out)
    return out


def _train_on_cluster(
    config: TrainConfig, datasets: list[TrainDataset], output_dir: str, kube_config: Configuration | None
) -> str:
    """Create (or find) the job whose pods run this call, follow it to the end, check its output."""
    from synthvlm.images import image_for

    out = model_uri(output_dir)
    args = worker_args(config, datasets, output_dir)
    cluster = config.cluster
    # Same inputs, same name: a retried step follows the job it started instead of starting another.
    name = job_name(config.stage, json.dumps(args))
    namespace = cluster.namespace or current_namespace()
    image = cluster.image or image_for("train")
    labels = {"synthvlm/stage": f"train-{config.stage}"}
    if cluster.api == "trainjob":
        from synthvlm.train.trainjob import run_trainjob  # the kubeflow SDK takes ~1.5 s to import

        run_trainjob(
            name,
            ENTRYPOINT,
            args,
            num_nodes=config.num_nodes,
            gpus_per_node=config.gpus_per_node,
            config=cluster,
            namespace=namespace,
            image=image,
            labels=labels,
            configuration=kube_config,
        )
    else:
        manifest = pytorchjob_manifest(
            name,
            [*ENTRYPOINT, *args],
            num_nodes=config.num_nodes,
            gpus_per_node=config.gpus_per_node,
            config=cluster,
            namespace=namespace,
            image=image,
            labels=labels,
        )
        run_pytorchjob(custom_objects_api(kube_config), manifest, cluster)
    require_done(out)
    return out
