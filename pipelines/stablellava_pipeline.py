"""StableLLaVA (v1 Fig. 3, v2 Fig. 2): an LLM writes keywords and Stable Diffusion prompts per ability ->
SDXL images (sharded over GPU pods) -> the LLM writes dialogues from the same prompts -> CLIP check
(keep score >= gamma = 0.25) -> LLaVA pretraining/SFT data and an eval set."""

from kfp import dsl

from components.select import select_pairs
from components.stablellava import (
    stablellava_dialogues,
    stablellava_export,
    stablellava_keywords,
    stablellava_prompts,
)
from components.validate import validate_stablellava_config
from pipelines.common import generate_and_score, named, with_llm_key
from synthvlm.run_config import StableLLaVARunConfig, to_pipeline_arguments

_DEFAULTS = to_pipeline_arguments(StableLLaVARunConfig())


@dsl.pipeline(name="stablellava", description=__doc__)
def pipeline(
    llm_secret: str = _DEFAULTS["llm_secret"],
    data_root: str = _DEFAULTS["data_root"],
    num_shards: int = _DEFAULTS["num_shards"],
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
    keywords_config: str = _DEFAULTS["keywords_config"],
    prompts_config: str = _DEFAULTS["prompts_config"],
    dialogues_config: str = _DEFAULTS["dialogues_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
):
    """StableLLaVA synthetic visual instruction data.

    Args:
        llm_secret: Kubernetes Secret with the LLM API key (key OPENAI_API_KEY); never a parameter value.
        data_root: Where prompts, images, dialogues and the exports go (gs://bucket/prefix). Required.
        num_shards: Number of generation shards, one GPU pod each.
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        keywords_config: JSON of KeywordsConfig (abilities, LLM keyword banks per ability; v1 §4.3).
        prompts_config: JSON of PromptsConfig (Fig. 4 template, in-context pool of 20, filters; v1 §4).
        dialogues_config: JSON of DialoguesConfig (Q&A, multi-turn, multi-image, eval; answers <= 500 chars).
        generate_config: JSON of GenerateConfig (SDXL; resolution, steps, guidance).
        score_config: JSON of ScoreConfig (open_clip model for the CLIP check).
        select_config: JSON of SelectConfig (threshold gamma = 0.25: StableLLaVA v2 §4.4).
        export_config: JSON of StableLLaVAExportConfig (LLaVA SFT JSON, eval JSONL, train/eval overlap).
    """
    cfg = validate_stablellava_config(
        llm_secret=llm_secret,
        data_root=data_root,
        num_shards=num_shards,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        keywords_config=keywords_config,
        prompts_config=prompts_config,
        dialogues_config=dialogues_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
    ).set_caching_options(False)
    named(cfg, "validate parameters")
    keywords = stablellava_keywords(config_json=keywords_config, data_root=data_root).after(cfg)
    named(keywords, "keywords per ability")
    prompts = stablellava_prompts(
        config_json=prompts_config, keywords=keywords.outputs["Output"], data_root=data_root
    )
    named(prompts, "SD prompts + filters")
    # Dialogues need only the prompts, so they are written while the GPUs draw the images.
    dialogues = stablellava_dialogues(
        config_json=dialogues_config, prompts_manifest=prompts.outputs["Output"], data_root=data_root
    )
    named(dialogues, "dialogues")
    for task in (keywords, prompts, dialogues):
        with_llm_key(task, llm_secret)

    _, scored = generate_and_score(
        prompts.outputs["Output"],
        num_shards,
        data_root,
        generate_config,
        score_config,
        gpu_node_selector,
        gpu_tolerations,
    )
    selected = select_pairs(
        config_json=select_config,
        scored_manifests=dsl.Collected(scored.outputs["Output"]),
        data_root=data_root,
    )
    named(selected, "CLIP check (gamma)")
    exported = stablellava_export(
        config_json=export_config,
        selected_manifest=selected.outputs["Output"],
        dialogues=dialogues.outputs["Output"],
        data_root=data_root,
    )
    named(exported, "export LLaVA SFT + eval")
