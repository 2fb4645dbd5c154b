"""Pieces both recipes share: GPU placement, pod sizes, volumes, the LLM key, and sharded generation +
CLIP scoring."""

import json
import os

from kfp import dsl, kubernetes

from components.clip_score import clip_score
from components.generate import generate_images
from components.plan_shards import plan_shards
from synthvlm.errors import ConfigError

# KFP needs ParallelFor's parallelism at compile time: the most GPU pods generating at once, set with
# `synthvlm compile --max-parallel-gpus N`. Default 8: SynthVLM §3.1 generated on 8 A100.
MAX_PARALLEL_GPU_PODS = int(os.environ.get("SYNTHVLM_MAX_PARALLEL_GPU_PODS", "8"))
GPU_RETRIES = 2  # preemptible GPU nodes: a retried shard resumes from its finished batches
LLM_KEY_ENV = "OPENAI_API_KEY"  # env var the LLM stages read (LLMConfig.api_key_env) and the Secret's key


# What each kind of task asks of its node: (CPU request, memory request, memory limit or None). Requests
# let the scheduler place pods and keep them from being evicted first; memory limits stop a runaway CPU
# task from taking its neighbours down. Override at compile time: `synthvlm compile --resources
# KIND=CPU,MEMORY[,LIMIT]` (SYNTHVLM_TASK_RESOURCES, JSON). Sizes (measured on the CPU dev machine where
# they could be, else from the model sizes):
#   light:   validation, shard planning, pass-through: ~0.3 GB RSS (python + pydantic + kfp).
#   llm:     LLM stages: async HTTP, ~0.5 GB plus the prompt/dialogue manifests.
#   records: captions, curate, select, export, reports over 1M records: curate peaked at 5.9 GiB and select
#            at 1.9 GB for 1M records (issue 13's measurement), so 8Gi requested, 16Gi limit.
#   generate: one SDXL pod per GPU: fp16 weights (~7 GB) are read into host memory before moving to the GPU,
#            16 image-encoding threads and two batches of decoded images in flight; 8 CPU / 48Gi is an
#            eighth of an 8x H100 node (typically 2 TB RAM, 208 vCPU), not measured on a GPU here.
#   score:   CLIP ViT-L-14 (~1.7 GB) and 8 image-decoding threads: 4 CPU / 16Gi.
#   train:   LLaVA-1.5 7B on one node: every rank loads the LLM in host memory before sharding (~14 GB fp16
#            each) and 4 data-loader workers per GPU: 32 CPU / 256Gi, no limit (the pod owns its node).
#   eval:    one GPU, one model, lmms-eval: 8 CPU / 64Gi.
TASK_RESOURCES: dict[str, tuple[str, str, str | None]] = {
    "light": ("500m", "1Gi", "4Gi"),
    "llm": ("1", "2Gi", "8Gi"),
    "records": ("2", "8Gi", "16Gi"),
    "generate": ("8", "48Gi", "64Gi"),
    "score": ("4", "16Gi", "32Gi"),
    "train": ("32", "256Gi", None),
    "eval": ("8", "64Gi", None),
}
for _kind, _size in json.loads(os.environ.get("SYNTHVLM_TASK_RESOURCES", "{}")).items():
    if _kind not in TASK_RESOURCES:  # `synthvlm compile --resources` names a kind this table lacks
        raise ConfigError(f"--resources {_kind}: unknown kind; kinds: {', '.join(sorted(TASK_RESOURCES))}")
    TASK_RESOURCES[_kind] = tuple(_size)

# Optional volumes, chosen at compile time (`synthvlm compile --data-pvc NAME --model-cache-pvc NAME`):
# a PVC mounted at the same path in every task, so data_root can be a plain path on shared storage, and
# a model cache mounted at HF_HOME in every task that loads models (one download per cluster, not per pod).
DATA_PVC = os.environ.get("SYNTHVLM_DATA_PVC", "")
DATA_MOUNT = os.environ.get("SYNTHVLM_DATA_MOUNT", "/data")
MODEL_CACHE_PVC = os.environ.get("SYNTHVLM_MODEL_CACHE_PVC", "")
MODEL_CACHE_MOUNT = "/models"
MODEL_CACHE_HF_HOME = f"{MODEL_CACHE_MOUNT}/huggingface"
# s3:// data roots (`synthvlm compile --s3-endpoint URL --s3-secret NAME[:ACCESS_KEY,SECRET_KEY]`): every
# task gets the endpoint and the credentials from a Secret, e.g. KFP's bundled MinIO:
# --s3-endpoint http://minio-service.kubeflow:9000 --s3-secret mlpipeline-minio-artifact:accesskey,secretkey
S3_ENDPOINT = os.environ.get("SYNTHVLM_S3_ENDPOINT", "")
S3_SECRET = os.environ.get("SYNTHVLM_S3_SECRET", "")


def sized(task, kind: str):
    """Give a task the CPU and memory of its kind (TASK_RESOURCES)."""
    cpu, memory, limit = TASK_RESOURCES[kind]
    task.set_cpu_request(cpu).set_memory_request(memory)
    if limit:
        task.set_memory_limit(limit)
    return task


def loads_models(task):
    """Mount the model cache PVC at HF_HOME when one was chosen at compile time."""
    if MODEL_CACHE_PVC:
        kubernetes.mount_pvc(task, pvc_name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_MOUNT)
        task.set_env_variable("HF_HOME", MODEL_CACHE_HF_HOME)
    return task


def form_documented(pipeline_name: str):
    """Append the run form's typed parameters (synthvlm.run_config.FORM_FIELDS) to a pipeline function's
    docstring "Args:" section (its last), so each gets its description in the KFP UI from one place."""
    from synthvlm.run_config import FORM_FIELDS

    def decorate(func):
        lines = [f"        {field.name}: {field.description}" for field in FORM_FIELDS[pipeline_name]]
        func.__doc__ = func.__doc__.rstrip() + "\n" + "\n".join(lines) + "\n"
        return func

    return decorate


def named(task, display_name: str, size: str = "light"):
    """Name a task for the UI, size it (TASK_RESOURCES), mount the data PVC if any, and turn KFP's cache off.

    Every task reads or writes the data root, which KFP's cache cannot see: a cache hit would hand back an
    old output URI even when the data behind it was changed or deleted. What may be reused is decided by
    the stage runner's fingerprints instead (synthvlm/runner.py), which a rerun checks in a second.
    """
    if DATA_PVC:
        kubernetes.mount_pvc(task, pvc_name=DATA_PVC, mount_path=DATA_MOUNT)
    if S3_ENDPOINT:
        task.set_env_variable("AWS_ENDPOINT_URL", S3_ENDPOINT)
    if S3_SECRET:
        name, _, keys = S3_SECRET.partition(":")
        access, _, secret = (keys or "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY").partition(",")
        kubernetes.use_secret_as_env(
            task,
            secret_name=name,
            secret_key_to_env={access: "AWS_ACCESS_KEY_ID", secret: "AWS_SECRET_ACCESS_KEY"},
        )
    return sized(task, size).set_display_name(display_name).set_caching_options(False)


def on_gpu(task, node_selector, tolerations) -> None:
    """One GPU per pod on the chosen node pool; retried when the node is preempted."""
    # The resource is always nvidia.com/gpu; the node selector picks A100, H100, ...
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    loads_models(task)
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
    plan = plan_shards(
        captions_manifest=manifest,
        num_shards=num_shards,
        generate_config=generate_config,
        score_config=score_config,
    )
    named(plan, "plan shards")
    with dsl.ParallelFor(plan.output, parallelism=MAX_PARALLEL_GPU_PODS) as shard:
        gen = generate_images(
            config_json=shard.generate_config,
            captions_manifest=shard.manifest,
            data_root=data_root,
            shard=shard.shard,
            num_shards=shard.num_shards,
        )
        named(gen, "SDXL generate shard", size="generate")
        on_gpu(gen, node_selector, tolerations)
        scored = clip_score(
            config_json=shard.score_config, input_manifest=gen.outputs["Output"], data_root=data_root
        )
        named(scored, "CLIP score shard", size="score")
        on_gpu(scored, node_selector, tolerations)
    return gen, scored


def on_gpus(task, count, node_selector, tolerations) -> None:
    """`count` GPUs in one pod (training, evaluation) on the chosen node pool; retried on preemption."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(count)
    loads_models(task)
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
        named(here, display_name, size="train")
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
    named(evaluation, "evaluate", size="eval")
    on_gpus(evaluation, 1, node_selector, tolerations)
    return evaluation
