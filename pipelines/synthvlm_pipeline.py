"""SynthVLM (paper Fig. 3): captions [-> curation] -> SDXL images (sharded over GPU pods) -> CLIPScore
-> global top-k -> LLaVA pretraining data, with a report a person can look at."""

from kfp import dsl

from components.captions import load_captions
from components.curate import curate_shard, dedup_partition, merge_curation, plan_curation, plan_dedup
from components.export import export_llava
from components.passthrough import same_manifest
from components.report import write_report
from components.select import select_pairs
from components.validate import validate_synthvlm_config
from pipelines.common import form_documented, generate_and_score, named, with_llm_key
from synthvlm.run_config import SynthVLMRunConfig, to_pipeline_arguments

_DEFAULTS = to_pipeline_arguments(SynthVLMRunConfig())


# The most curation pods (filter shards, dedup partitions) at once; the shard count is the pool size over
# curate.scale.records_per_shard (200K: ~1 GB of records per pod).
MAX_PARALLEL_CURATION_PODS = 16


def curate_sharded(config_json, captions_manifest, data_root, llm_secret):
    """SynthVLM §3.1 curation over pods: per-caption filters per shard -> dedup per bucket partition ->
    one global merge (dedup resolution, raw-CLIP top 40%, sample); the same result as one pod."""
    plan = plan_curation(captions_manifest=captions_manifest, config_json=config_json)
    named(plan, "plan curation shards")
    with dsl.ParallelFor(plan.output, parallelism=MAX_PARALLEL_CURATION_PODS) as item:
        shard = curate_shard(
            config_json=item.config_json,
            captions_manifest=item.manifest,
            data_root=data_root,
            shard=item.shard,
            num_shards=item.num_shards,
        )
        named(shard, "curate: per-caption filters (shard)", size="records")
        with_llm_key(shard, llm_secret)
    parts = plan_dedup(
        shard_manifests=dsl.Collected(shard.output), config_json=config_json, data_root=data_root
    )
    named(parts, "plan dedup partitions")
    with dsl.ParallelFor(parts.output, parallelism=MAX_PARALLEL_CURATION_PODS) as item:
        pairs = dedup_partition(
            config_json=item.config_json,
            shard_manifests=item.shards,
            data_root=item.data_root,
            part=item.part,
            parts=item.parts,
        )
        named(pairs, "curate: near-duplicate pairs (partition)", size="records")
    merged = merge_curation(
        config_json=config_json,
        shard_manifests=dsl.Collected(shard.output),
        pair_files=dsl.Collected(pairs.output),
        data_root=data_root,
    )
    named(merged, "curate: merge (dedup, CLIP top 40%, sample)", size="records")
    return merged


@dsl.pipeline(name="synthvlm", description=__doc__)
@form_documented("synthvlm")
def pipeline(
    data_root: str,
    captions: str,
    max_captions: int = _DEFAULTS["max_captions"],
    curate_captions: bool = _DEFAULTS["curate_captions"],
    llm_secret: str = _DEFAULTS["llm_secret"],
    num_shards: int = _DEFAULTS["num_shards"],
    gpu_node_selector: dict = _DEFAULTS["gpu_node_selector"],
    gpu_tolerations: list = _DEFAULTS["gpu_tolerations"],
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
    curate_config: str = _DEFAULTS["curate_config"],
    generate_config: str = _DEFAULTS["generate_config"],
    score_config: str = _DEFAULTS["score_config"],
    select_config: str = _DEFAULTS["select_config"],
    export_config: str = _DEFAULTS["export_config"],
    report_config: str = _DEFAULTS["report_config"],
) -> str:
    """SynthVLM synthetic pretraining data; returns the LLaVA pretraining JSON URI.

    Args:
        data_root: Where images, manifests, the dataset and the report go (gs://, s3:// or a PVC path).
        captions: Captions file/URI (.jsonl/.csv/.parquet: id, caption); bundled:demo_captions.jsonl = demo.
        max_captions: Use only the first N captions (the number of images); 0 = all.
        curate_captions: Curate captions first (SynthVLM §3.1: heuristics, dedup, LLM judge, raw-image CLIP).
        llm_secret: Kubernetes Secret with the LLM API key (key OPENAI_API_KEY); never a parameter value.
        num_shards: Number of generation shards, one GPU pod each.
        gpu_node_selector: Picks the GPU model ({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}).
        gpu_tolerations: Tolerations for GPU pods (list of Kubernetes toleration objects).
        curate_config: Expert settings: JSON of CurateConfig (SynthVLM §3.1 thresholds).
        generate_config: Expert settings: JSON of GenerateConfig beyond the typed fields (scheduler, seed...).
        score_config: Expert settings: JSON of ScoreConfig beyond the typed fields (CLIPScore, §3.2).
        select_config: Expert settings: JSON of SelectConfig beyond the typed fields.
        export_config: Expert settings: JSON of ExportConfig (LLaVA pretraining JSON).
        report_config: Expert settings: JSON of ReportConfig (HTML report).
    """
    cfg = validate_synthvlm_config(
        data_root=data_root,
        captions=captions,
        max_captions=max_captions,
        curate_captions=curate_captions,
        llm_secret=llm_secret,
        num_shards=num_shards,
        gpu_node_selector=gpu_node_selector,
        gpu_tolerations=gpu_tolerations,
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
    )
    named(cfg, "validate parameters")
    caps = load_captions(captions=captions, max_captions=max_captions, data_root=data_root).after(cfg)
    named(caps, "load captions", size="records")
    with dsl.If(curate_captions == True, name="curate captions"):  # noqa: E712 - a KFP condition, not Python
        curated = curate_sharded(cfg.outputs["curate_config"], caps.outputs["Output"], data_root, llm_secret)
    with dsl.Else(name="all captions"):
        uncurated = same_manifest(manifest=caps.outputs["Output"])
        named(uncurated, "use all captions")
    captions_manifest = dsl.OneOf(curated.outputs["Output"], uncurated.output)

    gen, scored = generate_and_score(
        captions_manifest,
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
    named(selected, "select (global)", size="records")
    exported = export_llava(
        config_json=cfg.outputs["export_config"],
        selected_manifest=selected.outputs["Output"],
        data_root=data_root,
    )
    named(exported, "export LLaVA pretrain JSON", size="records")
    report = write_report(
        config_json=cfg.outputs["report_config"],
        captions_manifest=caps.outputs["Output"],
        used_captions_manifest=captions_manifest,
        generated_manifests=dsl.Collected(gen.outputs["Output"]),
        scored_manifests=dsl.Collected(scored.outputs["Output"]),
        selected_manifest=selected.outputs["Output"],
        exported=exported.outputs["Output"],
        data_root=data_root,
    )
    named(report, "report", size="records")
    return exported.outputs["Output"]
