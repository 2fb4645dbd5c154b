"""Evaluate a LLaVA model: JSONL benchmarks scored here, named lmms-eval tasks through lmms-eval itself.

    evaluate(config, "gs://bucket/run/llava-sft", ["gs://bucket/evals/pope.jsonl", "lmms_eval:mme"],
             "gs://bucket/run/eval/llava-sft.json")

For each JSONL benchmark (synthvlm.evaluation.benchmarks) the model answers every item (the model's
outputs are saved per benchmark, with a done marker, so a rerun after a crash answers only the benchmarks
it had not finished), the answers are scored (synthvlm.evaluation.metrics; LLM judge for `judge` items and
the types in `also_judge`), and the metrics overall and per ability go into one results document
(synthvlm.evaluation.report) at `output_uri`, with the per-item scores next to it:

    <output>.json                      results document (then <output>.json.done with the flat metrics)
    <output>.predictions/<bench>.jsonl model outputs per item (+ .done)
    <output>.items/<bench>.jsonl       per-item scores, parsed answers, judge reasons

What SynthVLM (Table 4) and StableLLaVA (Table 2) report on public benchmarks (SQA-IMG, MMBench, POPE,
MME, VQAv2, GQA, VizWiz, MM-Vet) is best run with the official task code: name them `lmms_eval:<task>`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.devices import DeviceName, DtypeName
from synthvlm.errors import ConfigError
from synthvlm.evaluation.answerers import (
    DEFAULT_MAX_NEW_TOKENS,
    MC_INSTRUCTION,
    SHORT_ANSWER_INSTRUCTION,
    Answerer,
    HFLlavaAnswerer,
    Question,
    answer_all,
    local_model_dir,
)
from synthvlm.evaluation.benchmarks import (
    Benchmark,
    BenchmarkItem,
    ItemType,
    benchmark_name,
    load_benchmark,
    resolve_benchmark_uri,
)
from synthvlm.evaluation.judge import JudgeTask, run_judge
from synthvlm.evaluation.lmms import is_lmms_task, require_lmms_eval, run_lmms_eval, task_name
from synthvlm.evaluation.metrics import ItemScore, by_ability, rotate_choices, score_item, summarize
from synthvlm.evaluation.report import flat_metrics
from synthvlm.llm import LLMClient, LLMConfig
from synthvlm.llm.fingerprint import llm_runtime_fields
from synthvlm.progress import Progress
from synthvlm.runner import LLM_CACHE_DIR, Stage, StageRun, plan_stage, run_stage
from synthvlm.stage import StageStats, is_done, mark_done

log = logging.getLogger(__name__)

LMMS_TYPE = "lmms_eval"  # the item-type key under which lmms-eval task metrics are reported


def _judge_default() -> LLMConfig:
    # StableLLaVA §5.2 scores with GPT-4; our choice: its current successor, at temperature 0 so that a
    # rerun gives the same scores (and hits the response cache, when one is configured).
    return LLMConfig(model="gpt-4o", temperature=0.0, max_tokens=256)


class EvalConfig(StageConfig):
    """How a model is asked and scored."""

    device: DeviceName = "auto"  # our choice: CUDA when present
    dtype: DtypeName = "auto"  # bfloat16 on GPU (LLaVA-1.5 is trained in bf16), float32 on CPU
    # LLaVA-1.5 eval scripts: greedy decoding (temperature 0), up to 128 new tokens.
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    # Questions per generate call. Our choice: 16 fits a 7B LLaVA in bf16 (576 image tokens each) on any
    # 24 GB+ GPU with room to spare; answers are the same as one at a time (left padding, greedy).
    batch_size: int = Field(16, ge=1)
    # LLaVA-1.5's response-format prompts (Improved Baselines, appendix): appended to the question for
    # short-answer types (VQAv2/GQA/POPE style) ...
    short_answer_instruction: str = SHORT_ANSWER_INSTRUCTION
    short_answer_types: list[ItemType] = Field(default_factory=lambda: ["vqa", "yes_no"])
    # ... and after the options of multiple-choice questions (MMBench / ScienceQA-IMG).
    mc_instruction: str = MC_INSTRUCTION
    # MMBench CircularEval: ask once per rotation of the choices, correct only if all are. Our choice: off
    # (it costs n_choices answers per item); turn on for MMBench-style numbers.
    circular: bool = False
    # StableLLaVA v1 §5.2: "multiple possible answers" are given as several keywords, so any one matches.
    keyword_mode: Literal["any", "all"] = "any"
    judge: LLMConfig = Field(default_factory=_judge_default)
    # Types also scored by the judge besides `judge` items; StableLLaVA reports both keyword accuracy and
    # the GPT-4 score on its real-image benchmark. Our choice: none by default (judge calls cost money).
    also_judge: list[ItemType] = Field(default_factory=list)
    # Items per benchmark (and lmms-eval `limit`); None = all. Our choice: all; small values for smoke runs.
    limit: int | None = Field(None, ge=1)
    # lmms-eval model backend for Hugging Face LLaVA checkpoints (lmms-eval's "llava_hf").
    lmms_model: str = "llava_hf"
    lmms_batch_size: int = Field(1, ge=1)  # lmms-eval's default


def _stem(output_uri: str) -> str:
    return output_uri.removesuffix(".json")


def predictions_uri(output_uri: str, benchmark: str) -> str:
    return f"{_stem(output_uri)}.predictions/{benchmark}.jsonl"


def items_uri(output_uri: str, benchmark: str) -> str:
    return f"{_stem(output_uri)}.items/{benchmark}.jsonl"


def default_model_name(model_uri_or_name: str) -> str:
    """'gs://b/run/llava-sft/' -> 'llava-sft'."""
    return model_uri_or_name.rstrip("/").rsplit("/", 1)[-1] or model_uri_or_name


def split_benchmarks(benchmarks: Sequence[str]) -> tuple[list[str], list[str]]:
    """JSONL benchmark URIs and lmms-eval task names; fails on empty lists and duplicate names."""
    if not benchmarks:
        raise ConfigError("no benchmarks given")
    jsonl = [b for b in benchmarks if not is_lmms_task(b)]
    tasks = [task_name(b) for b in benchmarks if is_lmms_task(b)]
    names = [benchmark_name(b) for b in jsonl] + tasks
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"benchmark names must be unique; repeated: {', '.join(duplicates)}")
    return jsonl, tasks


# ---- asking the model --------------------------------------------------------------------------------


def questions_for(item: BenchmarkItem, config: EvalConfig) -> list[Question]:
    """What to ask for one item: one question, or one per rotation of the choices under CircularEval."""
    text = item.question
    if item.type in config.short_answer_types:
        text = f"{text.rstrip()}\n{config.short_answer_instruction}"
    images = tuple(item.images)
    if item.type != "multiple_choice" or item.choices is None:
        return [Question(images, text)]
    shifts = range(len(item.choices)) if config.circular else range(1)
    return [Question(images, text, rotate_choices(item.choices, item.correct_letter, s)[0]) for s in shifts]


def _asked(question: Question) -> list[Any]:
    return [question.text, list(question.choices) if question.choices else None]


def _read_predictions(uri: str, asked: dict[str, list[Question]]) -> dict[str, list[str]] | None:
    """Saved outputs, if a finished earlier run asked exactly these questions (same items, prompts,
    rotations); else None."""
    if not is_done(uri):
        return None
    saved = {}
    for line in storage.read_text(uri).splitlines():
        if line.strip():
            row = json.loads(line)
            saved[row["id"]] = row
    for item_id, questions in asked.items():
        row = saved.get(item_id)
        if row is None or row.get("asked") != [_asked(q) for q in questions]:
            log.info("%s was asked other questions (benchmark or config changed); answering again", uri)
            return None
    log.info("reusing the model's saved answers in %s", uri)
    return {item_id: saved[item_id]["outputs"] for item_id in asked}


def answer_benchmark(
    benchmark: Benchmark, answerer: Answerer, config: EvalConfig, uri: str
) -> dict[str, list[str]]:
    """The model's outputs per item id, saved to `uri` (reused when a previous run finished it)."""
    asked = {item.id: questions_for(item, config) for item in benchmark.items if item.id is not None}
    saved = _read_predictions(uri, asked)
    if saved is not None:
        return saved
    flat = [(item_id, q) for item_id, questions in asked.items() for q in questions]
    outputs: dict[str, list[str]] = {item_id: [] for item_id in asked}
    with Progress(f"evaluate {benchmark.name}", len(flat), "questions") as progress:
        for start in range(0, len(flat), config.batch_size):
            chunk = flat[start : start + config.batch_size]
            for (item_id, _), text in zip(chunk, answer_all(answerer, [q for _, q in chunk]), strict=True):
                outputs[item_id].append(text)
            progress.update(len(chunk))
    rows = [
        {"id": item_id, "asked": [_asked(q) for q in asked[item_id]], "outputs": texts}
        for item_id, texts in outputs.items()
    ]
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    storage.write_text(uri, body, content_type="application/jsonl")
    mark_done(uri, StageStats(stage="evaluate.answers", count_in=len(flat), count_out=len(flat)))
    return outputs


# ---- scoring -------------------------------------------------------------------------------------------


def _needs_judge(item: BenchmarkItem, config: EvalConfig) -> bool:
    return item.type == "judge" or item.type in config.also_judge


def apply_judge(client: Any, benchmark: Benchmark, scores: dict[str, ItemScore], config: EvalConfig) -> None:
    """Ask the judge about every item that needs it and store score/reason in its ItemScore."""
    tasks = [
        JudgeTask(item.id, item.question, item.references, scores[item.id].outputs[0])
        for item in benchmark.items
        if item.id is not None and _needs_judge(item, config)
    ]
    if not tasks:
        return
    log.info("%s: asking the judge about %d answers", benchmark.name, len(tasks))
    for outcome in run_judge(client, tasks):
        score = scores[outcome.id]
        score.judge_score, score.judge_reason, score.judge_failed = (
            outcome.score,
            outcome.reason,
            not outcome.ok,
        )


def score_benchmark(
    benchmark: Benchmark, outputs: dict[str, list[str]], config: EvalConfig, judge: Any | None
) -> list[ItemScore]:
    scores = {
        item.id: score_item(item, outputs[item.id], config.keyword_mode)
        for item in benchmark.items
        if item.id is not None
    }
    if judge is not None:
        apply_judge(judge, benchmark, scores, config)
    return list(scores.values())


def _write_item_scores(uri: str, benchmark: Benchmark, scores: Sequence[ItemScore]) -> None:
    by_id = {item.id: item for item in benchmark.items}
    lines = []
    for score in scores:
        item = by_id[score.item_id]
        row = {"question": item.question, "references": item.references, **score.to_dict()}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    storage.write_text(uri, "".join(lines), content_type="application/jsonl")


def benchmark_result(benchmark: Benchmark, scores: Sequence[ItemScore]) -> dict[str, Any]:
    return {
        "uri": benchmark.uri,
        "n": len(scores),
        "metrics": summarize(scores),
        "by_ability": by_ability(scores),
    }


# ---- the stage -----------------------------------------------------------------------------------------


def _lmms_results(config: EvalConfig, model_uri_or_name: str, tasks: Sequence[str]) -> dict[str, Any]:
    with local_model_dir(model_uri_or_name) as path:
        per_task = run_lmms_eval(
            path,
            tasks,
            model_backend=config.lmms_model,
            batch_size=config.lmms_batch_size,
            device=None if config.device == "auto" else config.device,
            limit=config.limit,
        )
    return {
        task: {"uri": f"lmms_eval:{task}", "n": None, "metrics": {LMMS_TYPE: metrics}, "by_ability": {}}
        for task, metrics in per_task.items()
    }


def evaluate(
    config: EvalConfig,
    model_uri_or_name: str,
    benchmarks: Sequence[str],
    output_uri: str,
    *,
    answerer: Answerer | None = None,
    model_name: str | None = None,
    data_root: str | None = None,
) -> str:
    """Evaluate one model on `benchmarks` (JSONL URIs, 'bundled:...' or 'lmms_eval:<task>'); returns the
    versioned results document (a copy is published at `output_uri`). `answerer` replaces the HF LLaVA model
    (tests, other backends)."""
    inputs, output, params = _run_args(model_uri_or_name, benchmarks, output_uri, model_name)
    return run_stage(
        EVALUATE,
        config,
        inputs,
        output,
        params=params,
        context={"answerer": answerer, "benchmarks": list(benchmarks), "model_name": model_name},
        data_root=data_root,
    )


def _run_args(
    model_uri_or_name: str, benchmarks: Sequence[str], output_uri: str, model_name: str | None
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(inputs, output, params) of the runner for one evaluation."""
    jsonl, _ = split_benchmarks(benchmarks)
    # A trained model's fingerprint comes from its marker; a hub name is a param only.
    inputs = {"model": model_uri_or_name, "benchmarks": [resolve_benchmark_uri(uri) for uri in jsonl]}
    params = {"model": model_uri_or_name, "model_name": model_name, "benchmarks": list(benchmarks)}
    return inputs, output_uri, params


def versioned_output(
    config: EvalConfig,
    model_uri_or_name: str,
    benchmarks: Sequence[str],
    output_uri: str,
    *,
    model_name: str | None = None,
) -> str:
    """Where `evaluate` with these arguments writes its results (its fingerprint folder), without running."""
    inputs, output, params = _run_args(model_uri_or_name, benchmarks, output_uri, model_name)
    return plan_stage(EVALUATE, config, inputs, output, params=params).output


def _process(config: EvalConfig, run: StageRun) -> StageStats:
    model_uri_or_name: str = run.inputs["model"]
    benchmarks: list[str] = run.context["benchmarks"]
    answerer: Answerer | None = run.context["answerer"]
    model_name: str | None = run.context["model_name"]
    output_uri = run.output
    jsonl, tasks = split_benchmarks(benchmarks)
    if tasks:
        require_lmms_eval(tasks)  # fail before loading anything
    loaded = [load_benchmark(uri, limit=config.limit) for uri in jsonl]
    needs_judge = any(_needs_judge(item, config) for bench in loaded for item in bench.items)
    cache = storage.join(run.data_root, LLM_CACHE_DIR)
    # A missing API key fails here, early.
    judge = LLMClient(config.judge, default_cache_dir=cache) if needs_judge else None
    loading = time.monotonic()
    if loaded and answerer is None:
        answerer = HFLlavaAnswerer.load(
            model_uri_or_name,
            device=config.device,
            dtype=config.dtype,
            max_new_tokens=config.max_new_tokens,
            mc_instruction=config.mc_instruction,
        )
    stats = StageStats(stage="evaluate")
    stats.extra["load_seconds"] = round(time.monotonic() - loading, 3)  # the report's cost splits it
    results: dict[str, Any] = {}
    for bench in loaded:
        assert answerer is not None
        outputs = answer_benchmark(bench, answerer, config, predictions_uri(output_uri, bench.name))
        scores = score_benchmark(bench, outputs, config, judge)
        _write_item_scores(items_uri(output_uri, bench.name), bench, scores)
        results[bench.name] = benchmark_result(bench, scores)
        stats.count_in += len(bench.items)
        stats.count_out += len(scores)
        log.info("%s: %s", bench.name, json.dumps(results[bench.name]["metrics"]))
    if tasks:
        results.update(_lmms_results(config, model_uri_or_name, tasks))
    doc = {
        "model": model_name or default_model_name(model_uri_or_name),
        "model_uri": model_uri_or_name,
        "benchmarks": results,
    }
    storage.write_text(
        output_uri, json.dumps(doc, indent=2, sort_keys=True) + "\n", content_type="application/json"
    )
    stats.extra["model"] = doc["model"]
    stats.extra.update(flat_metrics(doc))
    if judge is not None:
        stats.extra.update(judge.metrics())
    return stats


EVALUATE = Stage(
    name="evaluate",
    process=_process,
    excluded={
        **llm_runtime_fields("judge"),
        "batch_size": "questions per generate call, each answered on its own (greedy decoding)",
        "lmms_batch_size": "lmms-eval's batching of the same questions",
    },
)
