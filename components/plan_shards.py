from kfp import dsl

from synthvlm.images import image_for


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def plan_shards(
    captions_manifest: str, num_shards: int, generate_config: str, score_config: str
) -> list[dict]:
    """One ParallelFor item per shard, carrying everything the shard's pods need."""
    # Items carry the manifest URI and the stage configs (outputs of the validation task) because a loop
    # body must not read upstream outputs directly (kfp.local 2.17 replaces them with the loop item).
    return [
        {
            "manifest": captions_manifest,
            "shard": i,
            "num_shards": num_shards,
            "generate_config": generate_config,
            "score_config": score_config,
        }
        for i in range(int(num_shards))
    ]
