"""The first task of every pipeline: validate every parameter with the pydantic configs before any GPU pod
is requested, and hand each stage its effective config (its JSON parameter with the run form's typed
fields filled in) as an output, so every later task reads one validated config."""

from typing import NamedTuple

from kfp import dsl

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_synthvlm_config(
    data_root: str,
    captions: str,
    max_captions: int,
    curate_captions: bool,
    llm_secret: str,
    num_shards: int,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    generation_model: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
    clip_model: str,
    clip_pretrained: str,
    select_mode: str,
    select_k: int,
    select_fraction: float,
    select_threshold: float,
    llm_base_url: str,
    llm_model: str,
    curate_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
) -> NamedTuple(
    "Configs",
    [
        ("curate_config", str),
        ("generate_config", str),
        ("score_config", str),
        ("select_config", str),
        ("export_config", str),
        ("report_config", str),
    ],
):
    """Validate every parameter; return each stage's effective config JSON."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.run_config import validated_stage_configs

    # In the order of the outputs above: the run config\'s sections (checked by a test).
    return tuple(validated_stage_configs(parameters, "synthvlm").values())


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_stablellava_config(
    data_root: str,
    llm_secret: str,
    num_shards: int,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    abilities: list,
    prompts_per_ability: int,
    generation_model: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
    clip_model: str,
    clip_pretrained: str,
    select_mode: str,
    select_k: int,
    select_fraction: float,
    select_threshold: float,
    llm_base_url: str,
    llm_model: str,
    keywords_config: str,
    prompts_config: str,
    dialogues_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
) -> NamedTuple(
    "Configs",
    [
        ("keywords_config", str),
        ("prompts_config", str),
        ("dialogues_config", str),
        ("generate_config", str),
        ("score_config", str),
        ("select_config", str),
        ("export_config", str),
        ("report_config", str),
    ],
):
    """Validate every parameter; return each stage's effective config JSON."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.run_config import validated_stage_configs

    # In the order of the outputs above: the run config\'s sections (checked by a test).
    return tuple(validated_stage_configs(parameters, "stablellava").values())


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_train_config(
    data_root: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    llm_secret: str,
    gpus_per_node: int,
    num_nodes: int,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: list,
    pretrain_config: str,
    sft_config: str,
    eval_config: str,
) -> NamedTuple(
    "Configs",
    [
        ("pretrain_config", str),
        ("sft_config", str),
        ("eval_config", str),
    ],
):
    """Validate every parameter; return each stage's effective config JSON."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.run_config import validated_stage_configs

    # In the order of the outputs above: the run config\'s sections (checked by a test).
    return tuple(validated_stage_configs(parameters, "train").values())


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_end_to_end_config(
    data_root: str,
    captions: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    llm_secret: str,
    gpus_per_node: int,
    num_nodes: int,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: list,
    num_shards: int,
    max_captions: int,
    curate_captions: bool,
    sft_on_synthetic: bool,
    generation_model: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
    clip_model: str,
    clip_pretrained: str,
    select_mode: str,
    select_k: int,
    select_fraction: float,
    select_threshold: float,
    llm_base_url: str,
    llm_model: str,
    pretrain_config: str,
    sft_config: str,
    eval_config: str,
    curate_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
) -> NamedTuple(
    "Configs",
    [
        ("pretrain_config", str),
        ("sft_config", str),
        ("eval_config", str),
        ("curate_config", str),
        ("generate_config", str),
        ("score_config", str),
        ("select_config", str),
        ("export_config", str),
        ("report_config", str),
    ],
):
    """Validate every parameter; return each stage's effective config JSON."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.run_config import validated_stage_configs

    # In the order of the outputs above: the run config\'s sections (checked by a test).
    return tuple(validated_stage_configs(parameters, "end-to-end").values())


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_stablellava_end_to_end_config(
    data_root: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    llm_secret: str,
    gpus_per_node: int,
    num_nodes: int,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: list,
    num_shards: int,
    sft_on_synthetic: bool,
    synthetic_ratio: float,
    pretrain_on_synthetic: bool,
    abilities: list,
    prompts_per_ability: int,
    generation_model: str,
    steps: int,
    guidance_scale: float,
    resolution: int,
    clip_model: str,
    clip_pretrained: str,
    select_mode: str,
    select_k: int,
    select_fraction: float,
    select_threshold: float,
    llm_base_url: str,
    llm_model: str,
    pretrain_config: str,
    sft_config: str,
    eval_config: str,
    keywords_config: str,
    prompts_config: str,
    dialogues_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
) -> NamedTuple(
    "Configs",
    [
        ("pretrain_config", str),
        ("sft_config", str),
        ("eval_config", str),
        ("keywords_config", str),
        ("prompts_config", str),
        ("dialogues_config", str),
        ("generate_config", str),
        ("score_config", str),
        ("select_config", str),
        ("export_config", str),
        ("report_config", str),
    ],
):
    """Validate every parameter; return each stage's effective config JSON."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.run_config import validated_stage_configs

    # In the order of the outputs above: the run config's sections (checked by a test).
    return tuple(validated_stage_configs(parameters, "stablellava-end-to-end").values())
