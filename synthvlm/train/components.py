"""What the train components turn their KFP parameters into (kept here so components stay thin)."""

from __future__ import annotations

import json

from synthvlm.config import validate
from synthvlm.errors import ConfigError
from synthvlm.train.config import TrainConfig, TrainDataset, parse_datasets


def stage_inputs(
    stage: str,
    config_json: str,
    datasets_json: str,
    gpus_per_node: int,
    num_nodes: int,
    dataset_uri: str = "",
    image_folder: str = "",
    dataset_ratio: float = 1.0,
    init_from: str = "",
) -> tuple[TrainConfig, list[TrainDataset]]:
    """(config, datasets) of one stage; stage, GPU/node counts and init_from override the JSON config."""
    try:
        fields = json.loads(config_json) if config_json.strip() else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train config_json is not valid JSON: {exc}") from None
    # KFP local runs can hand ints over as floats.
    fields.update(stage=stage, gpus_per_node=int(gpus_per_node), num_nodes=int(num_nodes))
    if init_from:
        fields["init_from"] = init_from
    config = validate(TrainConfig, fields, source=f"{stage} config_json")
    datasets = parse_datasets(datasets_json) if datasets_json.strip() not in ("", "[]") else []
    if dataset_uri:
        upstream = {"uri": dataset_uri, "image_folder": image_folder or None, "ratio": dataset_ratio}
        datasets.insert(0, validate(TrainDataset, upstream, source=f"{stage} dataset_uri"))
    if not datasets:
        raise ConfigError(f"{stage}: no datasets (set dataset_uri and/or datasets_json)")
    return config, datasets


def run_stage(
    stage: str,
    data_root: str,
    config_json: str,
    datasets_json: str,
    gpus_per_node: int,
    num_nodes: int,
    dataset_uri: str = "",
    image_folder: str = "",
    dataset_ratio: float = 1.0,
    init_from: str = "",
) -> str:
    """What a train component does: train `stage` into {data_root}/train/{stage}; returns the model URI."""
    from synthvlm import storage
    from synthvlm.stages.train import train

    config, datasets = stage_inputs(
        stage,
        config_json,
        datasets_json,
        gpus_per_node,
        num_nodes,
        dataset_uri,
        image_folder,
        dataset_ratio,
        init_from,
    )
    return train(config, datasets, storage.join(data_root, "train", stage))
