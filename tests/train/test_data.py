import json

import numpy as np
import pytest
import torch

from synthvlm.errors import InputError
from synthvlm.train.config import TrainDataset
from synthvlm.train.conversation import VICUNA_SYSTEM
from synthvlm.train.data import (
    IGNORE_INDEX,
    LlavaCollator,
    LlavaMixture,
    SampleTable,
    encode_sample,
    mixture_indices,
    parse_sample,
)
from synthvlm.train.model import build_tiny_llava, num_image_tokens
from tests.train.helpers import caption_samples, chat_samples, write_json

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
