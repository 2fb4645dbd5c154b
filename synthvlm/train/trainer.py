"""One training process: model + data + transformers.Trainer (checkpoints, resume, cosine with warmup,
gradient accumulation, DDP/FSDP through accelerate).

Every process of a torchrun launch runs `run_training`; with one process it runs in the caller.

Speed and memory choices (GPU paths; tested on CPU only in this repository):
- Frozen modules keep bf16 weights (no fp32 copy, no autocast cast per step); trained ones are fp32
  masters under bf16 autocast. Under FSDP every weight is fp32 (FSDP2 wants one dtype per group) and
  FSDP's mixed precision computes in bf16.
- Stage 1 trains the projector only. No weight in the LLM or the vision tower requires grad, so autograd
  records nothing for the vision tower (it runs as if under no_grad) and back-propagates through the LLM
  for activation gradients only (no weight gradients, no optimizer state for 7B weights).
- Stage-1 checkpoints hold the trained weights only (the projector: ~85 MB instead of 14 GB); the frozen
  weights come back from their source on resume. Final outputs are always complete HF models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.utils.data import Dataset, Sampler
from transformers import Trainer, TrainingArguments, set_seed

from synthvlm import storage
from synthvlm.train.config import TrainConfig, TrainDataset
from synthvlm.train.data import LlavaCollator, LlavaMixture, ModalityLengthGroupedSampler
from synthvlm.train.model import (
    build_llava,
    build_tiny_llava,
    count_parameters,
    load_llava,
    num_image_tokens,
    set_trainable,
    trainable_parameter_names,
    upcast_trainable,
)
from synthvlm.train.sync import (
    CheckpointSyncCallback,
    download_folder,
    last_local_checkpoint,
    pull_last_checkpoint,
    upload_folder,
)

log = logging.getLogger(__name__)

TRAINABLE_WEIGHTS = "trainable.safetensors"  # a stage-1 checkpoint's weights: trained parameters only


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its files: local folders for the Trainer, remote URIs when output_dir is remote."""

    work_dir: str  # local
    checkpoints: str  # local
    final_model: str  # local folder the final model is saved to
    remote_checkpoints: str | None  # synced copy of the checkpoints (None: output_dir is local)
    remote_model: str | None  # where the final model is uploaded (None: final_model is the output)


def run_paths(config: TrainConfig, output_dir: str) -> RunPaths:
    if not storage.is_remote(output_dir):
        return RunPaths(output_dir, f"{output_dir}/checkpoints", f"{output_dir}/model", None, None)
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:16]
    work = config.local_work_dir or os.path.join(tempfile.gettempdir(), "synthvlm-train", digest)
    return RunPaths(
        work,
        os.path.join(work, "checkpoints"),
        os.path.join(work, "model"),
        storage.join(output_dir, "checkpoints"),
        storage.join(output_dir, "model"),
    )


# ---------------------------------------------------------------- devices, precision, parallelism


def process_device(config: TrainConfig) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun, else cuda:0 / CPU."""
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def uses_bf16(config: TrainConfig, device: torch.device) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def distributed_mode(config: TrainConfig, world_size: int) -> str:
    """'none', 'ddp' or 'fsdp' for this run (one process is always 'none')."""
    mode = config.resolved().distributed
    return "none" if world_size == 1 else ("ddp" if mode == "none" else mode)


def current_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1


def _layer_class(module: torch.nn.Module) -> str:
    """Class name of the repeated transformer block inside `module` (its first `layers` ModuleList)."""
    for name, child in module.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(child, torch.nn.ModuleList) and len(child):
            return type(child[0]).__name__
    raise ValueError(f"no transformer layers found in {type(module).__name__}")


def fsdp_settings(model: torch.nn.Module, activation_checkpointing: bool) -> dict[str, Any]:
    """FSDP2 full sharding (ZeRO-3 like, what LLaVA-1.5's finetune used) wrapping each transformer layer."""
    layers = {_layer_class(model.model.language_model), _layer_class(model.model.vision_tower)}
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": sorted(layers),
        "reshard_after_forward": True,
        # One HF-format file: the final model loads with from_pretrained, checkpoints resume anywhere.
        "state_dict_type": "FULL_STATE_DICT",
        "activation_checkpointing": activation_checkpointing,
    }


def check_fsdp_enabled(mode: str, enabled: bool, device: torch.device) -> None:
    """FSDP that accelerate did not turn on: an error on GPUs (a 7B SFT replicated per GPU would run out
    of memory or silently train another way), a warning on CPU, where accelerate has no FSDP at all
    (it enables FSDP only for accelerator backends) and DDP over gloo is the honest stand-in."""
    if mode != "fsdp" or enabled:
        return
    if device.type != "cpu":
        raise RuntimeError(f"FSDP was requested but accelerate did not enable it on {device}")
    log.warning("FSDP was requested but accelerate has no FSDP on cpu; training with DDP instead")


# ---------------------------------------------------------------- model


def load_dtype(config: TrainConfig, device: torch.device, fsdp: bool) -> torch.dtype:
    """bf16 for weights that stay frozen on GPU; fp32 when the LLM trains, under FSDP, and on CPU."""
    if device.type != "cuda" or fsdp or config.stage == "sft" or not uses_bf16(config, device):
        return torch.float32
    return torch.bfloat16


def load_model(config: TrainConfig, device: torch.device, fsdp: bool = False):
    """(model, processor) for this stage, trainable parameters set, on `device`."""
    # Same seed on every rank: the new projector (and new embedding rows) start identical everywhere.
    set_seed(config.seed)
    dtype = load_dtype(config, device, fsdp)
    if config.tiny:
        model, processor = build_tiny_llava(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            aspect_ratio=config.image_aspect_ratio,
            attn_implementation=config.attn_implementation,
        )
        model = model.to(device=device, dtype=dtype)
    elif config.init_from:
        model, processor = load_llava(
            local_model_folder(config.init_from),
            attn_implementation=config.attn_implementation,
            dtype=dtype,
            device=device,
        )
    else:
        model, processor = build_llava(
            config.vision_tower,
            config.llm,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            aspect_ratio=config.image_aspect_ratio,
            attn_implementation=config.attn_implementation,
            dtype=dtype,
            device=device,
        )
    set_trainable(model, config.stage)
    upcast_trainable(model)
    model.config.use_cache = model.config.text_config.use_cache = False  # no KV cache while training
    return model, processor


def local_model_folder(uri: str) -> str:
    """A local folder with the model at `uri` (downloaded once for gs:// and s3://)."""
    if not storage.is_remote(uri):
        return uri
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = os.path.join(tempfile.gettempdir(), "synthvlm-models", digest)
    if not os.path.isfile(os.path.join(local, "config.json")):
        download_folder(uri, local, replace=False)
    return local


# ---------------------------------------------------------------- Trainer


def innermost_sampler(loader: Any) -> Any:
    """The index sampler under a DataLoader's (accelerate-wrapped) batch samplers, or None."""
    batches = getattr(loader, "batch_sampler", None)
    while hasattr(batches, "batch_sampler"):  # BatchSamplerShard, SkipBatchSampler
        batches = batches.batch_sampler
    return getattr(batches, "sampler", None)


class LlavaTrainer(Trainer):
    """transformers.Trainer with checkpoints that resume correctly and, in stage 1, stay small.

    With `trainable_only_checkpoints` (stage 1 without FSDP), `checkpoint-N/` gets TRAINABLE_WEIGHTS
    instead of the full model; resuming loads them into the freshly built model. Other non-FSDP
    checkpoints keep module key names (see _save). `save_full_model` writes the final output: a complete
    HF model in the format from_pretrained expects.

    With `group_by_modality_length` (LLaVA-1.5 SFT), the training order comes from
    ModalityLengthGroupedSampler: every global batch is image samples only or text-only samples only.
    """

    def __init__(
        self,
        *args: Any,
        trainable_only_checkpoints: bool = False,
        group_by_modality_length: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.trainable_only_checkpoints = trainable_only_checkpoints
        self.group_by_modality_length = group_by_modality_length
        self.saving_final_model = False

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler | None:
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not isinstance(dataset, LlavaMixture):
            raise TypeError(f"group_by_modality_length needs a LlavaMixture, got {type(dataset).__name__}")
        lengths, has_image = dataset.modality_lengths()
        # The sampler yields the global order. The DataLoader cuts it into per-device batches of
        # train_batch_size; with several processes accelerate's prepare() wraps that batch sampler in
        # BatchSamplerShard (split_batches=False, the Trainer's default), which hands batch k to rank
        # k % world_size. Micro-step j of all ranks thus reads the consecutive slice [j*G, (j+1)*G),
        # G = train_batch_size x world_size: the sampler's global batches are what the ranks train on.
        return ModalityLengthGroupedSampler(
            lengths,
            has_image,
            batch_size=self.args.train_batch_size * self.args.world_size,
            group_batches=self.args.gradient_accumulation_steps,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # accelerate forwards set_epoch to the sampler, except when a run resumes mid-epoch on several
        # processes: its SkipBatchSampler around BatchSamplerShard hides the sampler, which would then
        # replay epoch 0's order (samples of the resumed epoch seen twice, others never). Set the epoch
        # on the innermost sampler here, before the Trainer wraps the loader to skip the trained batches.
        sampler = innermost_sampler(kwargs["train_dataloader"])
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def save_full_model(self, output_dir: str) -> None:
        self.saving_final_model = True
        try:
            self.save_model(output_dir)
        finally:
            self.saving_final_model = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.saving_final_model or self.is_fsdp_enabled:
            # FSDP resumes from its own pytorch_model_fsdp file (module keys); this HF save is a copy.
            super()._save(output_dir, state_dict=state_dict)
            return
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self.trainable_only_checkpoints:
            # save_pretrained's default writes Llava's original key names (language_model.model.*), which
            # the Trainer's resume (load_state_dict with strict=False) silently fails to match: keep the
            # module names so a resumed run really continues from the checkpoint's weights.
            model.save_pretrained(output_dir, state_dict=state_dict, save_original_format=False)
            return
        weights = {
            name: param.detach().to("cpu").contiguous()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        path = os.path.join(output_dir, TRAINABLE_WEIGHTS)
        safetensors.torch.save_file(weights, path, metadata={"format": "pt"})
        model.config.save_pretrained(output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.isfile(path):
            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            return
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        weights = safetensors.torch.load_file(path, device="cpu")
        missing = set(trainable_parameter_names(target)) - set(weights)
        result = target.load_state_dict(weights, strict=False)
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"checkpoint {resume_from_checkpoint} does not match this model's trained parameters: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        log.info("resumed %d trained tensors from %s", len(weights), path)


def training_arguments(
    config: TrainConfig, paths: RunPaths, device: torch.device, world_size: int, fsdp_config: dict | None
) -> TrainingArguments:
    per_device, accumulation = config.batch_plan(world_size)
    on_gpu = device.type == "cuda"
    ckpt = bool(config.gradient_checkpointing)
    return TrainingArguments(
        output_dir=paths.checkpoints,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=float(config.learning_rate),  # type: ignore[arg-type]
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # < 1: a fraction of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        bf16=uses_bf16(config, device),
        tf32=True if on_gpu and config.tf32 and torch.cuda.get_device_capability(device)[0] >= 8 else None,
        # Under FSDP the wrapper checkpoints activations itself (fsdp_config), without an extra all-gather.
        activation_checkpointing=ckpt and fsdp_config is None,
        activation_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=on_gpu,
        dataloader_persistent_workers=config.dataloader_num_workers > 0,
        remove_unused_columns=False,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        fsdp=fsdp_config is not None or None,
        fsdp_config=fsdp_config,
        disable_tqdm=True,
    )


def run_training(config: TrainConfig, datasets: list[TrainDataset], output_dir: str) -> dict[str, Any]:
    """Train one stage in this process (one of a torchrun launch, or alone); return statistics.

    Resumes from the newest complete checkpoint (downloaded first when output_dir is gs://). The final
    model (weights + config + processor) lands in paths.final_model, and is uploaded to
    paths.remote_model by the main process.
    """
    config = config.resolved()
    paths = run_paths(config, output_dir)
    world_size = current_world_size()
    mode = distributed_mode(config, world_size)
    device = process_device(config)
    loading = time.monotonic()
    model, processor = load_model(config, device, fsdp=mode == "fsdp")
    load_seconds = round(time.monotonic() - loading, 3)  # the report's cost splits loading from training
    trainable, total = count_parameters(model)
    log.info(
        "stage %s: %d of %d parameters train (%s, %d process(es))",
        config.stage,
        trainable,
        total,
        mode,
        world_size,
    )

    dataset = LlavaMixture(
        datasets,
        processor,
        template=config.template,  # type: ignore[arg-type]
        image_token_id=model.config.image_token_index,
        tokens_per_image=num_image_tokens(model.config),
        max_length=config.max_length,
        seed=config.mixture_seed,
    )
    fsdp_config = fsdp_settings(model, bool(config.gradient_checkpointing)) if mode == "fsdp" else None
    args = training_arguments(config, paths, device, world_size, fsdp_config)
    if paths.remote_checkpoints:
        with args.main_process_first(local=True, desc="fetch checkpoints"):
            resume = pull_last_checkpoint(paths.remote_checkpoints, paths.checkpoints)
    else:
        resume = last_local_checkpoint(paths.checkpoints)
    if resume:
        log.info("resuming from %s", resume)

    callbacks = [CheckpointSyncCallback(paths.remote_checkpoints, config.save_total_limit)]
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id=int(processor.tokenizer.pad_token_id)),
        processing_class=processor,
        callbacks=callbacks if paths.remote_checkpoints else None,
        trainable_only_checkpoints=config.stage == "pretrain" and mode != "fsdp",
        group_by_modality_length=bool(config.group_by_modality_length),
    )
    check_fsdp_enabled(mode, trainer.is_fsdp_enabled, device)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_full_model(paths.final_model)
    if trainer.is_world_process_zero() and paths.remote_model:
        upload_folder(paths.final_model, paths.remote_model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "global_step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "load_seconds": load_seconds,
        "train_seconds": float((result.metrics or {}).get("train_runtime", 0.0) or 0.0),
        "first_logged_loss": float(losses[0]) if losses else None,
        "last_logged_loss": float(losses[-1]) if losses else None,
        "samples_per_epoch": len(dataset),
        "samples_per_dataset": dataset.counts(),
        "group_by_modality_length": trainer.group_by_modality_length,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": world_size,
        "distributed": "fsdp" if trainer.is_fsdp_enabled else ("ddp" if world_size > 1 else "none"),
        "resumed_from": Path(resume).name if resume else None,
        "is_main_process": trainer.is_world_process_zero(),
    }
