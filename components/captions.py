from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def load_captions(captions: str, max_captions: int, data_root: str, metrics: Output[Metrics]) -> str:
    """Validate the captions file and write the caption manifest under data_root."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.captions import CaptionsConfig, load_captions

    setup_logging()
    config = CaptionsConfig(captions=captions, max_records=max_captions or None)
    out = load_captions(config, storage.join(data_root, "captions", "captions.jsonl"))
    log_stage_metrics(metrics, out)
    return out
