"""StableLLaVA end to end (v2 §5): synthesize -> SFT on a mixture -> evaluate on the synthesized eval set and
named benchmarks -> comparison table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from synthvlm.errors import ConfigError
from synthvlm.run_config import StableLLaVAEndToEndRunConfig, preset
from synthvlm.stages.stablellava import training_inputs
from tests.pipelines.test_synthvlm_pipeline import REPO, SYNTHVLM, _clean_env


def test_mixtures_put_your_datasets_first_and_the_eval_set_before_the_benchmarks():
    exported = "gs://b/run/stablellava/export/export-0123/stablellava_sft.json"
    inputs = training_inputs(
        exported,
        "gs://b/run",
        '[{"uri": "gs://d/llava_v1_5_mix665k.json", "image_folder": "gs://d/images"}]',
        "",
        ["lmms_eval:mme"],
        pretrain_on_synthetic=False,
        sft_on_synthetic=True,
        synthetic_ratio=0.5,
    )
    folder = "gs://b/run/stablellava/export/export-0123"
    assert json.loads(inputs["pretrain_datasets"])[0]["uri"].endswith("mix665k.json")
    assert len(json.loads(inputs["pretrain_datasets"])) == 1  # no synthetic pretraining unless asked
    [synthetic] = json.loads(inputs["sft_datasets"])
    assert synthetic == {
        "uri": f"{folder}/stablellava_sft_interleaved.json",
        "image_folder": "gs://b/run",
        "ratio": 0.5,
        "name": "stablellava",
    }
    assert inputs["benchmarks"] == [f"{folder}/stablellava_eval.jsonl", "lmms_eval:mme"]


def test_paper_defaults_demand_the_stage_one_data():
    with pytest.raises(ConfigError, match="pretrain_datasets is empty"):
        from synthvlm.config import validate

        validate(
            StableLLaVAEndToEndRunConfig, {**preset("paper", "stablellava-end-to-end"), "data_root": "/d"}
        )


@pytest.mark.slow
def test_local_run_trains_and_evaluates_on_the_synthesized_eval_set(tmp_path: Path):
    cmd = [*SYNTHVLM, "run", "stablellava-end-to-end", "--local", "--preset", "demo"]
    cmd += ["--output", str(tmp_path / "run"), "--set", "generate.steps=2", "--set", "generate.height=64"]
    cmd += ["--set", "generate.width=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "run"
    assert (root / "train" / "sft" / "model.latest.json").is_file()
    results = json.loads((root / "eval" / "sft.json").read_text())
    assert set(results["benchmarks"]) == {"stablellava_eval", "colors"}  # synthesized set + named one
    table = (root / "eval" / "comparison.html").read_text()
    assert "stablellava_eval" in table
    assert "comparison table:" in proc.stdout
