"""Every pipeline: its checked-in YAML is current, every parameter has a paper default and a UI description,
and validation runs first on exactly the pipeline's parameters, before any GPU task."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from synthvlm.kfp_support import PIPELINE_MODULES
from synthvlm.run_config import FORM_FIELDS, run_config_class, to_pipeline_arguments
from tests.pipelines.test_synthvlm_pipeline import REPO, SYNTHVLM, _clean_env, without_comments

PIPELINES = sorted(PIPELINE_MODULES)


@pytest.fixture(scope="module")
def compiled_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    subprocess.run([*SYNTHVLM, "compile", "--output-dir", str(out)], check=True, env=_clean_env(), cwd=REPO)
    return out


def _load(path):
    spec, *platform = yaml.safe_load_all(path.read_text())
    return spec, (platform[0]["platforms"]["kubernetes"] if platform else {})


@pytest.mark.parametrize("name", PIPELINES)
def test_checked_in_yaml_is_current(compiled_dir, name):
    fresh = (compiled_dir / f"{name}.yaml").read_text()
    checked_in = (REPO / "pipelines" / "compiled" / f"{name}.yaml").read_text()
    assert without_comments(fresh) == without_comments(checked_in), (
        f"pipelines/compiled/{name}.yaml is stale: pipelines/, components/ or a stage config changed "
        "without recompiling; run `make compile` and commit the result"
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_parameters_have_defaults_and_descriptions(compiled_dir, name):
    spec, _ = _load(compiled_dir / f"{name}.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = to_pipeline_arguments(run_config_class(name).model_construct())
    assert set(params) == set(defaults)
    required = {"data_root", "captions"} & set(params)  # the form must not accept them empty
    for param, pspec in params.items():
        assert pspec.get("description"), f"{name}: parameter {param} has no description for the UI"
        if param in required:
            assert "defaultValue" not in pspec and not pspec.get("isOptional"), f"{name}: {param}"
        else:
            assert pspec.get("defaultValue", "") == defaults[param], f"{name}: {param}"


# The run form's typed parameters the issue names, per pipeline (more may exist).
TYPED = {
    "synthvlm": {"max_captions": "NUMBER_INTEGER", "select_mode": "STRING", "select_k": "NUMBER_INTEGER",
                 "select_fraction": "NUMBER_DOUBLE", "select_threshold": "NUMBER_DOUBLE",
                 "generation_model": "STRING", "steps": "NUMBER_INTEGER", "guidance_scale": "NUMBER_DOUBLE",
                 "resolution": "NUMBER_INTEGER", "clip_model": "STRING", "clip_pretrained": "STRING",
                 "llm_base_url": "STRING", "llm_model": "STRING"},
    "stablellava": {"abilities": "LIST", "prompts_per_ability": "NUMBER_INTEGER", "steps": "NUMBER_INTEGER",
                    "select_threshold": "NUMBER_DOUBLE", "llm_base_url": "STRING", "llm_model": "STRING",
                    "generation_model": "STRING", "clip_model": "STRING", "resolution": "NUMBER_INTEGER"},
}  # fmt: skip
TYPED["end-to-end"] = TYPED["synthvlm"]


@pytest.mark.parametrize("name", sorted(TYPED))
def test_run_form_has_typed_parameters_with_paper_defaults(compiled_dir, name):
    spec, _ = _load(compiled_dir / f"{name}.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    for param, kind in TYPED[name].items():
        assert params[param]["parameterType"] == kind, f"{name}: {param}"
        assert len(params[param]["description"]) > 20, f"{name}: {param} needs a real description"
    assert params["steps"]["defaultValue"] == 60  # SynthVLM §3.1
    assert params["resolution"]["defaultValue"] == 1024
    # the typed fields are not also in the stage JSON defaults (one place to set each)
    generate = json.loads(params["generate_config"]["defaultValue"])
    assert not {"steps", "height", "width", "model", "guidance_scale"} & set(generate)
    llm_paths = [field.paths for field in FORM_FIELDS[name] if field.name == "llm_model"][0]
    assert len(llm_paths) == (3 if name == "stablellava" else 1)  # one endpoint for every LLM stage


@pytest.mark.parametrize("name", PIPELINES)
def test_validation_outputs_every_stage_config_in_order(compiled_dir, name):
    """The validation task returns a tuple in its outputs' order: they must be the run config's sections."""
    from synthvlm import run_config

    spec, _ = _load(compiled_dir / f"{name}.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    [validate] = [t["componentRef"]["name"] for n, t in tasks.items() if n.startswith("validate-")]
    outputs = list(spec["components"][validate]["outputDefinitions"]["parameters"])
    sections = run_config._sections(run_config_class(name))
    assert sorted(outputs) == sorted(f"{s}_config" for s in sections)
    module = __import__("components.validate", fromlist=["x"])
    func = getattr(module, validate.removeprefix("comp-").replace("-", "_")).python_func
    declared = [field for field, _ in func.__annotations__["return"].__annotations__.items()]
    assert declared == [f"{s}_config" for s in sections]


@pytest.mark.parametrize("name", PIPELINES)
def test_validation_comes_first_on_all_parameters(compiled_dir, name):
    spec, _ = _load(compiled_dir / f"{name}.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    [validate] = [t for t in tasks if t.startswith("validate-")]
    assert set(tasks[validate]["inputs"]["parameters"]) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert tasks[validate]["cachingOptions"] == {}  # never skipped from cache
    for task_name in tasks:
        if task_name != validate:
            assert _depends_on(tasks, task_name, validate), f"{name}: {task_name} can start before validation"


def _depends_on(tasks, name, target, seen=None) -> bool:
    seen = seen or set()
    deps = set(tasks[name].get("dependentTasks", []))
    for param in tasks[name].get("inputs", {}).get("parameters", {}).values():
        producer = param.get("taskOutputParameter", {}).get("producerTask")
        if producer:
            deps.add(producer)
    if target in deps:
        return True
    seen.add(name)
    return any(_depends_on(tasks, d, target, seen) for d in deps - seen if d in tasks)


@pytest.mark.parametrize("name", PIPELINES)
def test_no_secret_values_and_gpu_tasks_placed_by_parameters(compiled_dir, name):
    spec, platform = _load(compiled_dir / f"{name}.yaml")
    text = (compiled_dir / f"{name}.yaml").read_text()
    assert "sk-" not in text and "BEGIN PRIVATE KEY" not in text
    for executor, container in spec["deploymentSpec"]["executors"].items():
        accel = container["container"].get("resources", {}).get("accelerator")
        if accel:  # every GPU task lands on the chosen node pool and is retried on preemption
            assert accel["resourceType"] == "nvidia.com/gpu"
            placement = platform["deploymentSpec"]["executors"][executor]
            assert "nodeSelector" in placement and "tolerations" in placement, f"{name}: {executor}"


def _all_tasks(spec):
    """(dag name, task name, task) of every task in the root DAG and in every nested DAG."""
    dags = [("root", spec["root"]["dag"])]
    dags += [(name, comp["dag"]) for name, comp in spec["components"].items() if "dag" in comp]
    for dag_name, dag in dags:
        for task_name, task in dag.get("tasks", {}).items():
            yield dag_name, task_name, task


@pytest.mark.parametrize("name", PIPELINES)
def test_kfp_cache_is_off_for_every_container_task(compiled_dir, name):
    """Outputs live in the data root, which KFP's cache cannot see: a cache hit must never stand in for
    data that was changed or deleted; the stage runner's fingerprints decide reuse instead."""
    spec, _ = _load(compiled_dir / f"{name}.yaml")
    containers = {name for name, comp in spec["components"].items() if "executorLabel" in comp}
    checked = 0
    for dag_name, task_name, task in _all_tasks(spec):
        if task["componentRef"]["name"] in containers:
            checked += 1
            assert not task.get("cachingOptions", {}).get("enableCache"), f"{name}: {dag_name}/{task_name}"
    assert checked >= 4


def test_compiling_twice_gives_byte_identical_files(compiled_dir, tmp_path):
    """kfp's header comments hold mapping defaults in protobuf map order, which changes between processes:
    `synthvlm compile` sorts them, so a recompile shows no diff."""
    again = tmp_path / "again"
    subprocess.run([*SYNTHVLM, "compile", "--output-dir", str(again)], check=True, env=_clean_env(), cwd=REPO)
    for name in PIPELINES:
        assert (again / f"{name}.yaml").read_bytes() == (compiled_dir / f"{name}.yaml").read_bytes(), name


@pytest.mark.parametrize("name", PIPELINES)
def test_every_task_requests_cpu_and_memory(compiled_dir, name):
    spec, platform = _load(compiled_dir / f"{name}.yaml")
    for executor, container in spec["deploymentSpec"]["executors"].items():
        resources = container["container"].get("resources", {})
        assert resources.get("resourceCpuRequest") and resources.get("resourceMemoryRequest"), (
            f"{name}: {executor} requests no CPU or memory"
        )
        if "accelerator" not in resources and "launcher" not in executor:
            assert resources.get("resourceMemoryLimit"), f"{name}: CPU task {executor} has no memory limit"
    # no volumes unless chosen at compile time
    for executor, config in platform.get("deploymentSpec", {}).get("executors", {}).items():
        assert "pvcMount" not in config, f"{name}: {executor}"


def test_volumes_and_sizes_are_compile_options(tmp_path):
    out = tmp_path / "with-volumes"
    subprocess.run(
        [*SYNTHVLM, "compile", "--output-dir", str(out), "--pipeline", "synthvlm", "--pipeline", "train",
         "--data-pvc", "synthvlm-data:/mnt/data", "--model-cache-pvc", "synthvlm-models",
         "--resources", "generate=4,24Gi,30Gi"],
        check=True, env=_clean_env(), cwd=REPO,
    )  # fmt: skip
    for name in ("synthvlm", "train"):
        spec, platform = _load(out / f"{name}.yaml")
        executors = platform["deploymentSpec"]["executors"]
        for executor in spec["deploymentSpec"]["executors"]:
            mounts = {m["mountPath"]: m for m in executors[executor].get("pvcMount", [])}
            assert mounts["/mnt/data"]["constant"] == "synthvlm-data", f"{name}: {executor}"
            container = spec["deploymentSpec"]["executors"][executor]["container"]
            if "accelerator" in container.get("resources", {}):  # model-loading tasks share the cache
                assert mounts["/models"]["constant"] == "synthvlm-models"
                assert {"name": "HF_HOME", "value": "/models/huggingface"} in container["env"]
            else:
                assert "/models" not in mounts
    spec, _ = _load(out / "synthvlm.yaml")
    generate = spec["deploymentSpec"]["executors"]["exec-generate-images"]["container"]["resources"]
    assert (generate["resourceCpuRequest"], generate["resourceMemoryRequest"]) == ("4", "24Gi")
    assert generate["resourceMemoryLimit"] == "30Gi"


def test_an_unknown_resource_kind_is_a_clean_error(tmp_path):
    proc = subprocess.run(
        [*SYNTHVLM, "compile", "--output-dir", str(tmp_path), "--resources", "gpu=1,2Gi"],
        capture_output=True, text=True, env=_clean_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "--resources gpu: unknown kind; kinds: eval, generate, light, llm, records, score, train"
        in proc.stderr
    )
