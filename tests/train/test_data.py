import json

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from synthvlm.errors import InputError
from synthvlm.train.config import TrainDataset
from synthvlm.train.conversation import VICUNA_SYSTEM
from synthvlm.train.data import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaMixture,
    ModalityLengthGroupedSampler,
    SampleTable,
    encode_sample,
    mixture_indices,
    parse_sample,
    word_count,
)
from synthvlm.train.model import build_tiny_llava, num_image_tokens
from tests.train.helpers import caption_samples, chat_samples, text_samples, write_json

QUESTION = {"from": "human", "value": "q"}
ANSWER = {"from": "gpt", "value": "A"}
TOKENS_PER_IMAGE = 16  # tiny CLIP: 32 px / 8 px patches = 4 x 4


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava()


def encode(sample, processor, template="vicuna_v1", max_length=2048):
    return encode_sample(
        sample,
        processor.tokenizer,
        template=template,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        tokens_per_image=TOKENS_PER_IMAGE,
        max_length=max_length,
    )


def targets(encoded, tokenizer):
    """The trained-on text: consecutive label runs decoded, one string per run."""
    runs, current = [], []
    for label in encoded.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_labels_are_masked_except_the_answers(tmp_path, tiny):
    model, processor = tiny
    assert num_image_tokens(model.config) == TOKENS_PER_IMAGE
    sample = parse_sample(chat_samples(tmp_path)[0], "x.json", 0)
    encoded = encode(sample, processor)
    assert targets(encoded, processor.tokenizer) == ["Red.</s>", "No, it is bright.</s>"]
    ids = np.array(encoded.input_ids)
    image_id = model.config.image_token_index
    assert (ids == image_id).sum() == TOKENS_PER_IMAGE
    assert all(encoded.labels[i] == IGNORE_INDEX for i in np.flatnonzero(ids == image_id))
    text = processor.tokenizer.decode([i for i in encoded.input_ids if i != image_id])
    # the single image moved to the front of its turn, as LLaVA-1.5 does
    assert text == f"<s>{VICUNA_SYSTEM} USER: \nWhat colour is it? ASSISTANT: Red.</s>USER: Is it dark? " + (
        "ASSISTANT: No, it is bright.</s>"
    )


def test_plain_template_trains_on_the_caption_only(tmp_path, tiny):
    _, processor = tiny
    sample = parse_sample(caption_samples(tmp_path)[0], "x.json", 0)
    encoded = encode(sample, processor, template="plain")
    assert targets(encoded, processor.tokenizer) == ["A plain red square.\n"]
    assert encoded.input_ids[0] == processor.tokenizer.bos_token_id
    assert encoded.labels[: 1 + TOKENS_PER_IMAGE] == [IGNORE_INDEX] * (1 + TOKENS_PER_IMAGE)


def test_multi_image_sample_expands_every_image_in_order(tmp_path, tiny):
    model, processor = tiny
    sample = parse_sample(chat_samples(tmp_path)[1], "x.json", 1)
    assert sample.images == ("images/green.png", "images/blue.png")
    encoded = encode(sample, processor)
    ids = np.array(encoded.input_ids)
    assert (ids == model.config.image_token_index).sum() == 2 * TOKENS_PER_IMAGE
    assert encoded.num_images == 2
    assert targets(encoded, processor.tokenizer) == ["The first is green, the second blue.</s>"]


def test_truncation_never_cuts_an_image_block(tmp_path, tiny):
    _, processor = tiny
    sample = parse_sample(chat_samples(tmp_path)[1], "x.json", 1)
    full = encode(sample, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    second_start = [i for i, t in enumerate(full.input_ids) if t == image_id][TOKENS_PER_IMAGE]
    cut = encode(sample, processor, max_length=second_start + 3)  # inside the second image's block
    assert cut.truncated and cut.num_images == 1
    assert cut.input_ids == full.input_ids[:second_start]
    short = encode(sample, processor, max_length=len(full.input_ids) - 2)  # inside the answer
    assert short.num_images == 2 and len(short.input_ids) == len(full.input_ids) - 2


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (
            {
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "A"},
                ],
            },
            "2 '<image>'",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "followed by a gpt answer"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}, "alternate"),
        ({"conversations": [{"from": "bot", "value": "q"}]}, "'from'"),
        ({"conversations": []}, "conversations"),
        ({"image": 3, "conversations": [{"from": "human", "value": "q"}]}, "'image'"),
        (
            {
                "image": "a.png",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}],
            },
            "gpt turn",
        ),
    ],
)
def test_bad_samples_name_the_file_and_sample(sample, message):
    with pytest.raises(InputError, match=message) as info:
        parse_sample(sample, "data.json", 7)
    assert "data.json, sample 7" in str(info.value)


def test_images_without_tokens_go_in_front_of_the_first_turn():
    sample = parse_sample({"image": ["a.png", "b.png"], "conversations": [QUESTION, ANSWER]}, "x.json", 0)
    assert sample.turns[0].text == "<image>\n<image>\nq"


def test_sample_table_reads_json_and_jsonl_and_reports_bad_lines(tmp_path):
    samples = chat_samples(tmp_path)
    table = SampleTable(write_json(tmp_path / "d.json", samples))
    assert len(table) == 4 and table[1].images == ("images/green.png", "images/blue.png")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(s) for s in samples) + "\n{broken\n")
    with pytest.raises(InputError, match="line 5"):
        SampleTable(str(jsonl))


def test_mixture_ratios_are_deterministic():
    pairs = mixture_indices([10, 4], [0.5, 2.0], seed=3)
    counts = np.bincount(pairs[:, 0])
    assert counts.tolist() == [5, 8]
    assert len(set(pairs[pairs[:, 0] == 0][:, 1].tolist())) == 5  # a half, without repeats
    assert sorted(pairs[pairs[:, 0] == 1][:, 1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert np.array_equal(pairs, mixture_indices([10, 4], [0.5, 2.0], seed=3))
    assert not np.array_equal(pairs, mixture_indices([10, 4], [0.5, 2.0], seed=4))


def test_mixture_items_collate_into_a_batch_the_model_accepts(tmp_path, tiny):
    model, processor = tiny
    datasets = [
        TrainDataset(uri=write_json(tmp_path / "chat.json", chat_samples(tmp_path)), name="chat"),
        TrainDataset(uri=write_json(tmp_path / "cap.json", caption_samples(tmp_path)), ratio=0.5, name="cap"),
    ]
    mixture = LlavaMixture(
        datasets,
        processor,
        template="vicuna_v1",
        image_token_id=model.config.image_token_index,
        tokens_per_image=TOKENS_PER_IMAGE,
        max_length=2048,
    )
    assert len(mixture) == 6 and mixture.counts() == {"chat": 4, "cap": 2}
    items = [mixture[i] for i in range(len(mixture))]
    batch = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    n_images = sum(len(mixture.sample(i)[1].images) for i in range(len(mixture)))
    assert batch["pixel_values"].shape == (n_images, 3, 32, 32)
    longest = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (6, longest)
    assert batch["attention_mask"].sum().item() == sum(len(i["input_ids"]) for i in items)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_images_are_padded_to_square_with_the_mean_colour(tmp_path, tiny):
    model, processor = tiny
    datasets = [TrainDataset(uri=write_json(tmp_path / "cap.json", caption_samples(tmp_path)))]
    mixture = LlavaMixture(
        datasets,
        processor,
        template="plain",
        image_token_id=model.config.image_token_index,
        tokens_per_image=16,
        max_length=2048,
    )
    item = next(mixture[i] for i in range(len(mixture)) if mixture.sample(i)[1].id == "cap-white")
    pixels = item["pixel_values"][0]  # a 48 x 16 white image: padded above and below
    assert pixels[:, 0, 16].abs().max() < 0.05  # the mean colour normalises to ~0
    assert (pixels[:, 16, 16] > 1.5).all()  # white normalises to well above 0


def test_plain_template_refuses_conversations_and_missing_images_fail_clearly(tmp_path, tiny):
    model, processor = tiny
    kwargs = dict(image_token_id=model.config.image_token_index, tokens_per_image=16, max_length=2048)
    chat = [TrainDataset(uri=write_json(tmp_path / "chat.json", chat_samples(tmp_path)))]
    with pytest.raises(InputError, match="plain"):
        LlavaMixture(chat, processor, template="plain", **kwargs)
    missing = [
        TrainDataset(uri=write_json(tmp_path / "x.json", caption_samples(tmp_path)), image_folder="/nope")
    ]
    mixture = LlavaMixture(missing, processor, template="plain", **kwargs)
    with pytest.raises(InputError, match="cannot read image"):
        mixture[0]


# ---------------------------------------------------------------- grouping by modality and length


def mixed_data(n: int = 203, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, has_image) of n samples, ~60% with an image (576 tokens + text), the rest text-only."""
    rng = np.random.default_rng(seed)
    has_image = rng.random(n) < 0.6
    return rng.integers(5, 800, n) + 576 * has_image, has_image


def batches_of(order, size: int) -> list[np.ndarray]:
    order = np.asarray(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def padding(order, lengths: np.ndarray, batch_size: int) -> int:
    """Pad tokens a right-padding collator adds over the epoch's batches."""
    return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in batches_of(order, batch_size))


def is_mixed(batch: np.ndarray, has_image: np.ndarray) -> bool:
    return len(set(has_image[batch].tolist())) > 1


def test_every_global_batch_has_one_modality_and_every_sample_comes_once():
    lengths, has_image = mixed_data()
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, group_batches=3, seed=42)
    order = list(sampler)
    assert len(sampler) == len(order) and sorted(order) == list(range(len(lengths)))
    batches = batches_of(order, 4)
    mixed = [i for i, b in enumerate(batches) if is_mixed(b, has_image)]
    assert set(mixed) <= {len(batches) - 2, len(batches) - 1}  # only the leftovers, at the very end
    modality = [bool(has_image[b[0]]) for b in batches[:-2]]
    assert sum(a != b for a, b in zip(modality, modality[1:], strict=False)) > 5  # modalities interleave
    # whole optimizer steps (3 batches of 4) first: one modality each, longest sample first
    whole_steps = int(has_image.sum()) // 12 + int((~has_image).sum()) // 12
    for step in batches_of(order[: whole_steps * 12], 12):
        assert not is_mixed(step, has_image)
        assert (np.diff(lengths[step]) <= 0).all()


def test_accelerate_hands_each_rank_its_slice_of_every_global_batch():
    """What the Trainer's DataLoader + accelerate's BatchSamplerShard do with the order under DDP/FSDP."""
    lengths, has_image = mixed_data()
    per_device, world = 2, 3
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=per_device * world, seed=1)
    order = sampler.order()
    ranks = [
        list(BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), world, rank))
        for rank in range(world)
    ]
    steps = list(zip(*ranks, strict=True))
    whole = len(order) // (per_device * world)
    for j, per_rank in enumerate(steps[:whole]):
        assert np.concatenate(per_rank).tolist() == order[j * 6 : (j + 1) * 6].tolist()
    mixed = [j for j, per_rank in enumerate(steps) if is_mixed(np.concatenate(per_rank), has_image)]
    assert set(mixed) <= {len(steps) - 2, len(steps) - 1}


def test_the_order_depends_only_on_seed_and_epoch():
    lengths, has_image = mixed_data()

    def order(seed: int, epoch: int) -> list[int]:
        sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, group_batches=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(42, 0) == order(42, 0)
    assert order(42, 1) == order(42, 1) != order(42, 0)
    assert order(7, 0) != order(42, 0)


def test_length_grouping_cuts_padding():
    lengths, has_image = mixed_data()
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, group_batches=8, seed=3)
    shuffled = np.random.default_rng(3).permutation(len(lengths))
    assert padding(sampler.order(), lengths, 4) < padding(shuffled, lengths, 4) / 3


@pytest.mark.parametrize(
    ("n", "image_share", "batch_size", "group_batches"),
    [(7, 1.0, 2, 3), (7, 0.0, 2, 3), (5, 0.5, 8, 2), (1, 1.0, 4, 1), (23, 0.3, 3, 2)],
)
def test_one_modality_and_sizes_that_do_not_divide(n, image_share, batch_size, group_batches):
    lengths = np.arange(n) * 7 % 11
    has_image = np.arange(n) < round(image_share * n)
    sampler = ModalityLengthGroupedSampler(
        lengths, has_image, batch_size=batch_size, group_batches=group_batches
    )
    order = sampler.order()
    assert sorted(order.tolist()) == list(range(n))
    batches = batches_of(order, batch_size)
    assert all(not is_mixed(b, has_image) for b in batches[:-2])
    step = batch_size * group_batches
    if image_share in (0.0, 1.0) and n >= step:
        assert (np.diff(lengths[order[:step]]) <= 0).all()


def test_mixture_lengths_follow_the_epochs_sample_list(tmp_path, tiny):
    model, processor = tiny
    datasets = [
        TrainDataset(uri=write_json(tmp_path / "chat.json", chat_samples(tmp_path)), ratio=2.0),
        TrainDataset(uri=write_json(tmp_path / "text.json", text_samples(6)), ratio=0.5),
    ]
    mixture = LlavaMixture(
        datasets,
        processor,
        template="vicuna_v1",
        image_token_id=model.config.image_token_index,
        tokens_per_image=TOKENS_PER_IMAGE,
        max_length=2048,
    )
    lengths, has_image = mixture.modality_lengths()
    assert len(lengths) == len(has_image) == len(mixture) == 11
    samples = [mixture.sample(i)[1] for i in range(len(mixture))]
    assert has_image.tolist() == [bool(s.images) for s in samples]
    expected = {"two-images": 4 + 7 + 2 * TOKENS_PER_IMAGE, "text-only": 4, "single": 6 + TOKENS_PER_IMAGE}
    for length, sample in zip(lengths, samples, strict=True):
        assert length == expected.get(sample.id, word_count(sample) + TOKENS_PER_IMAGE * len(sample.images))
    # within a modality the estimate orders samples as their real token counts do
    tokens = np.array([len(mixture[i]["input_ids"]) for i in range(len(mixture))])
    for modality in (has_image, ~has_image):
        est, real = lengths[modality], tokens[modality]
        longer = est[:, None] > est[None, :]
        assert (real[:, None] > real[None, :])[longer].all()
