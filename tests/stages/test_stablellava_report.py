"""The StableLLaVA report's billed-time table and its quiet key numbers, from markers with fixed numbers
(the demo run that exercises the rest of the report is tests/stages/test_report_demo.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthvlm.stage import done_uri
from synthvlm.stages.stablellava_report import StableLLaVAReportConfig, write_stablellava_report


def _done_output(path: Path, content: str, marker: dict) -> str:
    """An output holding `content` whose marker holds exactly `marker` (fixed seconds, unlike mark_done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    Path(done_uri(str(path))).write_text(
        json.dumps({"count_in": 1, "count_out": 1, "rejects": {}, "output": str(path), **marker})
    )
    return str(path)


def _section(doc: str, title: str) -> str:
    start = doc.index(f"<h2>{title}</h2>")
    end = doc.find("<h2>", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


TEMPLATE_LLM = {"llm": {"backend": "template", "model": "template"}, "llm_template_backend": 1}
NO_TOKENS = {"llm_requests": 0, "llm_prompt_tokens": 0, "llm_completion_tokens": 0}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sl")
    gpu = {"settings": {"device": "cuda"}}
    keywords = _done_output(
        root / "keywords.json",
        "{}",
        {
            "stage": "stablellava_keywords",
            "seconds": 3600.0,
            "llm": {"backend": "openai", "model": "gpt-4o-mini"},
            "llm_requests": 10,
            "llm_prompt_tokens": 2_000_000,
            "llm_completion_tokens": 1_000_000,
        },
    )
    prompts = _done_output(
        root / "prompts.jsonl",
        "",
        {"stage": "stablellava_prompts", "seconds": 36.0, **TEMPLATE_LLM, **NO_TOKENS},
    )
    dialogues = _done_output(
        root / "dialogues.jsonl",
        "",
        {"stage": "stablellava_dialogues", "seconds": 36.0, **TEMPLATE_LLM, **NO_TOKENS},
    )
    generated = [
        _done_output(
            root / "generate" / f"shard-{i}.jsonl",
            "",
            {
                "stage": "generate",
                "seconds": 1000.0,
                "load_seconds": 120.0,
                "generate_seconds": 800.0,
                # one encoder dropped tokens of 3 records, the other of none
                "records_with_dropped_tokens": {"text_encoder": 0, "text_encoder_2": 3 * i},
                **gpu,
            },
        )
        for i in range(2)
    ]
    scored = [
        _done_output(
            root / "scores" / "shard-0.jsonl",
            "",
            {
                "stage": "clip_score",
                "seconds": 360.0,
                "load_seconds": 60.0,
                "records_with_dropped_tokens": {"clip_scorer": 0},
                **gpu,
            },
        )
    ]
    selected = _done_output(root / "selected.jsonl", "", {"stage": "select", "seconds": 1.0})
    exported = _done_output(
        root / "export" / "sft.json", "[]", {"stage": "stablellava_export", "seconds": 360.0}
    )
    config = StableLLaVAReportConfig(
        gpu_hour_usd=2.0, cpu_hour_usd=0.05, llm_prices={"gpt-4o-mini": (0.15, 0.60)}
    )
    out = str(root / "report.html")
    write_stablellava_report(
        config,
        keywords=keywords,
        prompts=prompts,
        dialogues=dialogues,
        generated=generated,
        scored=scored,
        selected=selected,
        exported=exported,
        output_uri=out,
    )
    return Path(out).read_text()


def test_cost_table_bills_load_time_and_prices_llm_tokens_per_model(report: str) -> None:
    section = _section(report, "Cost: billed time")
    # the prices, printed above the table
    assert section.index("gpu_hour_usd = $2.00") < section.index("<table class='stages cost'>")
    assert "cpu_hour_usd = $0.050" in section and "gpt-4o-mini: $0.15 / $0.60" in section
    # two generate pods of one GPU: 2 x 1000 s wall, 2 x 120 s of it loading, 2 x 800 s painting
    assert (
        "<td>generate</td><td>2</td><td>1 GPU</td><td>2,000.0</td><td>240.0</td><td>1,600.0</td>"
        "<td>160.0</td><td>2,000.0</td><td>$2.000</td><td>$1.11</td>" in section
    )
    assert "<td>clip_score</td><td>1</td><td>1 GPU</td><td>360.0</td><td>60.0</td><td>300.0</td>" in section
    # an LLM pod requests 1 vCPU, the export's records pod 2
    assert "<td>stablellava_keywords</td><td>1</td><td>1 vCPU</td><td>3,600.0</td>" in section
    assert "<td>stablellava_export</td><td>1</td><td>2 vCPU</td><td>360.0</td>" in section
    # LLM tokens: 2M input x $0.15 + 1M output x $0.60 per 1M tokens = $0.90
    assert "LLM gpt-4o-mini: 2,000,000 input + 1,000,000 output tokens" in section and "$0.90" in section
    cpu_seconds = 3600 + 36 + 36 + 1 * 2 + 360 * 2  # keywords, prompts, dialogues (1 vCPU); select, export
    total = 2000 / 3600 * 2.0 + 360 / 3600 * 2.0 + cpu_seconds / 3600 * 0.05 + 0.90
    assert f"<th>total</th><td colspan='8'></td><th>${total:,.2f}</th>" in section


def test_template_llm_stages_have_no_token_rows(report: str) -> None:
    cost = _section(report, "Cost: billed time")
    assert "LLM template" not in cost and "LLM ?" not in cost and "0 input + 0 output" not in cost
    assert cost.count("template LLM") == 1  # free, said once
    llm = _section(report, "LLM requests, tokens and cost")
    assert "<td>stablellava_keywords</td>" in llm
    assert "<td>stablellava_prompts</td>" not in llm and "<td>stablellava_dialogues</td>" not in llm


def test_dropped_token_counts_show_only_when_not_zero(report: str) -> None:
    stages = _section(report, "Stages")
    assert "records with dropped tokens (text_encoder_2): 3" in stages
    assert "records with dropped tokens (text_encoder):" not in stages
    assert "records with dropped tokens (clip_scorer)" not in stages
