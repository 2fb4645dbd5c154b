from kfp import dsl
from kfp.dsl import Metrics, Output

from synthvlm.images import image_for


@dsl.component(base_image=image_for("diffusion"), install_kfp_package=False)
def generate_images(
    config_json: str,
    captions_manifest: str,
    data_root: str,
    shard: int,
    num_shards: int,
    metrics: Output[Metrics],
) -> str:
    """Generate this shard's images with SDXL; returns the shard manifest URI."""
    from synthvlm import storage
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.generate import GenerateConfig, generate

    setup_logging()
    config = GenerateConfig.model_validate_json(config_json)
    # Collected/ParallelFor ints can arrive as floats in kfp.local.
    out = generate(
        config,
        captions_manifest,
        storage.join(data_root, "generate"),
        rank=int(shard),
        world_size=int(num_shards),
    )
    log_stage_metrics(metrics, out)
    return out
