"""LLaVA-1.5 training (SynthVLM §3.4, Fig. 5): pretrain the projector -> SFT projector + LLM -> evaluate."""

from kfp import dsl

from components.validate import validate_train_config
from pipelines.common import named, train_and_evaluate
from synthvlm.run_config import TrainRunConfig, to_pipeline_arguments

# Defaults without validation: the paper's SFT data (LLaVA-665K) must be named by the user, and the
# first step says so.
_DEFAULTS = to_pipeline_arguments(TrainRunConfig.model_construct())


@dsl.pipeline(name="train", description=__doc__)
def pipeline(
    data_root: str,
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
    llm_secret: str = _DEFAULTS["llm_secret"],
    gpus_per_node: int = _DEFAULTS["gpus_per_node"],
    num_nodes: int = _DEFAULTS["num_nodes"],
    pretrain_datasets: str = _DEFAULTS["pretrain_datasets"],
    sft_datasets: str = _DEFAULTS["sft_datasets"],
    benchmarks: list = _DEFAULTS["benchmarks"],
    pretrain_config: str = _DEFAULTS["pretrain_config"],
    sft_config: str = _DEFAULTS["sft_config"],
    eval_config: str = _DEFAULTS["eval_config"],
):
    """Train and evaluate LLaVA-1.5.

    Args:
        data_root: Where models, checkpoints and eval results go (gs://, s3:// or a PVC path).
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        llm_secret: Kubernetes Secret with the LLM API key (LLM-judge evaluation; curation).
        gpus_per_node: GPUs per training pod (LLaVA-1.5: 8).
        num_nodes: Training nodes; > 1 runs a TrainJob (Kubeflow Trainer) or PyTorchJob.
        pretrain_datasets: Stage-1 LLaVA datasets, JSON: [{"uri": ..., "image_folder": ..., "ratio": 1}].
        sft_datasets: JSON list of LLaVA datasets for stage 2 (SynthVLM §4.1: LLaVA-665K). Required.
        benchmarks: Benchmark JSONL URIs or lmms_eval:<task> (default: SynthVLM Table 4 via lmms-eval).
        pretrain_config: JSON of TrainConfig for stage 1 (projector only, lr 1e-3, batch 256: LLaVA-1.5).
        sft_config: JSON of TrainConfig for stage 2 (projector + LLM, lr 2e-5, batch 128: LLaVA-1.5).
        eval_config: JSON of EvalConfig (decoding, answer parsing, LLM judge).
    """
    cfg = validate_train_config(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        llm_secret=llm_secret,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        pretrain_config=pretrain_config,
        sft_config=sft_config,
        eval_config=eval_config,
    )
    named(cfg, "validate parameters")
    evaluation = train_and_evaluate(
        data_root=data_root,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_config=cfg.outputs["pretrain_config"],
        sft_config=cfg.outputs["sft_config"],
        eval_config=cfg.outputs["eval_config"],
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
        after=cfg,
    )
    evaluation.set_display_name("evaluate SFT model")
