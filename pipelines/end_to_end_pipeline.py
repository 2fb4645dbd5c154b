"""End to end (SynthVLM §3-§4): SynthVLM data -> LLaVA-1.5 pretraining on it -> SFT -> evaluation."""

from kfp import dsl

from components.validate import validate_end_to_end_config
from pipelines.common import form_documented, named, train_and_evaluate
from pipelines.synthvlm_pipeline import pipeline as synthvlm_data
from synthvlm.run_config import EndToEndRunConfig, to_pipeline_arguments

# Defaults without validation: the paper's SFT data (LLaVA-665K) must be named by the user, and the
# first step says so.
_DEFAULTS = to_pipeline_arguments(EndToEndRunConfig.model_construct())


# Training runs as a nested pipeline, like the data: its dsl.If/Else groups (one node or a multi-node job)
# would otherwise be numbered like the SynthVLM data pipeline's own (condition-2, ...), and kfp 2.17 then
# looks up the wrong component for them ("component_input_parameter ... not found"). Nested pipelines are
# merged with their components renamed apart.
@dsl.pipeline(name="llava-training", description="LLaVA-1.5: pretrain the projector -> SFT -> evaluate.")
def llava_training(
    data_root: str,
    gpu_node_selector: dict,
    gpu_tolerations: list,
    gpus_per_node: int,
    num_nodes: int,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: list,
    pretrain_config: str,
    sft_config: str,
    eval_config: str,
    synthetic_dataset: str,
    sft_on_synthetic: bool,
) -> str:
    evaluation = train_and_evaluate(
        data_root=data_root,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_config=pretrain_config,
        sft_config=sft_config,
        eval_config=eval_config,
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        node_selector=gpu_node_selector,
        tolerations=gpu_tolerations,
        synthetic_dataset=synthetic_dataset,
        image_folder=data_root,
        sft_on_synthetic=sft_on_synthetic,
    )
    evaluation.set_display_name("evaluate SFT model")
    return evaluation.outputs["Output"]


@dsl.pipeline(name="end-to-end", description=__doc__)
@form_documented("end-to-end")
def pipeline(
    data_root: str,
    captions: str,
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
    llm_secret: str = _DEFAULTS["llm_secret"],
    gpus_per_node: int = _DEFAULTS["gpus_per_node"],
    num_nodes: int = _DEFAULTS["num_nodes"],
    pretrain_datasets: str = _DEFAULTS["pretrain_datasets"],
    sft_datasets: str = _DEFAULTS["sft_datasets"],
    benchmarks: list = _DEFAULTS["benchmarks"],
    num_shards: int = _DEFAULTS["num_shards"],
    max_captions: int = _DEFAULTS["max_captions"],
    curate_captions: bool = _DEFAULTS["curate_captions"],
    sft_on_synthetic: bool = _DEFAULTS["sft_on_synthetic"],
    generation_model: str = _DEFAULTS["generation_model"],
    steps: int = _DEFAULTS["steps"],
    guidance_scale: float = _DEFAULTS["guidance_scale"],
    resolution: int = _DEFAULTS["resolution"],
    clip_model: str = _DEFAULTS["clip_model"],
    clip_pretrained: str = _DEFAULTS["clip_pretrained"],
    select_mode: str = _DEFAULTS["select_mode"],
    select_k: int = _DEFAULTS["select_k"],
    select_fraction: float = _DEFAULTS["select_fraction"],
    select_threshold: float = _DEFAULTS["select_threshold"],
    llm_base_url: str = _DEFAULTS["llm_base_url"],
    llm_model: str = _DEFAULTS["llm_model"],
    pretrain_config: str = _DEFAULTS["pretrain_config"],
    sft_config: str = _DEFAULTS["sft_config"],
    eval_config: str = _DEFAULTS["eval_config"],
    curate_config: str = _DEFAULTS["curate_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
    report_config: str = _DEFAULTS["report_config"],
):
    """Synthetic data, training and evaluation in one run.

    Args:
        data_root: Where data, models, checkpoints and eval results go (gs://, s3:// or a PVC path).
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        llm_secret: Kubernetes Secret with the LLM API key (LLM-judge evaluation; curation).
        gpus_per_node: GPUs per training pod (LLaVA-1.5: 8).
        num_nodes: Training nodes; > 1 runs a TrainJob (Kubeflow Trainer) or PyTorchJob.
        pretrain_datasets: Stage-1 LLaVA datasets, JSON: [{"uri": ..., "image_folder": ..., "ratio": 1}].
        sft_datasets: JSON list of LLaVA datasets for stage 2 (SynthVLM §4.1: LLaVA-665K). Required.
        benchmarks: Benchmark JSONL URIs or lmms_eval:<task> (default: SynthVLM Table 4 via lmms-eval).
        num_shards: Number of generation shards, one GPU pod each.
        captions: Captions file/URI (.jsonl/.csv/.parquet: id, caption); bundled:demo_captions.jsonl = demo.
        max_captions: Use only the first N captions; 0 = all.
        curate_captions: Curate captions first (SynthVLM §3.1).
        sft_on_synthetic: Also fine-tune on the synthetic data (SynthVLM §4.1: no).
        pretrain_config: JSON of TrainConfig for stage 1 (projector only, lr 1e-3, batch 256: LLaVA-1.5).
        sft_config: JSON of TrainConfig for stage 2 (projector + LLM, lr 2e-5, batch 128: LLaVA-1.5).
        eval_config: JSON of EvalConfig (decoding, answer parsing, LLM judge).
        curate_config: JSON of CurateConfig (SynthVLM §3.1).
        generate_config: JSON of GenerateConfig (SDXL base 1.0, 60 steps, 1024x1024: SynthVLM §3.1).
        score_config: JSON of ScoreConfig (CLIPScore, SynthVLM §3.2).
        select_config: JSON of SelectConfig (top_k k=100000: SynthVLM §3.2).
        export_config: JSON of ExportConfig (LLaVA pretraining JSON).
        report_config: JSON of ReportConfig (HTML report).
    """
    cfg = validate_end_to_end_config(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        llm_secret=llm_secret,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        num_shards=num_shards,
        captions=captions,
        max_captions=max_captions,
        curate_captions=curate_captions,
        sft_on_synthetic=sft_on_synthetic,
        generation_model=generation_model,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        select_mode=select_mode,
        select_k=select_k,
        select_fraction=select_fraction,
        select_threshold=select_threshold,
        llm_base_url=llm_base_url,
        llm_model=llm_model,
        pretrain_config=pretrain_config,
        sft_config=sft_config,
        eval_config=eval_config,
        curate_config=curate_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
        report_config=report_config,
    )
    named(cfg, "validate parameters")
    data = synthvlm_data(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        llm_secret=llm_secret,
        num_shards=num_shards,
        captions=captions,
        max_captions=max_captions,
        curate_captions=curate_captions,
        generation_model=generation_model,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        select_mode=select_mode,
        select_k=select_k,
        select_fraction=select_fraction,
        select_threshold=select_threshold,
        llm_base_url=llm_base_url,
        llm_model=llm_model,
        curate_config=curate_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
        report_config=report_config,
    ).after(cfg)
    data.set_display_name("SynthVLM data")
    training = llava_training(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        pretrain_config=cfg.outputs["pretrain_config"],
        sft_config=cfg.outputs["sft_config"],
        eval_config=cfg.outputs["eval_config"],
        synthetic_dataset=data.output,
        sft_on_synthetic=sft_on_synthetic,
    )
    training.set_display_name("LLaVA-1.5 training + evaluation")
