"""The synthvlm pipeline: compiled YAML is current and well-formed; a kfp.local run makes the dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthvlm.records import read_manifest
from synthvlm.run_config import SynthVLMRunConfig, from_pipeline_arguments, to_pipeline_arguments
from synthvlm.stage import is_done, read_stats

REPO = Path(__file__).resolve().parents[2]
SYNTHVLM = [sys.executable, "-m", "synthvlm.cli"]


def without_comments(text: str) -> str:
    """KFP's header comment prints dict defaults in protobuf map order, which varies between processes."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHVLM_IMAGE_")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compiled")
    subprocess.run([*SYNTHVLM, "compile", "--output-dir", str(out)], check=True, env=_clean_env(), cwd=REPO)
    spec, platform = yaml.safe_load_all((out / "synthvlm.yaml").read_text())
    return {"path": out / "synthvlm.yaml", "spec": spec, "platform": platform["platforms"]["kubernetes"]}


def test_defaults_are_the_papers(compiled):
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    # typed run-form parameters, taken out of the <section>_config JSON
    assert (params["steps"]["defaultValue"], params["resolution"]["defaultValue"]) == (60, 1024)  # §3.1
    assert not {"steps", "height", "width"} & json.loads(params["generate_config"]["defaultValue"]).keys()
    assert params["select_k"]["defaultValue"] == 100_000  # SynthVLM §3.2
    assert "k" not in json.loads(params["select_config"]["defaultValue"])


def test_gpu_tasks_fan_out_with_retries(compiled):
    spec = compiled["spec"]
    executors = spec["deploymentSpec"]["executors"]
    placement = compiled["platform"]["deploymentSpec"]["executors"]
    for name in ("exec-generate-images", "exec-clip-score"):
        accel = executors[name]["container"]["resources"]["accelerator"]
        assert accel["resourceType"] == "nvidia.com/gpu"
        assert accel["resourceCount"] == "1"
        assert "synthvlm-diffusion" in executors[name]["container"]["image"]
        # placement comes from pipeline parameters: one compiled pipeline serves A100 and H100 pools
        assert placement[name]["nodeSelector"] == {
            "nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}
        }
        assert placement[name]["tolerations"] == [
            {"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}
        ]
    defaults = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_node_selector"]["defaultValue"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"
    }
    assert defaults["gpu_tolerations"]["defaultValue"][0]["key"] == "nvidia.com/gpu"
    [loop_name] = [name for name in spec["root"]["dag"]["tasks"] if name.startswith("for-loop-")]
    loop = spec["root"]["dag"]["tasks"][loop_name]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    body = spec["components"][f"comp-{loop_name}"]["dag"]["tasks"]
    for task in ("generate-images", "clip-score"):
        assert body[task]["retryPolicy"]["maxRetryCount"] == 2
    # validation runs first: everything else waits for it, and it is never served from cache
    tasks = spec["root"]["dag"]["tasks"]
    assert "validate-synthvlm-config" in tasks["load-captions"]["dependentTasks"]
    assert tasks["validate-synthvlm-config"]["cachingOptions"] == {}


def test_pipeline_arguments_round_trip():
    config = SynthVLMRunConfig(data_root="gs://b/run", num_shards=3)
    config.select.k = 7
    assert from_pipeline_arguments(to_pipeline_arguments(config)) == config


def _run(output: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [*SYNTHVLM, "run", "synthvlm", "--local", "--preset", "demo", "--output", str(output)]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=600)


SMALL = ("max_captions=6", "select.k=3", "generate.steps=2", "generate.height=64", "generate.width=64")


@pytest.mark.slow
def test_local_run_produces_the_exported_dataset(tmp_path: Path):
    proc = _run(tmp_path / "run", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = tmp_path / "run"
    dataset = json.loads((root / "export" / "llava_pretrain.json").read_text())
    assert len(dataset) == 3
    for sample in dataset:
        assert (root / sample["image"]).is_file()
        assert sample["conversations"][0]["value"].startswith("<image>\n")
    manifest = read_manifest(str(root / "export" / "manifest.jsonl"))
    assert [r.id for r in manifest] == [s["id"] for s in dataset]
    assert all("clip" in r.scores and r.provenance["generation"]["steps"] == 2 for r in manifest)
    assert read_stats(str(root / "captions" / "captions.jsonl"))["count_out"] == 6
    shards = (root / "generate" / "shards").glob("shard-*.jsonl")
    assert sum(read_stats(str(p))["count_out"] for p in shards) == 6
    assert is_done(str(root / "report.html"))
    assert "demo preset uses tiny RANDOM-WEIGHT" in proc.stdout
    assert str(root / "report.html") in proc.stdout
    # A quiet console: task start/end lines, our log lines with progress totals; no executor dumps.
    lines = proc.stdout.splitlines()
    assert len(lines) <= 100, proc.stdout
    assert "load-captions: SUCCESS in" in proc.stdout and "executor_input" not in proc.stdout
    assert any(re.search(r"generate shard 1/2: 3/3 images \(100\.0%\)", line) for line in lines)

    # Any record of the exported dataset rebuilds byte for byte from the record alone.
    record = manifest[1]
    again = tmp_path / "again"  # --output is a folder: <id><ext> is written in it
    cmd = [*SYNTHVLM, "regenerate", "--manifest", str(root / "export" / "manifest.jsonl")]
    cmd += ["--id", record.id, "--output", str(again), "--check"]
    regen = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=600)
    assert regen.returncode == 0, regen.stdout[-2000:] + regen.stderr[-2000:]
    written, status = regen.stdout.strip().splitlines()[-1].rsplit(": ", 1)
    rebuilt = Path(written)
    assert (rebuilt.parent, rebuilt.stem, status) == (again, record.id, "byte-identical")
    assert rebuilt.read_bytes() == Path(record.image_uri).read_bytes()


# captions, curate (one shard, one dedup partition, the merge), 2 x generate, 2 x clip_score, select,
# export_llava, report
RUNNER_STAGES = 11


RUNNER_LINE = re.compile(r"^\s+(\w+): (computing|unchanged|settings or inputs changed)")


def _runner_lines(proc: subprocess.CompletedProcess, what: str) -> list[str]:
    """The stage runner's start/skip lines (one per stage run) that contain `what`."""
    return [line for line in proc.stdout.splitlines() if RUNNER_LINE.match(line) and what in line]


@pytest.mark.slow
def test_rerun_with_other_k_recomputes_from_select_on_and_an_unchanged_rerun_skips_everything(tmp_path: Path):
    root = tmp_path / "run"
    base = ("max_captions=6", "generate.steps=2", "generate.height=64", "generate.width=64")
    first = _run(root, *base, "select.k=5")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert len(_runner_lines(first, ": computing")) == RUNNER_STAGES
    first_selection = read_stats(str(root / "select" / "selected.jsonl"))["published_from"]

    second = _run(root, *base, "select.k=3")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    dataset = json.loads((root / "export" / "llava_pretrain.json").read_text())
    assert len(dataset) == 3 and len(read_manifest(str(root / "export" / "manifest.jsonl"))) == 3
    report = (root / "report.html").read_text()
    assert "3 records selected" in report and "5 records selected" not in report
    assert "&quot;k&quot;: 3" in report  # the report shows the settings that made the selection
    # Only select and what reads it were recomputed; the first selection is still readable.
    recomputed = _runner_lines(second, "changed since")
    assert sorted(RUNNER_LINE.match(line)[1] for line in recomputed) == [
        "export_llava",
        "report",
        "select",
    ]
    assert len(_runner_lines(second, "unchanged")) == RUNNER_STAGES - 3
    assert len(read_manifest(first_selection)) == 5

    third = _run(root, *base, "select.k=3")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert len(_runner_lines(third, "unchanged")) == RUNNER_STAGES
    assert not _runner_lines(third, ": computing") and not _runner_lines(third, "changed since")
    assert len(json.loads((root / "export" / "llava_pretrain.json").read_text())) == 3


@pytest.mark.slow
def test_local_run_with_bad_captions_fails_and_publishes_nothing(tmp_path: Path):
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"id": "a", "caption": "fine"}\n{"id": "b", "caption": ""}\n')
    proc = _run(tmp_path / "run", f"captions={bad}")
    assert proc.returncode != 0
    assert f"{bad}, line 2, field 'caption': caption is empty" in proc.stdout + proc.stderr
    assert not list((tmp_path / "run").rglob("*.done"))
    assert not (tmp_path / "run" / "export").exists()


def test_bad_parameter_fails_before_anything_runs(tmp_path: Path):
    proc = _run(tmp_path / "run", "select.mode=best")
    assert proc.returncode == 2
    assert "config field 'select.mode'" in proc.stderr and "'top_k'" in proc.stderr
    assert not (tmp_path / "run" / "kfp-local").exists()


def test_validation_step_rejects_bad_parameters_before_gpu_work(tmp_path: Path):
    from components.validate import validate_synthvlm_config
    from synthvlm.errors import ConfigError

    good = to_pipeline_arguments(SynthVLMRunConfig(data_root=str(tmp_path)))
    validate_synthvlm_config.python_func(**good)  # passes
    generate = json.loads(good["generate_config"])
    generate["safety"]["blocklist_file"] = str(tmp_path / "missing-blocklist.txt")
    with pytest.raises(ConfigError, match="safety.blocklist_file"):
        validate_synthvlm_config.python_func(**{**good, "generate_config": json.dumps(generate)})
    with pytest.raises(ConfigError, match="config field 'data_root': required"):
        validate_synthvlm_config.python_func(**{**good, "data_root": ""})
    with pytest.raises(ConfigError, match="pipeline parameter 'select_config': not valid JSON"):
        validate_synthvlm_config.python_func(**{**good, "select_config": "{mode: top_k"})


def test_max_parallel_gpu_pods_is_a_compile_option(tmp_path: Path):
    cmd = [
        *SYNTHVLM,
        "compile",
        "--output-dir",
        str(tmp_path),
        "--pipeline",
        "synthvlm",
        "--max-parallel-gpus",
        "32",
    ]
    subprocess.run(cmd, check=True, env=_clean_env(), cwd=REPO)
    spec, _ = yaml.safe_load_all((tmp_path / "synthvlm.yaml").read_text())
    [loop] = [t for name, t in spec["root"]["dag"]["tasks"].items() if name.startswith("for-loop-")]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 32
