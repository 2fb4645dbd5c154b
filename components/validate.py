from kfp import dsl

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_synthvlm_config(
    captions: str,
    max_captions: int,
    curate_captions: bool,
    llm_secret: str,
    data_root: str,
    num_shards: int,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    curate_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
):
    """Validate every parameter with the pydantic configs before any GPU pod is requested."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.kfp_support import setup_logging
    from synthvlm.run_config import SynthVLMRunConfig, from_pipeline_arguments
    from synthvlm.safety import validate_safety

    setup_logging()
    config = from_pipeline_arguments(parameters, SynthVLMRunConfig)
    config.require_data_root()
    validate_safety(config.generate.safety)  # blocklist file readable, checker known: before any GPU pod


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_stablellava_config(
    llm_secret: str,
    data_root: str,
    num_shards: int,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    keywords_config: str,
    prompts_config: str,
    dialogues_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
):
    """Validate every parameter with the pydantic configs before any GPU pod is requested."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.kfp_support import setup_logging
    from synthvlm.run_config import StableLLaVARunConfig, from_pipeline_arguments
    from synthvlm.safety import validate_safety

    setup_logging()
    config = from_pipeline_arguments(parameters, StableLLaVARunConfig)
    config.require_data_root()
    validate_safety(config.generate.safety)  # blocklist file readable, checker known: before any GPU pod


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
):
    """Validate every parameter with the pydantic configs before any GPU pod is requested."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.kfp_support import setup_logging
    from synthvlm.run_config import TrainRunConfig, from_pipeline_arguments

    setup_logging()
    from_pipeline_arguments(parameters, TrainRunConfig).require_data_root()


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def validate_end_to_end_config(
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
    captions: str,
    max_captions: int,
    curate_captions: bool,
    sft_on_synthetic: bool,
    pretrain_config: str,
    sft_config: str,
    eval_config: str,
    curate_config: str,
    generate_config: str,
    score_config: str,
    select_config: str,
    export_config: str,
    report_config: str,
):
    """Validate every parameter with the pydantic configs before any GPU pod is requested."""
    parameters = dict(locals())  # first statement: exactly the pipeline parameters

    from synthvlm.kfp_support import setup_logging
    from synthvlm.run_config import EndToEndRunConfig, from_pipeline_arguments
    from synthvlm.safety import validate_safety

    setup_logging()
    config = from_pipeline_arguments(parameters, EndToEndRunConfig)
    config.require_data_root()
    validate_safety(config.generate.safety)  # blocklist file readable, checker known: before any GPU pod
