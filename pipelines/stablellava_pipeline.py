"""StableLLaVA (v1 Fig. 3, v2 Fig. 2): an LLM writes keywords and Stable Diffusion prompts per ability ->
SDXL images (sharded over GPU pods) -> the LLM writes dialogues from the same prompts -> CLIP check
(keep score >= gamma = 0.25) -> LLaVA pretraining/SFT data and an eval set."""

from kfp import dsl

from components.report import write_stablellava_report
from components.select import select_pairs
from components.stablellava import (
    stablellava_dialogues,
    stablellava_export,
    stablellava_keywords,
    stablellava_prompts,
)
from components.validate import validate_stablellava_config
from pipelines.common import form_documented, generate_and_score, named, with_llm_key
from synthvlm.run_config import StableLLaVARunConfig, to_pipeline_arguments

_DEFAULTS = to_pipeline_arguments(StableLLaVARunConfig())


@dsl.pipeline(name="stablellava", description=__doc__)
@form_documented("stablellava")
def pipeline(
    data_root: str,
    llm_secret: str = _DEFAULTS["llm_secret"],
    num_shards: int = _DEFAULTS["num_shards"],
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
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
    keywords_config: str = _DEFAULTS["keywords_config"],
    prompts_config: str = _DEFAULTS["prompts_config"],
    dialogues_config: str = _DEFAULTS["dialogues_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
    report_config: str = _DEFAULTS["report_config"],
) -> str:
    """StableLLaVA synthetic visual instruction data; returns the LLaVA SFT JSON URI (its folder holds the
    interleaved SFT JSON, the pretraining JSON and the eval set).

    Args:
        data_root: Where prompts, images, dialogues and the exports go (gs://, s3:// or a PVC path).
        llm_secret: Kubernetes Secret with the LLM API key (key OPENAI_API_KEY); never a parameter value.
        num_shards: Number of generation shards, one GPU pod each.
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        keywords_config: Expert settings: JSON of KeywordsConfig (keyword banks per ability; v1 §4.3).
        prompts_config: Expert settings: JSON of PromptsConfig (Fig. 4 template, in-context pool, filters).
        dialogues_config: Expert settings: JSON of DialoguesConfig (Q&A, multi-turn, multi-image, eval).
        generate_config: Expert settings: JSON of GenerateConfig beyond the typed fields (scheduler, seed...).
        score_config: Expert settings: JSON of ScoreConfig beyond the typed fields (the CLIP check's model).
        select_config: Expert settings: JSON of SelectConfig beyond the typed fields.
        export_config: Expert settings: JSON of StableLLaVAExportConfig (SFT JSON, eval JSONL, overlap).
        report_config: Expert settings: JSON of StableLLaVAReportConfig (HTML report).
    """
    cfg = validate_stablellava_config(
        data_root=data_root,
        llm_secret=llm_secret,
        num_shards=num_shards,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
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
    )
    named(cfg, "validate parameters")
    keywords = stablellava_keywords(config_json=cfg.outputs["keywords_config"], data_root=data_root)
    named(keywords, "keywords per ability", size="llm")
    prompts = stablellava_prompts(
        config_json=cfg.outputs["prompts_config"], keywords=keywords.outputs["Output"], data_root=data_root
    )
    named(prompts, "SD prompts + filters", size="llm")
    # Dialogues need only the prompts, so they are written while the GPUs draw the images.
    dialogues = stablellava_dialogues(
        config_json=cfg.outputs["dialogues_config"],
        prompts_manifest=prompts.outputs["Output"],
        data_root=data_root,
    )
    named(dialogues, "dialogues", size="llm")
    for task in (keywords, prompts, dialogues):
        with_llm_key(task, llm_secret)

    gen, scored = generate_and_score(
        prompts.outputs["Output"],
        num_shards,
        data_root,
        cfg.outputs["generate_config"],
        cfg.outputs["score_config"],
        gpu_node_selector,
        gpu_tolerations,
    )
    selected = select_pairs(
        config_json=cfg.outputs["select_config"],
        scored_manifests=dsl.Collected(scored.outputs["Output"]),
        data_root=data_root,
    )
    named(selected, "CLIP check (gamma)", size="records")
    exported = stablellava_export(
        config_json=cfg.outputs["export_config"],
        selected_manifest=selected.outputs["Output"],
        dialogues=dialogues.outputs["Output"],
        data_root=data_root,
    )
    named(exported, "export LLaVA SFT + eval", size="records")
    report = write_stablellava_report(
        config_json=cfg.outputs["report_config"],
        keywords=keywords.outputs["Output"],
        prompts_manifest=prompts.outputs["Output"],
        dialogues=dialogues.outputs["Output"],
        generated_manifests=dsl.Collected(gen.outputs["Output"]),
        scored_manifests=dsl.Collected(scored.outputs["Output"]),
        selected_manifest=selected.outputs["Output"],
        exported=exported.outputs["Output"],
        data_root=data_root,
    )
    named(report, "report", size="records")
    return exported.outputs["Output"]
