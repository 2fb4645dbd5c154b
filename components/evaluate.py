from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from synthvlm.images import image_for


# The eval image is the train image plus lmms-eval (the `lmms_eval:<task>` benchmarks).
@dsl.component(base_image=image_for("eval"), install_kfp_package=False)
def evaluate_model(
    config_json: str,
    model: str,
    model_name: str,
    benchmarks: list[str],
    data_root: str,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    """Evaluate one model on benchmarks; returns the results document URI (GPU settings: the pipeline)."""
    import shutil

    from synthvlm import storage
    from synthvlm.evaluation.report import write_comparison
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.evaluate import EvalConfig, evaluate

    setup_logging()
    out = evaluate(
        EvalConfig.model_validate_json(config_json),
        model,
        benchmarks,
        storage.join(data_root, "eval", f"{model_name}.json"),
        model_name=model_name,
        data_root=data_root,
    )
    log_stage_metrics(metrics, out)
    html_uri = write_comparison(
        [out], storage.join(data_root, "eval", f"{model_name}.html"), title=model_name
    )
    with storage.local_copy(html_uri) as local:
        shutil.copyfile(local, report.path)
    return out


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def compare_models(results: list[str], data_root: str, report: Output[HTML]) -> str:
    """One HTML table comparing evaluated models (rows: benchmarks/abilities, columns: models)."""
    import shutil

    from synthvlm import storage
    from synthvlm.evaluation.report import write_comparison
    from synthvlm.kfp_support import setup_logging

    setup_logging()
    out = write_comparison(list(results), storage.join(data_root, "eval", "comparison.html"))
    with storage.local_copy(out) as local:
        shutil.copyfile(local, report.path)
    return out
