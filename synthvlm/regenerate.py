"""Exact regeneration of one image from its manifest record (`synthvlm regenerate`).

Everything comes from the record's `provenance.generation` (written by the generate stage), never
from a current config: the model and its resolved commit, sampler settings, dtype, the GPU speed
settings that were applied, the encoder and its quality, and the exact painter call the image came
from (ids, captions and seeds of its batch in order, plus padding). The batch matters: batched
kernels make an image depend on its neighbours, on a GPU and also on a CPU (measured with the tiny
model: a seed alone and in a batch of 4 differ by ~1e-6, enough to flip some 8-bit pixels).

The result is byte-identical only with the same hardware, library versions and torch numerics
switches: the switches and CPU thread count are set from the record while regenerating; differing
versions or devices are logged as warnings, not errors. Works on any manifest that carries the
record: generation shard manifests, scored/selected manifests and the export's dataset manifest.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from synthvlm import devices, storage
from synthvlm.errors import InputError, SynthVLMError
from synthvlm.models.sdxl import is_builtin, model_revision
from synthvlm.records import Record, read_manifest
from synthvlm.stages.generate import (
    GenerateConfig,
    Painter,
    _to_numpy,
    device_name,
    encode_image,
    library_versions,
    numerics_settings,
)

log = logging.getLogger(__name__)

# Keys without which an image cannot be remade (records from before exact regeneration lack `batch`).
REQUIRED_KEYS = (
    "model",
    "revision_source",
    "scheduler",
    "steps",
    "guidance_scale",
    "height",
    "width",
    "dtype",
    "negative_prompt",
    "image_format",
    "quality",
    "speed_settings",
    "device",
    "batch",
)
EXTENSIONS: dict[str, tuple[str, ...]] = {"jpeg": (".jpg", ".jpeg"), "png": (".png",), "webp": (".webp",)}
_SPEED_FLAGS = ("fuse_qkv", "channels_last")


class RegenerationMismatch(SynthVLMError):
    """`--check`: the regenerated image is not byte-identical to the original (or that is unreadable)."""


@dataclass
class Regenerated:
    output: str
    original_uri: str | None
    identical: bool | None  # None: no readable original to compare with
    warnings: list[str] = field(default_factory=list)


def find_record(manifest: str, record_id: str) -> Record:
    if not storage.exists(manifest):
        raise InputError(manifest, "manifest not found")
    try:
        records = read_manifest(manifest)
    except ValueError as exc:  # not .jsonl/.parquet (e.g. the export's LLaVA JSON)
        raise InputError(manifest, str(exc)) from None
    for rec in records:
        if rec.id == record_id:
            return rec
    raise InputError(manifest, f"no record with id {record_id!r}", field="id")


def generation_provenance(record: Record, manifest: str) -> dict[str, Any]:
    """The record's generation provenance, checked for everything regeneration needs."""
    generation = record.provenance.get("generation")
    if not isinstance(generation, dict):
        raise InputError(
            manifest, f"record {record.id!r} has no generation provenance", field="provenance.generation"
        )
    missing = [key for key in REQUIRED_KEYS if key not in generation]
    if missing:
        raise InputError(
            manifest,
            f"record {record.id!r} lacks {', '.join(missing)} in its generation provenance "
            "(made before exact regeneration was recorded?)",
            field="provenance.generation",
        )
    batch = generation["batch"] if isinstance(generation["batch"], dict) else {}
    ids, captions, seeds = (batch.get(key) for key in ("ids", "captions", "seeds"))
    lists = isinstance(ids, list) and isinstance(captions, list) and isinstance(seeds, list)
    listed = lists and len(ids) == len(captions) == len(seeds) and record.id in ids
    if not listed or (record.seed is not None and seeds[ids.index(record.id)] != record.seed):
        raise InputError(
            manifest,
            f"record {record.id!r}: its batch provenance does not list it with its seed",
            field="provenance.generation.batch",
        )
    for key, source in (("model", "revision_source"), ("refiner", "refiner_revision_source")):
        name = generation.get(key)
        # e.g. the GPU benchmark's random full-size SDXL: known only to the process that registered it
        if name and generation.get(source) == "builtin" and not is_builtin(name):
            raise InputError(
                manifest,
                f"record {record.id!r}: model {name!r} was built in code by a builder registered at "
                "run time (synthvlm.models.sdxl.register_builder); register it before regenerating",
                field=f"provenance.generation.{key}",
            )
    return generation


def _load_revision(generation: dict[str, Any], model: str, prefix: str = "") -> str | None:
    """The revision to load: the recorded commit for a hub id; folders are loaded as they are."""
    if os.path.isdir(model) or generation.get(f"{prefix}revision_source") == "builtin":
        return None
    return generation.get(f"{prefix}revision") or generation.get(f"{prefix}revision_requested")


def _device(generation: dict[str, Any], warnings: list[str]) -> devices.DeviceName:
    recorded = generation["device"]
    if recorded == "cuda" and not torch.cuda.is_available():
        warnings.append("made on cuda but no CUDA GPU is visible: regenerating on cpu")
        return "cpu"
    return "cuda" if recorded == "cuda" else "cpu"


def regenerate_config(
    generation: dict[str, Any], device: devices.DeviceName, manifest: str, record_id: str
) -> GenerateConfig:
    """The generate stage's settings as they were for this record (nothing from a current config)."""
    speed = generation["speed_settings"]
    compile_mode = next((s.split("=", 1)[1] for s in speed if s.startswith("compile=")), None)
    batch = generation["batch"]
    settings: dict[str, Any] = {
        "model": generation["model"],
        "revision": _load_revision(generation, generation["model"]),
        "scheduler": generation["scheduler"],
        "steps": generation["steps"],
        "guidance_scale": generation["guidance_scale"],
        "height": generation["height"],
        "width": generation["width"],
        "dtype": generation["dtype"],
        "device": device,
        "negative_prompt": generation["negative_prompt"],
        # records from before the setting were all made with diffusers' truncating encoding
        "long_prompts": generation.get("long_prompts", "truncate"),
        "image_format": generation["image_format"],
        "quality": generation["quality"],
        "batch_size": batch.get("padded_to") or len(batch["ids"]),
        "seed": generation.get("global_seed", 0),
        "compile": compile_mode is not None,
        "vae_upcast": "vae_upcast=False" not in speed,
        **{flag: flag in speed for flag in _SPEED_FLAGS},
    }
    if compile_mode is not None:
        settings["compile_mode"] = compile_mode
    if generation.get("refiner"):
        settings["refiner_model"] = generation["refiner"]
        settings["refiner_revision"] = _load_revision(generation, generation["refiner"], "refiner_")
        settings["high_noise_frac"] = generation["high_noise_frac"]
    try:
        return GenerateConfig(**settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError(
            manifest, f"record {record_id!r}: {err['msg']}", field=f"provenance.generation.{where}"
        ) from None


@contextmanager
def recorded_numerics(generation: dict[str, Any]) -> Iterator[None]:
    """Set torch's numerics switches and CPU threads as they were at generation; restore them after."""
    saved, threads = numerics_settings(), torch.get_num_threads()
    _set_numerics({**saved, **generation.get("numerics", {})})
    torch.set_num_threads(generation.get("num_threads") or threads)
    try:
        yield
    finally:
        _set_numerics(saved)
        torch.set_num_threads(threads)


def _set_numerics(values: dict[str, Any]) -> None:
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    torch.set_float32_matmul_precision(values["float32_matmul_precision"])
    cudnn.allow_tf32 = values["cudnn_allow_tf32"]
    matmul.allow_bf16_reduced_precision_reduction = values["bf16_reduced_precision_reduction"]
    matmul.allow_fp16_reduced_precision_reduction = values["fp16_reduced_precision_reduction"]
    cudnn.benchmark = values["cudnn_benchmark"]
    cudnn.deterministic = values["cudnn_deterministic"]
    torch.use_deterministic_algorithms(values["deterministic_algorithms"])


def environment_differences(generation: dict[str, Any], painter: Painter) -> list[str]:
    """What differs from the record in hardware, libraries and loaded weights (each breaks exactness)."""
    now = {
        "device": painter.device.type,
        "device_name": device_name(painter.device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(painter.dtype).removeprefix("torch."),
        "speed_settings": painter.speed_settings,
    }
    diffs = [
        f"{key}: {generation.get(key)!r} then, {value!r} now"
        for key, value in now.items()
        if key in generation and generation[key] != value
    ]
    recorded_versions = generation.get("versions", {})
    for key, value in library_versions(generation["image_format"]).items():
        if key in recorded_versions and recorded_versions[key] != value:
            diffs.append(f"{key} {recorded_versions[key]} then, {value} now")
    models = [("", painter.pipe, generation["model"])]
    if painter.refiner is not None:
        models.append(("refiner_", painter.refiner, generation["refiner"]))
    for prefix, pipe, model in models:
        current = model_revision(pipe, model)
        for key in ("revision", "content_sha256"):
            then = generation.get(f"{prefix}{key}")
            if then != current.get(key):
                diffs.append(f"{prefix}{key} of {model}: {then} then, {current.get(key)} now")
    return diffs


def _read_original(uri: str | None) -> bytes | None:
    if not uri:
        return None
    try:
        return storage.read_bytes(uri)
    except Exception as exc:  # missing, no credentials, ...: regeneration still works
        log.warning("original image %s is not readable (%s): nothing to compare with", uri, exc)
        return None


def _pixel_difference(original: bytes, data: bytes) -> str:
    try:
        a, b = (np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.int16) for raw in (original, data))
    except Exception as exc:  # the original may be corrupt
        return f"original not decodable: {exc}"
    if a.shape != b.shape:
        return f"sizes {a.shape} vs {b.shape}"
    return f"max pixel difference {int(np.abs(a - b).max())}, {float((a != b).mean()):.2%} of values differ"


def regenerate(manifest: str, record_id: str, output: str, *, check: bool = False) -> Regenerated:
    """Remake record `record_id` of `manifest` into `output` and compare it with the original image.

    `check`: raise RegenerationMismatch (after writing `output`) unless the bytes are identical.
    """
    record = find_record(manifest, record_id)
    generation = generation_provenance(record, manifest)
    image_format = generation["image_format"]
    if not output.lower().endswith(EXTENSIONS.get(image_format, ())):
        raise InputError(
            manifest,
            f"record {record_id!r} was encoded as {image_format}: --output must end with "
            f"{' or '.join(EXTENSIONS.get(image_format, ('?',)))}, got {output!r}",
        )
    warnings: list[str] = []
    config = regenerate_config(generation, _device(generation, warnings), manifest, record_id)
    batch = generation["batch"]
    prompts, seeds = list(batch["captions"]), [int(s) for s in batch["seeds"]]
    weighted = list(batch.get("weighted_prompts") or [])  # the prompts with emphasis weights, if used
    padded_to = batch.get("padded_to")
    if padded_to and len(prompts) < padded_to:  # as Painter pads: copies of the last prompt and seed
        prompts += [prompts[-1]] * (padded_to - len(prompts))
        seeds += [seeds[-1]] * (padded_to - len(seeds))
        weighted += [weighted[-1]] * (padded_to - len(weighted)) if weighted else []
    index = batch["ids"].index(record_id)
    with recorded_numerics(generation):
        try:
            painter = Painter(config)
        except (OSError, ValueError) as exc:  # diffusers: not cached / not on the hub / not a folder
            raise InputError(
                manifest,
                f"record {record_id!r}: cannot load {config.model} (revision {config.revision}): {exc}",
                field="provenance.generation.model",
            ) from None
        warnings += environment_differences(generation, painter)
        for warning in warnings:
            log.warning("%s: %s", record_id, warning)
        log.info("%s: regenerating in its batch of %d (position %d)", record_id, len(prompts), index)
        # The stage's own tensor -> array path (float32 of the whole call, then the row).
        image = _to_numpy(painter(prompts, seeds, weighted or None))[index]
    data = encode_image(image, image_format, config.quality)
    original = _read_original(record.image_uri)
    storage.write_bytes(output, data, content_type=f"image/{image_format}")
    identical = None if original is None else original == data
    if identical:
        log.info("%s: %s is byte-identical to the original %s", record_id, output, record.image_uri)
    elif identical is False:
        log.warning(
            "%s: %s differs from the original %s (%s)",
            *(record_id, output, record.image_uri, _pixel_difference(original, data)),
        )
    result = Regenerated(output, record.image_uri, identical, warnings)
    if check and not identical:
        what = "differs from" if identical is False else "could not be compared with"
        raise RegenerationMismatch(f"{manifest}: record {record_id!r}: {output} {what} {record.image_uri}")
    return result
