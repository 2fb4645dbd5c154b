from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("train"), install_kfp_package=False)
def pretrain(
    config_json: str,
    datasets_json: str,
    data_root: str,
    gpus_per_node: int,
    num_nodes: int,
    metrics: Output[Metrics],
    dataset_uri: str = "",
    image_folder: str = "",
    dataset_ratio: float = 1.0,
) -> str:
    """LLaVA-1.5 stage 1: train the projector. `dataset_uri` (an upstream LLaVA JSON, e.g. the export) joins
    `datasets_json`; num_nodes > 1 submits a TrainJob (Kubeflow Trainer) or PyTorchJob from this pod, which
    then holds no GPU (the pipeline's multi-node branch)."""
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.train.components import run_stage

    setup_logging()
    out = run_stage(
        "pretrain",
        data_root,
        config_json,
        datasets_json,
        gpus_per_node,
        num_nodes,
        dataset_uri,
        image_folder,
        dataset_ratio,
    )
    log_stage_metrics(metrics, out)
    return out


@dsl.component(base_image=image_for("train"), install_kfp_package=False)
def sft(
    config_json: str,
    init_from: str,
    datasets_json: str,
    data_root: str,
    gpus_per_node: int,
    num_nodes: int,
    metrics: Output[Metrics],
    dataset_uri: str = "",
    image_folder: str = "",
    dataset_ratio: float = 1.0,
    use_dataset_uri: bool = True,
) -> str:
    """LLaVA-1.5 stage 2: train projector + LLM from `init_from` (stage 1's model URI), e.g. on LLaVA-665K.
    `use_dataset_uri` False leaves the upstream dataset out (SynthVLM §4.1 fine-tunes on LLaVA-665K only)."""
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.train.components import run_stage

    setup_logging()
    out = run_stage(
        "sft",
        data_root,
        config_json,
        datasets_json,
        gpus_per_node,
        num_nodes,
        dataset_uri if use_dataset_uri else "",
        image_folder,
        dataset_ratio,
        init_from,
    )
    log_stage_metrics(metrics, out)
    return out
