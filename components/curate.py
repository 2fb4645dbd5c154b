from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def curate_captions(
    config_json: str, captions_manifest: str, data_root: str, metrics: Output[Metrics]
) -> str:
    """SynthVLM §3.1 caption curation; returns the curated manifest URI (rejects go next to it).

    The LLM key comes from the environment variable named by judge.llm.api_key_env (a Kubernetes secret).
    """
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.curate import CurateConfig, curate

    setup_logging()
    out = curate(
        CurateConfig.model_validate_json(config_json),
        captions_manifest,
        storage.join(data_root, "curate", "curated.jsonl"),
        storage.join(data_root, "curate", "rejects.jsonl"),
        data_root=data_root,
    )
    log_stage_metrics(metrics, out)
    return out
