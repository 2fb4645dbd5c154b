import pytest

from synthvlm.errors import ConfigError
from synthvlm.stage import is_done
from synthvlm.train.components import run_stage, stage_inputs
from tests.train.helpers import caption_samples, tiny_config, write_json


class FakeMetrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, name, value):
        self.logged[name] = value


def test_stage_inputs_override_the_json_and_add_the_upstream_dataset():
    config_json = tiny_config("sft", gpus_per_node=8).model_dump_json()
    config, datasets = stage_inputs(
        "pretrain",
        config_json,
        '[{"uri": "gs://b/665k.json", "ratio": 0.5}]',
        4.0,
        1,
        "gs://b/export/x.json",
        "gs://b",
    )
    assert (config.stage, config.gpus_per_node, config.num_nodes) == ("pretrain", 4, 1)
    assert [(d.uri, d.image_folder, d.ratio) for d in datasets] == [
        ("gs://b/export/x.json", "gs://b", 1.0),
        ("gs://b/665k.json", None, 0.5),
    ]
    config, _ = stage_inputs("sft", "", "[]", 8, 2, "x.json", init_from="gs://b/stage1/model")
    assert (config.init_from, config.num_nodes, config.resolved().learning_rate) == (
        "gs://b/stage1/model",
        2,
        2e-5,
    )
    with pytest.raises(ConfigError, match="no datasets"):
        stage_inputs("sft", "{}", "[]", 1, 1)
    with pytest.raises(ConfigError, match="not valid JSON"):
        stage_inputs("sft", "{", "[]", 1, 1)


def test_pretrain_component_trains_and_logs_metrics(tmp_path):
    from components.train import pretrain

    data = write_json(tmp_path / "export" / "llava_pretrain.json", caption_samples(tmp_path))
    metrics = FakeMetrics()
    config_json = tiny_config("pretrain").model_dump_json()
    out = pretrain.python_func(
        config_json=config_json,
        datasets_json="[]",
        data_root=str(tmp_path / "root"),
        gpus_per_node=1,
        num_nodes=1,
        metrics=metrics,
        dataset_uri=data,
        image_folder=str(tmp_path),
    )
    assert is_done(out) and out.startswith(str(tmp_path / "root" / "train" / "pretrain"))
    assert metrics.logged["global_step"] == 4.0 and metrics.logged["count_in"] == 4.0
    # the cost of training: model loading and training measured, wall seconds x 1 requested GPU billed
    assert metrics.logged["load_seconds"] > 0 and metrics.logged["train_seconds"] > 0
    assert metrics.logged["billed_gpu_seconds"] == metrics.logged["seconds"]
    assert metrics.logged["cost_usd"] == pytest.approx(metrics.logged["seconds"] / 3600 * 3.0)


def test_components_compile_into_a_two_stage_pipeline(tmp_path):
    import yaml
    from kfp import compiler, dsl

    from components.train import pretrain, sft

    @dsl.pipeline(name="llava-train")
    def two_stages(export_json: str, data_root: str, sft_datasets: str):
        stage1 = pretrain(
            config_json="{}",
            datasets_json="[]",
            data_root=data_root,
            gpus_per_node=8,
            num_nodes=1,
            dataset_uri=export_json,
            image_folder=data_root,
        )
        sft(
            config_json="{}",
            init_from=stage1.outputs["Output"],
            datasets_json=sft_datasets,
            data_root=data_root,
            gpus_per_node=8,
            num_nodes=1,
        )

    path = tmp_path / "p.yaml"
    compiler.Compiler().compile(two_stages, package_path=str(path))
    spec = yaml.safe_load(path.read_text())
    assert {"comp-pretrain", "comp-sft"} <= set(spec["components"])
    image = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["image"]
    assert image.split("/")[-1].startswith("synthvlm-train:")


def test_run_stage_trains_into_the_stage_folder_of_the_data_root(monkeypatch):
    calls = []

    def fake_train(config, datasets, output_dir):
        calls.append((config, datasets, output_dir))
        return f"{output_dir}/model"

    monkeypatch.setattr("synthvlm.stages.train.train", fake_train)
    out = run_stage(
        "sft", "gs://b/run", "{}", "[]", 8, 1, "x.json", init_from="gs://b/run/train/pretrain/model"
    )
    ((config, datasets, output_dir),) = calls
    assert output_dir == "gs://b/run/train/sft" and out == "gs://b/run/train/sft/model"
    assert (config.stage, config.gpus_per_node, config.init_from) == (
        "sft",
        8,
        "gs://b/run/train/pretrain/model",
    )
    assert [d.uri for d in datasets] == ["x.json"]
