"""Pieces both recipes share: GPU placement, the LLM key, and sharded generation + CLIP scoring."""

import os

from kfp import dsl, kubernetes

from components.clip_score import clip_score
from components.generate import generate_images
from components.plan_shards import plan_shards

# KFP needs ParallelFor's parallelism at compile time: the most GPU pods generating at once, set with
# `synthvlm compile --max-parallel-gpus N`. Default 8: SynthVLM §3.1 generated on 8 A100.
MAX_PARALLEL_GPU_PODS = int(os.environ.get("SYNTHVLM_MAX_PARALLEL_GPU_PODS", "8"))
GPU_RETRIES = 2  # preemptible GPU nodes: a retried shard resumes from its finished batches
LLM_KEY_ENV = "OPENAI_API_KEY"  # env var the LLM stages read (LLMConfig.api_key_env) and the Secret's key


def named(task, display_name: str):
    """Name a task for the UI and turn KFP's cache off for it.

    Every task reads or writes the data root, which KFP's cache cannot see: a cache hit would hand back an
    old output URI even when the data behind it was changed or deleted. What may be reused is decided by
    the stage runner's fingerprints instead (synthvlm/runner.py), which a rerun checks in a second.
    """
    return task.set_display_name(display_name).set_caching_options(False)


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
    named(plan, "plan shards")
    with dsl.ParallelFor(plan.output, parallelism=MAX_PARALLEL_GPU_PODS) as shard:
        gen = generate_images(
            config_json=generate_config,
            captions_manifest=shard.manifest,
            data_root=data_root,
            shard=shard.shard,
            num_shards=shard.num_shards,
        )
        named(gen, "SDXL generate shard")
        on_gpu(gen, node_selector, tolerations)
        scored = clip_score(
            config_json=score_config, input_manifest=gen.outputs["Output"], data_root=data_root
        )
        named(scored, "CLIP score shard")
        on_gpu(scored, node_selector, tolerations)
    return gen, scored


def on_gpus(task, count, node_selector, tolerations) -> None:
    """`count` GPUs in one pod (training, evaluation) on the chosen node pool; retried on preemption."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    task.set_retry(num_retries=GPU_RETRIES, backoff_duration="60s", backoff_factor=2.0)


# A multi-node run's train task only creates the Kubeflow job (TrainJob or PyTorchJob) and follows it: the
# GPUs are in the job's pods, so its own pod asks for a little CPU and no GPU.
LAUNCHER_CPU = "500m"
LAUNCHER_MEMORY = "1Gi"


def as_launcher(task) -> None:
    """A CPU-only pod that submits and follows a multi-node training job; retried like a GPU task (a retry
    re-attaches to the same job: the job's name comes from the stage and its arguments)."""
    task.set_cpu_request(LAUNCHER_CPU).set_memory_request(LAUNCHER_MEMORY)
    task.set_retry(num_retries=GPU_RETRIES, backoff_duration="60s", backoff_factor=2.0)


def train_stage(
    component, display_name, *, num_nodes, gpus_per_node, node_selector, tolerations, after=None, **inputs
):
    """One training stage, placed by the runtime `num_nodes`: one node trains in this task's pod on
    `gpus_per_node` GPUs; more nodes run `component` as a CPU-only launcher of the multi-node job.
    Returns the stage's output (the model URI) from whichever branch ran."""
    with dsl.If(num_nodes == 1, name=f"{display_name}: one node"):
        here = component(gpus_per_node=gpus_per_node, num_nodes=num_nodes, **inputs)
        named(here, display_name)
        on_gpus(here, gpus_per_node, node_selector, tolerations)
    with dsl.Else(name=f"{display_name}: multi-node job"):
        launcher = component(gpus_per_node=gpus_per_node, num_nodes=num_nodes, **inputs)
        named(launcher, f"{display_name} launcher (multi-node job)")
        as_launcher(launcher)
    if after is not None:
        here.after(after)
        launcher.after(after)
    return dsl.OneOf(here.outputs["Output"], launcher.outputs["Output"])


def train_and_evaluate(
    *,
    data_root,
    gpus_per_node,
    num_nodes,
    pretrain_config,
    sft_config,
    eval_config,
    pretrain_datasets,
    sft_datasets,
    benchmarks,
    node_selector,
    tolerations,
    synthetic_dataset="",
    image_folder="",
    sft_on_synthetic=False,
    after=None,
):
    """LLaVA-1.5 (SynthVLM Fig. 5): pretrain the projector -> SFT projector + LLM -> evaluate.

    Each training stage branches on `num_nodes` (train_stage): GPUs in the task's pod for one node, a
    CPU-only launcher of a Kubeflow job for more; dsl.OneOf hands the model URI on from either branch."""
    from components.evaluate import evaluate_model
    from components.train import pretrain, sft

    placement = dict(
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        node_selector=node_selector,
        tolerations=tolerations,
    )
    pretrained = train_stage(
        pretrain,
        "LLaVA pretrain (projector)",
        **placement,
        after=after,
        config_json=pretrain_config,
        datasets_json=pretrain_datasets,
        data_root=data_root,
        dataset_uri=synthetic_dataset,
        image_folder=image_folder,
    )
    fine_tuned = train_stage(
        sft,
        "LLaVA SFT (projector + LLM)",
        **placement,
        config_json=sft_config,
        init_from=pretrained,
        datasets_json=sft_datasets,
        data_root=data_root,
        dataset_uri=synthetic_dataset,
        image_folder=image_folder,
        use_dataset_uri=sft_on_synthetic,
    )
    evaluation = evaluate_model(
        config_json=eval_config,
        model=fine_tuned,
        model_name="sft",
        benchmarks=benchmarks,
        data_root=data_root,
    )
    named(evaluation, "evaluate")
    on_gpus(evaluation, 1, node_selector, tolerations)
    return evaluation
