"""StableLLaVA end to end (v2 §5): synthesize images and dialogues -> LLaVA-1.5 SFT on a mixture of the
synthetic data and your datasets -> evaluation on the synthesized eval set and named benchmarks -> one
comparison table."""

from kfp import dsl

from components.evaluate import compare_models
from components.stablellava import stablellava_training_inputs
from components.validate import validate_stablellava_end_to_end_config
from pipelines.common import form_documented, named
from pipelines.end_to_end_pipeline import llava_training
from pipelines.stablellava_pipeline import pipeline as stablellava_data
from synthvlm.run_config import StableLLaVAEndToEndRunConfig, to_pipeline_arguments

# Defaults without validation: the paper's data (LLaVA-1.5's stage-1 data, LLaVA-665K) must be named by
# the user, and the first step says so.
_DEFAULTS = to_pipeline_arguments(StableLLaVAEndToEndRunConfig.model_construct())


@dsl.pipeline(name="stablellava-end-to-end", description=__doc__)
@form_documented("stablellava-end-to-end")
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
    num_shards: int = _DEFAULTS["num_shards"],
    sft_on_synthetic: bool = _DEFAULTS["sft_on_synthetic"],
    synthetic_ratio: float = _DEFAULTS["synthetic_ratio"],
    pretrain_on_synthetic: bool = _DEFAULTS["pretrain_on_synthetic"],
    abilities: list = _DEFAULTS["abilities"],
    prompts_per_ability: int = _DEFAULTS["prompts_per_ability"],
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
    keywords_config: str = _DEFAULTS["keywords_config"],
    prompts_config: str = _DEFAULTS["prompts_config"],
    dialogues_config: str = _DEFAULTS["dialogues_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
    report_config: str = _DEFAULTS["report_config"],
):
    """StableLLaVA data, LLaVA-1.5 training on it and evaluation in one run.

    Args:
        data_root: Where data, models, checkpoints and eval results go (gs://, s3:// or a PVC path).
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        llm_secret: Kubernetes Secret with the LLM API key (key OPENAI_API_KEY); never a parameter value.
        gpus_per_node: GPUs per training pod (LLaVA-1.5: 8).
        num_nodes: Training nodes; > 1 runs a TrainJob (Kubeflow Trainer) or PyTorchJob.
        pretrain_datasets: Stage-1 LLaVA datasets, JSON: [{"uri": ..., "image_folder": ..., "ratio": 1}].
        sft_datasets: SFT datasets mixed with the synthetic data, JSON list (v2 §5: LLaVA-665K).
        benchmarks: Benchmarks besides the synthesized eval set (lmms_eval:<task> or JSONL URIs).
        num_shards: Number of generation shards, one GPU pod each.
        sft_on_synthetic: Fine-tune on the synthetic SFT data (v2 §5: yes, mixed with LLaVA-665K).
        synthetic_ratio: Mixing ratio of the synthetic SFT data: samples per epoch / its size.
        pretrain_on_synthetic: Also pretrain the projector on the synthetic image-caption pairs.
        pretrain_config: Expert settings: JSON of TrainConfig for stage 1 (LLaVA-1.5).
        sft_config: Expert settings: JSON of TrainConfig for stage 2 (LLaVA-1.5).
        eval_config: Expert settings: JSON of EvalConfig (decoding, answer parsing, LLM judge).
        keywords_config: Expert settings: JSON of KeywordsConfig (keyword banks per ability; v1 §4.3).
        prompts_config: Expert settings: JSON of PromptsConfig (Fig. 4 template, in-context pool, filters).
        dialogues_config: Expert settings: JSON of DialoguesConfig (Q&A, multi-turn, multi-image, eval).
        generate_config: Expert settings: JSON of GenerateConfig beyond the typed fields (scheduler, seed...).
        score_config: Expert settings: JSON of ScoreConfig beyond the typed fields (the CLIP check's model).
        select_config: Expert settings: JSON of SelectConfig beyond the typed fields.
        export_config: Expert settings: JSON of StableLLaVAExportConfig (SFT JSON, eval JSONL, overlap).
        report_config: Expert settings: JSON of StableLLaVAReportConfig (HTML report).
    """
    cfg = validate_stablellava_end_to_end_config(
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
        sft_on_synthetic=sft_on_synthetic,
        synthetic_ratio=synthetic_ratio,
        pretrain_on_synthetic=pretrain_on_synthetic,
        abilities=abilities,
        prompts_per_ability=prompts_per_ability,
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
        keywords_config=keywords_config,
        prompts_config=prompts_config,
        dialogues_config=dialogues_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
        report_config=report_config,
    )
    named(cfg, "validate parameters")
    data = stablellava_data(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        llm_secret=llm_secret,
        num_shards=num_shards,
        abilities=abilities,
        prompts_per_ability=prompts_per_ability,
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
        keywords_config=keywords_config,
        prompts_config=prompts_config,
        dialogues_config=dialogues_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
        report_config=report_config,
    ).after(cfg)
    data.set_display_name("StableLLaVA data")
    inputs = stablellava_training_inputs(
        exported=data.output,
        data_root=data_root,
        pretrain_datasets=pretrain_datasets,
        sft_datasets=sft_datasets,
        benchmarks=benchmarks,
        pretrain_on_synthetic=pretrain_on_synthetic,
        sft_on_synthetic=sft_on_synthetic,
        synthetic_ratio=synthetic_ratio,
    )
    named(inputs, "training mixtures + benchmarks")
    training = llava_training(
        data_root=data_root,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        gpus_per_node=gpus_per_node,
        num_nodes=num_nodes,
        pretrain_datasets=inputs.outputs["pretrain_datasets"],
        sft_datasets=inputs.outputs["sft_datasets"],
        benchmarks=inputs.outputs["benchmarks"],
        pretrain_config=cfg.outputs["pretrain_config"],
        sft_config=cfg.outputs["sft_config"],
        eval_config=cfg.outputs["eval_config"],
        synthetic_dataset="",
        sft_on_synthetic=False,
    )
    training.set_display_name("LLaVA-1.5 training + evaluation")
    table = compare_models(results=[training.output], data_root=data_root)
    named(table, "comparison table")
