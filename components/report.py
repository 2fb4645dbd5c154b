from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def write_report(
    config_json: str,
    captions_manifest: str,
    used_captions_manifest: str,
    generated_manifests: list[str],
    scored_manifests: list[str],
    selected_manifest: str,
    exported: str,
    data_root: str,
    report: Output[HTML],
    summary: Output[Markdown],
) -> str:
    """HTML report: sample grid with captions and scores, score histogram, counts per stage."""
    import shutil

    from synthvlm import storage
    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.report import ReportConfig, report_markdown, write_report

    setup_logging()
    curated = [used_captions_manifest] if used_captions_manifest != captions_manifest else []
    stage_outputs = [captions_manifest, *curated, *sorted(generated_manifests), *sorted(scored_manifests)]
    stage_outputs += [selected_manifest, exported]
    config = ReportConfig.model_validate_json(config_json)
    out = write_report(
        config,
        selected_manifest,
        stage_outputs,
        storage.join(data_root, "report.html"),
        all_scores_manifests=sorted(scored_manifests),
    )
    with storage.local_copy(out) as local:
        shutil.copyfile(local, report.path)
    with open(summary.path, "w", encoding="utf-8") as fh:
        fh.write(report_markdown(config, selected_manifest, stage_outputs))
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def write_stablellava_report(
    config_json: str,
    keywords: str,
    prompts_manifest: str,
    dialogues: str,
    generated_manifests: list[str],
    scored_manifests: list[str],
    selected_manifest: str,
    exported: str,
    data_root: str,
    report: Output[HTML],
) -> str:
    """HTML report: per-ability counts, rejects, samples with their prompts and dialogues, LLM cost."""
    import shutil

    from synthvlm import storage
    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.stablellava_report import StableLLaVAReportConfig, write_stablellava_report

    setup_logging()
    out = write_stablellava_report(
        StableLLaVAReportConfig.model_validate_json(config_json),
        keywords=keywords,
        prompts=prompts_manifest,
        dialogues=dialogues,
        generated=sorted(generated_manifests),
        scored=sorted(scored_manifests),
        selected=selected_manifest,
        exported=exported,
        output_uri=storage.join(data_root, "stablellava", "report.html"),
    )
    with storage.local_copy(out) as local:
        shutil.copyfile(local, report.path)
    return out
