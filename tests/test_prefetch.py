"""prefetch-models: every model a run config names, downloaded once into HF_HOME."""

from __future__ import annotations

from synthvlm.cli import main
from synthvlm.prefetch import models_of
from synthvlm.run_config import EndToEndRunConfig, SynthVLMRunConfig, preset


def test_paper_run_names_sdxl_clip_and_llava_parts():
    config = EndToEndRunConfig.model_validate(
        {**preset("paper", "end-to-end"), "sft_datasets": '["x.json"]', "curate_captions": True}
    )
    names = {(ref.kind, ref.name, ref.revision) for ref in models_of(config)}
    assert ("hub", "stabilityai/stable-diffusion-xl-base-1.0", None) in names
    assert ("open_clip", "ViT-L-14", "openai") in names
    assert ("hub", "lmsys/vicuna-7b-v1.5", None) in names
    assert ("hub", "openai/clip-vit-large-patch14-336", None) in names
    assert ("hub", "openai-community/gpt2", None) in names  # curation's perplexity filter (paper preset)
    assert ("hub", "Salesforce/blip-itm-base-coco", None) in names  # and its BLIP image-text matching
    assert len(names) == len(models_of(config))  # each model once, however many stages use it


def test_tiny_models_and_switched_off_parts_are_left_out(tmp_path):
    demo = SynthVLMRunConfig.model_validate(preset("demo"))
    # tiny built-in SDXL and CLIP are not downloaded; curation's raw-image CLIP is named (it is enabled)
    assert [ref.used_by for ref in models_of(demo)] == ["curate.clip.score"]
    demo.curate.clip.enabled = False
    assert models_of(demo) == []
    local = SynthVLMRunConfig.model_validate({"generate": {"model": str(tmp_path)}, "curate_captions": False})
    assert [ref.name for ref in models_of(local)] == ["ViT-L-14"]  # a local folder needs no download


def test_dry_run_lists_without_downloading(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prefetch-models", "synthvlm", "--preset", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stabilityai/stable-diffusion-xl-base-1.0" in out and "cached" not in out
