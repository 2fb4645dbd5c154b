"""Reruns never return stale data: a changed setting or input recomputes exactly what it affects, an
unchanged one (or a setting that cannot change the output) skips, and old results stay readable."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from synthvlm import stage, storage
from synthvlm.models.clip import TINY_CLIP
from synthvlm.models.sdxl import TINY_SDXL
from synthvlm.records import read_manifest
from synthvlm.stages import generate as gen
from synthvlm.stages.captions import CaptionsConfig, load_captions
from synthvlm.stages.clip_score import ScoreConfig, score
from synthvlm.stages.export_llava import ExportConfig, export_llava
from synthvlm.stages.generate import GenerateConfig, generate
from synthvlm.stages.select import SelectConfig, select


def tiny(**overrides: Any) -> GenerateConfig:
    settings = dict(model=TINY_SDXL, steps=2, height=64, width=64, batch_size=2, device="cpu")
    return GenerateConfig(**{**settings, **overrides})


def write_captions(path: Path, captions: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": f"c{i}", "caption": c}) + "\n" for i, c in enumerate(captions)))
    return str(path)


def _no_model(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the model was loaded although nothing output-affecting changed")


def test_changed_steps_regenerate_every_image_and_batch_size_skips(tmp_path, monkeypatch) -> None:
    source = write_captions(tmp_path / "a.jsonl", ["a red car", "a cat on a sofa", "a bowl of soup"])
    captions = load_captions(
        CaptionsConfig(captions=source), str(tmp_path / "d" / "captions" / "captions.jsonl")
    )
    out = str(tmp_path / "d" / "generate")

    two_steps = generate(tiny(steps=2), captions, out)
    first = {r.id: r for r in read_manifest(two_steps)}
    first_bytes = {rid: storage.read_bytes(r.image_uri) for rid, r in first.items()}

    three_steps = generate(tiny(steps=3), captions, out)
    second = {r.id: r for r in read_manifest(three_steps)}
    assert three_steps != two_steps and second.keys() == first.keys()
    for rid, rec in second.items():
        # Made under the new settings, in the new fingerprint's folder: no old image is reused.
        assert rec.provenance["generation"]["steps"] == 3
        assert rec.image_uri != first[rid].image_uri
        assert rec.image_uri.startswith(three_steps.rsplit("/shards/", 1)[0] + "/images/")
        assert storage.read_bytes(rec.image_uri) != first_bytes[rid]
    # The first run's images and manifest are still there, unchanged.
    assert {rid: storage.read_bytes(r.image_uri) for rid, r in first.items()} == first_bytes
    assert stage.is_done(two_steps)
    # The stable shard path holds the latest complete run.
    assert read_manifest(f"{out}/shards/shard-00000-of-00001.jsonl") == list(second.values())

    # batch_size (and write workers) cannot change an image: same fingerprint, nothing is generated.
    monkeypatch.setattr(gen, "load_sdxl", _no_model)
    assert generate(tiny(steps=3, batch_size=1, write_workers=2), captions, out) == three_steps
    assert generate(tiny(steps=2, batch_size=3), captions, out) == two_steps  # back to the first settings


def test_changed_captions_file_redoes_captions_and_everything_downstream(tmp_path, caplog) -> None:
    data = tmp_path / "d"

    def pipeline(source: str) -> dict[str, str]:
        out = {
            "captions": load_captions(
                CaptionsConfig(captions=source), str(data / "captions" / "captions.jsonl")
            )
        }
        out["generate"] = generate(tiny(), out["captions"], str(data / "generate"))
        clip = ScoreConfig(model=TINY_CLIP, pretrained=None, device="cpu")
        out["score"] = score(clip, out["generate"], str(data / "scores" / "shard-00000-of-00001.jsonl"))
        out["select"] = select(SelectConfig(k=2), [out["score"]], str(data / "select" / "selected.jsonl"))
        out["export"] = export_llava(ExportConfig(), out["select"], str(data), str(data / "export"))
        return out

    source = tmp_path / "captions.jsonl"
    first = pipeline(write_captions(source, ["a red car", "a cat on a sofa", "a bowl of soup"]))
    with caplog.at_level(logging.INFO, logger="synthvlm.runner"):
        again = pipeline(str(source))
    assert again == first
    assert sum("unchanged" in r.getMessage() for r in caplog.records) == 5  # every stage skipped

    # Same file name, other content (one caption changed): every stage recomputes.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthvlm.runner"):
        second = pipeline(write_captions(source, ["a red car", "a dog in the snow", "a bowl of soup"]))
    for name in first:
        assert second[name] != first[name], name
    assert not any("unchanged" in r.getMessage() for r in caplog.records)
    exported = json.loads((data / "export" / "llava_pretrain.json").read_text())
    all_captions = {r.caption for r in read_manifest(second["captions"])}
    assert {s["conversations"][1]["value"] for s in exported} <= all_captions
    assert "a cat on a sofa" not in {r.caption for r in read_manifest(second["generate"])}
    # The first run's export is still readable, as it was.
    assert len(json.loads(Path(first["export"]).read_text())) == 2


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_threshold_is_rejected_and_nothing_is_marked_complete(tmp_path, bad) -> None:
    from synthvlm.config import validate
    from synthvlm.errors import ConfigError

    scored = tmp_path / "scored.jsonl"
    scored.write_text(json.dumps({"id": "a", "caption": "x", "scores": {"clip": 0.3}}) + "\n")
    with pytest.raises(ConfigError, match="threshold"):
        config = validate(SelectConfig, {"mode": "threshold", "threshold": float(bad)})
        select(config, [str(scored)], str(tmp_path / "select" / "selected.jsonl"))
    assert not list(tmp_path.rglob("*.done"))


def test_a_moved_hub_branch_gets_its_own_generation_folder(tmp_path, monkeypatch) -> None:
    import huggingface_hub

    cache = tmp_path / "hub"
    refs = cache / "models--org--sdxl" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    captions = write_captions(tmp_path / "c.jsonl", ["a red car"])
    config = GenerateConfig(model="org/sdxl")  # revision None: whatever main is
    before = gen.version_dir(config, captions, str(tmp_path / "generate"))
    (refs / "main").write_text("b" * 40)
    assert gen.version_dir(config, captions, str(tmp_path / "generate")) != before
