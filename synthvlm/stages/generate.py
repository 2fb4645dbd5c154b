"""Image generation: SDXL images per caption, sharded, batched, resumable.

Each image gets its own seed, derived from (global seed, image id, attempt), and its own
torch.Generator, so it depends neither on the shard layout nor, beyond floating-point rounding of batched
kernels (measured: ~1e-6, enough to change some JPEG bytes), on its batch neighbours. Each record names
the exact call (ids, captions, seeds, padding) that made it, so `synthvlm regenerate` repeats it byte for
byte. With `images_per_prompt` N > 1 a caption `c` yields images `c~0` ... `c~{N-1}`
(provenance.source_id = c), for best-of-N selection downstream; with N = 1 (SynthVLM §3.1) ids stay the
caption ids.

The stage runs through synthvlm.runner: everything of one fingerprint (settings that change images, the
captions manifest) lives under `{output_dir}/generate-<fingerprint>/`: `images/{id}.{ext}`,
`shards/shard-*.jsonl` and `rejects/shard-*.jsonl`; a copy of the latest shard manifests is published at
`{output_dir}/shards/`. Images made under other settings are never reused. Within one fingerprint, work is
committed per batch as a small part manifest with a done marker, written only after the batch's images: a
rerun skips finished parts (by image id, so another batch size on rerun is fine), regenerates the rest,
and finally publishes the union as the shard manifest. Temp files of writes a kill interrupted are removed.

Encoding and upload run on background threads while the next batch denoises (a bounded queue of
parts; an error there stops the stage, and parts already handed over are still committed). Optional:
an SDXL refiner for the last (1 - high_noise_frac) of the steps, a prompt blocklist and an image
safety checker (`synthvlm.safety`), CLIP scoring of the decoded tensors in the same pod
(`score_in_pod`), chunked encoding of prompts longer than the text encoders' 77 tokens (`long_prompts`;
every record says how many tokens each encoder dropped), and GPU speed settings (compile, fused QKV,
channels-last, VAE precision) that are ignored, with a log line, on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, TypeVar

import diffusers
import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import features
from pydantic import Field

from synthvlm import devices, stage, storage
from synthvlm import runner as stage_runner
from synthvlm.config import StageConfig
from synthvlm.embeddings import EMBEDDINGS_SUFFIX, embeddings_uri, read_embeddings, write_embeddings
from synthvlm.errors import ConfigError, InputError
from synthvlm.models.sdxl import (
    SchedulerName,
    load_sdxl,
    load_sdxl_refiner,
    model_revision,
    resolve_weights,
)
from synthvlm.progress import Progress
from synthvlm.ranking import SOURCE_ID_KEY
from synthvlm.records import Record, check_id, read_manifest, write_manifest
from synthvlm.safety import (
    REJECT_BLOCKED_PROMPT,
    REJECT_UNSAFE_IMAGE,
    PromptBlocklist,
    SafetyConfig,
    check_images,
    load_image_checker,
)
from synthvlm.scoring import REJECT_NON_FINITE, ScoreConfig, TensorScorer, with_score
from synthvlm.tokens import DROPPED_TOKENS_KEY, dropped_token_counts, hf_dropped

log = logging.getLogger(__name__)

STAGE = "generate"
ImageFormat = Literal["jpeg", "png", "webp"]
LongPrompts = Literal["truncate", "chunk"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
REJECT_NAN = "nan_image"
REJECT_BLACK = "black_image"
VARIANT_SEPARATOR = "~"  # image id = f"{caption id}~{n}" when images_per_prompt > 1
MAX_REJECT_EXAMPLES = 10  # our choice: ids per reject reason in the shard's stats; all are in the sidecar
_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_T = TypeVar("_T")
_R = TypeVar("_R")


class GenerateConfig(StageConfig):
    """Settings of the image generation stage."""

    # SynthVLM §3.1: "we utilized Stable Diffusion XL (SDXL)"; a hub id or a local folder.
    model: str = Field("stabilityai/stable-diffusion-xl-base-1.0", min_length=1)
    # Our choice: the hub's default branch; pin a commit hash for a reproducible dataset.
    revision: str | None = None
    # SynthVLM §3.1: "configuring SDXL's steps to 60".
    steps: int = Field(60, ge=1)
    # diffusers' Stable Diffusion default (StableDiffusionPipeline), as in the papers' generation code.
    # (StableDiffusionXLPipeline's own default would be 5.0.)
    guidance_scale: float = Field(7.5, ge=0)
    # SynthVLM §3.1: "images at a resolution of 1024x1024". SDXL needs multiples of 8.
    height: int = Field(1024, ge=8, multiple_of=8)
    width: int = Field(1024, ge=8, multiple_of=8)
    # Our choice: 8 doubles throughput over batch 1 on an H100 (design.md reference figures).
    batch_size: int = Field(8, ge=1)
    # Our choice: the global seed from which every image's seed is derived.
    seed: int = Field(0, ge=0)
    # Our choice: none; an empty prompt keeps SDXL's zeroed negative conditioning.
    negative_prompt: str = ""
    # Prompts longer than SDXL's text context (both CLIP encoders: 75 prompt tokens of 77). "truncate":
    # diffusers' encoding, which drops the rest. "chunk": a call with a long prompt (or negative prompt) is
    # encoded by compel (CompelForSDXL, truncate_long_prompts=False): 75-token chunks, each encoded on its
    # own and concatenated, so the UNet cross-attends to every token; SDXL's pooled embedding still sees
    # only the first 75 tokens (recorded as text_encoder_2_pooled). Other prompts of that call are padded
    # with empty chunks to the same length, so their images then depend on sharing the call (the call is
    # recorded; regeneration repeats it exactly); calls of prompts that fit are encoded as with "truncate".
    # Prompts with emphasis weights (StableLLaVA) always go through compel, which never truncates.
    # Our choice: "truncate", diffusers' default and what the papers' code ran, so images match theirs and
    # records made before this setting regenerate unchanged; each record says how many tokens each encoder
    # dropped (provenance.generation.dropped_tokens) and the report counts such records.
    long_prompts: LongPrompts = "truncate"
    # Our choice: Euler, the sampler SDXL base ships with; dpmpp_2m = DPM-Solver++(2M).
    scheduler: SchedulerName = "euler"
    # Our choice: bfloat16 on GPU (no fp16 overflow in the SDXL VAE), float32 on CPU (half precision
    # is ignored there, with a log line).
    dtype: devices.DtypeName = "auto"
    # Our choice: CUDA when present, else CPU.
    device: devices.DeviceName = "auto"
    # Our choice: JPEG at quality 95 keeps 1M 1024^2 images near 300 GB with no visible loss.
    image_format: ImageFormat = "jpeg"
    quality: int = Field(95, ge=1, le=100)
    # SynthVLM §3.1: one image per caption. N > 1 makes ids "{id}~{n}" for best-of-N selection.
    images_per_prompt: int = Field(1, ge=1)
    # Our choice: none (SynthVLM §3.1 uses SDXL base only); e.g. stabilityai/stable-diffusion-xl-refiner-1.0.
    refiner_model: str | None = None
    # Our choice: the hub's default branch; pin a commit hash for a reproducible dataset.
    refiner_revision: str | None = None
    # diffusers SDXL docs (ensemble of expert denoisers): the base runs the first 80% of the steps.
    high_noise_frac: float = Field(0.8, gt=0, lt=1)
    # GPU speed settings (ignored on CPU). Off by default: our choice until measured on the target GPU
    # (benchmarks/generation.py); design.md: compile gains ~25% at batch 8 after a ~150 s warm-up.
    compile: bool = False
    # design.md reference figures use torch.compile's default mode (max-autotune warms up far longer).
    compile_mode: CompileMode = "default"
    # Our choice: off; diffusers' fuse_qkv_projections (one matmul for q, k, v) is marked experimental.
    fuse_qkv: bool = False
    # Our choice: off; channels-last UNet/VAE memory layout (diffusers' SDXL speed-up guide).
    channels_last: bool = False
    # diffusers' default: True (an fp16 SDXL VAE decodes in float32; it overflows in fp16). False sets
    # force_upcast off, honoured only when the VAE is not float16 (bf16 has float32's range).
    vae_upcast: bool = True
    # Our choice: parts waiting for or in encode/upload while the next batch denoises (bounds memory).
    pending_parts: int = Field(2, ge=1)
    # Our choice: object-store writes are latency bound; 16 parallel uploads keep up with an H100.
    write_workers: int = Field(16, ge=1)
    # Our choice: none (scoring is its own stage). Set to CLIP-score decoded images on the generation
    # device, no JPEG round trip; the shard manifest then carries scores and an embeddings sidecar.
    score_in_pod: ScoreConfig | None = None
    # Our choice: everything off (the papers filter no prompts or images).
    safety: SafetyConfig = Field(default_factory=SafetyConfig)


def record_seed(global_seed: int, record_id: str, repeat: int = 0) -> int:
    """Seed of one image (attempt `repeat`): a hash, the same whatever the sharding/batching."""
    digest = hashlib.sha256(f"{global_seed}\0{record_id}\0{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63: fits int64 manifests and torch seeds


def shard_manifest_uri(output_dir: str, rank: int, world_size: int) -> str:
    return storage.join(output_dir, "shards", f"shard-{rank:05d}-of-{world_size:05d}.jsonl")


def rejects_uri(output_dir: str, rank: int, world_size: int) -> str:
    """Every dropped image id of a shard with its reason (JSONL), outside shards/ (which holds manifests)."""
    return storage.join(output_dir, "rejects", f"shard-{rank:05d}-of-{world_size:05d}.jsonl")


def image_uri(output_dir: str, record_id: str, image_format: ImageFormat) -> str:
    return storage.join(output_dir, "images", f"{record_id}.{_EXTENSIONS[image_format]}")


def image_problem(image: np.ndarray) -> str | None:
    """Why a decoded image (HxWx3 floats in [0, 1]) is unusable, or None when it is fine."""
    if not np.isfinite(image).all():
        return REJECT_NAN  # e.g. fp16 overflow in the VAE
    if image.max() < 0.5 / 255:
        return REJECT_BLACK  # every pixel rounds to 0 in 8 bits
    return None


def encode_image(image: np.ndarray, image_format: ImageFormat, quality: int) -> bytes:
    pil = VaeImageProcessor.numpy_to_pil(image[None])[0]
    buf = io.BytesIO()
    if image_format == "png":
        pil.save(buf, format="PNG")  # lossless: quality does not apply
    else:
        pil.save(buf, format=image_format.upper(), quality=quality)
    return buf.getvalue()


def image_records(records: Sequence[Record], images_per_prompt: int, source: str) -> list[Record]:
    """One record per image to make: the captions themselves, or N variants "{id}~{n}" of each."""
    if images_per_prompt == 1:
        return list(records)
    out = []
    for rec in records:
        for n in range(images_per_prompt):
            variant_id = f"{rec.id}{VARIANT_SEPARATOR}{n}"
            try:
                check_id(variant_id)
            except ValueError as exc:
                raise InputError(source, f"record {rec.id!r}: image id {exc}", field="id") from None
            provenance = {**rec.provenance, SOURCE_ID_KEY: rec.id, "image_index": n}
            out.append(rec.model_copy(update={"id": variant_id, "provenance": provenance}))
    return out


# --- device, precision and GPU speed settings ---------------------------------------------------


def resolve_runtime(config: GenerateConfig) -> tuple[torch.device, torch.dtype]:
    """Device and dtype; half precision on a CPU becomes float32 (slow there, fp16 partly unsupported)."""
    device = devices.resolve_device(config.device)
    dtype = devices.resolve_dtype(config.dtype, device)
    if device.type != "cuda" and dtype != torch.float32:
        log.info("dtype %s is a GPU setting: using float32 on %s", config.dtype, device)
        dtype = torch.float32
    return device, dtype


def _requested_speed_settings(config: GenerateConfig) -> list[str]:
    requested = [name for name in ("compile", "fuse_qkv", "channels_last") if getattr(config, name)]
    return requested + ([] if config.vae_upcast else ["vae_upcast=False"])


def apply_speed_settings(
    pipe: Any, config: GenerateConfig, device: torch.device, *, vae: bool = True
) -> list[str]:
    """Apply the GPU speed settings to a (base or refiner) pipeline; returns those applied.

    On anything but CUDA nothing is applied: the settings only pay off there (and torch.compile would
    need a C++ toolchain on a CPU node). `vae=False` leaves the VAE alone (a refiner shares the base's).
    """
    requested = _requested_speed_settings(config)
    if device.type != "cuda":
        if requested:
            log.info("ignoring GPU speed settings on %s: %s", device, ", ".join(requested))
        return []
    applied = []
    if config.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=vae)
        applied.append("fuse_qkv")
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        if vae:
            pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if not config.vae_upcast and vae:
        if pipe.vae.dtype == torch.float16:
            log.warning("vae_upcast=False ignored: SDXL's VAE overflows in float16 (use bfloat16)")
        else:
            pipe.vae.register_to_config(force_upcast=False)
            applied.append("vae_upcast=False")
    if config.compile:
        # In place (nn.Module.compile): the pipeline keeps its UNet object, config and dtype checks.
        pipe.unet.compile(mode=config.compile_mode)
        applied.append(f"compile={config.compile_mode}")
    return applied


# PIL.features names of the codec behind each format: its version decides the encoded bytes too.
_CODECS: dict[str, str] = {"jpeg": "jpg", "png": "zlib", "webp": "webp"}
_LIBRARIES = ("torch", "diffusers", "transformers", "Pillow", "numpy", "compel")


def numerics_settings() -> dict[str, Any]:
    """The global torch switches that change GPU arithmetic (TF32, reduced-precision sums, autotuning)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": cudnn.allow_tf32,
        "bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
        "fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction,
        "cudnn_benchmark": cudnn.benchmark,
        "cudnn_deterministic": cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def library_versions(image_format: ImageFormat) -> dict[str, str | None]:
    versions: dict[str, str | None] = {name: metadata.version(name) for name in _LIBRARIES}
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    versions["codec"] = f"{_CODECS[image_format]} {features.version(_CODECS[image_format])}"
    return versions


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()


def runtime_provenance(device: torch.device, image_format: ImageFormat) -> dict[str, Any]:
    """Where and with what an image was made: regeneration is exact only on the same of all of these."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        # On a CPU the vector ISA and the intra-op threads change sum order (measured: 1 vs 2 threads
        # give different images with the tiny model).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "numerics": numerics_settings(),
        "versions": library_versions(image_format),
    }


class Painter:
    """The loaded models plus the settings of every call: prompts + seeds -> decoded images.

    Loads the SDXL base (and refiner), the image safety checker and the in-pod CLIP scorer once; a
    benchmark or a caller generating several shards in one process can pass it to `generate`.
    """

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.device, self.dtype = resolve_runtime(config)
        log.info(
            "loading %s (revision %s) on %s as %s", config.model, config.revision, self.device, self.dtype
        )
        self.pipe = load_sdxl(config.model, config.revision, self.dtype, self.device, config.scheduler)
        self.refiner = None
        if config.refiner_model:
            log.info("loading refiner %s (revision %s)", config.refiner_model, config.refiner_revision)
            self.refiner = load_sdxl_refiner(
                config.refiner_model,
                self.pipe,
                config.refiner_revision,
                self.dtype,
                self.device,
                config.scheduler,
            )
        self.speed_settings = apply_speed_settings(self.pipe, config, self.device)
        if self.refiner is not None:
            apply_speed_settings(self.refiner, config, self.device, vae=False)
        if self.speed_settings:
            log.info("GPU speed settings: %s", ", ".join(self.speed_settings))
        # A compiled UNet recompiles for every new batch shape: pad short batches to the full size.
        compiled = any(name.startswith("compile") for name in self.speed_settings)
        self.fixed_batch = config.batch_size if compiled else None
        self.image_checker = load_image_checker(config.safety, self.device, self.dtype)
        self.scorer = TensorScorer(config.score_in_pod, self.device) if config.score_in_pod else None
        self.provenance = self._provenance()

    def _provenance(self) -> dict[str, Any]:
        """What `synthvlm.regenerate` needs, besides each image's batch, to remake an image exactly."""
        config = self.config
        provenance: dict[str, Any] = {
            "model": config.model,
            # The resolved commit (not the requested branch), or why there is none.
            **model_revision(self.pipe, config.model, config.revision),
            "scheduler": config.scheduler,
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "height": config.height,
            "width": config.width,
            "dtype": str(self.dtype).removeprefix("torch."),
            "negative_prompt": config.negative_prompt,
            "long_prompts": config.long_prompts,
            "diffusers_version": diffusers.__version__,
            "global_seed": config.seed,
            "image_format": config.image_format,
            "quality": config.quality,
            # Applied GPU speed settings change the arithmetic (fused matmuls, compiled kernels).
            "speed_settings": list(self.speed_settings),
            **runtime_provenance(self.device, config.image_format),
        }
        if config.refiner_model:
            provenance["refiner"] = config.refiner_model
            revision = model_revision(self.refiner, config.refiner_model, config.refiner_revision)
            provenance.update({f"refiner_{key}": value for key, value in revision.items()})
            provenance["high_noise_frac"] = config.high_noise_frac
        return provenance

    def __call__(
        self, prompts: list[str], seeds: list[int], weighted_prompts: list[str] | None = None
    ) -> torch.Tensor:
        """Images N x 3 x H x W in [0, 1], on the generation device.

        `weighted_prompts` (compel syntax, e.g. StableLLaVA's `((x))` emphasis as `(x)1.21`) condition the
        base model through compel's SDXL prompt weighting instead of `prompts`; the refiner, which has only
        the second text encoder, gets the plain `prompts`."""
        count = len(prompts)
        if self.fixed_batch and count < self.fixed_batch:
            padding = self.fixed_batch - count
            prompts, seeds = prompts + [prompts[-1]] * padding, seeds + [seeds[-1]] * padding
            if weighted_prompts:
                weighted_prompts = weighted_prompts + [weighted_prompts[-1]] * padding
        # CPU generators: the initial noise of a seed is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        common: dict[str, Any] = {
            "prompt": prompts,
            # None (not "") keeps SDXL's zeroed negative conditioning (force_zeros_for_empty_prompt).
            "negative_prompt": self.config.negative_prompt or None,
            "num_inference_steps": self.config.steps,
            "guidance_scale": self.config.guidance_scale,
            "generator": generators,
        }
        base = dict(common)
        if weighted_prompts:
            from synthvlm.stablellava.emphasis import weighted_embeddings

            del base["prompt"], base["negative_prompt"]
            base.update(weighted_embeddings(self.pipe, weighted_prompts, self.config.negative_prompt or None))
        elif self.chunks_needed(prompts):
            del base["prompt"], base["negative_prompt"]
            base.update(chunked_embeddings(self.pipe, prompts, self.config.negative_prompt or None))
        size = {"height": self.config.height, "width": self.config.width}
        if self.refiner is None:
            return self.pipe(**base, **size, output_type="pt").images[:count]
        # Ensemble of experts: the base denoises the high-noise part and hands over its latents; the
        # refiner starts where the base ended (denoising_start, not denoising_end as in the papers' code).
        frac = self.config.high_noise_frac
        latents = self.pipe(**base, **size, denoising_end=frac, output_type="latent").images
        return self.refiner(**common, image=latents, denoising_start=frac, output_type="pt").images[:count]

    def chunks_needed(self, prompts: Sequence[str]) -> bool:
        """Whether a call of plain `prompts` is encoded in chunks: `long_prompts: chunk` and a prompt (or the
        negative prompt) longer than a text encoder's context."""
        if self.config.long_prompts != "chunk":
            return False
        texts = [*prompts, self.config.negative_prompt]
        return any(max(hf_dropped(tok, texts)) > 0 for tok in (self.pipe.tokenizer, self.pipe.tokenizer_2))

    def dropped_tokens(
        self, prompts: Sequence[str], weighted_prompts: Sequence[str] | None = None
    ) -> list[dict[str, int]]:
        """Per prompt of one call, how many of its tokens each text encoder never saw.

        text_encoder / text_encoder_2: the per-token conditioning of the base's two encoders (0 when compel
        encodes the call: weighted prompts, or `long_prompts: chunk`); text_encoder_2_pooled: SDXL's pooled
        embedding, from the first 77 tokens in every mode; refiner_text_encoder_2: the refiner's encoder,
        which gets the plain prompts through diffusers (truncated).
        """
        chunked = bool(weighted_prompts) or self.config.long_prompts == "chunk"
        encoded = list(weighted_prompts) if weighted_prompts else list(prompts)
        first = [0] * len(prompts) if chunked else hf_dropped(self.pipe.tokenizer, prompts)
        second = hf_dropped(self.pipe.tokenizer_2, encoded)  # compel pools the text it was given
        out = [
            {"text_encoder": a, "text_encoder_2": 0 if chunked else b, "text_encoder_2_pooled": b}
            for a, b in zip(first, second, strict=True)
        ]
        if self.refiner is not None:
            for row, n in zip(out, hf_dropped(self.refiner.tokenizer_2, prompts), strict=True):
                row["refiner_text_encoder_2"] = n
        return out


def chunked_embeddings(
    pipe: Any, prompts: Sequence[str], negative_prompt: str | None = None
) -> dict[str, Any]:
    """SDXL conditioning of plain prompts of any length, as keyword arguments of a diffusers SDXL call:
    compel's CompelForSDXL (truncate_long_prompts=False: 75-token chunks per encoder, concatenated; pooled
    embedding from the first chunk), with every prompt read as literal text, not compel's weight syntax
    (a caption's "(left)" or "well-liked -" stays what it says).

    Without a negative prompt no negative embeddings are returned, so the pipeline keeps SDXL's zeroed
    negative conditioning, as a call with `negative_prompt=None` does.
    """
    from compel import CompelForSDXL
    from compel.prompt_parser import Conjunction, FlattenedPrompt, Fragment

    def literal(text: str) -> Conjunction:
        fragment = Fragment("")
        fragment.text = text  # set after construction: Fragment() would unescape "\(" in captions
        return Conjunction([FlattenedPrompt([fragment])])

    compel = CompelForSDXL(pipe, device=str(pipe.device))
    for encoder in (compel.compel_1, compel.compel_2):
        encoder.parse_prompt_string = literal  # an instance attribute shadows the classmethod
    negative = [negative_prompt] * len(prompts) if negative_prompt else None
    cond = compel(list(prompts), negative_prompt=negative)
    out = {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled_embeds}
    if cond.negative_embeds is not None:
        out["negative_prompt_embeds"] = cond.negative_embeds
        out["negative_pooled_prompt_embeds"] = cond.negative_pooled_embeds
    return out


# --- one batch ----------------------------------------------------------------------------------


@dataclass
class PaintedPart:
    """One batch after generation and checks, before it is written."""

    records: list[Record]  # kept records: seed, image_uri, provenance (and scores) set
    images: list[np.ndarray]  # HxWx3 floats in [0, 1], one per kept record
    embeddings: np.ndarray | None  # in-pod CLIP image embeddings, one row per kept record
    stats: stage.StageStats  # extra: ids (all of the batch), rejected {id: reason}, retried, paint_seconds


@dataclass
class _Painted:
    image: np.ndarray
    tensor: torch.Tensor
    seed: int
    repeat: int


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def _reject(stats: stage.StageStats, record_id: str, reason: str) -> None:
    stats.rejects[reason] += 1
    stats.extra["rejected"][record_id] = reason


WEIGHTED_PROMPT_KEY = "weighted_prompt"  # provenance key: the prompt with attention weights (compel syntax)


def weighted_prompts(records: Sequence[Record]) -> list[str] | None:
    """The records' weighted prompts (StableLLaVA's emphasis), or None when none of them has one."""
    if not any(WEIGHTED_PROMPT_KEY in rec.provenance for rec in records):
        return None
    return [str(rec.provenance.get(WEIGHTED_PROMPT_KEY) or rec.caption) for rec in records]


def _paint_with_retry(
    painter: Painter, batch: Sequence[Record], global_seed: int, stats: stage.StageStats
) -> dict[str, _Painted]:
    """id -> painted image of the records with a usable image; one retry with a new seed."""
    good: dict[str, _Painted] = {}
    pending = list(batch)
    for repeat in (0, 1):
        if not pending:
            break
        seeds = [record_seed(global_seed, rec.id, repeat) for rec in pending]
        tensors = painter([rec.caption for rec in pending], seeds, weighted_prompts(pending))
        failed = []
        for rec, seed, image, tensor in zip(pending, seeds, _to_numpy(tensors), tensors, strict=True):
            problem = image_problem(image)
            if problem is None:
                good[rec.id] = _Painted(image, tensor, seed, repeat)
            elif repeat == 0:
                failed.append(rec)
            else:
                log.warning("dropping %s: %s again with a second seed", rec.id, problem)
                _reject(stats, rec.id, problem)
        stats.extra["retried"] += len(failed)
        pending = failed
    return good


def _check_safety(
    painter: Painter, batch: Sequence[Record], good: dict[str, _Painted], stats: stage.StageStats
) -> None:
    """Drop (from `good`) the images the configured image checker flags."""
    ids = [rec.id for rec in batch if rec.id in good]
    if painter.image_checker is None or not ids:
        return
    flags = check_images(painter.image_checker, torch.stack([good[i].tensor for i in ids]))
    for record_id, flagged in zip(ids, flags, strict=True):
        if flagged:
            log.info("dropping %s: flagged by the image safety checker", record_id)
            _reject(stats, record_id, REJECT_UNSAFE_IMAGE)
            del good[record_id]


def _painter_calls(
    painter: Painter, batch: Sequence[Record], good: dict[str, _Painted], global_seed: int
) -> list[dict[str, Any]]:
    """The painter calls `_paint_with_retry` made: [first try, retry of the failures], for provenance.

    On a GPU an image depends on its batch neighbours (batched kernels), and on a CPU too (measured
    with the tiny model), so each record carries the exact call its image came from.
    """
    retried = [rec for rec in batch if rec.id not in good or good[rec.id].repeat == 1]
    return [
        {
            "ids": [rec.id for rec in recs],
            "captions": [rec.caption for rec in recs],
            **({"weighted_prompts": weighted} if (weighted := weighted_prompts(recs)) else {}),
            "seeds": [record_seed(global_seed, rec.id, repeat) for rec in recs],
            # Painter pads a shorter call to this size with copies of its last prompt and seed.
            "padded_to": painter.fixed_batch,
        }
        for repeat, recs in enumerate((list(batch), retried))
    ]


def paint_part(
    painter: Painter, batch: Sequence[Record], config: GenerateConfig, output_dir: str
) -> PaintedPart:
    """Generate one batch: retry bad images once, drop unsafe ones, score in pod if configured."""
    stats = stage.StageStats(
        stage=STAGE,
        count_in=len(batch),
        extra={"ids": [rec.id for rec in batch], "rejected": {}, "retried": 0},
    )
    started = time.monotonic()
    good = _paint_with_retry(painter, batch, config.seed, stats)
    calls = _painter_calls(painter, batch, good, config.seed)  # before safety drops any from `good`
    dropped: list[dict[str, dict[str, int]]] = []  # per call: id -> tokens each text encoder never saw
    for call in calls:
        counts = painter.dropped_tokens(call["captions"], call.get("weighted_prompts"))
        dropped.append(dict(zip(call["ids"], counts, strict=True)))
    _check_safety(painter, batch, good, stats)
    kept = [rec for rec in batch if rec.id in good]
    records = [
        rec.model_copy(
            update={
                "seed": good[rec.id].seed,
                "image_uri": image_uri(output_dir, rec.id, config.image_format),
                "provenance": {
                    **rec.provenance,
                    "generation": {
                        **painter.provenance,
                        "seed_repeat": good[rec.id].repeat,
                        "batch": calls[good[rec.id].repeat],
                        DROPPED_TOKENS_KEY: dropped[good[rec.id].repeat][rec.id],
                    },
                },
            }
        )
        for rec in kept
    ]
    embeddings = None
    if painter.scorer is not None and config.score_in_pod is not None:
        records, embeddings = _score(painter.scorer, records, good, config.score_in_pod, stats)
    stats.extra["paint_seconds"] = round(time.monotonic() - started, 3)
    return PaintedPart(records, [good[rec.id].image for rec in records], embeddings, stats)


def _score(
    scorer: TensorScorer,
    records: list[Record],
    good: dict[str, _Painted],
    config: ScoreConfig,
    stats: stage.StageStats,
) -> tuple[list[Record], np.ndarray]:
    """CLIP-score the decoded tensors: (scored records, their image embeddings)."""
    if not records:
        return [], np.empty((0, 0), np.float32)
    tensors = torch.stack([good[rec.id].tensor for rec in records])
    scores, embeddings, texts = scorer.score(tensors, [rec.caption for rec in records])
    scored, rows = [], []
    for row, (rec, value) in enumerate(zip(records, scores, strict=True)):
        if not np.isfinite(value):
            _reject(stats, rec.id, REJECT_NON_FINITE)
            continue
        scored.append(with_score(rec, value, config, texts, row))
        rows.append(row)
    return scored, embeddings[rows]


def commit_part(
    part: PaintedPart,
    part_uri: str,
    config: GenerateConfig,
    io_map: Callable[[Callable[[int], None], Iterable[int]], Any],
) -> dict[str, Any]:
    """Write a part's images, then its embeddings, manifest and done marker; returns the marker's stats."""

    def write_image(i: int) -> None:
        data = encode_image(part.images[i], config.image_format, config.quality)
        storage.write_bytes(part.records[i].image_uri, data, content_type=f"image/{config.image_format}")

    io_map(write_image, range(len(part.records)))
    if part.embeddings is not None:
        write_embeddings(part_uri, part.embeddings)
    write_manifest(part_uri, part.records)
    part.stats.count_out = len(part.records)
    return stage.mark_done(part_uri, part.stats)


class PartCommitter:
    """Commits parts on a background thread while the caller paints the next batch.

    At most `max_pending` parts wait or are being written: a bounded queue, so painting waits when
    writing falls behind. A commit's error is raised in the caller at its next `submit` or at the end;
    parts handed over before an error are still committed, so no finished image is lost.
    """

    def __init__(self, max_pending: int, write_workers: int):
        self.max_pending = max_pending
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit-part")
        self._writers = ThreadPoolExecutor(write_workers, thread_name_prefix="write-image")
        self._pending: deque[tuple[int, Future[dict[str, Any]]]] = deque()
        self.results: dict[int, dict[str, Any]] = {}

    def io_map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        return list(self._writers.map(fn, items))

    def submit(self, index: int, commit: Callable[[], dict[str, Any]]) -> None:
        self._pending.append((index, self._committer.submit(commit)))
        while len(self._pending) > self.max_pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        index, future = self._pending.popleft()
        self.results[index] = future.result()

    def __enter__(self) -> PartCommitter:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            while self._pending:
                if exc is None:
                    self._wait_oldest()
                    continue
                # Already failing: finish the other commits, log (not raise) their errors.
                index, future = self._pending.popleft()
                if future.exception() is not None:
                    log.error("part %d failed too: %s", index, future.exception())
        finally:
            self._committer.shutdown(wait=True)
            self._writers.shutdown(wait=True)


# --- the shard ----------------------------------------------------------------------------------


def _io_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int = 16) -> list[_R]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _done_parts(parts_dir: str) -> dict[int, str]:
    """Part index -> URI of the parts with a done marker."""
    uris = set(storage.list_uris(parts_dir))
    return {
        int(uri.rsplit("part-", 1)[1].removesuffix(".jsonl")): uri
        for uri in uris
        if uri.endswith(".jsonl") and stage.done_uri(uri) in uris
    }


def _read_part(uri: str) -> tuple[list[Record], np.ndarray | None]:
    records = read_manifest(uri)
    has_embeddings = storage.exists(embeddings_uri(uri))
    return records, read_embeddings(uri, len(records)) if has_embeddings else None


def _reject_examples(rejected: dict[str, str]) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for record_id, reason in rejected.items():
        ids = examples.setdefault(reason, [])
        if len(ids) < MAX_REJECT_EXAMPLES:
            ids.append(record_id)
    return examples


def _finish_shard(
    items: Sequence[Record],
    blocked: dict[str, str],
    part_uris: list[str],
    part_stats: list[dict[str, Any]],
    shard_uri: str,
    shard_rejects_uri: str,
    config: GenerateConfig,
) -> stage.StageStats:
    """Union of the part manifests in shard order and the sidecars (the runner writes the marker)."""
    parts = _io_map(_read_part, part_uris)
    by_id = {rec.id: rec for recs, _ in parts for rec in recs}
    kept = [by_id[rec.id] for rec in items if rec.id in by_id]
    rejected = {**blocked}
    for part in part_stats:
        rejected.update(part.get("rejected", {}))
    stats = stage.StageStats(stage=STAGE, count_in=len(items) + len(blocked), count_out=len(kept))
    stats.rejects.update(rejected.values())
    stats.extra = {
        "images_per_prompt": config.images_per_prompt,
        "retried": sum(part["retried"] for part in part_stats),
        "generate_seconds": round(sum(part.get("paint_seconds", part["seconds"]) for part in part_stats), 3),
        "reject_examples": _reject_examples(rejected),
        # per text encoder, kept records whose prompt lost tokens to it (the report shows it)
        "records_with_dropped_tokens": dropped_token_counts(rec.provenance for rec in kept),
    }
    lines = "".join(json.dumps({"id": rid, "reason": why}) + "\n" for rid, why in rejected.items())
    storage.write_text(shard_rejects_uri, lines, content_type="application/jsonl")
    if config.score_in_pod is not None:
        _write_shard_embeddings(parts, kept, shard_uri)
    write_manifest(shard_uri, kept)
    return stats


def _write_shard_embeddings(
    parts: list[tuple[list[Record], np.ndarray | None]], kept: list[Record], shard_uri: str
) -> None:
    rows: dict[str, np.ndarray] = {}
    for records, embeddings in parts:
        if embeddings is not None and len(records):
            rows.update(zip((rec.id for rec in records), embeddings, strict=True))
    if len(rows) < len(kept):
        log.warning("%s: some parts were made without score_in_pod; no embeddings sidecar", shard_uri)
        return
    if kept:
        write_embeddings(shard_uri, np.stack([rows[rec.id] for rec in kept]))
    else:
        write_embeddings(shard_uri, np.empty((0, 0), np.float32))


def _split_blocked(
    records: list[Record], config: GenerateConfig, source: str
) -> tuple[list[Record], dict[str, str]]:
    """(records to generate, image id -> reject reason of blocked prompts)."""
    blocklist = PromptBlocklist.from_config(config.safety)
    if not blocklist:
        return records, {}
    allowed, blocked = [], {}
    for rec in records:
        term = blocklist.match(rec.caption)
        if term is None:
            allowed.append(rec)
            continue
        log.info("skipping %s: prompt contains blocked term %r", rec.id, term)
        for image in image_records([rec], config.images_per_prompt, source):
            blocked[image.id] = REJECT_BLOCKED_PROMPT
    return allowed, blocked


def _clean_interrupted_writes(run: stage_runner.StageRun, parts_dir: str, ids: set[str]) -> None:
    """Temp files a killed write of this shard left (its parts, its images); other shards' are theirs."""
    removed = storage.remove_interrupted_writes(parts_dir)
    removed += storage.remove_interrupted_writes(
        storage.join(run.dir, "images"), owned=lambda name: name.rsplit(".", 1)[0] in ids
    )
    for tmp in removed:
        log.info("removed %s, left by an interrupted write", tmp)


def _process(config: GenerateConfig, run: stage_runner.StageRun) -> stage.StageStats:
    input_manifest: str = run.inputs["captions"]
    rank, world_size = run.context["rank"], run.context["world_size"]
    painter: Painter | None = run.context.get("painter")
    load_seconds = 0.0  # loading the painter (the report's cost splits it from painting)
    captions = read_manifest(input_manifest)[rank::world_size]
    allowed, blocked = _split_blocked(captions, config, input_manifest)
    items = image_records(allowed, config.images_per_prompt, input_manifest)
    parts_dir = run.output.removesuffix(".jsonl") + ".parts"
    _clean_interrupted_writes(run, parts_dir, {rec.id for rec in items})
    part_uris = _done_parts(parts_dir)
    part_stats = dict(zip(part_uris, _io_map(stage.read_stats, part_uris.values()), strict=True))
    done_ids = {rid for stats in part_stats.values() for rid in stats["ids"]}
    todo = [rec for rec in items if rec.id not in done_ids]
    log.info(
        "shard %d/%d: %d images, %d done earlier, %d to generate",
        *(rank, world_size, len(items), len(items) - len(todo), len(todo)),
    )
    if todo:
        label = f"shard {rank + 1}/{world_size}"
        with run.progress(len(items), "images", done=len(items) - len(todo), label=label) as progress:
            loading = time.monotonic()
            painter = painter or Painter(config)
            load_seconds = round(time.monotonic() - loading, 3)
            _generate_parts(painter, todo, config, run.dir, parts_dir, part_uris, part_stats, progress)
    order = sorted(part_uris)
    stats = _finish_shard(
        items,
        blocked,
        [part_uris[i] for i in order],
        [part_stats[i] for i in order],
        run.output,
        rejects_uri(run.dir, rank, world_size),
        config,
    )
    stats.extra["load_seconds"] = load_seconds
    log.info(
        "shard %d/%d done: %s",
        *(rank, world_size, {k: v for k, v in stats.to_dict().items() if k != "reject_examples"}),
    )
    return stats


_SAME_IMAGES = "the same images up to floating-point rounding of the kernels (records name it for regenerate)"
GENERATE = stage_runner.Stage(
    name=STAGE,
    process=_process,
    excluded={
        # Each image has its own seed and generator, so it does not depend on its batch neighbours.
        "batch_size": "each image has its own seed and generator; " + _SAME_IMAGES,
        "compile": _SAME_IMAGES,
        "compile_mode": _SAME_IMAGES,
        "fuse_qkv": _SAME_IMAGES,
        "channels_last": _SAME_IMAGES,
        "pending_parts": "how many finished batches wait for upload",
        "write_workers": "parallel uploads of the same bytes",
        "score_in_pod.batch_size": "each image and caption is encoded on its own",
        "score_in_pod.read_workers": "not used in the pod (no image reads)",
    },
    sidecars=("rejects/{name}", "{output}" + EMBEDDINGS_SUFFIX),
)


def version_dir(config: GenerateConfig, input_manifest: str, output_dir: str) -> str:
    """The fingerprint folder of generation under `config` from `input_manifest` (shards/, images/, ...)."""
    plan = stage_runner.plan_stage(
        GENERATE,
        config,
        {"captions": input_manifest},
        _shard_0(output_dir),
        params=weights_params(config),
        root=output_dir,
    )
    return plan.dir


def _shard_0(output_dir: str) -> str:
    return shard_manifest_uri(output_dir, 0, 1)


def generate(
    config: GenerateConfig,
    input_manifest: str,
    output_dir: str,
    rank: int = 0,
    world_size: int = 1,
    *,
    painter: Painter | None = None,
) -> str:
    """Generate this shard's images (records i with i % world_size == rank); return the versioned shard
    manifest (a copy is published at `{output_dir}/shards/`).

    Images go to `{output_dir}/generate-<fingerprint>/images/`: images made under other settings are
    never reused. `painter`: already loaded models to reuse (built from an equivalent config).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return stage_runner.run_stage(
        GENERATE,
        config,
        {"captions": input_manifest},
        shard_manifest_uri(output_dir, rank, world_size),
        params=weights_params(config),
        context={"rank": rank, "world_size": world_size, "painter": painter},
        root=output_dir,
    )


def weights_params(config: GenerateConfig) -> dict[str, Any]:
    """The weights `config` loads, resolved to a commit (or a folder's content hash) before loading: part
    of the fingerprint, so a hub branch that moved between two runs never mixes images of two commits."""
    weights = {"model": resolve_weights(config.model, config.revision)}
    if config.refiner_model:
        weights["refiner"] = resolve_weights(config.refiner_model, config.refiner_revision)
    return {"weights": weights}


def _generate_parts(
    painter: Painter,
    todo: list[Record],
    config: GenerateConfig,
    output_dir: str,
    parts_dir: str,
    part_uris: dict[int, str],
    part_stats: dict[int, dict[str, Any]],
    progress: Progress,
) -> None:
    """Paint `todo` batch by batch while earlier batches are written; adds the new parts to the dicts."""
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    # Numbered after the parts already done, so a rerun with another batch size overwrites none.
    first_index = max(part_uris, default=-1) + 1
    with PartCommitter(config.pending_parts, config.write_workers) as committer:
        for n, batch in enumerate(batches):
            started = time.monotonic()
            index = first_index + n
            uri = storage.join(parts_dir, f"part-{index:06d}.jsonl")
            part = paint_part(painter, batch, config, output_dir)

            def commit(part: PaintedPart = part, uri: str = uri) -> dict[str, Any]:
                return commit_part(part, uri, config, committer.io_map)

            committer.submit(index, commit)
            part_uris[index] = uri
            rate = len(batch) / max(time.monotonic() - started, 1e-9)
            log.debug("batch %d/%d painted, %.2f images/s", n + 1, len(batches), rate)
            progress.update(len(batch))
    part_stats.update(committer.results)
