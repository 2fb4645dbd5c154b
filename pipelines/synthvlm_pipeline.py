"""SynthVLM (paper Fig. 3): captions [-> curation] -> SDXL images (sharded over GPU pods) -> CLIPScore
-> global top-k -> LLaVA pretraining data, with a report a person can look at."""

from kfp import dsl

from components.captions import load_captions
from components.curate import curate_captions as curate_captions_op
from components.export import export_llava
from components.passthrough import same_manifest
from components.report import write_report
from components.select import select_pairs
from components.validate import validate_synthvlm_config
from pipelines.common import generate_and_score, named, with_llm_key
from synthvlm.run_config import SynthVLMRunConfig, to_pipeline_arguments

_DEFAULTS = to_pipeline_arguments(SynthVLMRunConfig())


@dsl.pipeline(name="synthvlm", description=__doc__)
def pipeline(
    captions: str = _DEFAULTS["captions"],
    max_captions: int = _DEFAULTS["max_captions"],
    curate_captions: bool = _DEFAULTS["curate_captions"],
    llm_secret: str = _DEFAULTS["llm_secret"],
    data_root: str = _DEFAULTS["data_root"],
    num_shards: int = _DEFAULTS["num_shards"],
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
    curate_config: str = _DEFAULTS["curate_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
    report_config: str = _DEFAULTS["report_config"],
) -> str:
    """SynthVLM synthetic pretraining data; returns the LLaVA pretraining JSON URI.

    Args:
        captions: Captions file/URI (.jsonl/.csv/.parquet with id, caption). Default: bundled demo.
        max_captions: Use only the first N captions; 0 = all.
        curate_captions: Curate captions first (SynthVLM §3.1: heuristics, dedup, LLM judge, raw-image CLIP).
        llm_secret: Kubernetes Secret with the LLM API key (key OPENAI_API_KEY); never a parameter value.
        data_root: Where images, manifests, the dataset and the report go (gs://bucket/prefix). Required.
        num_shards: Number of generation shards, one GPU pod each.
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        curate_config: JSON of CurateConfig (SynthVLM §3.1 thresholds; judge LLM endpoint and model).
        generate_config: JSON of GenerateConfig (SDXL base 1.0, 60 steps, 1024x1024: SynthVLM §3.1).
        score_config: JSON of ScoreConfig (open_clip model + pretrained tag; CLIPScore, SynthVLM §3.2).
        select_config: JSON of SelectConfig (top_k k=100000 of 1M: SynthVLM §3.2; top_fraction; threshold).
        export_config: JSON of ExportConfig (LLaVA pretraining JSON).
        report_config: JSON of ReportConfig (HTML report).
    """
    cfg = validate_synthvlm_config(
        captions=captions,
        max_captions=max_captions,
        curate_captions=curate_captions,
        llm_secret=llm_secret,
        data_root=data_root,
        num_shards=num_shards,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
        curate_config=curate_config,
        generate_config=generate_config,
        score_config=score_config,
        select_config=select_config,
        export_config=export_config,
        report_config=report_config,
    ).set_caching_options(False)
    named(cfg, "validate parameters")
    caps = load_captions(captions=captions, max_captions=max_captions, data_root=data_root).after(cfg)
    named(caps, "load captions")
    with dsl.If(curate_captions == True, name="curate captions"):  # noqa: E712 - a KFP condition, not Python
        curated = curate_captions_op(
            config_json=curate_config, captions_manifest=caps.outputs["Output"], data_root=data_root
        )
        named(curated, "curate captions (SynthVLM §3.1)")
        with_llm_key(curated, llm_secret)
    with dsl.Else(name="all captions"):
        uncurated = same_manifest(manifest=caps.outputs["Output"])
        named(uncurated, "use all captions")
    captions_manifest = dsl.OneOf(curated.outputs["Output"], uncurated.output)

    gen, scored = generate_and_score(
        captions_manifest,
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
    named(selected, "select (global)")
    exported = export_llava(
        config_json=export_config, selected_manifest=selected.outputs["Output"], data_root=data_root
    )
    named(exported, "export LLaVA pretrain JSON")
    report = write_report(
        config_json=report_config,
        captions_manifest=caps.outputs["Output"],
        used_captions_manifest=captions_manifest,
        generated_manifests=dsl.Collected(gen.outputs["Output"]),
        scored_manifests=dsl.Collected(scored.outputs["Output"]),
        selected_manifest=selected.outputs["Output"],
        exported=exported.outputs["Output"],
        data_root=data_root,
    )
    named(report, "report")
    return exported.outputs["Output"]
