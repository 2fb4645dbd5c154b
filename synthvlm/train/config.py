"""Settings of LLaVA-1.5 training: stage 1 (pretrain: projector only) and stage 2 (SFT: projector + LLM).

Fields whose paper value differs between the stages (learning rate, global batch, template, ...) default
to None, meaning "the value of this stage" (`STAGE_DEFAULTS`); `TrainConfig.resolved()` fills them. Keeping
None in the config (rather than filling it at construction) means a config dumped for one stage never
carries that stage's numbers into the other.

Sources: LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning", Table 9 and the
released scripts/v1_5/pretrain.sh and finetune.sh) and SynthVLM §3.4 / §4.1 (the same LLaVA-1.5 recipe:
stage 1 trains the projector on the synthetic data, stage 2 the projector and the LLM on LLaVA-665K).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from synthvlm.config import StageConfig, validate
from synthvlm.errors import ConfigError
from synthvlm.train.kubeflow import ClusterJobConfig

Stage = Literal["pretrain", "sft"]
TemplateName = Literal["plain", "vicuna_v1"]
Distributed = Literal["auto", "none", "ddp", "fsdp"]

STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {
        # LLaVA-1.5 pretrain.sh: --version plain (the human turn becomes just the image).
        "template": "plain",
        # LLaVA-1.5 Table 9 / pretrain.sh: lr 1e-3, batch 256.
        "learning_rate": 1e-3,
        "global_batch_size": 256,
        # Our choice: 16 fits a frozen 7B LLM on an 80 GB GPU without gradient checkpointing
        # (LLaVA's 32 x 8 GPUs ran on ZeRO-2 with checkpointing); accumulation makes up the global batch.
        "per_device_batch_size": 16,
        # Our choice: off. Only the projector trains, activations of a 640-token sample fit, and
        # recomputation costs ~30% throughput (design.md reference: 23 vs 16 samples/s).
        "gradient_checkpointing": False,
        # Our choice: DDP. The frozen LLM needs no sharded optimizer state (LLaVA used ZeRO-2).
        "distributed": "ddp",
        # LLaVA-1.5 pretrain.sh does not set --group_by_modality_length (HF default: off); every
        # pretraining sample has one image, so there is no modality to separate.
        "group_by_modality_length": False,
    },
    "sft": {
        # LLaVA-1.5 finetune.sh: --version v1 (Vicuna v1 conversation template).
        "template": "vicuna_v1",
        # LLaVA-1.5 Table 9 / finetune.sh: lr 2e-5, batch 128.
        "learning_rate": 2e-5,
        "global_batch_size": 128,
        # LLaVA-1.5 finetune.sh: per_device_train_batch_size 16 (x 8 GPUs = 128).
        "per_device_batch_size": 16,
        # LLaVA-1.5 finetune.sh: --gradient_checkpointing True.
        "gradient_checkpointing": True,
        # LLaVA-1.5 finetune.sh used ZeRO-3; FSDP full sharding is its PyTorch equivalent.
        "distributed": "fsdp",
        # LLaVA-1.5 finetune.sh: --group_by_modality_length True (LLaVA-665K mixes text-only samples in).
        "group_by_modality_length": True,
    },
}


class TrainDataset(StageConfig):
    """One LLaVA-format dataset of a training mixture."""

    # A LLaVA JSON (a list of samples) or JSONL file, local or gs://.
    uri: str = Field(min_length=1)
    # Folder the samples' `image` paths are relative to (LLaVA's --image_folder); None = the JSON's folder.
    image_folder: str | None = None
    # Our choice of mixing rule: samples drawn per epoch = ratio x dataset size. 1.0 = every sample once,
    # 0.5 = a seeded half, 2.0 = every sample twice.
    ratio: float = Field(1.0, gt=0)
    # A short name for logs and statistics; None = the JSON file name.
    name: str | None = None

    @classmethod
    def from_spec(cls, spec: str) -> TrainDataset:
        """'json=gs://b/x.json,images=gs://b/img,ratio=0.5' (or just a JSON path) -> TrainDataset."""
        if "=" not in spec:
            return cls(uri=spec)
        fields: dict[str, Any] = {}
        aliases = {"json": "uri", "images": "image_folder"}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"dataset spec {spec!r}: expected key=value pairs, got {part!r}")
            fields[aliases.get(key.strip(), key.strip())] = value.strip()
        return validate(cls, fields, source=f"dataset spec {spec!r}")

    def display_name(self) -> str:
        return self.name or self.uri.rstrip("/").rsplit("/", 1)[-1]


def parse_datasets(datasets_json: str) -> list[TrainDataset]:
    """A JSON list of datasets (objects, or plain JSON paths) -> validated TrainDatasets."""
    try:
        items = json.loads(datasets_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"datasets: not valid JSON: {exc}") from None
    if isinstance(items, dict | str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ConfigError("datasets: expected a non-empty JSON list of datasets")
    out = []
    for i, item in enumerate(items):
        data = {"uri": item} if isinstance(item, str) else item
        out.append(validate(TrainDataset, data, source=f"datasets[{i}]"))
    return out


class TrainConfig(StageConfig):
    """Settings of one LLaVA-1.5 training stage (None = this stage's default, see STAGE_DEFAULTS)."""

    # SynthVLM §3.4: stage 1 "pretrain" trains the projector, stage 2 "sft" the projector and the LLM.
    stage: Stage = "pretrain"

    # ---- model
    # LLaVA-1.5 / SynthVLM §4.1: "CLIP 336 with a 14-patch configuration" (CLIP ViT-L/14 at 336 px).
    vision_tower: str = Field("openai/clip-vit-large-patch14-336", min_length=1)
    # LLaVA-1.5 7B / SynthVLM §4.1 (Table 4 trains 7B and 13B): Vicuna v1.5.
    llm: str = Field("lmsys/vicuna-7b-v1.5", min_length=1)
    # Our choice: None builds from vision_tower + llm; a LLaVA checkpoint folder/URI (for SFT: stage 1's
    # output) continues from it instead.
    init_from: str | None = None
    # Our choice: the tiny random-weight LLaVA built from configs (tests and smoke runs, no downloads).
    tiny: bool = False
    # LLaVA-1.5: mm_projector_type mlp2x_gelu (two linear layers with GELU between them).
    projector: Literal["mlp2x_gelu"] = "mlp2x_gelu"
    # LLaVA-1.5: mm_vision_select_layer -2 (the penultimate CLIP layer).
    vision_feature_layer: int = -2
    # LLaVA-1.5: mm_vision_select_feature "patch" (drop CLS) = transformers' "default".
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    # Our choice: PyTorch SDPA (flash/memory-efficient kernels on GPU, no extra package).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    # ---- data
    # None = stage default: "plain" for pretrain, "vicuna_v1" for SFT (LLaVA-1.5 scripts).
    template: TemplateName | None = None
    # LLaVA-1.5 finetune.sh: --model_max_length 2048 (tokens after expanding each image to 576).
    max_length: int = Field(2048, ge=16)
    # LLaVA-1.5: --image_aspect_ratio pad (pad to square with the mean colour, then CLIP preprocessing).
    image_aspect_ratio: Literal["pad", "crop"] = "pad"
    # Our choice: any fixed seed; it decides which samples a ratio < 1 keeps and the mixture order.
    mixture_seed: int = 0

    # ---- optimisation
    learning_rate: float | None = Field(None, gt=0)  # None = 1e-3 pretrain, 2e-5 SFT (LLaVA-1.5 Table 9)
    global_batch_size: int | None = Field(None, ge=1)  # None = 256 pretrain, 128 SFT (LLaVA-1.5 Table 9)
    per_device_batch_size: int | None = Field(None, ge=1)  # None = 16 (see STAGE_DEFAULTS)
    # LLaVA-1.5 Table 9: 1 epoch in both stages.
    num_train_epochs: float = Field(1.0, gt=0)
    # Our choice: -1 = the epochs decide; a positive value caps the optimizer steps (smoke runs).
    max_steps: int = -1
    # LLaVA-1.5 Table 9: warmup ratio 0.03, cosine decay, no weight decay.
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    # HF Trainer default, also what LLaVA's scripts ran with.
    max_grad_norm: float = Field(1.0, gt=0)
    # Our choice: "auto" = bf16 mixed precision on GPU (LLaVA-1.5: --bf16 True), fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # LLaVA-1.5 scripts: --tf32 True (only applies on GPUs).
    tf32: bool = True
    # None = stage default: off for pretrain, on for SFT.
    gradient_checkpointing: bool | None = None
    # LLaVA-1.5 scripts: --dataloader_num_workers 4.
    dataloader_num_workers: int = Field(4, ge=0)
    # Our choice: a checkpoint every 500 optimizer steps (a preempted pod loses at most that).
    save_steps: int = Field(500, ge=1)
    # LLaVA-1.5 scripts: --save_total_limit 1.
    save_total_limit: int = Field(1, ge=1)
    # LLaVA-1.5 scripts: --logging_steps 1.
    logging_steps: int = Field(1, ge=1)
    # HF Trainer's default seed (LLaVA kept it).
    seed: int = 42
    # None = stage default: off for pretrain, on for SFT (LLaVA-1.5 scripts). On: every global batch
    # holds image samples only or text-only samples only, each optimizer step's samples ordered by length
    # (see data.ModalityLengthGroupedSampler).
    group_by_modality_length: bool | None = None

    # ---- parallelism (set by the pipeline: GPU count and node count per run)
    gpus_per_node: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    # "auto" = stage default: DDP for pretrain, FSDP (full shard) for SFT; "none" = one process.
    distributed: Distributed = "auto"
    # torch.distributed's conventional rendezvous port.
    master_port: int = Field(29500, ge=1, le=65535)
    # Our choice: where checkpoints live while training when output_dir is gs:// (None = a folder under
    # the system temp dir named after output_dir); they are synced to output_dir after every save.
    local_work_dir: str | None = None
    # Our choice: CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where and how the Kubeflow job (TrainJob, or PyTorchJob) of a multi-node run (num_nodes > 1) runs;
    # unused for one node.
    cluster: ClusterJobConfig = Field(default_factory=ClusterJobConfig)

    @field_validator("vision_feature_layer")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("vision_feature_layer 0 is the patch embedding, not a transformer layer")
        return value

    def resolved(self) -> TrainConfig:
        """A copy with every None field set to this stage's default."""
        data = self.model_dump()
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if data.get(key) is None or (key == "distributed" and data[key] == "auto"):
                data[key] = value
        return TrainConfig.model_validate(data)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes

    def batch_plan(self, world_size: int | None = None) -> tuple[int, int]:
        """(per-device batch, accumulation steps) so that global batch = per_device x accumulation x world."""
        cfg = self.resolved()
        world = world_size or cfg.world_size
        global_batch = int(cfg.global_batch_size)  # type: ignore[arg-type]
        per_device = min(int(cfg.per_device_batch_size), max(1, global_batch // world))  # type: ignore[arg-type]
        if global_batch % (per_device * world):
            raise ConfigError(
                f"global_batch_size {global_batch} is not a multiple of per_device_batch_size {per_device} "
                f"x {world} processes; pick sizes so that global = per_device x accumulation x processes"
            )
        return per_device, global_batch // (per_device * world)
