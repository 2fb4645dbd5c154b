from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def select_pairs(
    config_json: str, scored_manifests: list[str], data_root: str, metrics: Output[Metrics]
) -> str:
    """Global selection (top-k / top fraction / threshold) over all shards' scores."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.select import SelectConfig, select

    setup_logging()
    config = SelectConfig.model_validate_json(config_json)
    out = select(config, sorted(scored_manifests), storage.join(data_root, "select", "selected.jsonl"))
    log_stage_metrics(metrics, out)
    return out
