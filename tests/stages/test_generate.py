from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pytest
from PIL import Image

from synthvlm import stage, storage
from synthvlm.config import validate
from synthvlm.errors import ConfigError
from synthvlm.models.sdxl import TINY_SDXL
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stages import generate as gen
from synthvlm.stages.generate import GenerateConfig, encode_image, generate, record_seed, shard_manifest_uri

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

    def __init__(self, pipe: Any, spoil: dict[int, float]):
        self.pipe, self.spoil, self.prompts = pipe, spoil, []

    def __call__(self, **kwargs: Any) -> Any:
        self.prompts.extend(kwargs["prompt"])
        out = self.pipe(**kwargs)
        for i, generator in enumerate(kwargs["generator"]):
            out.images[i] = self.spoil.get(generator.initial_seed(), out.images[i])
        return out


class LoadSpy:
    """Stands in for `load_sdxl`: loads the real pipeline, keeps a SpyPipe of each load."""

    def __init__(self, real_load: Any):
        self.real_load, self.pipes, self.spoil = real_load, [], {}

    def __call__(self, *args: Any, **kwargs: Any) -> SpyPipe:
        self.pipes.append(SpyPipe(self.real_load(*args, **kwargs), self.spoil))
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
    with caplog.at_level(logging.INFO, logger=gen.__name__):
        shard = generate(tiny_config(), str(tmp_path / "captions.jsonl"), out)
    assert shard == f"{out}/shards/shard-00000-of-00001.jsonl"
    assert stage.is_done(shard)
    records = read_manifest(shard)
    assert [r.id for r in records] == [r.id for r in inputs]
    for rec, source in zip(records, inputs, strict=True):
        assert rec.caption == source.caption
        assert rec.seed == record_seed(0, rec.id)
        assert rec.image_uri == f"{out}/images/{rec.id}.jpg"
        image = decode(rec.image_uri)
        assert (image.format, image.size, image.mode) == ("JPEG", (64, 64), "RGB")
        assert rec.provenance["source"] == "test"  # upstream provenance is kept
        assert rec.provenance["generation"] == {
            "model": TINY_SDXL,
            "revision": None,
            "scheduler": "euler",
            "steps": 2,
            "guidance_scale": 7.5,
            "height": 64,
            "width": 64,
            "dtype": "float32",
            "negative_prompt": "",
            "diffusers_version": rec.provenance["generation"]["diffusers_version"],
            "seed_repeat": 0,
        }
    assert rec.provenance["generation"]["diffusers_version"][0].isdigit()
    assert counts(shard) == (5, 5, {}, 0)
    assert len(spy.pipes) == 1 and sorted(spy.pipes[0].prompts) == sorted(r.caption for r in inputs)
    assert "batch 3/3" in caplog.text and "images/s" in caplog.text
    assert len(storage.list_uris(f"{out}/shards/shard-00000-of-00001.parts", ".jsonl")) == 3


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
        assert shard == shard_manifest_uri(out, rank, 2) == f"{out}/shards/shard-{rank:05d}-of-00002.jsonl"
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
    parts = f"{out}/shards/shard-00000-of-00001.parts"
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
    storage.delete(stage.done_uri(f"{out}/shards/shard-00000-of-00001.parts/part-000002.jsonl"))
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
    assert not storage.exists(str(tmp_path / "run" / "images" / "cap-001.jpg"))
    assert counts(shard) == (3, 2, {"black_image": 1}, 2)


def test_generate_to_gcs(tmp_path, gcs_emulator) -> None:
    captions = f"{gcs_emulator}/in/captions.jsonl"
    write_captions(captions, n=2)
    out = f"{gcs_emulator}/runs/gen"
    shard = generate(tiny_config(image_format="webp"), captions, out)
    assert shard.startswith("gs://") and stage.is_done(shard)
    for rec in read_manifest(shard):
        assert rec.image_uri == f"{out}/images/{rec.id}.webp"
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
