"""The stablellava pipeline: compiled YAML is current, the LLM key only comes from a Secret, a run exports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from synthvlm.run_config import StableLLaVARunConfig, from_pipeline_arguments, to_pipeline_arguments
from tests.pipelines.test_synthvlm_pipeline import REPO, SYNTHVLM, _clean_env

LLM_TASKS = ("exec-stablellava-keywords", "exec-stablellava-prompts", "exec-stablellava-dialogues")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compiled")
    cmd = [*SYNTHVLM, "compile", "--output-dir", str(out), "--pipeline", "stablellava"]
    subprocess.run(cmd, check=True, env=_clean_env(), cwd=REPO)
    text = (out / "stablellava.yaml").read_text()
    spec, platform = yaml.safe_load_all(text)
    return {"text": text, "spec": spec, "platform": platform["platforms"]["kubernetes"]}


def test_llm_key_comes_from_a_secret_and_clip_check_is_gamma(compiled):
    executors = compiled["platform"]["deploymentSpec"]["executors"]
    for name in LLM_TASKS:
        [secret] = executors[name]["secretAsEnv"]
        assert secret["keyToEnv"] == [{"envVar": "OPENAI_API_KEY", "secretKey": "OPENAI_API_KEY"}]
        assert secret["secretNameParameter"] == {"componentInputParameter": "llm_secret"}
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    # no parameter can carry the key itself: configs name the env var (api_key_env), never the value
    assert not [name for name in params if any(w in name for w in ("api_key", "token", "password"))]
    for name, spec in params.items():
        if name.endswith("_config"):
            assert "api_key" not in _keys(json.loads(spec["defaultValue"])), name
    assert set(params) == set(to_pipeline_arguments(StableLLaVARunConfig()))
    # typed run-form parameters, not inside select_config
    mode, threshold = (params[name]["defaultValue"] for name in ("select_mode", "select_threshold"))
    assert (mode, threshold) == ("threshold", 0.25)  # StableLLaVA v2 §4.4 gamma
    assert not {"mode", "threshold"} & json.loads(params["select_config"]["defaultValue"]).keys()


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_api_key_value_never_reaches_compiled_yaml(tmp_path: Path):
    env = _clean_env() | {"OPENAI_API_KEY": "sk-test-NEVER-IN-YAML-0123456789"}
    subprocess.run([*SYNTHVLM, "compile", "--output-dir", str(tmp_path)], check=True, env=env, cwd=REPO)
    for path in tmp_path.glob("*.yaml"):
        assert "NEVER-IN-YAML" not in path.read_text(), path.name


def test_round_trip():
    config = StableLLaVARunConfig(data_root="gs://b/sl", num_shards=2)
    assert from_pipeline_arguments(to_pipeline_arguments(config), StableLLaVARunConfig) == config


@pytest.mark.slow
def test_local_run_exports_sft_eval_and_multi_image(tmp_path: Path):
    cmd = [*SYNTHVLM, "run", "stablellava", "--local", "--preset", "demo", "--output", str(tmp_path / "run")]
    cmd += ["--set", "generate.steps=2", "--set", "generate.height=64", "--set", "generate.width=64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "run"
    export = root / "stablellava" / "export"
    sft = json.loads((export / "stablellava_sft.json").read_text())
    interleaved = json.loads((export / "stablellava_sft_interleaved.json").read_text())
    assert sft and all(isinstance(s.get("image", ""), str) for s in sft)  # LLaVA-1.5: one image per sample
    multi = [s for s in interleaved if len(s["image"]) > 1]
    assert multi, "no multi-image sample in the interleaved SFT file"
    for sample in interleaved:
        images = sample["image"]
        assert all((root / image).is_file() for image in images)
        markers = sum(turn["value"].count("<image>") for turn in sample["conversations"])
        assert markers == len(images), sample["id"]
    evals = [json.loads(line) for line in (export / "stablellava_eval.jsonl").read_text().splitlines()]
    assert evals and all(item.get("answer") or item.get("answers") for item in evals)
    assert (root / "stablellava" / "report.html").is_file()  # the StableLLaVA report is published
