from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def export_llava(config_json: str, selected_manifest: str, data_root: str, metrics: Output[Metrics]) -> str:
    """Write the LLaVA pretraining JSON (+ dataset manifest) for the selected pairs."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.export_llava import ExportConfig, export_llava

    setup_logging()
    config = ExportConfig.model_validate_json(config_json)
    out = export_llava(config, selected_manifest, data_root, storage.join(data_root, "export"))
    log_stage_metrics(metrics, out)
    return out
