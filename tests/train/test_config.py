import pytest

from synthvlm.config import build_config
from synthvlm.errors import ConfigError
from synthvlm.train.config import STAGE_DEFAULTS, TrainConfig, TrainDataset, parse_datasets


def test_stage_defaults_follow_llava_1_5():
    pre = TrainConfig(stage="pretrain").resolved()
    sft = TrainConfig(stage="sft").resolved()
    assert (pre.learning_rate, pre.global_batch_size, pre.template) == (1e-3, 256, "plain")
    assert (sft.learning_rate, sft.global_batch_size, sft.template) == (2e-5, 128, "vicuna_v1")
    assert pre.warmup_ratio == sft.warmup_ratio == 0.03 and pre.lr_scheduler == "cosine"
    assert pre.num_train_epochs == 1 and pre.max_length == 2048
    assert (pre.vision_tower, pre.llm) == ("openai/clip-vit-large-patch14-336", "lmsys/vicuna-7b-v1.5")
    assert (pre.distributed, sft.distributed) == ("ddp", "fsdp")
    assert sft.gradient_checkpointing and not pre.gradient_checkpointing
    assert sft.group_by_modality_length is True and pre.group_by_modality_length is False


def test_group_by_modality_length_can_be_set_either_way():
    sft_off = TrainConfig(stage="sft", group_by_modality_length=False).resolved()
    pretrain_on = TrainConfig(stage="pretrain", group_by_modality_length=True).resolved()
    assert sft_off.group_by_modality_length is False and pretrain_on.group_by_modality_length is True
    assert TrainConfig(stage="sft").group_by_modality_length is None  # unresolved: the stage decides


def test_explicit_values_win_and_a_dumped_config_does_not_leak_stage_values():
    config = TrainConfig(stage="pretrain", learning_rate=5e-4)
    assert config.resolved().learning_rate == 5e-4
    dumped = TrainConfig(stage="pretrain").model_dump()
    sft = TrainConfig.model_validate({**dumped, "stage": "sft"}).resolved()
    assert sft.learning_rate == STAGE_DEFAULTS["sft"]["learning_rate"]


def test_batch_plan_makes_the_global_batch():
    config = TrainConfig(stage="pretrain", gpus_per_node=8)
    assert config.batch_plan() == (16, 2)  # 16 x 2 x 8 = 256
    assert TrainConfig(stage="sft", gpus_per_node=8).batch_plan() == (16, 1)  # LLaVA-1.5 finetune: 16 x 8
    assert TrainConfig(stage="sft", gpus_per_node=8, num_nodes=4).batch_plan() == (4, 1)  # 4 x 32 = 128
    assert TrainConfig(stage="pretrain").batch_plan() == (16, 16)  # one GPU accumulates
    with pytest.raises(ConfigError, match="multiple"):
        TrainConfig(stage="sft", gpus_per_node=3).batch_plan()


def test_unknown_field_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="unknown field"):
        build_config(TrainConfig, sets=["lr=1"])
    with pytest.raises(ConfigError, match="stage"):
        build_config(TrainConfig, sets=["stage=finetune"])
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        build_config(TrainConfig, sets=["vision_feature_layer=0"])


def test_dataset_specs():
    spec = TrainDataset.from_spec("json=gs://b/x.json,images=gs://b/img,ratio=0.5,name=synth")
    assert (spec.uri, spec.image_folder, spec.ratio, spec.name) == (
        "gs://b/x.json",
        "gs://b/img",
        0.5,
        "synth",
    )
    assert TrainDataset.from_spec("data/x.json").display_name() == "x.json"
    with pytest.raises(ConfigError, match="ratio"):
        TrainDataset.from_spec("json=x.json,ratio=0")
    sets = parse_datasets('["a.json", {"uri": "b.json", "ratio": 2}]')
    assert [(d.uri, d.ratio) for d in sets] == [("a.json", 1.0), ("b.json", 2.0)]
    with pytest.raises(ConfigError, match="datasets"):
        parse_datasets("[]")
