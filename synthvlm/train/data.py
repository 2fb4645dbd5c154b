"""LLaVA-format training data: reading and validating the JSON, tokenising with masked labels, images,
mixing several datasets with ratios, and batching.

A sample is LLaVA's JSON object: `{"id", "image": str | [str, ...] (optional), "conversations":
[{"from": "human"|"gpt", "value": str}, ...]}`; each `<image>` in the text marks where an image goes
(several for multi-image samples). Labels are -100 everywhere except the assistant answers, so image
placeholders, the system prompt and the questions never contribute to the loss.

Truncation policy (max_length counts tokens after each `<image>` has become its 576 placeholders): the
first max_length tokens are kept; an image whose placeholder block would be cut is dropped together with
everything after it (a partial block would not match the image's features), and images beyond the cut
are not loaded. Samples are validated in full when a dataset is opened, so a bad sample fails the run
before any GPU time is spent, naming the file, the sample and the field.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor, PreTrainedTokenizerBase

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.train.config import TrainDataset
from synthvlm.train.conversation import (
    ASSISTANT,
    IMAGE_TOKEN,
    ROLE_ALIASES,
    USER,
    Template,
    Turn,
    render,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels the loss skips (transformers' and LLaVA's convention)


@dataclass(frozen=True)
class LlavaSample:
    id: str
    images: tuple[str, ...]  # paths relative to the dataset's image folder, in <image> order
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int  # images whose placeholders survived truncation (the first num_images)
    truncated: bool


# ---------------------------------------------------------------- parsing and validation


def _bad(where: str, index: int, message: str, field: str | None = "conversations") -> InputError:
    return InputError(where, message, line=index, field=field, unit="sample")


def _images_of(obj: dict[str, Any], where: str, index: int) -> tuple[str, ...]:
    image = obj.get("image")
    if image is None:
        return ()
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not images or not all(isinstance(x, str) and x for x in images):
        raise _bad(where, index, "'image' must be a non-empty string or list of strings", field="image")
    return tuple(images)


def _turns_of(obj: dict[str, Any], where: str, index: int) -> list[Turn]:
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise _bad(where, index, "missing or empty 'conversations' list")
    turns = []
    for j, message in enumerate(convs):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            raise _bad(where, index, f"turn {j} needs a string 'value'")
        role = ROLE_ALIASES.get(str(message.get("from", "")).lower())
        if role is None:
            allowed = sorted(ROLE_ALIASES)
            got = message.get("from")
            raise _bad(where, index, f"turn {j} has 'from' {got!r}; expected one of {allowed}")
        turns.append(Turn(role, message["value"]))
    # LLaVA's preprocess skips a leading assistant turn; then roles must alternate user/assistant.
    if turns[0].role == ASSISTANT:
        turns = turns[1:]
    for j, turn in enumerate(turns):
        if turn.role != (USER if j % 2 == 0 else ASSISTANT):
            raise _bad(where, index, "turns must alternate human/gpt")
    if len(turns) < 2 or turns[-1].role != ASSISTANT:
        raise _bad(where, index, "needs at least one human turn followed by a gpt answer")
    return turns


def _place_images(turns: list[Turn], num_images: int, where: str, index: int) -> list[Turn]:
    """Check the <image> count; with none in the text, put them at the start of the first turn.

    LLaVA-1.5 moves a single image's token to the front of its turn ("<image>\\n" + text); several images
    keep the positions the data gives them.
    """
    count = sum(t.text.count(IMAGE_TOKEN) for t in turns)
    if count == 0 and num_images:
        return [Turn(USER, f"{IMAGE_TOKEN}\n" * num_images + turns[0].text), *turns[1:]]
    if count != num_images:
        raise _bad(where, index, f"{count} '{IMAGE_TOKEN}' token(s) in the text but {num_images} image(s)")
    if num_images == 1:
        first = next(i for i, t in enumerate(turns) if IMAGE_TOKEN in t.text)
        if turns[first].role != USER:
            raise _bad(where, index, f"'{IMAGE_TOKEN}' is in a gpt turn")
        text = turns[first].text.replace(IMAGE_TOKEN, "").strip()
        turns = [*turns[:first], Turn(USER, f"{IMAGE_TOKEN}\n{text}"), *turns[first + 1 :]]
    return turns


def parse_sample(obj: Any, where: str, index: int) -> LlavaSample:
    if not isinstance(obj, dict):
        raise _bad(where, index, "a sample must be a JSON object", field=None)
    images = _images_of(obj, where, index)
    turns = _place_images(_turns_of(obj, where, index), len(images), where, index)
    return LlavaSample(id=str(obj.get("id", index)), images=images, turns=tuple(turns))


def _load_objects(uri: str) -> list[Any]:
    text = storage.read_text(uri)
    if uri.endswith(".jsonl"):
        objects = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    objects.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(uri, f"not valid JSON: {exc.msg}", line=line_no) from None
        return objects
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(uri, f"not valid JSON: {exc.msg}", line=exc.lineno) from None
    if not isinstance(data, list):
        raise InputError(uri, f"expected a JSON list of samples, got {type(data).__name__}")
    return data


def word_count(sample: LlavaSample) -> int:
    """Whitespace-separated words of all turns, `<image>` markers excluded (LLaVA's length estimate)."""
    return sum(len(turn.text.replace(IMAGE_TOKEN, " ").split()) for turn in sample.turns)


class SampleTable:
    """The validated samples of one LLaVA JSON, packed into one byte buffer.

    665K Python dicts would be copied page by page into every DataLoader worker (reference counts touch
    them); one numpy buffer + offsets is shared copy-on-write untouched.
    """

    def __init__(self, uri: str):
        self.uri = uri
        blobs = []
        num_turns = []
        num_words = []
        num_images = []
        for index, obj in enumerate(_load_objects(uri)):
            sample = parse_sample(obj, uri, index)
            num_turns.append(len(sample.turns))
            num_words.append(word_count(sample))
            num_images.append(len(sample.images))
            blobs.append(
                json.dumps(
                    [sample.id, list(sample.images), [[t.role, t.text] for t in sample.turns]],
                    ensure_ascii=False,
                ).encode()
            )
        if not blobs:
            raise InputError(uri, "the dataset has no samples")
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self.num_turns = np.array(num_turns, dtype=np.int32)
        # Per-sample length and modality for length grouping, known without tokenising or loading images.
        self.num_words = np.array(num_words, dtype=np.int32)
        self.num_images = np.array(num_images, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> LlavaSample:
        raw = self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes()
        sample_id, images, turns = json.loads(raw)
        return LlavaSample(sample_id, tuple(images), tuple(Turn(r, t) for r, t in turns))


# ---------------------------------------------------------------- tokenisation


def _target_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for tokens whose characters overlap an answer span (both lists ascending)."""
    mask = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(end > start and k < len(spans) and spans[k][0] < end)
    return mask


def encode_sample(
    sample: LlavaSample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    image_token_id: int,
    tokens_per_image: int,
    max_length: int,
) -> Encoded:
    """Token ids with each <image> expanded to its placeholders, labels = ids on answers else -100."""
    rendered = render(
        template, sample.turns, eos_token=str(tokenizer.eos_token), num_images=len(sample.images)
    )
    enc = tokenizer(rendered.text, return_offsets_mapping=True, add_special_tokens=True)
    is_target = _target_mask(enc["offset_mapping"], rendered.answer_spans)
    input_ids: list[int] = []
    labels: list[int] = []
    blocks: list[tuple[int, int]] = []  # placeholder [start, end) per image
    for token, target in zip(enc["input_ids"], is_target, strict=True):
        if token == image_token_id:
            blocks.append((len(input_ids), len(input_ids) + tokens_per_image))
            input_ids.extend([image_token_id] * tokens_per_image)
            labels.extend([IGNORE_INDEX] * tokens_per_image)
        else:
            input_ids.append(token)
            labels.append(token if target else IGNORE_INDEX)
    truncated = len(input_ids) > max_length
    if truncated:
        cut = max_length
        for start, end in blocks:
            if start < cut < end:
                cut = start
                break
        input_ids, labels = input_ids[:cut], labels[:cut]
    kept = sum(1 for _, end in blocks if end <= len(input_ids))
    return Encoded(input_ids, labels, kept, truncated)


# ---------------------------------------------------------------- images


def load_image(uri: str) -> Image.Image:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        return image.convert("RGB")


def _image_folder(dataset: TrainDataset) -> str:
    if dataset.image_folder is not None:
        return dataset.image_folder
    return dataset.uri.rsplit("/", 1)[0] if "/" in dataset.uri else "."


# ---------------------------------------------------------------- mixture


def mixture_indices(sizes: Sequence[int], ratios: Sequence[float], seed: int) -> np.ndarray:
    """(source, sample) pairs of one epoch: round(ratio x size) draws per source, shuffled with `seed`.

    The whole part of a ratio repeats every sample; the fractional part draws a seeded subset without
    replacement. The same (sizes, ratios, seed) always give the same order.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for source, (size, ratio) in enumerate(zip(sizes, ratios, strict=True)):
        whole, frac = int(ratio), ratio - int(ratio)
        picks = [np.tile(np.arange(size), whole)]
        extra = round(frac * size)
        if extra:
            picks.append(np.sort(rng.choice(size, size=extra, replace=False)))
        chosen = np.concatenate(picks)
        parts.append(np.stack([np.full(len(chosen), source), chosen], axis=1))
    pairs = np.concatenate(parts).astype(np.int64)
    return pairs[rng.permutation(len(pairs))]


def _check_single_turn(tables: Sequence[SampleTable]) -> None:
    """The plain (pretraining) template takes one question and one answer per sample."""
    for table in tables:
        bad = np.flatnonzero(table.num_turns != 2)
        if len(bad):
            raise InputError(
                table.uri,
                f"{len(bad)} sample(s) have more than one question/answer round; the 'plain' pretraining "
                "template needs exactly one (use template vicuna_v1 for conversations)",
                line=int(bad[0]),
                unit="sample",
            )


class LlavaMixture(torch.utils.data.Dataset):
    """Several LLaVA datasets mixed with ratios; items are tokenised with labels and preprocessed images."""

    def __init__(
        self,
        datasets: Sequence[TrainDataset],
        processor: LlavaProcessor,
        *,
        template: Template,
        image_token_id: int,
        tokens_per_image: int,
        max_length: int,
        seed: int = 0,
    ):
        if not datasets:
            raise ValueError("at least one dataset is needed")
        self.datasets = list(datasets)
        self.tables = [SampleTable(d.uri) for d in self.datasets]
        if template == "plain":
            _check_single_turn(self.tables)
        self.folders = [_image_folder(d) for d in self.datasets]
        self.index = mixture_indices([len(t) for t in self.tables], [d.ratio for d in self.datasets], seed)
        self.processor = processor
        self.template: Template = template
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self._pid = os.getpid()
        for dataset, table in zip(self.datasets, self.tables, strict=True):
            log.info("dataset %s: %d samples, ratio %g", dataset.display_name(), len(table), dataset.ratio)

    def __len__(self) -> int:
        return len(self.index)

    def counts(self) -> dict[str, int]:
        """Samples per dataset in one epoch of the mixture."""
        per_source = np.bincount(self.index[:, 0], minlength=len(self.datasets))
        return {d.display_name(): int(n) for d, n in zip(self.datasets, per_source, strict=True)}

    def modality_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(estimated tokens, has image) for every position of this epoch's sample list.

        The estimate is words + tokens_per_image per image: it only has to order samples of one modality
        by length, and needs neither the tokenizer (665K conversations on every rank) nor the images.
        """
        sources, rows = self.index[:, 0], self.index[:, 1]
        words = np.zeros(len(self.index), dtype=np.int64)
        images = np.zeros(len(self.index), dtype=np.int64)
        for source, table in enumerate(self.tables):
            here = sources == source
            words[here] = table.num_words[rows[here]]
            images[here] = table.num_images[rows[here]]
        return words + images * self.tokens_per_image, images > 0

    def sample(self, i: int) -> tuple[int, LlavaSample]:
        source, row = (int(x) for x in self.index[i])
        return source, self.tables[source][row]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if os.getpid() != self._pid:
            # A forked DataLoader worker must not share the parent's GCS client (its HTTP connections).
            storage.reset_client()
            self._pid = os.getpid()
        source, sample = self.sample(i)
        encoded = encode_sample(
            sample,
            self.processor.tokenizer,
            template=self.template,
            image_token_id=self.image_token_id,
            tokens_per_image=self.tokens_per_image,
            max_length=self.max_length,
        )
        item = {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
        }
        if encoded.num_images:
            paths = sample.images[: encoded.num_images]
            try:
                images = [load_image(storage.join(self.folders[source], p)) for p in paths]
            except (OSError, ValueError) as exc:
                message = f"sample {sample.id!r}: cannot read image: {exc}"
                raise InputError(self.datasets[source].uri, message, field="image") from exc
            item["pixel_values"] = self.processor.image_processor(images=images, return_tensors="pt")[
                "pixel_values"
            ]
        return item


# ---------------------------------------------------------------- grouping by modality and length


def _longest_first(indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return indices[np.argsort(-lengths[indices], kind="stable")]


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive pieces of `size` (the last one shorter when len(indices) is not a multiple)."""
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def modality_grouped_order(
    lengths: np.ndarray, has_image: np.ndarray, batch_size: int, group_batches: int, seed: Sequence[int]
) -> np.ndarray:
    """One epoch's sample order in which every global batch of `batch_size` has a single modality.

    Per modality: shuffle, cut into steps of batch_size x group_batches samples (one optimizer step),
    order each step longest first so that its consecutive global batches hold similar lengths. Sorting
    inside a step leaves each step's sample set a random draw: only the split into micro-batches (and so
    the padding) changes. The steps of both modalities are shuffled together; what is left of each
    modality follows as whole single-modality batches, and the last partial batch of each modality is
    merged into the final one or two batches (the only ones that can mix modalities).
    """
    rng = np.random.default_rng(list(seed))
    step = batch_size * group_batches
    steps: list[np.ndarray] = []
    batches: list[np.ndarray] = []
    remnants: list[np.ndarray] = []
    for modality in (np.flatnonzero(has_image), np.flatnonzero(~has_image)):
        shuffled = rng.permutation(modality)
        whole = len(shuffled) // step * step
        steps += [_longest_first(chunk, lengths) for chunk in _chunks(shuffled[:whole], step)]
        rest = _longest_first(shuffled[whole:], lengths)
        full = len(rest) // batch_size * batch_size
        batches += _chunks(rest[:full], batch_size)
        remnants.append(rest[full:])
    ordered = [steps[i] for i in rng.permutation(len(steps))]
    ordered += [batches[i] for i in rng.permutation(len(batches))]
    ordered.append(_longest_first(np.concatenate(remnants), lengths))
    return np.concatenate(ordered).astype(np.int64)


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """LLaVA-1.5's group_by_modality_length as a sampler of the *global* order of one epoch.

    `batch_size` is the global batch of one micro-step (per-device batch x processes) and `group_batches`
    the accumulation steps. Each rank must see the same order: it depends only on (seed, epoch), and
    each process's DataLoader takes its share of it (see trainer.LlavaTrainer._get_train_sampler).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        has_image: np.ndarray,
        *,
        batch_size: int,
        group_batches: int = 1,
        seed: int = 0,
    ):
        if len(lengths) != len(has_image):
            raise ValueError("lengths and has_image must describe the same samples")
        if batch_size < 1 or group_batches < 1:
            raise ValueError("batch_size and group_batches must be positive")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.has_image = np.asarray(has_image, dtype=bool)
        self.batch_size = batch_size
        self.group_batches = group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        # (seed, epoch) as entropy: a new order every epoch, the same one for a resumed run.
        seed = (self.seed % 2**32, self.epoch)
        return modality_grouped_order(self.lengths, self.has_image, self.batch_size, self.group_batches, seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


@dataclass
class LlavaCollator:
    """Right-pads ids (pad token) and labels (-100); concatenates the batch's images in sample order.

    LlavaForConditionalGeneration fills the placeholder positions of the whole batch, row by row, from
    one tensor of image features, so the images must follow the order of their placeholders.
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = feature["input_ids"]
            labels[row, :n] = feature["labels"]
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixels:
            out["pixel_values"] = torch.cat(pixels)
        return out
