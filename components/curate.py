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


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def plan_curation(captions_manifest: str, config_json: str) -> list[dict]:
    """One ParallelFor item per filter shard (pool size / curate.scale.records_per_shard)."""
    # Items carry the manifest URI and the config: a loop body must not read upstream outputs directly
    # (kfp.local 2.17 replaces them with the loop item).
    from synthvlm.curation.sharded import plan

    return plan(captions_manifest, config_json)


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def curate_shard(
    config_json: str, captions_manifest: str, data_root: str, shard: int, num_shards: int
) -> str:
    """The per-caption curation steps on one shard; returns its survivors' manifest URI."""
    from synthvlm import storage
    from synthvlm.curation.sharded import curate_shard as run_shard
    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.curate import CurateConfig

    setup_logging()
    config = CurateConfig.model_validate_json(config_json)
    folder = storage.join(data_root, "curate")
    return run_shard(config, captions_manifest, folder, int(shard), int(num_shards), data_root=data_root)


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def plan_dedup(shard_manifests: list, config_json: str, data_root: str) -> list[dict]:
    """One ParallelFor item per dedup partition (as many as filter shards), carrying every shard's URI."""
    shards = sorted(shard_manifests)
    return [
        {
            "shards": shards,
            "part": p,
            "parts": len(shards),
            "config_json": config_json,
            "data_root": data_root,
        }
        for p in range(len(shards))
    ]


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def dedup_partition(config_json: str, shard_manifests: list, data_root: str, part: int, parts: int) -> str:
    """Exact groups and verified near-duplicate pairs of one partition of the LSH buckets."""
    from synthvlm import storage
    from synthvlm.curation.sharded import dedup_partition as run_partition
    from synthvlm.kfp_support import setup_logging
    from synthvlm.stages.curate import CurateConfig

    setup_logging()
    config = CurateConfig.model_validate_json(config_json)
    folder = storage.join(data_root, "curate")
    return run_partition(config, sorted(shard_manifests), folder, int(part), int(parts))


@dsl.component(base_image=image_for("cpu"), install_kfp_package=False)
def merge_curation(
    config_json: str, shard_manifests: list, pair_files: list, data_root: str, metrics: Output[Metrics]
) -> str:
    """Global dedup resolution, raw-CLIP top fraction and sample; returns the curated manifest URI."""
    from synthvlm import storage
    from synthvlm.curation.sharded import merge
    from synthvlm.kfp_support import log_stage_metrics, setup_logging
    from synthvlm.stages.curate import CurateConfig

    setup_logging()
    out = merge(
        CurateConfig.model_validate_json(config_json),
        sorted(shard_manifests),
        sorted(pair_files),
        storage.join(data_root, "curate", "curated.jsonl"),
        storage.join(data_root, "curate", "rejects.jsonl"),
    )
    log_stage_metrics(metrics, out)
    return out
