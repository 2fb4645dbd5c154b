"""Training runs of the tiny LLaVA on CPU: what trains, loss, checkpoints, resume, the saved model."""

from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers.trainer
from transformers import AutoProcessor, LlavaForConditionalGeneration

from synthvlm.train.config import TrainDataset
from synthvlm.train.data import LlavaCollator, LlavaMixture, ModalityLengthGroupedSampler
from synthvlm.train.model import build_tiny_llava
from synthvlm.train.trainer import (
    TRAINABLE_WEIGHTS,
    LlavaTrainer,
    check_fsdp_enabled,
    innermost_sampler,
    run_training,
)
from tests.train.helpers import caption_samples, chat_samples, text_samples, tiny_config, write_json


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-data")
    return {
        "captions": [TrainDataset(uri=write_json(root / "captions.json", caption_samples(root)))],
        "chat": [TrainDataset(uri=write_json(root / "chat.json", chat_samples(root)))],
        # 3 samples with images, 1 + 5 text-only
        "mixed": [
            TrainDataset(uri=write_json(root / "chat.json", chat_samples(root))),
            TrainDataset(uri=write_json(root / "text.json", text_samples(5))),
        ],
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


def mixed_config(**overrides):
    """SFT on the 9 mixed samples: global batch 4 = 2 per device x 2 accumulation, 3 steps an epoch."""
    return tiny_config("sft", global_batch_size=4, per_device_batch_size=2, **overrides)


def spy_on_batches(monkeypatch) -> tuple[list[int], list[set[bool]]]:
    """(dataset indices read, in order; per collated batch the set of 'has an image' of its samples)."""
    indices: list[int] = []
    modalities: list[set[bool]] = []
    getitem, collate = LlavaMixture.__getitem__, LlavaCollator.__call__

    def spy_getitem(self, i):
        indices.append(int(i))
        return getitem(self, i)

    def spy_collate(self, features):
        modalities.append({"pixel_values" in f for f in features})
        return collate(self, features)

    monkeypatch.setattr(LlavaMixture, "__getitem__", spy_getitem)
    monkeypatch.setattr(LlavaCollator, "__call__", spy_collate)
    return indices, modalities


def expected_order(datasets, seed: int, epochs: int) -> list[int]:
    """The sampler's order of each epoch, from a mixture built like run_training's."""
    model, processor = build_tiny_llava()
    mixture = LlavaMixture(
        datasets,
        processor,
        template="vicuna_v1",
        image_token_id=model.config.image_token_index,
        tokens_per_image=16,
        max_length=2048,
    )
    sampler = ModalityLengthGroupedSampler(
        *mixture.modality_lengths(), batch_size=2, group_batches=2, seed=seed
    )
    order = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order += list(sampler)
    return order


@pytest.mark.parametrize("grouped", [True, False])
def test_group_by_modality_length_trains_on_single_modality_batches(grouped, data, tmp_path, monkeypatch):
    indices, modalities = spy_on_batches(monkeypatch)
    config = mixed_config(group_by_modality_length=grouped)
    stats = run_training(config, data["mixed"], str(tmp_path))
    assert stats["samples_per_epoch"] == 9 and stats["global_step"] == 6
    assert stats["group_by_modality_length"] is grouped
    assert len(modalities) == 10  # 5 micro-batches (4 x 2 + 1) a epoch, 2 epochs
    if not grouped:
        assert any(len(m) > 1 for m in modalities)  # the random order mixes: the check below can fail
        return
    assert all(len(m) == 1 for m in modalities) and {True} in modalities and {False} in modalities
    order = expected_order(data["mixed"], config.seed, epochs=2)
    assert indices == order and order[:9] != order[9:]  # each epoch's own order, read as it is


def test_stage_defaults_turn_grouping_on_for_sft_only(stage1):
    _, stats = stage1
    assert stats["group_by_modality_length"] is False


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "random-order"])
def test_resume_mid_epoch_keeps_the_epoch_order(grouped, data, tmp_path, monkeypatch):
    # checkpoint-4: one optimizer step into the second epoch
    config = mixed_config(save_steps=2, group_by_modality_length=grouped)
    reference = run_training(config, data["mixed"], str(tmp_path / "reference"))

    original = LlavaTrainer.training_step

    def preempted_after_step_4(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("preempted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaTrainer, "training_step", preempted_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_training(config, data["mixed"], str(tmp_path / "run"))
    monkeypatch.setattr(LlavaTrainer, "training_step", original)

    # As with several processes, where accelerate's set_epoch cannot reach the sampler behind the
    # skipped batches: the resumed epoch must still read its own order, not epoch 0's.
    skip = transformers.trainer.skip_first_batches

    def skip_hiding_the_sampler(loader, num_batches):
        skipped = skip(loader, num_batches)
        skipped.set_epoch = lambda epoch: None
        return skipped

    monkeypatch.setattr(transformers.trainer, "skip_first_batches", skip_hiding_the_sampler)
    resumed = run_training(config, data["mixed"], str(tmp_path / "run"))
    assert resumed["resumed_from"] == "checkpoint-4"
    assert resumed["global_step"] == reference["global_step"] == 6
    expected = LlavaForConditionalGeneration.from_pretrained(tmp_path / "reference" / "model").state_dict()
    got = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert changed_parts(expected, got) == set()


def test_fsdp_that_accelerate_did_not_enable_fails_on_a_gpu_and_warns_on_cpu(caplog):
    with pytest.raises(RuntimeError, match="FSDP was requested"):
        check_fsdp_enabled("fsdp", False, torch.device("cuda", 0))
    with caplog.at_level("WARNING", logger="synthvlm.train.trainer"):
        check_fsdp_enabled("fsdp", False, torch.device("cpu"))
    assert "no FSDP on cpu" in caplog.text
    check_fsdp_enabled("fsdp", True, torch.device("cuda", 0))
    check_fsdp_enabled("ddp", False, torch.device("cuda", 0))


def test_innermost_sampler_is_found_under_accelerates_shard_and_skip_wrappers():
    """The multi-process resume layout: SkipBatchSampler(BatchSamplerShard(BatchSampler(sampler)))."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, SkipBatchSampler
    from torch.utils.data import BatchSampler, DataLoader

    sampler = ModalityLengthGroupedSampler([3, 1, 2, 5], [True, False, True, False], batch_size=2, seed=0)
    shard = BatchSamplerShard(BatchSampler(sampler, 1, False), num_processes=2, process_index=1)
    loader = DataLoaderShard(list(range(4)), batch_sampler=SkipBatchSampler(shard, 1))
    assert innermost_sampler(loader) is sampler
    assert innermost_sampler(DataLoader(list(range(4)), sampler=sampler)) is sampler
    assert innermost_sampler(object()) is None
