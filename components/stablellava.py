"""StableLLaVA components: keywords -> prompts (+ filters) -> dialogues -> export. Images, CLIP scores and the
gamma = 0.25 alignment check come from the shared generate / clip_score / select components.

Each component validates its stage config from JSON, calls the stage, and logs the stage's statistics as
KFP Metrics. The LLM key (config `llm.api_key_env`, OPENAI_API_KEY by default) comes from the pod's
environment (a Kubernetes secret); the "template" backend needs none.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def stablellava_keywords(config_json: str, data_root: str, metrics: Output[Metrics]) -> str:
    """LLM keyword banks per ability; returns the keywords JSON URI."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.stablellava import KeywordsConfig, generate_keywords

    setup_logging()
    config = KeywordsConfig.model_validate_json(config_json)
    out = generate_keywords(
        config, storage.join(data_root, "stablellava", "keywords.json"), data_root=data_root
    )
    log_stage_metrics(metrics, out)
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def stablellava_prompts(config_json: str, keywords: str, data_root: str, metrics: Output[Metrics]) -> str:
    """SD prompts per ability and paired prompts, filtered; returns the prompt manifest URI."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.stablellava import PromptsConfig, generate_prompts

    setup_logging()
    config = PromptsConfig.model_validate_json(config_json)
    out = generate_prompts(
        config, keywords, storage.join(data_root, "stablellava", "prompts.jsonl"), data_root=data_root
    )
    log_stage_metrics(metrics, out)
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def stablellava_dialogues(
    config_json: str, prompts_manifest: str, data_root: str, metrics: Output[Metrics]
) -> str:
    """Dialogues (caption, Q&A, multi-turn, multi-image, eval) from the prompts; returns their URI."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.stablellava import DialoguesConfig, generate_dialogues

    setup_logging()
    config = DialoguesConfig.model_validate_json(config_json)
    out = generate_dialogues(
        config,
        prompts_manifest,
        storage.join(data_root, "stablellava", "dialogues.jsonl"),
        data_root=data_root,
    )
    log_stage_metrics(metrics, out)
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def stablellava_export(
    config_json: str, selected_manifest: str, dialogues: str, data_root: str, metrics: Output[Metrics]
) -> str:
    """LLaVA pretrain/SFT JSON and eval JSONL for the dialogues whose images passed the CLIP check."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.stablellava import StableLLaVAExportConfig, export_stablellava

    setup_logging()
    config = StableLLaVAExportConfig.model_validate_json(config_json)
    out_dir = storage.join(data_root, "stablellava", "export")
    out = export_stablellava(config, selected_manifest, dialogues, data_root, out_dir)
    log_stage_metrics(metrics, out)
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def stablellava_training_inputs(
    exported: str,
    data_root: str,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: list,
    pretrain_on_synthetic: bool,
    sft_on_synthetic: bool,
    synthetic_ratio: float,
) -> NamedTuple("TrainingInputs", [("pretrain_datasets", str), ("sft_datasets", str), ("benchmarks", list)]):
    """The training mixtures and benchmarks of StableLLaVA v2 §5: your datasets plus the synthetic ones
    (SFT at `synthetic_ratio`), and the synthesized eval set before the named benchmarks."""
    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.stablellava import training_inputs

    setup_logging()
    inputs = training_inputs(
        exported,
        data_root,
        pretrain_datasets,
        sft_datasets,
        list(benchmarks),
        pretrain_on_synthetic=pretrain_on_synthetic,
        sft_on_synthetic=sft_on_synthetic,
        synthetic_ratio=synthetic_ratio,
    )
    return inputs["pretrain_datasets"], inputs["sft_datasets"], inputs["benchmarks"]
