from __future__ import annotations

import pytest

from synthvlm.billing import (
    Prices,
    billed_metrics,
    cost_line,
    cost_markdown,
    cost_rows,
    cost_table_html,
    gpu_seconds,
    llm_token_costs,
    template_llm_stages,
)


def test_gpu_seconds_and_cost_estimate() -> None:
    stats = [
        {"stage": "captions", "seconds": 100.0},  # CPU stage: not counted
        {"stage": "generate", "seconds": 0.5, "generate_seconds": 1800.0},  # shard 0
        {"stage": "generate", "seconds": 0.5, "generate_seconds": 1800.0},  # shard 1
        {"stage": "clip_score", "seconds": 360.0},
    ]
    assert gpu_seconds(stats) == 3960.0
    # 3960 s = 1.1 GPU-hours; at $3.00 per GPU-hour that is $3.30
    line = cost_line(stats, 3.0)
    assert line.endswith("(1.100 GPU-hours); estimated cost $3.30 at $3.00 per GPU-hour")
    assert "gpu_hour_usd = $3.00" in line and "generate_seconds" in line and "not counted" in line


def test_llm_token_cost_of_an_unpriced_model_is_named() -> None:
    prompts = {"stage": "stablellava_prompts", "llm": {"model": "m1"}}
    tokens = {"llm_prompt_tokens": 10, "llm_completion_tokens": 5}
    markers = [
        {**prompts, **tokens},  # shard 0
        {**prompts, **tokens},  # shard 1
        {"stage": "curate", "llm_model": "other", "llm_prompt_tokens": 1, "llm_completion_tokens": 1},
    ]
    costs = llm_token_costs(markers, {"m1": (1.0, 2.0)})
    assert costs == [
        ("stablellava_prompts", "m1", 20, 10, pytest.approx(40 / 1e6)),
        ("curate", "other", 1, 1, None),
    ]


# The merged curate marker of a template run: counters at the top, the backend only in its settings.
TEMPLATE_CURATE = {
    "stage": "curate",
    "seconds": 1.0,
    "llm_requests": 0,
    "llm_prompt_tokens": 0,
    "llm_completion_tokens": 0,
    "llm_template_backend": 1,
    "settings": {"judge": {"llm": {"backend": "template", "model": "gpt-4o-mini"}}},
}
TEMPLATE_KEYWORDS = {
    "stage": "stablellava_keywords",
    "seconds": 1.0,
    "llm": {"backend": "template", "model": "template"},
    "llm_prompt_tokens": 0,
    "llm_completion_tokens": 0,
}


def test_llm_stages_without_tokens_have_no_row_and_the_template_is_named_free_once() -> None:
    markers = [TEMPLATE_CURATE, TEMPLATE_KEYWORDS]
    assert llm_token_costs(markers, Prices().llm_prices) == []
    assert template_llm_stages(markers) == ["curate", "stablellava_keywords"]
    doc = cost_table_html(markers, Prices(), {})
    assert "LLM ?" not in doc and "input + 0 output tokens" not in doc and "unpriced" not in doc
    assert doc.count("template LLM") == 1 and "(curate, stablellava_keywords) is free" in doc
    # styled as the stage table
    assert "<table class='stages cost'>" in doc and "class='stats'" not in doc
    md = "\n".join(cost_markdown(markers, Prices(), {}))
    assert "LLM" not in md.split("| --- |", 1)[1].split("| total |")[0] and md.count("template LLM") == 1


def test_curate_tokens_are_priced_at_the_judge_model_its_settings_name() -> None:
    real = {
        **TEMPLATE_CURATE,
        "llm_template_backend": 0,
        "llm_prompt_tokens": 1_000_000,
        "llm_completion_tokens": 0,
        "settings": {"judge": {"llm": {"backend": "openai", "model": "gpt-4o-mini"}}},
    }
    assert llm_token_costs([real], Prices().llm_prices) == [
        ("curate", "gpt-4o-mini", 1_000_000, 0, pytest.approx(0.15))
    ]
    assert template_llm_stages([real]) == []


def test_stablellava_pods_are_billed_at_the_cpus_their_kind_requests() -> None:
    markers = [
        {"stage": "stablellava_prompts", "seconds": 3600.0},  # llm pod: 1 vCPU
        {"stage": "stablellava_export", "seconds": 3600.0},  # records pod: 2 vCPUs
    ]
    rows = {r.stage: r for r in cost_rows(markers, Prices(cpu_hour_usd=0.10))}
    assert (rows["stablellava_prompts"].units, rows["stablellava_prompts"].usd) == (1.0, pytest.approx(0.10))
    assert (rows["stablellava_export"].units, rows["stablellava_export"].usd) == (2.0, pytest.approx(0.20))


def test_billed_metrics_sum_units_and_price_tokens() -> None:
    markers = [
        {"stage": "generate", "seconds": 100.0, "generate_seconds": 90.0},
        {"stage": "stablellava_dialogues", "seconds": 360.0, "llm": {"model": "gpt-4o-mini"}}
        | {"llm_prompt_tokens": 0, "llm_completion_tokens": 1_000_000},
    ]
    metrics = billed_metrics(markers, Prices(gpu_hour_usd=3.6, cpu_hour_usd=1.0))
    assert metrics["billed_gpu_seconds"] == 100.0 and metrics["billed_vcpu_seconds"] == 360.0
    # 100 GPU-s at $3.60/h = $0.10; 360 vCPU-s at $1/h = $0.10; 1M output tokens at $0.60
    assert metrics["cost_usd"] == pytest.approx(0.10 + 0.10 + 0.60)


def test_sharded_curation_bills_its_filter_and_dedup_pods_in_reports_not_in_a_tasks_metrics() -> None:
    pods = [
        {"stage": "curate_shard", "seconds": 100.0, "load_seconds": 20.0},
        {"stage": "curate_shard", "seconds": 80.0},
        {"stage": "curate_dedup", "seconds": 10.0},
    ]
    merge = {"stage": "curate", "seconds": 30.0, "pods": pods}
    prices = Prices(cpu_hour_usd=0.36)
    rows = {r.stage: r for r in cost_rows([merge], prices)}
    assert list(rows) == ["curate_shard", "curate_dedup", "curate"]
    assert (rows["curate_shard"].pods, rows["curate_shard"].wall, rows["curate_shard"].load) == (
        2,
        180.0,
        20.0,
    )
    assert rows["curate_shard"].unit == "vCPU" and rows["curate_shard"].units == 2.0
    assert "curate_shard" in cost_table_html([merge], prices, {})
    # 220 s x 2 vCPUs in a report; the merge task's own metrics count its pod only (30 s x 2)
    assert sum(r.unit_seconds for r in rows.values()) == 440.0
    assert billed_metrics([merge], prices)["billed_vcpu_seconds"] == 60.0
