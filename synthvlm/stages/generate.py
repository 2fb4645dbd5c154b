"""Image generation: one SDXL image per caption, sharded, batched, resumable.

Each record gets its own seed, derived from (global seed, record id), and its own torch.Generator,
so its image depends neither on the shard layout nor on its batch neighbours. Work is committed
per batch as a small part manifest with a done marker; a rerun skips finished parts (by record id,
so a different batch size on rerun is fine) and finally publishes the union as the shard manifest.
Images go straight to `{output_dir}/images/{id}.{ext}` (a local folder or gs://).
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import diffusers
import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from pydantic import Field

from synthvlm import devices, stage, storage
from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError
from synthvlm.models.sdxl import SchedulerName, load_sdxl
from synthvlm.records import Record, read_manifest, write_manifest

log = logging.getLogger(__name__)

STAGE = "generate"
ImageFormat = Literal["jpeg", "png", "webp"]
_EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_IO_THREADS = 16  # our choice: object-store writes/reads are latency bound; overlap them
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
    # Our choice: the global seed from which every record's seed is derived.
    seed: int = Field(0, ge=0)
    # Our choice: none; an empty prompt keeps SDXL's zeroed negative conditioning.
    negative_prompt: str = ""
    # Our choice: Euler, the sampler SDXL base ships with; dpmpp_2m = DPM-Solver++(2M).
    scheduler: SchedulerName = "euler"
    # Our choice: bfloat16 on GPU (no fp16 overflow in the SDXL VAE), float32 on CPU.
    dtype: devices.DtypeName = "auto"
    # Our choice: CUDA when present, else CPU.
    device: devices.DeviceName = "auto"
    # Our choice: JPEG at quality 95 keeps 1M 1024^2 images near 300 GB with no visible loss.
    image_format: ImageFormat = "jpeg"
    quality: int = Field(95, ge=1, le=100)


def record_seed(global_seed: int, record_id: str, repeat: int = 0) -> int:
    """Seed of one record's image (attempt `repeat`): a hash, the same whatever the sharding/batching."""
    digest = hashlib.sha256(f"{global_seed}\0{record_id}\0{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63: fits int64 manifests and torch seeds


def shard_manifest_uri(output_dir: str, rank: int, world_size: int) -> str:
    return storage.join(output_dir, "shards", f"shard-{rank:05d}-of-{world_size:05d}.jsonl")


def image_uri(output_dir: str, record_id: str, image_format: ImageFormat) -> str:
    return storage.join(output_dir, "images", f"{record_id}.{_EXTENSIONS[image_format]}")


def image_problem(image: np.ndarray) -> str | None:
    """Why a decoded image (HxWx3 floats in [0, 1]) is unusable, or None when it is fine."""
    if not np.isfinite(image).all():
        return "nan_image"  # e.g. fp16 overflow in the VAE
    if image.max() < 0.5 / 255:
        return "black_image"  # every pixel rounds to 0 in 8 bits
    return None


def encode_image(image: np.ndarray, image_format: ImageFormat, quality: int) -> bytes:
    pil = VaeImageProcessor.numpy_to_pil(image[None])[0]
    buf = io.BytesIO()
    if image_format == "png":
        pil.save(buf, format="PNG")  # lossless: quality does not apply
    else:
        pil.save(buf, format=image_format.upper(), quality=quality)
    return buf.getvalue()


class _Painter:
    """The loaded pipeline plus the settings of every call: prompts + seeds -> decoded images."""

    def __init__(self, config: GenerateConfig):
        device = devices.resolve_device(config.device)
        self.dtype = devices.resolve_dtype(config.dtype, device)
        self.config = config
        log.info("loading %s (revision %s) on %s as %s", config.model, config.revision, device, self.dtype)
        self.pipe = load_sdxl(config.model, config.revision, self.dtype, device, config.scheduler)
        self.provenance: dict[str, Any] = {
            "model": config.model,
            "revision": config.revision,
            "scheduler": config.scheduler,
            "steps": config.steps,
            "guidance_scale": config.guidance_scale,
            "height": config.height,
            "width": config.width,
            "dtype": str(self.dtype).removeprefix("torch."),
            "negative_prompt": config.negative_prompt,
            "diffusers_version": diffusers.__version__,
        }

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        # CPU generators: the initial noise of a seed is the same on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return self.pipe(
            prompt=prompts,
            # None (not "") keeps SDXL's zeroed negative conditioning (force_zeros_for_empty_prompt).
            negative_prompt=self.config.negative_prompt or None,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            height=self.config.height,
            width=self.config.width,
            generator=generators,
            output_type="np",
        ).images


def _io_map(fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        return list(pool.map(fn, items))


def _paint_with_retry(
    painter: _Painter, batch: Sequence[Record], global_seed: int, stats: stage.StageStats
) -> dict[str, tuple[np.ndarray, int, int]]:
    """id -> (image, seed, repeat) of the records with a usable image; one retry with a new seed."""
    good: dict[str, tuple[np.ndarray, int, int]] = {}
    pending = list(batch)
    for repeat in (0, 1):
        if not pending:
            break
        seeds = [record_seed(global_seed, rec.id, repeat) for rec in pending]
        images = painter([rec.caption for rec in pending], seeds)
        failed = []
        for rec, seed, image in zip(pending, seeds, images, strict=True):
            problem = image_problem(image)
            if problem is None:
                good[rec.id] = (image, seed, repeat)
            elif repeat == 0:
                failed.append(rec)
            else:
                log.warning("dropping %s: %s again with a second seed", rec.id, problem)
                stats.rejects[problem] += 1
        stats.extra["retried"] += len(failed)
        pending = failed
    return good


def _generate_part(
    painter: _Painter, batch: Sequence[Record], config: GenerateConfig, output_dir: str, part_uri: str
) -> dict[str, Any]:
    """Generate one batch, write its images, then its part manifest and done marker (listing all ids).

    Returns the part's statistics (what its done marker holds).
    """
    stats = stage.StageStats(
        stage=STAGE, count_in=len(batch), extra={"ids": [rec.id for rec in batch], "retried": 0}
    )
    good = _paint_with_retry(painter, batch, config.seed, stats)
    out: list[Record] = []
    for rec in batch:
        if rec.id not in good:
            continue
        _, seed, repeat = good[rec.id]
        provenance = {**painter.provenance, "seed_repeat": repeat}
        out.append(
            rec.model_copy(
                update={
                    "seed": seed,
                    "image_uri": image_uri(output_dir, rec.id, config.image_format),
                    "provenance": {**rec.provenance, "generation": provenance},
                }
            )
        )

    def write_image(rec: Record) -> None:
        data = encode_image(good[rec.id][0], config.image_format, config.quality)
        storage.write_bytes(rec.image_uri, data, content_type=f"image/{config.image_format}")

    _io_map(write_image, out)
    write_manifest(part_uri, out)
    stats.count_out = len(out)
    return stage.mark_done(part_uri, stats)


def _done_parts(parts_dir: str) -> dict[int, str]:
    """Part index -> URI of the parts with a done marker."""
    uris = set(storage.list_uris(parts_dir))
    return {
        int(uri.rsplit("part-", 1)[1].removesuffix(".jsonl")): uri
        for uri in uris
        if uri.endswith(".jsonl") and stage.done_uri(uri) in uris
    }


def _finish_shard(
    records: Sequence[Record], part_uris: list[str], part_stats: list[dict[str, Any]], shard_uri: str
) -> dict[str, Any]:
    """Union of the part manifests in shard order, then the shard's done marker with summed stats."""
    by_id = {rec.id: rec for recs in _io_map(read_manifest, part_uris) for rec in recs}
    kept = [by_id[rec.id] for rec in records if rec.id in by_id]
    stats = stage.StageStats(stage=STAGE, count_in=len(records), count_out=len(kept))
    for part in part_stats:
        stats.rejects.update(part["rejects"])
    stats.extra = {
        "retried": sum(part["retried"] for part in part_stats),
        "generate_seconds": round(sum(part["seconds"] for part in part_stats), 3),
    }
    write_manifest(shard_uri, kept)
    return stage.mark_done(shard_uri, stats)


def generate(
    config: GenerateConfig, input_manifest: str, output_dir: str, rank: int = 0, world_size: int = 1
) -> str:
    """Generate this shard's images (records i with i % world_size == rank); return the shard manifest."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    shard_uri = shard_manifest_uri(output_dir, rank, world_size)
    if stage.is_done(shard_uri):
        log.info("%s is already done; nothing to generate", shard_uri)
        return shard_uri
    records = read_manifest(input_manifest)[rank::world_size]
    parts_dir = shard_uri.removesuffix(".jsonl") + ".parts"
    part_uris = _done_parts(parts_dir)
    part_stats = dict(zip(part_uris, _io_map(stage.read_stats, part_uris.values()), strict=True))
    done_ids = {rid for stats in part_stats.values() for rid in stats["ids"]}
    todo = [rec for rec in records if rec.id not in done_ids]
    log.info(
        "shard %d/%d: %d records, %d done earlier, %d to generate",
        *(rank, world_size, len(records), len(records) - len(todo), len(todo)),
    )
    if todo:
        painter = _Painter(config)
        batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
        # Numbered after the parts already done, so a rerun with another batch size overwrites none.
        first_index = max(part_uris, default=-1) + 1
        for n, batch in enumerate(batches):
            started = time.monotonic()
            index = first_index + n
            part_uris[index] = storage.join(parts_dir, f"part-{index:06d}.jsonl")
            part_stats[index] = _generate_part(painter, batch, config, output_dir, part_uris[index])
            rate = len(batch) / max(time.monotonic() - started, 1e-9)
            log.info("shard %d/%d: batch %d/%d, %.2f images/s", rank, world_size, n + 1, len(batches), rate)
    order = sorted(part_uris)
    stats = _finish_shard(records, [part_uris[i] for i in order], [part_stats[i] for i in order], shard_uri)
    log.info("shard %d/%d done: %s", rank, world_size, stats)
    return shard_uri
