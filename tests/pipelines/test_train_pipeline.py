"""Training placement in the compiled pipelines (train, end-to-end): with one node each training stage runs
in its own pod on `gpus_per_node` GPUs; with more nodes the same component runs as a CPU-only launcher of
the Kubeflow job (the GPUs are in the job's pods). `num_nodes` is a runtime parameter, so this is a
dsl.If/Else per stage, and dsl.OneOf hands the model on to the SFT and to the evaluation."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.pipelines.test_synthvlm_pipeline import REPO, SYNTHVLM, _clean_env

TRAIN_PIPELINES = ["train", "end-to-end"]
ONE_NODE = "int(inputs.parameter_values['pipelinechannel--num_nodes']) == 1"
MULTI_NODE = f"!({ONE_NODE})"
GPUS_PER_NODE = "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"
PIPELINE = "<pipeline parameter>"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compiled")
    cmd = [*SYNTHVLM, "compile", "--output-dir", str(out)]
    for name in TRAIN_PIPELINES:
        cmd += ["--pipeline", name]
    subprocess.run(cmd, check=True, env=_clean_env(), cwd=REPO)
    specs = {}
    for name in TRAIN_PIPELINES:
        spec, platform = yaml.safe_load_all((out / f"{name}.yaml").read_text())
        specs[name] = spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return specs


# --- reading a compiled spec: nested DAGs (conditions, sub-pipelines) and where an input comes from ------


def container_tasks(spec: dict):
    """Every container task, as its chain [(dag, task name, task spec), ...] from the root DAG down."""

    def visit(dag, chain):
        for name, task in dag["tasks"].items():
            here = [*chain, (dag, name, task)]
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                yield from visit(component["dag"], here)
            else:
                yield here

    yield from visit(spec["root"]["dag"], [])


def conditions(chain) -> list[str]:
    return [task["triggerPolicy"]["condition"] for _, _, task in chain if "triggerPolicy" in task]


def producers(spec: dict, chain, input_name: str) -> tuple[set[tuple[str, str]], bool]:
    """The (container task, output) pairs that feed the last task's parameter `input_name` ((PIPELINE, name)
    for a pipeline parameter), and whether a dsl.OneOf picks between them on the way."""
    *outer, (dag, _, task) = chain
    source = task["inputs"]["parameters"][input_name]
    if "componentInputParameter" in source:
        return group_input(spec, outer, source["componentInputParameter"])
    if "taskOutputParameter" in source:
        output = source["taskOutputParameter"]
        return _output_of(spec, dag, output["producerTask"], output["outputParameterKey"])
    return set(), False  # a constant


def group_input(spec: dict, outer, input_name: str) -> tuple[set[tuple[str, str]], bool]:
    """Like `producers`, for an input of the group (condition, sub-pipeline) that `outer` ends in."""
    if not outer:
        return {(PIPELINE, input_name)}, False
    return producers(spec, outer, input_name)


def _output_of(spec, dag, task_name, key) -> tuple[set[tuple[str, str]], bool]:
    component = spec["components"][dag["tasks"][task_name]["componentRef"]["name"]]
    if "dag" not in component:
        return {(task_name, key)}, False
    value = component["dag"]["outputs"]["parameters"][key]
    one_of = "valueFromOneof" in value
    selectors = value["valueFromOneof"]["parameterSelectors"] if one_of else [value["valueFromParameter"]]
    found = set()
    for selector in selectors:
        tasks, inner_one_of = _output_of(
            spec, component["dag"], selector["producerSubtask"], selector["outputParameterKey"]
        )
        found |= tasks
        one_of |= inner_one_of
    return found, one_of


def training_tasks(spec: dict) -> dict[tuple[str, str], list]:
    """{(stage, "one node" | "multi-node"): chain} for the pretrain and SFT tasks."""
    found: dict[tuple[str, str], list] = {}
    for chain in container_tasks(spec):
        component = chain[-1][2]["componentRef"]["name"]
        stage = next((s for s in ("pretrain", "sft") if component.startswith(f"comp-{s}")), None)
        if stage is None:
            continue
        branch = {(ONE_NODE,): "one node", (MULTI_NODE,): "multi-node"}.get(tuple(conditions(chain)))
        assert branch, f"{chain[-1][1]} runs under {conditions(chain)}, not one num_nodes branch"
        assert (stage, branch) not in found, f"two {stage} tasks on the {branch} branch"
        found[(stage, branch)] = chain
    assert set(found) == {(s, b) for s in ("pretrain", "sft") for b in ("one node", "multi-node")}
    return found


def executor(spec: dict, chain) -> str:
    return spec["components"][chain[-1][2]["componentRef"]["name"]]["executorLabel"]


# --- the placement --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAIN_PIPELINES)
def test_one_node_trains_on_gpus_in_its_pod(compiled, name):
    spec, placement = compiled[name]
    for stage in ("pretrain", "sft"):
        chain = training_tasks(spec)[(stage, "one node")]
        label = executor(spec, chain)
        accelerator = spec["deploymentSpec"]["executors"][label]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == GPUS_PER_NODE
        assert producers(spec, chain, "pipelinechannel--gpus_per_node") == (
            {(PIPELINE, "gpus_per_node")},
            False,
        )
        assert placement[label]["nodeSelector"] == {
            "nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}
        }
        assert placement[label]["tolerations"] == [
            {"tolerationJson": {"componentInputParameter": "pipelinechannel--gpu_tolerations"}}
        ]
        for param in ("gpu_node_selector", "gpu_tolerations"):  # from the enclosing group's inputs
            assert group_input(spec, chain[:-1], f"pipelinechannel--{param}") == ({(PIPELINE, param)}, False)
        assert chain[-1][2]["retryPolicy"]["maxRetryCount"] >= 1  # preemptible GPU nodes


@pytest.mark.parametrize("name", TRAIN_PIPELINES)
def test_multi_node_launcher_holds_no_gpu(compiled, name):
    spec, placement = compiled[name]
    for stage in ("pretrain", "sft"):
        chain = training_tasks(spec)[(stage, "multi-node")]
        label = executor(spec, chain)
        resources = spec["deploymentSpec"]["executors"][label]["container"]["resources"]
        assert "accelerator" not in resources
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"]
        assert "nodeSelector" not in placement.get(label, {})
        assert "tolerations" not in placement.get(label, {})
        # a retried launcher re-attaches to the same job
        assert chain[-1][2]["retryPolicy"]["maxRetryCount"] >= 1
        assert "launcher" in chain[-1][2]["taskInfo"]["name"]
        # the job itself is sized by the same parameters
        for param in ("num_nodes", "gpus_per_node"):
            assert producers(spec, chain, param) == ({(PIPELINE, param)}, False), param


@pytest.mark.parametrize("name", TRAIN_PIPELINES)
def test_models_pass_on_through_one_of(compiled, name):
    spec, _ = compiled[name]
    tasks = training_tasks(spec)
    pretrained = {(tasks[("pretrain", b)][-1][1], "Output") for b in ("one node", "multi-node")}
    fine_tuned = {(tasks[("sft", b)][-1][1], "Output") for b in ("one node", "multi-node")}
    for branch in ("one node", "multi-node"):
        assert producers(spec, tasks[("sft", branch)], "init_from") == (pretrained, True)
    [evaluation] = [
        c for c in container_tasks(spec) if c[-1][2]["componentRef"]["name"] == "comp-evaluate-model"
    ]
    assert conditions(evaluation) == []  # runs whichever branch trained
    assert producers(spec, evaluation, "model") == (fine_tuned, True)
    container = spec["deploymentSpec"]["executors"][executor(spec, evaluation)]["container"]
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    assert "/synthvlm-eval:" in container["image"]  # the image with lmms-eval
