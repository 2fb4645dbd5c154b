"""StableLLaVA dialogues as training files for named trainers, and an evaluation set two evaluators read.

Training files (LLaVA conversation JSON: {"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}, ...]}, image paths relative to the data root, LLaVA's --image_folder):
- LLaVA-1.5 (`llava15_sample`): only samples the original LLaVA-1.5 code trains on (haotian-liu/LLaVA
  `LazySupervisedDataset`, which opens `os.path.join(image_folder, sample["image"])` and so takes one
  image per sample): `image` a string, one `<image>` at the front of the first human turn; text-only
  samples (no `image`) are allowed. Multi-image samples are left out of this file (and counted).
- LLaVA-NeXT / LLaVA-OneVision interleaved (`interleaved_sample`): every sample, `image` always a list,
  one `<image>` per image at the place it appears: the first human turn for single-image and pair
  samples, the turn that shows it for interleaved dialogues (v2 App. C).

Evaluation rows (JSONL) in the format of `synthvlm evaluate` (synthvlm.evaluation.benchmarks), scored by
the question kind (`EVAL_METRICS`): keyword match for wh-questions (v1 §5.2 "answers in the form of
keywords"), yes/no for yes/no questions, a 2-way choice for either-or questions, or the LLM judge (v2 §5.2
GPT-4 score). Image paths are absolute (a local path or a gs:// URI), so the file reads the same from its
versioned folder and from its published copy. `lmms_task_files` writes an lmms-eval task for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from synthvlm.llava_format import IMAGE_TOKEN
from synthvlm.stablellava.dialogues import Dialogue

EvalMetric = Literal["keyword", "yes_no", "multiple_choice", "vqa", "judge"]
# Which metric each question kind is scored with by default, and the ones it may use instead.
EVAL_METRICS: dict[str, EvalMetric] = {"wh": "keyword", "yes_no": "yes_no", "either_or": "multiple_choice"}
ALLOWED_METRICS: dict[str, tuple[str, ...]] = {
    "wh": ("keyword", "vqa", "judge"),
    "yes_no": ("yes_no", "keyword", "judge"),
    "either_or": ("multiple_choice", "keyword", "judge"),
}

LMMS_TASK = "stablellava_synth"
LMMS_DIR = "lmms_eval_task"
LMMS_YAML = f"{LMMS_DIR}/{LMMS_TASK}.yaml"
LMMS_UTILS = f"{LMMS_DIR}/utils.py"
_UTILS_SOURCE = Path(__file__).with_name("lmms_task_utils.py")


def conversations(dialogue: Dialogue) -> list[dict[str, str]]:
    """LLaVA turns with one `<image>` per image: at the front of the first human turn, or (interleaved
    dialogues) where the dialogue's markers put them."""
    out: list[dict[str, str]] = []
    for index, turn in enumerate(dialogue.turns):
        question = turn.question
        if index == 0 and dialogue.image_turns is None:
            question = "\n".join([IMAGE_TOKEN] * len(dialogue.record_ids) + [question])
        out.append({"from": "human", "value": question})
        out.append({"from": "gpt", "value": turn.answer})
    return out


def image_token_problem(sample: Mapping[str, Any]) -> str | None:
    """Why a sample's `<image>` markers do not match its images (None when they do)."""
    image = sample.get("image")
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    turns = sample["conversations"]
    markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if markers != len(images):
        return f"{markers} {IMAGE_TOKEN} marker(s) for {len(images)} image(s)"
    if any(IMAGE_TOKEN in turn["value"] for turn in turns if turn["from"] != "human"):
        return f"{IMAGE_TOKEN} in a gpt turn"
    return None


def fits_llava15(dialogue: Dialogue) -> bool:
    """Whether the original LLaVA-1.5 code can train on the dialogue: at most one image."""
    return len(dialogue.record_ids) <= 1


def llava15_sample(dialogue: Dialogue, image_paths: Sequence[str]) -> dict[str, Any]:
    """A LLaVA-1.5 sample: `image` a string (one image) or absent (text only)."""
    if not fits_llava15(dialogue) or len(image_paths) != len(dialogue.record_ids):
        raise ValueError(f"{dialogue.id}: LLaVA-1.5 takes one image per sample, not {len(image_paths)}")
    sample: dict[str, Any] = {"id": dialogue.id}
    if image_paths:
        sample["image"] = image_paths[0]
    sample["conversations"] = conversations(dialogue)
    return sample


def interleaved_sample(dialogue: Dialogue, image_paths: Sequence[str]) -> dict[str, Any]:
    """A LLaVA-NeXT / OneVision interleaved sample: `image` a list in `<image>` order."""
    if len(image_paths) != len(dialogue.record_ids):
        raise ValueError(f"{dialogue.id}: {len(dialogue.record_ids)} images expected, got {len(image_paths)}")
    return {"id": dialogue.id, "image": list(image_paths), "conversations": conversations(dialogue)}


def eval_row(dialogue: Dialogue, image_uri: str, metrics: Mapping[str, str] = EVAL_METRICS) -> dict[str, Any]:
    """One `synthvlm evaluate` item; `type` is the metric the question kind is scored with."""
    kind = str(dialogue.question_type)
    metric = metrics.get(kind, EVAL_METRICS.get(kind, "keyword"))
    turn = dialogue.turns[0]
    row: dict[str, Any] = {"id": dialogue.id, "image": image_uri, "question": turn.question, "type": metric}
    references = list(dialogue.answer_keywords)
    if metric == "judge":
        row["answer"] = turn.answer  # the judge compares with the full reference answer (v2 §5.2)
    elif metric == "multiple_choice":
        if not dialogue.choices:
            raise ValueError(f"{dialogue.id}: multiple_choice needs the either-or options")
        row["choices"] = list(dialogue.choices)
        row["answer"] = references[0]
    elif metric == "yes_no" or len(references) == 1:
        row["answer"] = references[0]
    else:
        row["answers"] = references
    row["ability"] = dialogue.ability
    return row


def absolute_uri(uri: str) -> str:
    """A URI as is; a local path made absolute."""
    return uri if "://" in uri else os.path.abspath(uri)


def lmms_task_yaml(eval_uri: str, task: str = LMMS_TASK) -> str:
    """The lmms-eval task (lmms-eval 0.7 task-directory format) over the eval JSONL at `eval_uri`."""
    return f"""# lmms-eval task for the StableLLaVA synthesized eval set (synthvlm stablellava export).
# Run: lmms_eval --model llava_hf --model_args pretrained=<model> --include_path <this folder> --tasks {task}
# utils.py scores with synthvlm's own metrics (synthvlm must be importable), so the numbers match
# `synthvlm evaluate`; items of type "judge" are left out here (they need the LLM judge).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {eval_uri}
test_split: test
output_type: generate_until
process_docs: !function utils.process_docs
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 128
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def lmms_task_files(eval_uri: str) -> dict[str, str]:
    """{relative path: text} of the lmms-eval task directory written beside the eval file."""
    return {LMMS_YAML: lmms_task_yaml(absolute_uri(eval_uri)), LMMS_UTILS: _UTILS_SOURCE.read_text()}


def file_guide(files: Mapping[str, Mapping[str, Any]]) -> str:
    """README.md beside the exports: which file fits which trainer or evaluator."""
    lines = [
        "# StableLLaVA export",
        "",
        "Image paths in the training files are relative to the data root (LLaVA's `--image_folder`);",
        "the eval set's image paths are absolute.",
        "",
        "| file | format | samples | fits |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in files.items():
        fits = "; ".join(info["fits"])
        lines.append(f"| `{name}` | {info['format']} | {info.get('samples', '')} | {fits} |")
    lines.append("")
    for name, info in files.items():
        if info.get("notes"):
            lines.append(f"- `{name}`: {info['notes']}")
    return "\n".join(lines) + "\n"
