"""StableLLaVA dialogues as LLaVA training samples and an evaluation set.

- LLaVA conversation JSON (the format of LLaVA's llava_v1_5_mix665k.json): {"id", "image", "conversations":
  [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}, ...]}.
  One `<image>` token per image, all in the first human turn; `image` is a path relative to the data root
  (LLaVA's --image_folder) for one image and a list of such paths, in token order, for several (the
  multi-image form of LLaVA-NeXT-Interleave's data).
- Evaluation rows (JSONL): {"id", "image", "question", "answer", "answers", "type", "ability"}, where
  `answers` are the reference keywords (v1 §5.2: "manually annotated answers in the form of keywords ...
  multiple keywords" when several answers are right) and `type` the question type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from synthvlm.llava_format import IMAGE_TOKEN
from synthvlm.stablellava.dialogues import Dialogue, Turn


def conversations(turns: Sequence[Turn], image_count: int) -> list[dict[str, str]]:
    """LLaVA turns; the first human turn starts with one `<image>` line per image."""
    out: list[dict[str, str]] = []
    for index, turn in enumerate(turns):
        question = turn.question
        if index == 0:
            question = "\n".join([IMAGE_TOKEN] * image_count + [question])
        out.append({"from": "human", "value": question})
        out.append({"from": "gpt", "value": turn.answer})
    return out


def llava_sample(dialogue: Dialogue, image_paths: Sequence[str]) -> dict[str, Any]:
    """One LLaVA training sample; `image` is a string for one image and a list for several."""
    if len(image_paths) != len(dialogue.record_ids):
        raise ValueError(f"{dialogue.id}: {len(dialogue.record_ids)} images expected, got {len(image_paths)}")
    image: str | list[str] = image_paths[0] if len(image_paths) == 1 else list(image_paths)
    return {
        "id": dialogue.id,
        "image": image,
        "conversations": conversations(dialogue.turns, len(image_paths)),
    }


def eval_row(dialogue: Dialogue, image_path: str) -> dict[str, Any]:
    turn = dialogue.turns[0]
    return {
        "id": dialogue.id,
        "image": image_path,
        "question": turn.question,
        "answer": turn.answer,
        "answers": list(dialogue.answer_keywords),
        "type": dialogue.question_type,
        "ability": dialogue.ability,
    }
