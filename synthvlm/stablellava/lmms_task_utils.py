"""lmms-eval task functions for the StableLLaVA synthesized eval set (copied as `utils.py` into the task
directory the stablellava export writes; lmms-eval loads it through the task YAML's `!function` tags).

A doc is one row of the eval JSONL (synthvlm.evaluation.benchmarks format; lmms-eval's `json` loader gives
None for the fields a row does not have). The question is asked as `synthvlm evaluate` asks it (same
instructions, the options of a choice question as "A. ..."), and scored with synthvlm's own metrics, so
both evaluators give the same numbers for the same answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from synthvlm.evaluation.answerers import MC_INSTRUCTION, SHORT_ANSWER_INSTRUCTION, question_with_choices
from synthvlm.evaluation.benchmarks import BenchmarkItem
from synthvlm.evaluation.metrics import score_item

# Relative image paths are relative to the eval file, which sits in the folder above this task folder.
EVAL_DIR = Path(__file__).resolve().parent.parent
SHORT_ANSWER_TYPES = ("vqa", "yes_no")  # synthvlm evaluate's default `short_answer_types`
_FIELDS = ("id", "image", "question", "answer", "answers", "type", "ability", "choices")


def _item(doc: dict[str, Any]) -> BenchmarkItem:
    return BenchmarkItem.model_validate({k: doc[k] for k in _FIELDS if doc.get(k) is not None})


def image_paths(doc: dict[str, Any]) -> list[str]:
    images = doc["image"] if isinstance(doc["image"], list) else [doc["image"]]
    return [p if "://" in p or Path(p).is_absolute() else str(EVAL_DIR / p) for p in images]


def process_docs(dataset: Any) -> Any:
    """Leave out the items only the LLM judge can score."""
    return dataset.filter(lambda doc: doc["type"] != "judge")


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    out = []
    for path in image_paths(doc):
        with Image.open(path) as image:
            out.append(image.convert("RGB"))
    return out


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    question = str(doc["question"])
    if doc["type"] == "multiple_choice":
        text = question_with_choices(question, doc["choices"], kwargs.get("mc_instruction", MC_INSTRUCTION))
    elif doc["type"] in SHORT_ANSWER_TYPES:
        text = f"{question.rstrip()}\n{kwargs.get('short_answer_instruction', SHORT_ANSWER_INSTRUCTION)}"
    else:
        text = question
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    item = _item(doc)
    if item.type == "multiple_choice":
        return item.correct_letter
    return " | ".join(item.references)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    score = score_item(_item(doc), [results[0] if results else ""]).score
    return {"accuracy": float(score or 0.0)}
