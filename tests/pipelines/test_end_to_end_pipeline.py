"""The end-to-end pipeline locally: synthetic data -> tiny LLaVA pretrain -> SFT -> eval, all in kfp.local."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from synthvlm.errors import ConfigError
from synthvlm.run_config import EndToEndRunConfig, TrainRunConfig
from synthvlm.stage import is_done
from tests.pipelines.test_synthvlm_pipeline import REPO, SYNTHVLM, _clean_env


def test_paper_defaults_demand_the_sft_data():
    """SynthVLM §4.1 fine-tunes on LLaVA-665K, which we cannot ship: the run must name it, up front."""
    with pytest.raises(ValueError, match="sft_datasets is empty"):
        EndToEndRunConfig()
    with pytest.raises(ValueError, match="pretrain_datasets is empty"):
        TrainRunConfig(sft_datasets='["gs://b/665k.json"]')
    with pytest.raises(ConfigError, match=r"datasets\[0\]"):
        TrainRunConfig(sft_datasets='[{"uri": ""}]')
    config = TrainRunConfig(pretrain_datasets='["gs://b/synth.json"]', sft_datasets='["gs://b/665k.json"]')
    assert (config.pretrain.stage, config.sft.stage, config.gpus_per_node) == ("pretrain", "sft", 8)


@pytest.mark.slow
def test_local_end_to_end_run_trains_and_evaluates(tmp_path: Path):
    root = tmp_path / "run"
    cmd = [*SYNTHVLM, "run", "end-to-end", "--local", "--preset", "demo", "--output", str(root)]
    for item in (
        "max_captions=6",
        "select.k=4",
        "generate.steps=2",
        "generate.height=64",
        "generate.width=64",
    ):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(json.loads((root / "export" / "llava_pretrain.json").read_text())) == 4
    # A model is not copied to a stable path: `model.latest.json` names the fingerprint folder's model.
    pointer = json.loads((root / "train" / "sft" / "model.latest.json").read_text())
    model = Path(pointer["published_from"])
    assert model.parent.name.startswith("train-") and model.parent.parent == root / "train" / "sft"
    assert is_done(str(model)) and (model / "config.json").is_file()
    assert pointer["settings"]["stage"] == "sft"
    from transformers import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.from_pretrained(model).config.model_type == "llava"
    results = json.loads((root / "eval" / "sft.json").read_text())
    assert "colors" in json.dumps(results)
    assert (root / "eval" / "sft.html").is_file()
