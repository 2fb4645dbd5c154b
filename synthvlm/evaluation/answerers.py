"""Who answers benchmark questions: the `Answerer` protocol, and a Hugging Face LLaVA answerer.

Metrics never see a model, only the strings an `Answerer` returns, so tests use scripted answerers and
any model (HF LLaVA, a served model, a baseline) plugs in with one method:

    answer(image_paths, question, choices=None) -> str

`choices`, when given, are the options of a multiple-choice question in order; the answerer shows them
as "A. ..., B. ..." (LLaVA-1.5's format, `question_with_choices`) or however its model expects.

An answerer that is faster on batches also offers `answer_many(questions)` (`BatchAnswerer`); the
evaluate stage uses it when present (`answer_all`).

`HFLlavaAnswerer` runs a `LlavaForConditionalGeneration` checkpoint (local folder, gs:// folder or hub
name) with its processor: the LLaVA-1.5 vicuna_v1 conversation prompt (synthvlm.train.conversation, the
same text the model is trained on), greedy decoding, batches left-padded.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from synthvlm import storage
from synthvlm.devices import DeviceName, DtypeName, resolve_device, resolve_dtype
from synthvlm.evaluation.benchmarks import OPTION_LETTERS
from synthvlm.train.conversation import IMAGE_TOKEN, USER, Turn, generation_prompt

log = logging.getLogger(__name__)

# LLaVA-1.5's response-format prompts (Liu et al. 2023, "Improved Baselines with Visual Instruction
# Tuning", appendix, and its eval scripts): short answers for VQA-style and yes/no questions, letters for
# multiple choice.
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA-1.5 eval scripts (model_vqa_loader.py --max_new_tokens 128)
_READ_WORKERS = 8  # our choice: parallel image reads per batch (gs:// latency)


@dataclass(frozen=True)
class Question:
    """One question for `answer_many`: the same arguments as `Answerer.answer`."""

    image_paths: Sequence[str]
    text: str
    choices: Sequence[str] | None = None


@runtime_checkable
class Answerer(Protocol):
    """Answers one question about one or more images."""

    def answer(self, image_paths: Sequence[str], question: str, choices: Sequence[str] | None = None) -> str:
        """The model's answer text for `question` about the images at `image_paths` (local or gs://)."""
        ...


@runtime_checkable
class BatchAnswerer(Answerer, Protocol):
    """An answerer that is faster on batches (one forward pass for many questions)."""

    def answer_many(self, questions: Sequence[Question]) -> list[str]:
        """Answers in the order of `questions`."""
        ...


def answer_all(answerer: Answerer, questions: Sequence[Question]) -> list[str]:
    """Answers from `answer_many` when the answerer has it, else one `answer` call per question."""
    if isinstance(answerer, BatchAnswerer):
        answers = answerer.answer_many(questions)
        if len(answers) != len(questions):
            raise RuntimeError(f"answer_many returned {len(answers)} answers for {len(questions)} questions")
        return answers
    return [answerer.answer(q.image_paths, q.text, q.choices) for q in questions]


def question_with_choices(
    question: str, choices: Sequence[str] | None, instruction: str | None = MC_INSTRUCTION
) -> str:
    """LLaVA-1.5's multiple-choice text: the question, 'A. x' lines, then the instruction."""
    if not choices:
        return question
    lines = [question.rstrip(), *(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def vicuna_v1_prompt(text: str, n_images: int) -> str:
    """One user turn in the vicuna_v1 format LLaVA-1.5 is trained with (synthvlm.train.conversation), images
    first as LLaVA places them: 'SYSTEM USER: <image>\\n{text} ASSISTANT:'."""
    user_text = f"{IMAGE_TOKEN}\n" * n_images + text
    return generation_prompt([Turn(USER, user_text)], "vicuna_v1")


def load_image(uri: str):
    """An RGB PIL image from a local path or gs:// URI."""
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as img:
        return img.convert("RGB")


@contextmanager
def local_model_dir(model_uri_or_name: str) -> Iterator[str]:
    """A local folder (or hub name) `from_pretrained` can load: a gs:// or s3:// folder is downloaded
    first."""
    if not storage.is_remote(model_uri_or_name):
        yield model_uri_or_name
        return
    prefix = model_uri_or_name.rstrip("/") + "/"
    uris = storage.list_uris(model_uri_or_name)
    if not uris:
        raise FileNotFoundError(f"no model files under {model_uri_or_name}")
    with tempfile.TemporaryDirectory(prefix="synthvlm-model-") as tmp:
        for uri in uris:
            target = Path(tmp) / uri.removeprefix(prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(uri))
        log.info("downloaded %d model files from %s", len(uris), model_uri_or_name)
        yield tmp


PromptFn = Callable[[str, int], str]


class HFLlavaAnswerer:
    """Greedy answers from a transformers `LlavaForConditionalGeneration` and its processor."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        mc_instruction: str | None = MC_INSTRUCTION,
        prompt_fn: PromptFn = vicuna_v1_prompt,
    ):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.mc_instruction = mc_instruction
        self.prompt_fn = prompt_fn

    @classmethod
    def load(
        cls,
        model_uri_or_name: str,
        *,
        device: DeviceName = "auto",
        dtype: DtypeName = "auto",
        **kwargs: Any,
    ) -> HFLlavaAnswerer:
        """Load a checkpoint folder (local or gs://) or hub name saved with `save_pretrained`."""
        from synthvlm.train.model import load_llava

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        with local_model_dir(model_uri_or_name) as path:
            model, processor = load_llava(path, dtype=torch_dtype, device=torch_device)
        log.info("loaded %s on %s (%s)", model_uri_or_name, torch_device, torch_dtype)
        return cls(model, processor, **kwargs)

    def prompt(self, n_images: int, question: str, choices: Sequence[str] | None = None) -> str:
        return self.prompt_fn(question_with_choices(question, choices, self.mc_instruction), n_images)

    def answer(self, image_paths: Sequence[str], question: str, choices: Sequence[str] | None = None) -> str:
        question_ = Question(tuple(image_paths), question, tuple(choices) if choices else None)
        return self.answer_many([question_])[0]

    def answer_many(self, questions: Sequence[Question]) -> list[str]:
        """Answer a batch in one `generate` call (prompts left-padded, as decoder-only generation needs)."""
        import torch

        if not questions:
            return []
        uris = [uri for q in questions for uri in q.image_paths]
        with ThreadPoolExecutor(max_workers=_READ_WORKERS) as pool:  # gs:// reads overlap
            images = list(pool.map(load_image, uris))
        prompts = [self.prompt(len(q.image_paths), q.text, q.choices) for q in questions]
        tokenizer = self.processor.tokenizer
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = padding_side
        param = next(self.model.parameters())
        inputs = inputs.to(param.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
