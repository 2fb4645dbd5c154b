"""Pieces both recipes share: GPU placement, the LLM key, and sharded generation + CLIP scoring."""

from kfp import dsl, kubernetes

from components.clip_score import clip_score
from components.generate import generate_images
from components.plan_shards import plan_shards

# KFP needs ParallelFor's parallelism at compile time: the most GPU pods generating at once.
MAX_PARALLEL_GPU_PODS = 8  # SynthVLM §3.1: 8 A100
GPU_RETRIES = 2  # preemptible GPU nodes: a retried shard resumes from its finished batches
LLM_KEY_ENV = "OPENAI_API_KEY"  # env var the LLM stages read (LLMConfig.api_key_env) and the Secret's key


def on_gpu(task, node_selector, tolerations) -> None:
    """One GPU per pod on the chosen node pool; retried when the node is preempted."""
    # The resource is always nvidia.com/gpu; the node selector picks A100, H100, ...
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    task.set_retry(num_retries=GPU_RETRIES, backoff_duration="60s", backoff_factor=2.0)


def with_llm_key(task, secret_name) -> None:
    """The API key reaches the pod from a Secret, never as a parameter; optional so that keyless
    (self-hosted or template-backend) runs start without one."""
    kubernetes.use_secret_as_env(
        task, secret_name=secret_name, secret_key_to_env={LLM_KEY_ENV: LLM_KEY_ENV}, optional=True
    )


def generate_and_score(
    manifest, num_shards, data_root, generate_config, score_config, node_selector, tolerations
):
    """Fan a prompt/caption manifest out over GPU pods: SDXL per shard, then CLIP scores per shard."""
    plan = plan_shards(captions_manifest=manifest, num_shards=num_shards)
    plan.set_display_name("plan shards")
    with dsl.ParallelFor(plan.output, parallelism=MAX_PARALLEL_GPU_PODS) as shard:
        gen = generate_images(
            config_json=generate_config,
            captions_manifest=shard.manifest,
            data_root=data_root,
            shard=shard.shard,
            num_shards=shard.num_shards,
        )
        gen.set_display_name("SDXL generate shard")
        on_gpu(gen, node_selector, tolerations)
        scored = clip_score(
            config_json=score_config, input_manifest=gen.outputs["Output"], data_root=data_root
        )
        scored.set_display_name("CLIP score shard")
        on_gpu(scored, node_selector, tolerations)
    return gen, scored
