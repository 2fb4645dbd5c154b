"""What a run costs, from its stages' done markers: shared by both HTML reports and the stages' KFP Metrics.

Billed time: per stage (summed over its shard pods), the wall seconds of each pod x the accelerators it
requests (GPUs, or vCPUs for a CPU pod), split into load (`load_seconds`), work and idle; LLM tokens priced
per model. `Prices` holds the prices (a base of the report configs, so its keys sit at their top level);
`cost_table_html` and `cost_markdown` render the table with the prices printed above it. `cost_line` is the
narrower GPU-time estimate (painting and scoring only) the reports print under their summary.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field

from synthvlm.config import StageConfig


class Prices(StageConfig):
    """Prices the billed cost is computed at (settings of both reports)."""

    # our assumption: roughly the on-demand price of one A100 GPU-hour on public clouds; set your own.
    gpu_hour_usd: float = Field(default=3.0, ge=0)
    # our assumption: roughly the on-demand price of one vCPU-hour on public clouds; CPU pods are priced at
    # this times the CPUs their kind requests (the billed-time table); set your own.
    cpu_hour_usd: float = Field(default=0.05, ge=0)
    # USD per 1M (input, output) tokens by LLM model name, for the tokens the LLM stages' markers record; a
    # model not listed is priced at 0 and named as unpriced. Default: OpenAI's price page
    # (openai.com/api/pricing) as of writing, our choice; set your own.
    llm_prices: dict[str, tuple[float, float]] = Field(default_factory=lambda: {"gpt-4o-mini": (0.15, 0.60)})


# Stages that hold one GPU per pod, and the statistic that measures how long they held it.
GPU_STAGE_SECONDS = {"generate": "generate_seconds", "clip_score": "seconds"}


def device_kind(device: Any) -> str | None:
    """'GPU' for CUDA devices, 'CPU', 'MPS', ...; None when unknown ('auto' says what was asked, not used)."""
    name = str(device or "").strip().lower()
    if not name or name == "auto":
        return None
    if name.startswith("cuda") or name == "gpu":
        return "GPU"
    return name.split(":", 1)[0].upper()


def _stage_seconds(stats: Mapping[str, Any]) -> float:
    key = GPU_STAGE_SECONDS.get(str(stats.get("stage", "")), "seconds")
    return float(stats.get(key, stats.get("seconds", 0.0)) or 0.0)


def gpu_seconds(all_stats: Sequence[Mapping[str, Any]], devices: Mapping[str, str] | None = None) -> float:
    """GPU-seconds of the GPU stages (one GPU per shard pod), summed over shards; a stage that `devices`
    says ran on something else (a CPU) is not counted."""
    total = 0.0
    for stats in all_stats:
        name = str(stats.get("stage", ""))
        if name in GPU_STAGE_SECONDS and (devices or {}).get(name, "GPU") == "GPU":
            total += _stage_seconds(stats)
    return total


def cost_line(
    all_stats: Sequence[Mapping[str, Any]], gpu_hour_usd: float, devices: Mapping[str, str] | None = None
) -> str:
    """The estimated GPU cost, naming the price it assumes and the seconds it counts."""
    seconds = gpu_seconds(all_stats, devices)
    elsewhere: dict[str, float] = {}
    for stats in all_stats:
        name = str(stats.get("stage", ""))
        kind = (devices or {}).get(name, "GPU")
        if name in GPU_STAGE_SECONDS and kind != "GPU":
            elsewhere[kind] = elsewhere.get(kind, 0.0) + _stage_seconds(stats)
    ran_elsewhere = "".join(
        f"{' and '.join(sorted(n for n, k in (devices or {}).items() if k == kind))} ran on {kind} here: "
        f"{spent:.1f} {kind}-seconds, not priced as GPU time. "
        for kind, spent in sorted(elsewhere.items())
    )
    return (
        "Painting and scoring time only (the billed total, with load, idle, CPU stages, training and LLM "
        "tokens, is under 'Cost: billed time'). "
        + ran_elsewhere
        + "Counted: one GPU per shard pod of the GPU stages, generate (its painting time, "
        "generate_seconds) and CLIP score (its wall seconds); CPU stages, pod start-up and idle GPUs are not "
        f"counted. Assumed price: gpu_hour_usd = ${gpu_hour_usd:.2f} per GPU-hour (a report setting). "
        f"{seconds:.1f} GPU-seconds ({seconds / 3600:.3f} GPU-hours); "
        f"estimated cost ${seconds / 3600 * gpu_hour_usd:.2f} at ${gpu_hour_usd:.2f} per GPU-hour"
    )


# CPUs each kind of pod requests, copied from pipelines/common.py TASK_RESOURCES and the `size=` of each task
# in pipelines/ (keep them in step; the package does not import the pipelines): stage name prefix ->
# requested vCPUs. Others run as "records" pods.
_STAGE_CPUS = {
    "stablellava_report": 2.0,  # records
    "stablellava_export": 2.0,  # records
    "stablellava": 1.0,  # llm: keywords, prompts, dialogues
    "generate": 8.0,
    "clip_score": 4.0,  # score
    "train": 32.0,
    "evaluate": 8.0,  # eval
}
_DEFAULT_CPUS = 2.0  # records
# Statistic of the stage's own work (the rest of its wall time is loading and idling); without one, all
# of the wall time but the load is counted as work.
_WORK_SECONDS = {"generate": "generate_seconds", "train": "train_seconds"}


@dataclass(frozen=True)
class CostRow:
    """One stage's billed time, summed over its shard pods: `units` accelerators (GPUs, or vCPUs for a
    CPU pod) held for `wall` seconds each, split into load, work and idle."""

    stage: str
    unit: str  # "GPU" or "vCPU"
    units: float
    pods: int
    wall: float
    load: float
    work: float
    idle: float
    hour_usd: float  # price of one unit-hour

    @property
    def unit_seconds(self) -> float:
        return self.wall * self.units

    @property
    def usd(self) -> float:
        return self.unit_seconds / 3600 * self.hour_usd


def _prefix_lookup(table: Mapping[str, Any], name: str, default: Any) -> Any:
    for prefix in sorted(table, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "_") or name.startswith(prefix + "."):
            return table[prefix]
    return default


def _billed_units(stats: Mapping[str, Any], devices: Mapping[str, str]) -> tuple[str, float]:
    """What a cloud bills the stage's pod for: ("GPU", n) or ("vCPU", requested CPUs)."""
    name = str(stats.get("stage", ""))
    settings = stats.get("settings") or {}
    if name.startswith("train"):
        return "GPU", float(settings.get("gpus_per_node", 1) or 1) * float(settings.get("num_nodes", 1) or 1)
    if name in GPU_STAGE_SECONDS:
        if devices.get(name, "GPU") == "GPU":
            return "GPU", 1.0
    elif name == "evaluate" and device_kind(settings.get("device")) in (None, "GPU"):
        return "GPU", 1.0
    return "vCPU", float(_prefix_lookup(_STAGE_CPUS, name, _DEFAULT_CPUS))


def cost_rows(
    markers: Sequence[Mapping[str, Any]],
    prices: Prices,
    devices: Mapping[str, str] | None = None,
    *,
    with_pods: bool = True,
) -> list[CostRow]:
    """Per stage (summed over shards), in order of first appearance: wall seconds x accelerators requested,
    split into load (`load_seconds`, where the marker records it), work and idle.

    `with_pods`: also bill the tasks a marker lists under `pods` (sharded curation's filter and dedup
    tasks, recorded by its merge), which have no marker of their own among a report's inputs."""
    rows: dict[str, CostRow] = {}
    expanded = [pod for stats in markers for pod in (*(stats.get("pods") or [] if with_pods else []), stats)]
    for stats in expanded:
        name = str(stats.get("stage", "?"))
        unit, units = _billed_units(stats, devices or {})
        wall = float(stats.get("seconds", 0.0) or 0.0)
        load = min(float(stats.get("load_seconds", 0.0) or 0.0), wall)
        work_key = _prefix_lookup(_WORK_SECONDS, name, None)
        if work_key is not None and stats.get(work_key) is not None:
            work = min(float(stats[work_key]), wall - load)
            idle = wall - load - work
        else:
            work, idle = wall - load, 0.0
        price = prices.gpu_hour_usd if unit == "GPU" else prices.cpu_hour_usd
        key = f"{name}/{unit}/{units}"
        old = rows.get(key)
        if old is None:
            rows[key] = CostRow(name, unit, units, 1, wall, load, work, idle, price)
        else:
            add = {"wall": wall, "load": load, "work": work, "idle": idle}
            rows[key] = replace(old, pods=old.pods + 1, **{k: getattr(old, k) + v for k, v in add.items()})
    return list(rows.values())


def _llm_settings(marker: Mapping[str, Any]) -> Mapping[str, Any]:
    """The LLM settings of a stage: `settings.llm` (StableLLaVA) or one level down (curate's `judge.llm`)."""
    settings = marker.get("settings") or {}
    candidates = [settings.get("llm"), *(v.get("llm") for v in settings.values() if isinstance(v, Mapping))]
    return next((c for c in candidates if isinstance(c, Mapping)), {})


def _is_template(marker: Mapping[str, Any]) -> bool:
    """Whether the stage's LLM was the offline template backend (no model, no tokens, free)."""
    llm = marker.get("llm")
    return (
        bool(marker.get("llm_template_backend"))
        or marker.get("llm_backend") == "template"
        or (isinstance(llm, Mapping) and llm.get("backend") == "template")
        or _llm_settings(marker).get("backend") == "template"
    )


def _llm_model(marker: Mapping[str, Any]) -> str | None:
    if _is_template(marker):
        return "template"
    llm = marker.get("llm")
    if isinstance(llm, Mapping) and llm.get("model"):
        return str(llm["model"])
    if marker.get("llm_model"):
        return str(marker["llm_model"])
    model = _llm_settings(marker).get("model")  # curate's merged marker names its model only here
    return str(model) if model else None


def llm_token_costs(
    markers: Sequence[Mapping[str, Any]], prices: Mapping[str, tuple[float, float]]
) -> list[tuple[str, str, int, int, float | None]]:
    """(stage, model, input tokens, output tokens, USD or None where the model has no price), per LLM stage
    (summed over shards) from the tokens its markers record, priced per 1M tokens. A stage that used no
    tokens (the template backend, or every answer from the cache) has no row: it cost nothing."""
    totals: dict[tuple[str, str], list[int]] = {}
    for marker in markers:
        if "llm_prompt_tokens" not in marker and "llm_completion_tokens" not in marker:
            continue
        key = (str(marker.get("stage", "?")), _llm_model(marker) or "?")
        counts = totals.setdefault(key, [0, 0])
        counts[0] += int(marker.get("llm_prompt_tokens", 0) or 0)
        counts[1] += int(marker.get("llm_completion_tokens", 0) or 0)
    out = []
    for (stage_name, model), (n_in, n_out) in totals.items():
        if not n_in and not n_out:
            continue
        price = prices.get(model)
        usd = None if price is None else (n_in * price[0] + n_out * price[1]) / 1e6
        out.append((stage_name, model, n_in, n_out, usd))
    return out


def template_llm_stages(markers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The stages whose LLM was the offline template backend, in order of first appearance."""
    return list(dict.fromkeys(str(m.get("stage", "?")) for m in markers if _is_template(m)))


def _method_text() -> str:
    return (
        "Billed time: each pod's wall seconds x the accelerators it requests (what a cloud bills): one GPU "
        "per generate / CLIP score shard that ran on a GPU, gpus_per_node x num_nodes for training, one GPU "
        "for evaluation; CPU pods count the vCPUs their kind requests. Load = model loading (load_seconds "
        "where the marker records it), work = painting (generate_seconds) or training (train_seconds), else "
        "the rest of the wall time; idle = wall - load - work. Pod scheduling and image pulls before a stage "
        "starts are not counted. LLM stages add the tokens their markers record, priced per model."
    )


def prices_text(prices: Prices) -> str:
    """The prices the table assumes, named by their report settings."""
    llm = "; ".join(f"{m}: ${i:.2f} / ${o:.2f}" for m, (i, o) in sorted(prices.llm_prices.items())) or "none"
    return (
        "Assumed prices (report settings): "
        f"gpu_hour_usd = ${prices.gpu_hour_usd:.2f} per GPU-hour, "
        f"cpu_hour_usd = ${prices.cpu_hour_usd:.3f} per vCPU-hour, "
        f"llm_prices (USD per 1M input / output tokens): {llm}."
    )


def _template_note(markers: Sequence[Mapping[str, Any]]) -> str:
    stages = template_llm_stages(markers)
    if not stages:
        return ""
    return f"The offline template LLM ({', '.join(stages)}) is free: no requests, no tokens."


def cost_table_html(markers: Sequence[Mapping[str, Any]], prices: Prices, devices: Mapping[str, str]) -> str:
    """The prices, then the billed-time table (class 'stages', styled as the stage table) with its total."""
    rows = cost_rows(markers, prices, devices)
    head = (
        "<table class='stages cost'><thead><tr><th>stage</th><th>pods</th><th>billed</th><th>wall s</th>"
        "<th>load s</th><th>work s</th><th>idle s</th><th>unit-seconds</th><th>price / unit-hour</th>"
        "<th>cost</th></tr></thead><tbody>"
    )
    body = "".join(
        f"<tr><td>{html.escape(r.stage)}</td><td>{r.pods}</td><td>{r.units:g} {r.unit}</td>"
        f"<td>{r.wall:,.1f}</td><td>{r.load:,.1f}</td><td>{r.work:,.1f}</td><td>{r.idle:,.1f}</td>"
        f"<td>{r.unit_seconds:,.1f}</td><td>${r.hour_usd:.3f}</td><td>${r.usd:,.2f}</td></tr>"
        for r in rows
    )
    llm = llm_token_costs(markers, prices.llm_prices)
    body += "".join(
        f"<tr class='llm'><td>{html.escape(s)}</td><td colspan='6' class='text'>LLM {html.escape(m)}: "
        f"{n_in:,} input + {n_out:,} output tokens</td><td></td>"
        f"<td>{'unpriced' if usd is None else 'per 1M tokens'}</td><td>${usd or 0.0:,.2f}</td></tr>"
        for s, m, n_in, n_out, usd in llm
    )
    total = sum(r.usd for r in rows) + sum(usd or 0.0 for *_, usd in llm)
    body += f"<tr class='total'><th>total</th><td colspan='8'></td><th>${total:,.2f}</th></tr>"
    note = _template_note(markers)
    after = f"<p class='cost'>{html.escape(note)}</p>" if note else ""
    return (
        f"<p class='cost'>{html.escape(_method_text())}</p>"
        f"<p class='prices'>{html.escape(prices_text(prices))}</p>{head}{body}</tbody></table>{after}"
    )


def md_cell(value: Any) -> str:
    """`value` as one Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def cost_markdown(
    markers: Sequence[Mapping[str, Any]], prices: Prices, devices: Mapping[str, str]
) -> list[str]:
    """The prices and the billed-time table as Markdown lines."""
    rows = cost_rows(markers, prices, devices)
    llm = llm_token_costs(markers, prices.llm_prices)
    lines = [
        md_cell(_method_text()),
        "",
        f"**{md_cell(prices_text(prices))}**",
        "",
        "| stage | billed | wall s | load s | work s | idle s | cost |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        cells = [r.stage, f"{r.units:g} {r.unit} x {r.pods} pod(s)", f"{r.wall:.1f}", f"{r.load:.1f}"]
        cells += [f"{r.work:.1f}", f"{r.idle:.1f}", f"${r.usd:.2f}"]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    for s, m, n_in, n_out, usd in llm:
        cost = "unpriced" if usd is None else f"${usd:.2f}"
        lines.append(f"| {md_cell(s)} | LLM {md_cell(m)}: {n_in} in + {n_out} out tokens | | | | | {cost} |")
    total = sum(r.usd for r in rows) + sum(usd or 0.0 for *_, usd in llm)
    lines.append(f"| total | | | | | | ${total:.2f} |")
    note = _template_note(markers)
    return [*lines, "", md_cell(note)] if note else lines


def billed_metrics(markers: Sequence[Mapping[str, Any]], prices: Prices | None = None) -> dict[str, float]:
    """billed_gpu_seconds / billed_vcpu_seconds (wall seconds x units requested) and cost_usd of `markers`
    (LLM tokens included), for KFP Metrics; a unit no stage was billed for is left out."""
    prices = prices or Prices()
    rows = cost_rows(markers, prices, with_pods=False)  # a task's metrics: its own pod only
    out: dict[str, float] = {}
    for row in rows:
        key = f"billed_{row.unit.lower()}_seconds"
        out[key] = out.get(key, 0.0) + row.unit_seconds
    llm = llm_token_costs(markers, prices.llm_prices)
    out["cost_usd"] = sum(row.usd for row in rows) + sum(usd or 0.0 for *_, usd in llm)
    return out
