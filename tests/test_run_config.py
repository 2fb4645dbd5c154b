"""The run form: typed pipeline parameters for the settings users change most, stage JSON for the rest."""

from __future__ import annotations

import json

import pytest

from synthvlm.errors import ConfigError
from synthvlm.run_config import (
    FORM_FIELDS,
    RUN_CONFIGS,
    StableLLaVARunConfig,
    SynthVLMRunConfig,
    from_pipeline_arguments,
    preset,
    to_pipeline_arguments,
    validated_stage_configs,
)


@pytest.mark.parametrize("pipeline", ["synthvlm", "stablellava"])
def test_demo_and_paper_configs_round_trip_through_the_form(pipeline):
    cls = RUN_CONFIGS[pipeline]
    for name in ("paper", "demo"):
        config = cls.model_validate({**preset(name, pipeline), "data_root": "/tmp/x"})
        assert from_pipeline_arguments(to_pipeline_arguments(config), cls) == config


def test_typed_parameter_sets_its_fields_and_leaves_the_stage_json():
    args = to_pipeline_arguments(SynthVLMRunConfig(data_root="/d"))
    assert "steps" not in json.loads(args["generate_config"])
    config = from_pipeline_arguments({**args, "steps": 7, "resolution": 512, "clip_pretrained": ""})
    assert config.generate.steps == 7
    assert (config.generate.height, config.generate.width) == (512, 512)
    assert config.score.pretrained is None  # "" stands for None


def test_a_stage_json_value_wins_over_the_typed_parameter():
    """Experts can still set one stage apart: e.g. a non-square size, or another LLM for one stage."""
    config = SynthVLMRunConfig(data_root="/d")
    config.generate.width = 768
    args = to_pipeline_arguments(config)
    assert args["resolution"] == 1024 and json.loads(args["generate_config"])["width"] == 768
    assert from_pipeline_arguments(args) == config


def test_one_llm_parameter_serves_every_stablellava_llm_stage():
    args = to_pipeline_arguments(StableLLaVARunConfig(data_root="/d"))
    args.update(llm_base_url="http://vllm:8000/v1", llm_model="qwen", abilities=["colour"])
    config = from_pipeline_arguments(args, StableLLaVARunConfig)
    for stage in (config.keywords, config.prompts, config.dialogues):
        assert (stage.llm.base_url, stage.llm.model) == ("http://vllm:8000/v1", "qwen")
    assert config.keywords.abilities == config.prompts.abilities == ["colour"]
    assert from_pipeline_arguments({**args, "abilities": []}, StableLLaVARunConfig).prompts.abilities is None


def test_bad_typed_value_names_the_field():
    args = to_pipeline_arguments(SynthVLMRunConfig(data_root="/d"))
    with pytest.raises(ConfigError, match="generate.steps"):
        from_pipeline_arguments({**args, "steps": 0})


def test_validation_task_hands_each_stage_its_effective_config():
    args = {**to_pipeline_arguments(SynthVLMRunConfig(data_root="/d")), "steps": 9}
    configs = validated_stage_configs(args, "synthvlm")
    assert list(configs) == [
        f"{s}_config" for s in ("curate", "generate", "score", "select", "export", "report")
    ]
    assert json.loads(configs["generate_config"])["steps"] == 9


def test_every_form_field_points_at_real_fields():
    for pipeline, fields in FORM_FIELDS.items():
        data = RUN_CONFIGS[pipeline].model_construct().model_dump()  # unvalidated: train needs datasets
        for field in fields:
            for path in field.paths:
                node = data
                for part in path.split("."):
                    assert part in node, f"{pipeline}: {field.name} -> {path}"
                    node = node[part]
