from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("diffusion"), install_kfp_package=False)
def clip_score(config_json: str, input_manifest: str, data_root: str, metrics: Output[Metrics]) -> str:
    """CLIP-score one manifest of generated images; returns the scored manifest URI."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.clip_score import ScoreConfig, score

    setup_logging()
    name = input_manifest.rsplit("/", 1)[-1]
    out = score(
        ScoreConfig.model_validate_json(config_json), input_manifest, storage.join(data_root, "scores", name)
    )
    log_stage_metrics(metrics, out)
    return out
