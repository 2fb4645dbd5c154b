"""`synthvlm regenerate`: one image remade from its record alone, byte for byte, from any manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from synthvlm import regenerate as regen
from synthvlm.cli import main
from synthvlm.errors import InputError
from synthvlm.models.sdxl import TINY_SDXL, TINY_SDXL_REFINER, build_tiny_sdxl
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stages.export_llava import ExportConfig, export_llava
from synthvlm.stages.generate import GenerateConfig, generate, record_seed
from tests.stages.test_generate import CAPTIONS

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def _generate(root: Path, **overrides: Any) -> str:
    """5 captions in batches of 3 (3 + 2), so batch composition matters; returns the shard manifest."""
    captions = str(root / "captions.jsonl")
    write_manifest(captions, [Record(id=f"cap-{i}", caption=c) for i, c in enumerate(CAPTIONS)])
    settings = dict(model=TINY_SDXL, steps=2, height=64, width=64, batch_size=3, device="cpu")
    return generate(GenerateConfig(**{**settings, **overrides}), captions, str(root / "run"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _generate(tmp_path_factory.mktemp("gen"))


def _record(manifest: str, record_id: str) -> Record:
    return next(rec for rec in read_manifest(manifest) if rec.id == record_id)


@pytest.mark.parametrize("record_id", ["cap-1", "cap-4"])  # mid first batch; in the short last batch
def test_regenerate_through_the_cli_is_byte_identical(shard: str, tmp_path, capsys, record_id) -> None:
    folder = tmp_path / "again"
    assert (
        main(["regenerate", "--manifest", shard, "--id", record_id, "--output", str(folder), "--check"]) == 0
    )
    out = folder / f"{record_id}.jpg"  # in the --output folder, named after the record, as recorded (jpeg)
    original = _record(shard, record_id)
    assert out.read_bytes() == Path(original.image_uri).read_bytes()
    assert f"{out}: byte-identical" in capsys.readouterr().out
    batch = original.provenance["generation"]["batch"]
    expected_ids = ["cap-0", "cap-1", "cap-2"] if record_id == "cap-1" else ["cap-3", "cap-4"]
    assert batch["ids"] == expected_ids and batch["padded_to"] is None
    assert batch["captions"] == [CAPTIONS[int(i[-1])] for i in expected_ids]
    assert batch["seeds"] == [record_seed(0, i) for i in expected_ids]


def test_generation_provenance_has_what_regeneration_needs(shard: str) -> None:
    generation = _record(shard, "cap-0").provenance["generation"]
    assert set(regen.REQUIRED_KEYS) <= generation.keys()
    assert (generation["image_format"], generation["quality"], generation["device"]) == ("jpeg", 95, "cpu")
    assert set(generation["versions"]) >= {"torch", "diffusers", "transformers", "Pillow", "numpy"}
    assert generation["revision_source"] == "builtin" and generation["revision_missing"]


def test_regenerate_from_the_export_manifest(shard: str, tmp_path) -> None:
    root = str(Path(shard).parents[1])
    export_llava(ExportConfig(), shard, root, str(tmp_path / "export"))
    manifest = str(tmp_path / "export" / "manifest.jsonl")
    result = regen.regenerate(manifest, "cap-2", str(tmp_path / "cap-2.jpeg"), check=True)
    assert result.identical is True and result.original_uri == _record(shard, "cap-2").image_uri


@pytest.mark.parametrize("hub_id", [False, True])
def test_other_format_and_a_snapshot_of_the_hf_cache(tmp_path, monkeypatch, hub_id: bool) -> None:
    """A hub id (resolved in an offline HF cache) or the snapshot folder itself: the commit is recorded."""
    repo = tmp_path / "hub" / "models--org--tiny"
    build_tiny_sdxl().save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = "org/tiny" if hub_id else str(repo / "snapshots" / COMMIT)
    settings = dict(image_format="webp", quality=80, scheduler="dpmpp_2m")
    manifest = _generate(tmp_path, model=model, revision="main" if hub_id else None, **settings)
    generation = _record(manifest, "cap-3").provenance["generation"]
    assert (generation["revision"], generation["revision_source"]) == (COMMIT, "hf_cache")
    (repo / "refs" / "main").write_text("0" * 40)  # the branch moved on: the recorded commit is used
    result = regen.regenerate(manifest, "cap-3", str(tmp_path / "cap-3.webp"), check=True)
    assert result.identical is True and result.warnings == []


def test_regenerate_with_the_refiner(tmp_path) -> None:
    manifest = _generate(tmp_path, refiner_model=TINY_SDXL_REFINER, high_noise_frac=0.75, steps=4)
    generation = _record(manifest, "cap-4").provenance["generation"]
    assert (generation["refiner"], generation["refiner_revision_source"]) == (TINY_SDXL_REFINER, "builtin")
    assert regen.regenerate(manifest, "cap-4", str(tmp_path / "cap-4.jpg"), check=True).identical is True


def _edit_generation(manifest: str, target: str, record_id: str, **changes: Any) -> None:
    records = read_manifest(manifest)
    for rec in records:
        if rec.id == record_id:
            rec.provenance["generation"].update(changes)
    write_manifest(target, records)


def test_other_library_versions_warn_but_regenerate(shard: str, tmp_path, caplog) -> None:
    generation = _record(shard, "cap-0").provenance["generation"]
    edited = str(tmp_path / "edited.jsonl")
    _edit_generation(shard, edited, "cap-0", versions={**generation["versions"], "torch": "0.0.1"})
    with caplog.at_level(logging.WARNING, logger=regen.__name__):
        result = regen.regenerate(edited, "cap-0", str(tmp_path / "x.jpg"), check=True)
    assert result.identical is True
    assert "torch 0.0.1 then" in caplog.text


def test_check_fails_when_the_original_differs(shard: str, tmp_path, capsys) -> None:
    original = tmp_path / "original.jpg"
    original.write_bytes(Path(_record(shard, "cap-0").image_uri).read_bytes()[:-10])  # truncated
    records = [rec.model_copy(update={"image_uri": str(original)}) for rec in read_manifest(shard)]
    write_manifest(str(tmp_path / "m.jsonl"), records)
    folder = tmp_path / "x"
    args = ["regenerate", "--manifest", str(tmp_path / "m.jsonl"), "--id", "cap-0", "--output", str(folder)]
    assert main(args) == 0  # without --check: logged only
    assert f"{folder / 'cap-0.jpg'}: DIFFERENT" in capsys.readouterr().out
    assert main([*args, "--check"]) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "'cap-0'" in err and "Traceback" not in err
    assert (folder / "cap-0.jpg").is_file()  # written anyway, for inspection


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["regenerate", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_errors_name_the_manifest_and_the_id(shard: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "x")  # the --output folder
    err = _error(["--manifest", shard, "--id", "cap-9", "--output", out], capsys)
    assert shard in err and "'cap-9'" in err
    # --output names a folder: a file name is refused before anything is read or written
    err = _error(["--manifest", shard, "--id", "cap-0", "--output", str(tmp_path / "x.png")], capsys)
    assert f"--output {tmp_path / 'x.png'}: --output is a folder" in err and f"--output {tmp_path}" in err
    assert not (tmp_path / "x.png").exists()
    # the library still refuses a file name whose extension is not the recorded format's
    with pytest.raises(InputError) as exc:
        regen.regenerate(shard, "cap-0", str(tmp_path / "x.png"))
    assert shard in str(exc.value) and "'cap-0'" in str(exc.value) and ".jpg" in str(exc.value)
    assert not (tmp_path / "x.png").exists()
    bare = str(tmp_path / "captions.jsonl")
    write_manifest(bare, [Record(id="cap-0", caption="a cat", provenance={"source": "test"})])
    err = _error(["--manifest", bare, "--id", "cap-0", "--output", out], capsys)
    assert bare in err and "'cap-0'" in err and "no generation provenance" in err
    old = str(tmp_path / "old.jsonl")
    generation = {"model": TINY_SDXL, "steps": 2}  # written before exact regeneration
    write_manifest(old, [Record(id="cap-0", caption="a cat", provenance={"generation": generation})])
    err = _error(["--manifest", old, "--id", "cap-0", "--output", out], capsys)
    assert old in err and "lacks" in err and "batch" in err
    missing = str(tmp_path / "nope.jsonl")
    assert missing in _error(["--manifest", missing, "--id", "a", "--output", out], capsys)


def test_models_that_cannot_be_loaded_are_input_errors(shard: str, tmp_path, capsys) -> None:
    edited, out = str(tmp_path / "edited.jsonl"), str(tmp_path / "x")
    _edit_generation(shard, edited, "cap-0", model="bench/random-sdxl")  # a builder of another process
    err = _error(["--manifest", edited, "--id", "cap-0", "--output", out], capsys)
    assert "'cap-0'" in err and "register_builder" in err
    _edit_generation(
        shard, edited, "cap-0", model="org/not-cached", revision_source="hf_cache", revision="a" * 40
    )
    err = _error(["--manifest", edited, "--id", "cap-0", "--output", out], capsys)
    assert edited in err and "cannot load org/not-cached (revision aaaa" in err


def test_inconsistent_batch_is_an_input_error(shard: str, tmp_path, capsys) -> None:
    edited = str(tmp_path / "edited.jsonl")
    batch = _record(shard, "cap-0").provenance["generation"]["batch"]
    _edit_generation(shard, edited, "cap-0", batch={**batch, "seeds": batch["seeds"][::-1]})
    err = _error(["--manifest", edited, "--id", "cap-0", "--output", str(tmp_path / "x")], capsys)
    assert "'cap-0'" in err and "batch" in err
    assert json.loads(Path(edited).read_text().splitlines()[0])["id"] == "cap-0"


def test_regenerate_repeats_the_recorded_call_with_its_padding(shard: str, tmp_path, monkeypatch) -> None:
    """A compiled UNet padded short batches (Painter.fixed_batch): the same padded call is made again."""
    calls: list[tuple[list[str], list[int]]] = []
    real_call = regen.Painter.__call__

    def spy(self: regen.Painter, prompts: list[str], seeds: list[int], weighted_prompts: Any = None) -> Any:
        calls.append((prompts, seeds))
        return real_call(self, prompts, seeds)

    monkeypatch.setattr(regen.Painter, "__call__", spy)
    edited = str(tmp_path / "edited.jsonl")
    batch = _record(shard, "cap-3").provenance["generation"]["batch"]
    _edit_generation(shard, edited, "cap-3", batch={**batch, "padded_to": 4})
    regen.regenerate(edited, "cap-3", str(tmp_path / "x.jpg"))
    assert calls == [
        ([CAPTIONS[3], CAPTIONS[4], CAPTIONS[4], CAPTIONS[4]], [*batch["seeds"], *batch["seeds"][-1:] * 2])
    ]
