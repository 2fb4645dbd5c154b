from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import FusedAttnProcessor2_0
from PIL import Image

from synthvlm import safety, stage, storage
from synthvlm.config import validate
from synthvlm.embeddings import read_embeddings
from synthvlm.errors import ConfigError, InputError
from synthvlm.models.clip import TINY_CLIP
from synthvlm.models.sdxl import TINY_SDXL, TINY_SDXL_REFINER, build_tiny_sdxl
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stages import generate as gen
from synthvlm.stages.clip_score import ScoreConfig, score
from synthvlm.stages.generate import (
    GenerateConfig,
    PartCommitter,
    apply_speed_settings,
    encode_image,
    generate,
    image_records,
    record_seed,
    rejects_uri,
    shard_manifest_uri,
)

CAPTIONS = [
    "a red car on a bridge",
    "a cat on a sofa",
    "two dogs in the snow",
    "a bowl of soup",
    "a lighthouse",
]


def tiny_config(**overrides: Any) -> GenerateConfig:
    settings = dict(model=TINY_SDXL, steps=2, height=64, width=64, batch_size=2, device="cpu")
    return GenerateConfig(**{**settings, **overrides})


def write_captions(uri: str, n: int = len(CAPTIONS)) -> list[Record]:
    records = [
        Record(id=f"cap-{i:03d}", caption=CAPTIONS[i % len(CAPTIONS)], provenance={"source": "test"})
        for i in range(n)
    ]
    write_manifest(uri, records)
    return records


class SpyPipe:
    """Wraps a pipeline: records the prompts of every call and overwrites the images of spoiled seeds."""

    def __init__(self, pipe: Any, spoil: dict[int, float], on_call: Any = None):
        self.pipe, self.spoil, self.prompts, self.on_call = pipe, spoil, [], on_call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.prompts.extend(kwargs["prompt"])
        if self.on_call is not None:
            self.on_call()
        out = self.pipe(**kwargs)
        for i, generator in enumerate(kwargs["generator"]):
            out.images[i] = self.spoil.get(generator.initial_seed(), out.images[i])
        return out


class LoadSpy:
    """Stands in for `load_sdxl`: loads the real pipeline, keeps a SpyPipe of each load."""

    def __init__(self, real_load: Any):
        self.real_load, self.pipes, self.spoil, self.on_call = real_load, [], {}, None

    def __call__(self, *args: Any, **kwargs: Any) -> SpyPipe:
        self.pipes.append(SpyPipe(self.real_load(*args, **kwargs), self.spoil, self.on_call))
        return self.pipes[-1]


@pytest.fixture
def spy(monkeypatch) -> LoadSpy:
    load_spy = LoadSpy(gen.load_sdxl)
    monkeypatch.setattr(gen, "load_sdxl", load_spy)
    return load_spy


def counts(shard: str) -> tuple[int, int, dict[str, int], int]:
    """(count_in, count_out, rejects, retried) from a shard's done marker."""
    stats = stage.read_stats(shard)
    return stats["count_in"], stats["count_out"], stats["rejects"], stats["retried"]


def decode(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(storage.read_bytes(uri)))
    image.load()
    return image


def test_generate_writes_images_and_manifest_with_provenance(tmp_path, spy, caplog) -> None:
    inputs = write_captions(str(tmp_path / "captions.jsonl"))
    out = str(tmp_path / "run")
    with caplog.at_level(logging.INFO):
        shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    vdir = gen.version_dir(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    assert shard == f"{vdir}/shards/shard-00000-of-00001.jsonl" and vdir.startswith(f"{out}/generate-")
    assert stage.read_stats(f"{out}/shards/shard-00000-of-00001.jsonl")["published_from"] == shard
    assert stage.is_done(shard)
    records = read_manifest(shard)
    assert [r.id for r in records] == [r.id for r in inputs]
    for rec, source in zip(records, inputs, strict=True):
        assert rec.caption == source.caption
        assert rec.seed == record_seed(0, rec.id)
        assert rec.image_uri == f"{vdir}/images/{rec.id}.jpg"
        image = decode(rec.image_uri)
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 64), "RGB")
        assert rec.provenance["source"] == "test"  # upstream provenance is kept
        generation = rec.provenance["generation"]
        runtime = ("device_name", "cpu_capability", "num_threads", "numerics", "versions")
        assert generation == {
            "model": TINY_SDXL,
            "revision": None,
            "revision_requested": None,
            "revision_source": "builtin",
            "revision_missing": generation["revision_missing"],
            "scheduler": "euler",
            "steps": 2,
            "guidance_scale": 7.5,
            "height": 64,
            "width": 64,
            "dtype": "float32",
            "negative_prompt": "",
            "long_prompts": "truncate",
            "diffusers_version": generation["diffusers_version"],
            "global_seed": 0,
            "image_format": "jpeg",
            "quality": 95,
            "speed_settings": [],
            "device": "cpu",
            **{key: generation[key] for key in runtime},
            "seed_repeat": 0,
            "batch": generation["batch"],
            "dropped_tokens": {"text_encoder": 0, "text_encoder_2": 0, "text_encoder_2_pooled": 0},
        }
        assert rec.id in generation["batch"]["ids"] and generation["num_threads"] == torch.get_num_threads()
        assert generation["versions"]["Pillow"] and generation["numerics"]["float32_matmul_precision"]
    assert rec.provenance["generation"]["diffusers_version"][0].isdigit()
    assert counts(shard) == (5, 5, {}, 0)
    assert len(spy.pipes) == 1 and sorted(spy.pipes[0].prompts) == sorted(r.caption for r in inputs)
    assert "generate shard 1/1: 5/5 images (100.0%)" in caplog.text and "done in" in caplog.text
    assert len(storage.list_uris(f"{vdir}/shards/shard-00000-of-00001.parts", ".jsonl")) == 3


def test_image_does_not_depend_on_batch_neighbours(tmp_path) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=3)
    pixels = {}
    for batch_size in (1, 3):
        out = str(tmp_path / f"bs{batch_size}")
        config = tiny_config(batch_size=batch_size, image_format="png")
        shard = generate(config, str(tmp_path / "captions.jsonl"), out)
        pixels[batch_size] = {r.id: np.asarray(decode(r.image_uri), dtype=int) for r in read_manifest(shard)}
    assert pixels[1].keys() == pixels[3].keys()
    for rid, image in pixels[1].items():
        assert np.abs(image - pixels[3][rid]).max() <= 1  # batched matmuls may round differently
    assert np.abs(pixels[1]["cap-000"] - pixels[1]["cap-001"]).mean() > 1


def test_two_shards_are_disjoint_and_cover_the_manifest(tmp_path) -> None:
    inputs = write_captions(str(tmp_path / "captions.jsonl"))
    out = str(tmp_path / "run")
    ids = []
    for rank in (0, 1):
        shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), out, rank=rank, world_size=2)
        vdir = gen.version_dir(tiny_config(), str(tmp_path / "captions.jsonl"), out)
        assert shard == shard_manifest_uri(vdir, rank, 2) == f"{vdir}/shards/shard-{rank:05d}-of-00002.jsonl"
        ids.append({r.id for r in read_manifest(shard)})
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == {r.id for r in inputs}


def test_rerun_of_done_shard_does_not_load_the_model(tmp_path, monkeypatch) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=2)
    out = str(tmp_path / "run")
    shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    before = storage.read_bytes(shard)

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded for a finished shard")

    monkeypatch.setattr(gen, "load_sdxl", no_load)
    assert generate(tiny_config(), str(tmp_path / "captions.jsonl"), out) == shard
    assert storage.read_bytes(shard) == before


def test_rerun_after_crash_generates_only_missing_parts(tmp_path, spy) -> None:
    inputs = write_captions(str(tmp_path / "captions.jsonl"))
    out = str(tmp_path / "run")
    shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    first = read_manifest(shard)
    # A crash after part 0 and part 2 but before part 1 and the shard manifest were committed.
    parts = shard.removesuffix(".jsonl") + ".parts"
    for uri in (shard, f"{parts}/part-000001.jsonl"):
        storage.delete(stage.done_uri(uri))
    storage.delete(shard)
    assert generate(tiny_config(), str(tmp_path / "captions.jsonl"), out) == shard
    assert spy.pipes[1].prompts == [inputs[2].caption, inputs[3].caption]  # part 1 only
    assert read_manifest(shard) == first
    assert stage.read_stats(shard)["count_out"] == 5
    # Everything done but the shard manifest: no model load at all.
    storage.delete(stage.done_uri(shard))
    generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    assert len(spy.pipes) == 2 and read_manifest(shard) == first


def test_resume_with_other_batch_size_keeps_every_record_once(tmp_path, spy) -> None:
    write_captions(str(tmp_path / "captions.jsonl"))
    out = str(tmp_path / "run")
    shard = generate(tiny_config(batch_size=2), str(tmp_path / "captions.jsonl"), out)
    storage.delete(stage.done_uri(shard))
    storage.delete(stage.done_uri(shard.removesuffix(".jsonl") + ".parts/part-000002.jsonl"))
    generate(tiny_config(batch_size=3), str(tmp_path / "captions.jsonl"), out)
    assert spy.pipes[1].prompts == [CAPTIONS[4]]
    assert [r.id for r in read_manifest(shard)] == [f"cap-{i:03d}" for i in range(5)]


def test_bad_images_are_retried_with_a_new_seed_then_dropped(tmp_path, spy) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=3)
    # cap-000: NaN once, fine with the second seed; cap-001: black with both seeds.
    spy.spoil = {
        record_seed(0, "cap-000"): np.nan,
        record_seed(0, "cap-001"): 0.0,
        record_seed(0, "cap-001", repeat=1): 0.0,
    }
    shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))
    records = {r.id: r for r in read_manifest(shard)}
    assert sorted(records) == ["cap-000", "cap-002"]
    assert records["cap-000"].seed == record_seed(0, "cap-000", repeat=1)
    assert records["cap-000"].provenance["generation"]["seed_repeat"] == 1
    assert records["cap-002"].seed == record_seed(0, "cap-002")
    assert decode(records["cap-000"].image_uri).size == (64, 64)
    assert not storage.exists(shard.rsplit("/shards/", 1)[0] + "/images/cap-001.jpg")
    assert counts(shard) == (3, 2, {"black_image": 1}, 2)


def test_each_record_carries_the_painter_call_it_came_from(tmp_path, spy) -> None:
    """Images depend on their batch neighbours, so a retried image records the retry call, not its batch."""
    inputs = write_captions(str(tmp_path / "captions.jsonl"), n=3)
    captions = {rec.id: rec.caption for rec in inputs}
    spy.spoil = {record_seed(0, "cap-000"): np.nan, record_seed(0, "cap-001"): 0.0}
    shard = generate(tiny_config(batch_size=3), str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))
    records = {r.id: r.provenance["generation"] for r in read_manifest(shard)}

    def call(ids: list[str], repeat: int) -> dict[str, Any]:
        seeds = [record_seed(0, i, repeat) for i in ids]
        return {"ids": ids, "captions": [captions[i] for i in ids], "seeds": seeds, "padded_to": None}

    assert records["cap-002"]["batch"] == call(["cap-000", "cap-001", "cap-002"], 0)
    assert records["cap-000"]["batch"] == records["cap-001"]["batch"] == call(["cap-000", "cap-001"], 1)
    assert spy.pipes[0].prompts == [
        captions[i] for i in ("cap-000", "cap-001", "cap-002", "cap-000", "cap-001")
    ]


def test_generate_to_gcs(tmp_path, gcs_emulator) -> None:
    captions = f"{gcs_emulator}/in/captions.jsonl"
    write_captions(captions, n=2)
    out = f"{gcs_emulator}/runs/gen"
    shard = generate(tiny_config(image_format="webp"), captions, out)
    assert shard.startswith("gs://") and stage.is_done(shard)
    vdir = shard.rsplit("/shards/", 1)[0]
    assert vdir.startswith(f"{out}/generate-") and stage.is_done(f"{out}/shards/shard-00000-of-00001.jsonl")
    for rec in read_manifest(shard):
        assert rec.image_uri == f"{vdir}/images/{rec.id}.webp"
        assert decode(rec.image_uri).format == "WEBP"


def test_record_seed_is_stable_and_independent() -> None:
    seed = record_seed(0, "cap-000")
    assert seed == record_seed(0, "cap-000") == 5265015078711471965  # pinned: datasets must stay regenerable
    assert 0 <= seed < 2**63
    others = {record_seed(1, "cap-000"), record_seed(0, "cap-001"), record_seed(0, "cap-000", repeat=1)}
    assert seed not in others and len(others) == 3


@pytest.mark.parametrize(("image_format", "pil_format"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_image_formats(image_format: str, pil_format: str) -> None:
    pixels = np.random.default_rng(0).random((16, 24, 3), dtype=np.float32)
    image = Image.open(io.BytesIO(encode_image(pixels, image_format, quality=90)))
    assert (image.format, image.size) == (pil_format, (24, 16))
    if image_format == "png":  # lossless
        np.testing.assert_array_equal(np.asarray(image), (pixels * 255).round().astype(np.uint8))


def test_lower_quality_gives_smaller_jpeg() -> None:
    pixels = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    assert len(encode_image(pixels, "jpeg", quality=20)) < len(encode_image(pixels, "jpeg", quality=95))


def test_defaults_follow_the_papers() -> None:
    config = GenerateConfig()
    assert config.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (config.steps, config.height, config.width) == (60, 1024, 1024)
    assert (config.guidance_scale, config.scheduler, config.image_format) == (7.5, "euler", "jpeg")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("height", 100),
        ("width", 0),
        ("batch_size", 0),
        ("quality", 101),
        ("guidance_scale", -1),
        ("seed", -1),
        ("scheduler", "ddim"),
        ("image_format", "gif"),
        ("dtype", "float64"),
        ("model", ""),
        ("stepz", 3),
    ],
)
def test_invalid_config_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        validate(GenerateConfig, {field: value})


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_invalid_shard_is_a_config_error(tmp_path, rank: int, world_size: int) -> None:
    with pytest.raises(ConfigError, match="rank"):
        generate(tiny_config(), str(tmp_path / "missing.jsonl"), str(tmp_path / "run"), rank, world_size)


def test_image_records_make_n_variants_per_caption() -> None:
    captions = [
        Record(id="c1", caption="a cat", provenance={"source": "web"}),
        Record(id="c2", caption="a dog"),
    ]
    assert image_records(captions, 1, "in.jsonl") == captions
    variants = image_records(captions, 3, "in.jsonl")
    assert [r.id for r in variants] == ["c1~0", "c1~1", "c1~2", "c2~0", "c2~1", "c2~2"]
    assert variants[1].caption == "a cat"
    assert variants[1].provenance == {"source": "web", "source_id": "c1", "image_index": 1}
    with pytest.raises(InputError, match="in.jsonl, field 'id': record 'x+'.*longer than 200"):
        image_records([Record(id="x" * 199, caption="long id")], 2, "in.jsonl")


def test_images_per_prompt_gives_distinct_seeded_variants(tmp_path, spy) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=2)
    config = tiny_config(images_per_prompt=2, image_format="png", width=96)
    shard = generate(config, str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))
    records = read_manifest(shard)
    assert decode(records[0].image_uri).size == (96, 64)  # (width, height) as configured
    assert [r.id for r in records] == ["cap-000~0", "cap-000~1", "cap-001~0", "cap-001~1"]
    for rec in records:
        assert rec.seed == record_seed(0, rec.id)
        assert rec.provenance["source_id"] == rec.id.split("~")[0]
        assert rec.image_uri.endswith(f"/images/{rec.id}.png")
    first, second = (np.asarray(decode(r.image_uri), dtype=int) for r in records[:2])
    assert np.abs(first - second).mean() > 1  # same caption, other seed: another image
    assert sorted(spy.pipes[0].prompts) == sorted([CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2)
    stats = stage.read_stats(shard)
    assert (stats["count_in"], stats["count_out"], stats["images_per_prompt"]) == (4, 4, 2)


class CallSpy:
    """Replaces a pipeline class's __call__ (looked up on the type) and records each call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type):
        self.calls: list[tuple[dict[str, Any], Any]] = []
        real = cls.__call__

        def spy(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            out = real(pipe, *args, **kwargs)
            self.calls.append((kwargs, out.images))
            return out

        monkeypatch.setattr(cls, "__call__", spy)


def test_refiner_takes_over_the_base_latents_at_high_noise_frac(tmp_path, monkeypatch) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=3)
    base = CallSpy(monkeypatch, StableDiffusionXLPipeline)
    refiner = CallSpy(monkeypatch, StableDiffusionXLImg2ImgPipeline)
    config = tiny_config(refiner_model=TINY_SDXL_REFINER, high_noise_frac=0.75, steps=4, batch_size=3)
    shard = generate(config, str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))

    assert len(base.calls) == len(refiner.calls) == 1
    (base_kwargs, latents), (refiner_kwargs, images) = base.calls[0], refiner.calls[0]
    assert base_kwargs["denoising_end"] == 0.75 and base_kwargs["output_type"] == "latent"
    assert "denoising_start" not in base_kwargs
    assert latents.shape == (3, 4, 16, 16)  # latents, not pixels
    assert refiner_kwargs["image"] is latents  # handed over as they are
    assert refiner_kwargs["denoising_start"] == 0.75 and "denoising_end" not in refiner_kwargs
    for key in ("prompt", "num_inference_steps", "guidance_scale", "generator"):
        assert refiner_kwargs[key] is base_kwargs[key]
    assert images.shape == (3, 3, 64, 64)
    records = read_manifest(shard)
    assert len(records) == 3 and decode(records[0].image_uri).size == (64, 64)
    generation = records[0].provenance["generation"]
    assert (generation["refiner"], generation["high_noise_frac"]) == (TINY_SDXL_REFINER, 0.75)


def test_gpu_settings_are_ignored_on_cpu_with_a_note(tmp_path, spy, caplog) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=1)
    config = tiny_config(dtype="bfloat16", compile=True, fuse_qkv=True, channels_last=True, vae_upcast=False)
    with caplog.at_level(logging.INFO, logger=gen.__name__):
        shard = generate(config, str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))
    assert "using float32 on cpu" in caplog.text
    assert (
        "ignoring GPU speed settings on cpu: compile, fuse_qkv, channels_last, vae_upcast=False"
        in caplog.text
    )
    pipe = spy.pipes[0].pipe
    assert pipe.unet.dtype == torch.float32 and pipe.unet._compiled_call_impl is None
    assert not isinstance(next(iter(pipe.unet.attn_processors.values())), FusedAttnProcessor2_0)
    assert read_manifest(shard)[0].provenance["generation"]["dtype"] == "float32"


def test_speed_settings_on_a_cuda_device(monkeypatch, caplog) -> None:
    """The CUDA branch, run on CPU tensors: what each setting changes (torch.compile itself is spied)."""
    compiled: list[dict[str, Any]] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)

    def image() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a cat", num_inference_steps=2, height=64, width=64, generator=generator).images[0]

    before = np.asarray(image(), dtype=float)
    config = tiny_config(
        compile=True, compile_mode="max-autotune", fuse_qkv=True, channels_last=True, vae_upcast=False
    )
    applied = apply_speed_settings(pipe, config, torch.device("cuda"))
    assert applied == ["fuse_qkv", "channels_last", "vae_upcast=False", "compile=max-autotune"]
    assert compiled == [{"mode": "max-autotune"}]
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.config.force_upcast is False
    assert np.abs(np.asarray(image(), dtype=float) - before).max() <= 1  # same images, faster kernels

    fp16 = build_tiny_sdxl().to(dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger=gen.__name__):
        assert apply_speed_settings(fp16, tiny_config(vae_upcast=False), torch.device("cuda")) == []
    assert fp16.vae.config.force_upcast is True and "overflows in float16" in caplog.text


def test_short_batches_are_padded_for_a_compiled_unet(spy) -> None:
    painter = gen.Painter(tiny_config(batch_size=4))
    assert painter.fixed_batch is None  # no compile on a CPU
    seeds = [record_seed(0, "p"), record_seed(0, "q")]
    plain = painter(["a cat", "a dog"], seeds)
    painter.fixed_batch = 4  # what a compiled UNet on a GPU sets
    padded = painter(["a cat", "a dog"], seeds)
    assert spy.pipes[0].prompts[2:] == ["a cat", "a dog", "a dog", "a dog"]  # one shape: the full batch
    assert padded.shape == plain.shape == (2, 3, 64, 64)
    torch.testing.assert_close(padded, plain, atol=2 / 255, rtol=0)


def test_encoding_overlaps_with_the_next_batch(tmp_path, spy) -> None:
    """Batch 0's images are encoded only once batch 1 is being painted: writing runs behind painting."""
    write_captions(str(tmp_path / "captions.jsonl"), n=4)
    second_batch = threading.Event()
    calls = []
    spy.on_call = lambda: (calls.append(1), len(calls) == 2 and second_batch.set())
    waited = []
    real_encode = gen.encode_image

    def slow_encode(*args: Any) -> bytes:
        waited.append(second_batch.wait(timeout=20))
        return real_encode(*args)

    gen_encode = pytest.MonkeyPatch()
    gen_encode.setattr(gen, "encode_image", slow_encode)
    try:
        shard = generate(
            tiny_config(pending_parts=1), str(tmp_path / "captions.jsonl"), str(tmp_path / "run")
        )
    finally:
        gen_encode.undo()
    assert waited == [True] * 4
    assert len(read_manifest(shard)) == 4


def test_part_committer_is_bounded_and_raises_errors() -> None:
    in_flight, peak = [0], [0]
    lock = threading.Lock()

    def commit(value: int) -> dict[str, Any]:
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        if value == 3:
            raise OSError("upload failed")
        return {"value": value}

    with (
        pytest.raises(OSError, match="upload failed"),
        PartCommitter(max_pending=2, write_workers=2) as committer,
    ):
        for value in range(6):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            committer.submit(value, lambda value=value: commit(value))
    assert peak[0] <= 3  # two pending + the one just handed over
    assert in_flight[0] == 0  # everything handed over was committed, even after the error
    assert committer.results[0] == {"value": 0} and 3 not in committer.results


def test_failed_upload_stops_the_stage_and_a_rerun_redoes_only_that_part(tmp_path, spy, monkeypatch) -> None:
    inputs = write_captions(str(tmp_path / "captions.jsonl"))
    out = str(tmp_path / "run")
    real_write = storage.write_bytes

    def flaky_write(uri: str, data: bytes, content_type: str | None = None) -> None:
        if uri.endswith("cap-003.jpg"):
            raise OSError("connection reset")
        real_write(uri, data, content_type)

    monkeypatch.setattr(storage, "write_bytes", flaky_write)
    with pytest.raises(OSError, match="connection reset"):
        generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    shard = shard_manifest_uri(gen.version_dir(tiny_config(), str(tmp_path / "captions.jsonl"), out), 0, 1)
    assert not stage.is_done(shard) and not stage.is_done(shard_manifest_uri(out, 0, 1))
    parts = shard.removesuffix(".jsonl") + ".parts"
    assert [stage.is_done(f"{parts}/part-{i:06d}.jsonl") for i in range(3)] == [True, False, True]

    monkeypatch.setattr(storage, "write_bytes", real_write)
    generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    assert spy.pipes[1].prompts == [inputs[2].caption, inputs[3].caption]
    assert [r.id for r in read_manifest(shard)] == [r.id for r in inputs]


def test_score_in_pod_matches_the_scoring_stage(tmp_path) -> None:
    write_captions(str(tmp_path / "captions.jsonl"), n=3)
    clip = ScoreConfig(model=TINY_CLIP, pretrained=None, device="cpu")
    config = tiny_config(image_format="png", score_in_pod=clip)
    shard = generate(config, str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))
    in_pod = read_manifest(shard)
    embeddings = read_embeddings(shard, len(in_pod))
    assert embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(float), axis=1), 1, atol=1e-3)

    from_files = str(tmp_path / "scored.jsonl")
    score(clip, shard, from_files)
    file_scores = {r.id: r.scores["clip"] for r in read_manifest(from_files)}
    for rec in in_pod:
        assert rec.provenance["clip_scorer"]["model"] == TINY_CLIP
        # Only the 8-bit rounding of the PNG (and PIL vs tensor resizing) separates the two.
        assert rec.scores["clip"] == pytest.approx(file_scores[rec.id], abs=0.02)
    file_embeddings = read_embeddings(from_files, 3)
    assert np.abs(file_embeddings.astype(float) - embeddings.astype(float)).max() < 0.05


def test_blocked_prompts_and_unsafe_images_are_dropped_with_reasons(tmp_path, spy, monkeypatch) -> None:
    inputs = write_captions(str(tmp_path / "captions.jsonl"))  # cap-002 is "two dogs in the snow"
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# one term per line\nSOUP\n")
    spy.spoil = {record_seed(0, "cap-000"): 0.25}  # a flat grey image the checker below flags
    flagged_batches = []

    def flat_image_checker(config: Any, device: Any, dtype: Any) -> Any:
        def check(images: torch.Tensor) -> list[bool]:
            flagged_batches.append(len(images))
            return [bool(image.std() == 0) for image in images]

        return check

    monkeypatch.setitem(safety._FACTORIES, "flat", flat_image_checker)
    config = tiny_config(
        safety={"blocklist": ["Dogs"], "blocklist_file": str(blocklist), "image_checker": "flat"}
    )
    shard = generate(config, str(tmp_path / "captions.jsonl"), str(tmp_path / "run"))

    assert [r.id for r in read_manifest(shard)] == ["cap-001", "cap-004"]
    assert "two dogs in the snow" not in spy.pipes[0].prompts and "a bowl of soup" not in spy.pipes[0].prompts
    stats = stage.read_stats(shard)
    assert stats["rejects"] == {"blocked_prompt": 2, "unsafe_image": 1}
    assert stats["count_in"] == len(inputs) == stats["count_out"] + sum(stats["rejects"].values())
    assert stats["reject_examples"] == {"blocked_prompt": ["cap-002", "cap-003"], "unsafe_image": ["cap-000"]}
    assert rejects_uri(str(tmp_path / "run"), 0, 1) == f"{tmp_path}/run/rejects/shard-00000-of-00001.jsonl"
    lines = storage.read_text(rejects_uri(str(tmp_path / "run"), 0, 1)).splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["cap-000", "cap-002", "cap-003"]
    assert not storage.exists(shard.rsplit("/shards/", 1)[0] + "/images/cap-000.jpg")
    assert sum(flagged_batches) == 3


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run_of_that_shard(tmp_path) -> None:
    captions = str(tmp_path / "captions.jsonl")
    write_captions(captions, n=4)
    out = str(tmp_path / "run")
    vdir = Path(gen.version_dir(tiny_config(), captions, out))
    # What a SIGKILL mid-write leaves: temp files next to an image and a part of shard 0 of 2, and one
    # of an image that belongs to shard 1 (another pod may be writing it right now).
    (vdir / "images").mkdir(parents=True)
    mine = vdir / "images" / ".cap-000.jpg.k3j2h1.tmp"
    other = vdir / "images" / ".cap-001.jpg.x9y8z7.tmp"
    parts = vdir / "shards" / "shard-00000-of-00002.parts"
    parts.mkdir(parents=True)
    part_tmp = parts / ".part-000000.jsonl.a1b2c3.tmp"
    for path in (mine, other, part_tmp):
        path.write_bytes(b"half written")
    shard = generate(tiny_config(), captions, out, rank=0, world_size=2)
    assert [r.id for r in read_manifest(shard)] == ["cap-000", "cap-002"]
    assert not mine.exists() and not part_tmp.exists()
    assert other.exists()  # shard 1's: left alone


def test_emphasis_weights_condition_the_base_model_and_regenerate(tmp_path: Path) -> None:
    """StableLLaVA's `((x))` emphasis reaches SDXL as compel prompt weights: the same caption with a
    weighted prompt paints a different image, the call is recorded, and regeneration repeats it exactly."""
    from synthvlm.regenerate import regenerate

    plain = Record(id="plain", caption="a red car on a bridge")
    weighted = Record(
        id="weighted",
        caption="a red car on a bridge",
        provenance={"weighted_prompt": "a (red car)1.5 on a bridge"},
    )
    images = {}
    for rec in (plain, weighted):
        captions = str(tmp_path / f"{rec.id}.jsonl")
        write_manifest(captions, [rec.model_copy(update={"id": "same-id"})])  # same id: same seed
        shard = generate(tiny_config(batch_size=1, image_format="png"), captions, str(tmp_path / rec.id))
        [out] = read_manifest(shard)
        images[rec.id] = np.asarray(Image.open(out.image_uri))
        calls = out.provenance["generation"]["batch"]
        if rec is weighted:
            assert calls["weighted_prompts"] == ["a (red car)1.5 on a bridge"]
            again = regenerate(shard, "same-id", str(tmp_path / "again.png"), check=True)
            assert again.identical
        else:
            assert "weighted_prompts" not in calls
    assert not np.array_equal(images["plain"], images["weighted"])


# 80 one-token words: 5 past the 75 prompt tokens of SDXL's two 77-token text encoders.
LONG_PROMPT = " ".join(["cat"] * 80) + " on a red sofa"  # 84 tokens: 9 dropped


def test_long_prompts_record_dropped_tokens_and_chunk_changes_the_image(tmp_path: Path) -> None:
    """`truncate` drops what follows token 75 (and says so per record and in the marker); `chunk` encodes it
    through compel, so the image changes, nothing is dropped but from the pooled embedding, and
    regeneration repeats it exactly. A short prompt in a call of its own is encoded alike in both modes."""
    from synthvlm.regenerate import regenerate
    from synthvlm.stages.report import stages_table_html

    captions = str(tmp_path / "captions.jsonl")
    write_manifest(captions, [Record(id="long", caption=LONG_PROMPT), Record(id="short", caption="a cat")])
    images, shards = {}, {}
    for mode in ("truncate", "chunk"):
        config = tiny_config(batch_size=1, image_format="png", long_prompts=mode)
        shards[mode] = generate(config, captions, str(tmp_path / mode))
        for rec in read_manifest(shards[mode]):
            images[mode, rec.id] = np.asarray(Image.open(rec.image_uri))
            assert rec.provenance["generation"]["long_prompts"] == mode
            if rec.id == "short":
                assert set(rec.provenance["generation"]["dropped_tokens"].values()) == {0}
    by_mode = {mode: {r.id: r for r in read_manifest(shard)} for mode, shard in shards.items()}
    assert by_mode["truncate"]["long"].provenance["generation"]["dropped_tokens"] == {
        "text_encoder": 9,
        "text_encoder_2": 9,
        "text_encoder_2_pooled": 9,
    }
    assert by_mode["chunk"]["long"].provenance["generation"]["dropped_tokens"] == {
        "text_encoder": 0,
        "text_encoder_2": 0,
        "text_encoder_2_pooled": 9,  # SDXL's pooled embedding is made from the first 77 tokens only
    }
    assert not np.array_equal(images["truncate", "long"], images["chunk", "long"])
    assert np.array_equal(images["truncate", "short"], images["chunk", "short"])

    marker = stage.read_stats(shards["truncate"])
    assert marker["records_with_dropped_tokens"] == {
        "text_encoder": 1,
        "text_encoder_2": 1,
        "text_encoder_2_pooled": 1,
    }
    assert "records with dropped tokens (text_encoder): 1" in stages_table_html([marker])
    assert stage.read_stats(shards["chunk"])["records_with_dropped_tokens"]["text_encoder"] == 0

    again = regenerate(shards["chunk"], "long", str(tmp_path / "again.png"), check=True)
    assert again.identical


def test_truncated_prompts_differing_after_token_77_paint_the_same_image() -> None:
    long_a, long_b = LONG_PROMPT, LONG_PROMPT.replace("red sofa", "blue sky")
    for mode, same in (("truncate", True), ("chunk", False)):
        painter = gen.Painter(tiny_config(long_prompts=mode))
        a, b = (painter([prompt], [7]).numpy() for prompt in (long_a, long_b))
        assert np.array_equal(a, b) is same
