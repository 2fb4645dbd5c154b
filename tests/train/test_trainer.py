"""Training runs of the tiny LLaVA on CPU: what trains, loss, checkpoints, resume, the saved model."""

from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from synthvlm.train.config import TrainDataset
from synthvlm.train.model import build_tiny_llava
from synthvlm.train.trainer import TRAINABLE_WEIGHTS, LlavaTrainer, run_training
from tests.train.helpers import caption_samples, chat_samples, tiny_config, write_json


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-data")
    return {
        "captions": [TrainDataset(uri=write_json(root / "captions.json", caption_samples(root)))],
        "chat": [TrainDataset(uri=write_json(root / "chat.json", chat_samples(root)))],
    }


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    stats = run_training(tiny_config("pretrain"), data["captions"], str(out))
    return out, stats


def changed_parts(before: dict, after: dict) -> set[str]:
    """Top-level parts (vision_tower, multi_modal_projector, language_model, lm_head) with changed weights."""
    parts = set()
    for key, value in before.items():
        if not torch.equal(value, after[key].to(value.dtype)):
            parts.add(key.split(".")[1] if key.startswith("model.") else key.split(".")[0])
    return parts


def test_stage1_changes_only_the_projector_and_saves_a_loadable_model(stage1):
    out, stats = stage1
    assert stats["global_step"] == 4 and stats["distributed"] == "none"
    initial, _ = build_tiny_llava()  # the same seed: the weights training started from
    trained = LlavaForConditionalGeneration.from_pretrained(out / "model")
    assert changed_parts(initial.state_dict(), trained.state_dict()) == {"multi_modal_projector"}
    processor = AutoProcessor.from_pretrained(out / "model")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == trained.config.image_token_index
    assert stats["last_logged_loss"] < stats["first_logged_loss"]


def test_stage1_checkpoints_hold_only_the_projector(stage1):
    out, _ = stage1
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()
    weights = safetensors.torch.load_file(checkpoint / TRAINABLE_WEIGHTS)
    assert weights and all(k.startswith("model.multi_modal_projector.") for k in weights)


def test_stage2_from_stage1_trains_llm_and_projector_not_the_vision_tower(stage1, data, tmp_path):
    stage1_dir, _ = stage1
    config = tiny_config("sft", tiny=False, init_from=str(stage1_dir / "model"), num_train_epochs=3)
    stats = run_training(config, data["chat"], str(tmp_path))
    before = LlavaForConditionalGeneration.from_pretrained(stage1_dir / "model").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model").state_dict()
    assert changed_parts(before, after) == {"multi_modal_projector", "language_model", "lm_head"}
    assert stats["trainable_parameters"] < stats["total_parameters"]
    assert stats["last_logged_loss"] < stats["first_logged_loss"] - 0.5  # the LLM learns the answers


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(stage, data, tmp_path, monkeypatch):
    datasets = data["captions"] if stage == "pretrain" else data["chat"]
    reference = run_training(tiny_config(stage), datasets, str(tmp_path / "reference"))

    original = LlavaTrainer.training_step

    def preempted_after_step_2(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("preempted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaTrainer, "training_step", preempted_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(tiny_config(stage), datasets, str(tmp_path / "run"))
    monkeypatch.setattr(LlavaTrainer, "training_step", original)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]

    resumed = run_training(tiny_config(stage), datasets, str(tmp_path / "run"))
    assert resumed["resumed_from"] == "checkpoint-2"
    assert resumed["global_step"] == reference["global_step"] == 4
    expected = LlavaForConditionalGeneration.from_pretrained(tmp_path / "reference" / "model").state_dict()
    got = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert changed_parts(expected, got) == set()


def test_gradient_accumulation_makes_the_global_batch(data, tmp_path):
    config = tiny_config("pretrain", global_batch_size=4, per_device_batch_size=2, num_train_epochs=1)
    stats = run_training(config, data["captions"], str(tmp_path))
    assert stats["global_step"] == 1  # 4 samples, one optimizer step of 4
    assert Path(tmp_path / "model" / "config.json").is_file()
