"""A self-contained HTML report of a SynthVLM run.

Header (pipeline, preset, date, data root, models, selection fingerprint; a banner for random test models),
the stage table aggregated over shards (per-shard rows folded in <details>), GPU cost with its price (time
spent on a CPU is named as such, not priced), the billed-time cost table (synthvlm.billing, shared with the
StableLLaVA report: per stage, wall seconds x accelerators requested, split into load, work and idle;
training, evaluation and LLM tokens included; the prices printed), the score histogram with the selection cut,
the best kept records next to the lowest-scoring ones selection rejected (each with its reason), the rejects
of curation and generation with examples from their rejects files, a grid of kept images and the settings that
made the data. The file has no scripts or external assets (thumbnails are inline base64 JPEG, the histogram
inline SVG), so it opens from a bucket, a laptop or the KFP UI's HTML artifact viewer alike. Captions are user
data and are HTML-escaped everywhere. `report_markdown` gives a short summary for a KFP Markdown artifact;
synthvlm.stages.stablellava_report builds the StableLLaVA report from the same pieces.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from synthvlm import storage
from synthvlm.billing import (
    GPU_STAGE_SECONDS,
    Prices,
    cost_line,
    cost_markdown,
    cost_table_html,
    device_kind,
    md_cell,
)
from synthvlm.records import Record, read_manifest
from synthvlm.runner import RUN_RECORD_KEYS, Stage, StageRun, run_stage
from synthvlm.stage import StageStats, read_stats, require_done

log = logging.getLogger(__name__)

_JPEG_QUALITY = 85  # our choice: thumbnails only need to be recognisable, and small
_SVG_WIDTH, _SVG_HEIGHT = 640, 260
# Plot area margins: room for the y ticks and label on the left, x ticks and label below.
_SVG_LEFT, _SVG_RIGHT, _SVG_TOP, _SVG_BOTTOM = 64, 20, 28, 48
_STATS_COLUMNS = ("stage", "count_in", "count_out", "rejects", "seconds")


class ReportConfig(Prices):
    """Settings of the HTML report; the prices of its cost (gpu_hour_usd, cpu_hour_usd, llm_prices) come
    from `Prices`, shared with the StableLLaVA report."""

    # our choice: one screenful of thumbnails; also bounds the HTML size (~15 KB per thumbnail).
    max_images: int = Field(default=64, ge=0)
    # our choice: longer side in pixels; large enough to judge a caption against its image.
    thumbnail_size: int = Field(default=256, ge=16)
    # our choice: enough resolution to see the selection threshold at 100K-1M scores.
    histogram_bins: int = Field(default=20, ge=1)
    # key in Record.scores written by the CLIP scoring stage (SynthVLM's CLIPScore filter).
    score_key: str = "clip"
    # our choice: kept (highest scores) and rejected (lowest scores) thumbnails shown side by side, per side.
    examples_per_side: int = Field(default=8, ge=0)
    # our choice: examples per (stage, reason) in the table of rejects made before selection.
    max_reject_examples: int = Field(default=3, ge=0)
    # Named in the header: which pipeline and which preset (`--preset`) made the data. Markers do not record
    # them, so whoever starts the run fills them in (`synthvlm run` does); None = "not recorded".
    pipeline: str = "synthvlm"
    preset: str | None = None


def stage_devices(all_stats: Sequence[dict[str, Any]], records: Sequence[Record] = ()) -> dict[str, str]:
    """Stage -> 'GPU' / 'CPU' / ... for the GPU stages, from what their markers (or, for generate, the
    records' provenance) say was used; a stage whose device is not recorded is left out."""
    out: dict[str, str] = {}
    for name in GPU_STAGE_SECONDS:
        stats = first_marker(all_stats, name)
        if stats is None:
            continue
        kind = device_kind(stats.get("device")) or device_kind((stats.get("settings") or {}).get("device"))
        if kind is None and name == "generate":
            for record in records:
                generation = record.provenance.get("generation")
                if isinstance(generation, dict) and device_kind(generation.get("device")):
                    kind = device_kind(generation["device"])
                    break
        if kind is not None:
            out[name] = kind
    return out


@dataclass(frozen=True)
class Histogram:
    """Shared bin edges for all (pre-selection) and kept scores; `all_counts` is None without them."""

    edges: list[float]
    kept_counts: list[int]
    all_counts: list[int] | None


def score_of(record: Record, score_key: str) -> float | None:
    return record.scores.get(score_key)


def grid_records(records: Sequence[Record], max_images: int, score_key: str) -> list[Record]:
    """Up to `max_images` records spread evenly from the best to the worst score (unscored last)."""
    ranked = sorted(records, key=lambda r: (score_of(r, score_key) is None, -(score_of(r, score_key) or 0.0)))
    if len(ranked) <= max_images:
        return ranked
    if max_images <= 1:
        return ranked[:max_images]
    # Evenly spaced ranks show what the kept set looks like near the threshold, not only the best.
    picks = np.linspace(0, len(ranked) - 1, num=max_images).round().astype(int)
    return [ranked[i] for i in picks]


def _image_errors() -> tuple[type[BaseException], ...]:
    from google.api_core.exceptions import GoogleAPIError

    return (OSError, ValueError, Image.DecompressionBombError, GoogleAPIError)


def thumbnail_data_uri(image_uri: str, size: int) -> str:
    """The image at `image_uri` as a `data:image/jpeg;base64,...` thumbnail, longer side <= size."""
    with Image.open(io.BytesIO(storage.read_bytes(image_uri))) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster for 1024^2 images
        thumb = img.convert("RGB")
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def compute_histogram(kept: Sequence[float], all_scores: Sequence[float] | None, bins: int) -> Histogram:
    """Histogram of `kept` (and `all_scores`) over the same bins spanning both."""
    pooled = np.asarray(list(kept) + list(all_scores or ()), dtype=float)
    value_range = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
    kept_counts, edges = np.histogram(np.asarray(kept, dtype=float), bins=bins, range=value_range)
    all_counts = None
    if all_scores is not None:
        all_counts = np.histogram(np.asarray(all_scores, dtype=float), bins=edges)[0].tolist()
    return Histogram(edges=edges.tolist(), kept_counts=kept_counts.tolist(), all_counts=all_counts)


def _bar(x: float, width: float, count: int, max_count: int, cls: str, label: str) -> str:
    plot_h = _SVG_HEIGHT - _SVG_TOP - _SVG_BOTTOM
    height = plot_h * count / max_count if max_count else 0.0
    y = _SVG_HEIGHT - _SVG_BOTTOM - height
    return (
        f'<rect class="bar {cls}" data-count="{count}" x="{x:.2f}" y="{y:.2f}" '
        f'width="{width:.2f}" height="{height:.2f}"><title>{html.escape(label)}</title></rect>'
    )


def _y_ticks(max_count: int) -> list[int]:
    """Up to 5 whole-number ticks from 0 to max_count."""
    if max_count <= 0:
        return [0]
    step = max(1, math.ceil(max_count / 4))
    ticks = list(range(0, max_count + 1, step))
    return ticks if ticks[-1] == max_count else [*ticks, max_count]


def histogram_svg(hist: Histogram, score_key: str, cut: float | None = None, cut_name: str = "cut") -> str:
    """Inline SVG: grey bars for all scores (when given) behind blue bars for kept scores, with axes,
    tick values and (given `cut`, the selection cut) a vertical line labelled `cut_name`; a cut outside the
    plotted scores sits at the nearer edge, its label saying so."""
    n_bins = len(hist.kept_counts)
    max_count = max(hist.kept_counts + (hist.all_counts or []) + [0])
    left, right = _SVG_LEFT, _SVG_WIDTH - _SVG_RIGHT
    top, bottom = _SVG_TOP, _SVG_HEIGHT - _SVG_BOTTOM
    plot_w = right - left
    bar_w = plot_w / n_bins
    lo_edge, hi_edge = hist.edges[0], hist.edges[-1]

    def x_of(value: float) -> float:
        span = hi_edge - lo_edge
        return left + (plot_w * (value - lo_edge) / span if span else plot_w / 2)

    parts = [
        f'<svg class="histogram" width="{_SVG_WIDTH}" '
        f'height="{_SVG_HEIGHT}" viewBox="0 0 {_SVG_WIDTH} {_SVG_HEIGHT}" role="img">'
        f"<title>{html.escape(score_key)} score histogram</title>"
    ]
    for i in range(n_bins):
        x = left + i * bar_w
        lo, hi = hist.edges[i], hist.edges[i + 1]
        if hist.all_counts is not None:
            label = f"[{lo:.4f}, {hi:.4f}): {hist.all_counts[i]} all"
            parts.append(_bar(x, bar_w - 1, hist.all_counts[i], max_count, "all", label))
        label = f"[{lo:.4f}, {hi:.4f}): {hist.kept_counts[i]} kept"
        parts.append(_bar(x, bar_w - 1, hist.kept_counts[i], max_count, "kept", label))
    # Axes, with tick values: scores below the x axis, counts left of the y axis.
    parts.append(f'<line class="axis" x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
    parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>')
    for i in range(5):
        value = lo_edge + (hi_edge - lo_edge) * i / 4
        x = x_of(value) if hi_edge > lo_edge else left + plot_w * i / 4
        parts.append(f'<line x1="{x:.2f}" y1="{bottom}" x2="{x:.2f}" y2="{bottom + 4}" stroke="#333"/>')
        parts.append(
            f'<text class="tick x" x="{x:.2f}" y="{bottom + 16}" text-anchor="middle">{value:.4g}</text>'
        )
    plot_h = bottom - top
    for count in _y_ticks(max_count):
        y = bottom - (plot_h * count / max_count if max_count else 0)
        parts.append(f'<line x1="{left - 4}" y1="{y:.2f}" x2="{left}" y2="{y:.2f}" stroke="#333"/>')
        parts.append(f'<text class="tick y" x="{left - 7}" y="{y + 4:.2f}" text-anchor="end">{count}</text>')
    parts.append(
        f'<text class="axis-label" x="{(left + right) / 2:.2f}" y="{_SVG_HEIGHT - 8}" '
        f'text-anchor="middle">{html.escape(score_key)} score</text>'
    )
    mid_y = (top + bottom) / 2
    parts.append(
        f'<text class="axis-label" x="16" y="{mid_y:.2f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {mid_y:.2f})">count (records)</text>'
    )
    if cut is not None and math.isfinite(cut):
        x, where = x_of(cut), ""
        if cut < lo_edge or x < left:
            x, where = left, " (below every score)"
        elif cut > hi_edge or x > right:
            x, where = right, " (above every score)"
        name = html.escape(cut_name)
        parts.append(
            f'<line class="cut" x1="{x:.2f}" y1="{top - 6}" x2="{x:.2f}" y2="{bottom}" stroke="#c0392b" '
            f'stroke-width="2" stroke-dasharray="5,3"><title>{name}: {cut:.4f}{where}</title></line>'
        )
        # The label sits right of the line, or left of it near the right edge.
        tx, anchor = (x + 4, "start") if x < right - 150 else (x - 4, "end")
        parts.append(
            f'<text class="cut-label" x="{tx:.2f}" y="{top - 10}" fill="#c0392b" text-anchor="{anchor}">'
            f"{name} {cut:.4g}{where}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _format_rejects(rejects: dict[str, Any]) -> str:
    if not rejects:
        return "-"
    items = sorted(rejects.items(), key=lambda kv: (-kv[1], kv[0]))
    return "<br>".join(f"{html.escape(str(reason))}: {count}" for reason, count in items)


def _sig(value: float) -> str:
    """A float to 4 significant digits (no exponent for everyday magnitudes)."""
    if value != value or value in (math.inf, -math.inf):
        return str(value)
    if value and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{_sig(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    return f"{int(seconds // 3600)} h {seconds % 3600 / 60:.0f} min"


def _number(value: Any) -> float | None:
    """`value` as a float when it is a plain (non-bool) number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _aggregate(members: Sequence[dict[str, Any]], key: str, how: str) -> Any:
    """One value of `key` over a stage's shards: sum, min, max, first, or mean weighted by count_out."""
    present = [m for m in members if m.get(key) is not None]
    if not present:
        return None
    values = [m[key] for m in present]
    if how == "first":
        return (
            values[0] if all(v == values[0] for v in values) else ", ".join(sorted({str(v) for v in values}))
        )
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return None
    if how == "sum":
        return sum(numbers)  # type: ignore[arg-type]
    if how == "min":
        return min(numbers)  # type: ignore[type-var]
    if how == "max":
        return max(numbers)  # type: ignore[type-var]
    weights = [float(m.get("count_out", 0) or 0) for m in present]
    if sum(weights) <= 0:
        weights = [1.0] * len(present)
    return sum(w * n for w, n in zip(weights, numbers, strict=True)) / sum(weights)  # type: ignore[operator]


# Per stage, its key numbers: (label, marker key, how shards combine, format). Formats: "n" a count,
# "g" a float to 4 significant digits, "s" a duration, "usd" dollars, "%" a fraction as a percentage,
# "t" text.
_KEY_NUMBERS: dict[str, list[tuple[str, str, str, str]]] = {
    "curate": [
        ("LLM judge", "llm_model", "first", "t"),
        ("LLM requests", "llm_requests", "sum", "n"),
        ("LLM cost", "llm_cost_usd", "sum", "usd"),
    ],
    "generate": [
        ("painting time", "generate_seconds", "sum", "s"),
        ("retried", "retried", "sum", "n"),
    ],
    "clip_score": [
        ("mean score", "mean_score", "mean", "g"),
        ("min score", "min_score", "min", "g"),
        ("max score", "max_score", "max", "g"),
        ("model", "model", "first", "t"),
        ("device", "device", "first", "t"),
    ],
    "select": [
        ("mode", "mode", "first", "t"),
        ("k", "k", "first", "n"),
        ("mean score of input", "mean_score_in", "first", "g"),
        ("mean score kept", "mean_score_kept", "first", "g"),
        ("threshold", "threshold", "first", "g"),
        ("cut (lowest kept)", "min_score_kept", "first", "g"),
        ("near-duplicates", "near_duplicates", "sum", "n"),
    ],
    "export_llava": [("data root", "data_root", "first", "t")],
    "stablellava_keywords": [
        ("LLM requests", "llm_requests", "sum", "n"),
        ("LLM cache hits", "llm_cache_hits", "sum", "n"),
        ("LLM cost", "llm_cost_usd", "sum", "usd"),
    ],
    "stablellava_prompts": [
        ("train prompts", "train_records", "sum", "n"),
        ("eval prompts", "eval_records", "sum", "n"),
        ("keyword repetition rate", "dataset_keyword_repetition_rate", "first", "g"),
        ("LLM requests", "llm_requests", "sum", "n"),
        ("LLM cost", "llm_cost_usd", "sum", "usd"),
    ],
    "stablellava_dialogues": [
        ("LLM requests", "llm_requests", "sum", "n"),
        ("LLM cache hits", "llm_cache_hits", "sum", "n"),
        ("LLM cost", "llm_cost_usd", "sum", "usd"),
    ],
    "stablellava_export": [
        ("pretraining samples", "pretrain_samples", "sum", "n"),
        ("SFT samples", "sft_samples", "sum", "n"),
        ("eval items", "eval_items", "sum", "n"),
    ],
}
_MAX_GENERIC_NUMBERS = 4  # our choice: a stage we do not know gets a few of its scalar statistics


def _format_value(value: Any, fmt: str) -> str:
    number = _number(value)
    if number is None or fmt == "t":
        return html.escape(str(value))
    if fmt == "n":
        return f"{number:,.0f}" if number == int(number) else _sig(number)
    if fmt == "s":
        return _duration(number)
    if fmt == "usd":
        return f"${number:,.2f}"
    if fmt == "%":
        return f"{100 * number:.1f}%"
    return _sig(number)


def _generic_numbers(members: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Key numbers of a stage without a list in _KEY_NUMBERS: its first few scalar statistics."""
    first = members[0]
    picked = []
    for key in sorted(first):
        value = first[key]
        if key in _STATS_COLUMNS or key in RUN_RECORD_KEYS or isinstance(value, dict | list) or value is None:
            continue
        if _number(value) is None and (not isinstance(value, str) or len(value) > 40):
            continue
        if _number(value) is None:
            how, fmt = "first", "t"
        elif "seconds" in key:
            how, fmt = "sum", "s"
        elif key.startswith("min"):
            how, fmt = "min", "g"
        elif key.startswith("max"):
            how, fmt = "max", "g"
        elif "fraction" in key:
            how, fmt = "mean", "%"
        elif isinstance(value, int):
            how, fmt = "sum", "n"
        else:
            how, fmt = "mean", "g"
        picked.append((key.replace("_", " "), key, how, fmt))
    return picked[:_MAX_GENERIC_NUMBERS]


# Counts of things that went wrong or cost something: noise at 0 (the template LLM's 0 requests, no retries).
_SHOWN_WHEN_NONZERO = frozenset(
    {"retried", "near_duplicates", "llm_requests", "llm_cache_hits", "llm_retries", "llm_cost_usd"}
)


def _key_numbers(members: Sequence[dict[str, Any]], specs: Sequence[tuple[str, str, str, str]]) -> list[str]:
    items = []
    for label, key, how, fmt in specs:
        value = _aggregate(members, key, how)
        if value is None or (key in _SHOWN_WHEN_NONZERO and not value):
            continue
        items.append(f"{html.escape(label)}: {_format_value(value, fmt)}")
    return items


def _key_numbers_html(
    stage_name: str, members: Sequence[dict[str, Any]], devices: Mapping[str, str] | None = None
) -> str:
    # A known stage whose markers lack its usual statistics falls back to the generic pick (one whose
    # numbers are all zeros it hides shows none).
    specs = _KEY_NUMBERS.get(stage_name, ())
    recorded = any(m.get(key) is not None for _, key, _, _ in specs for m in members)
    items = _key_numbers(members, specs if recorded else _generic_numbers(members))
    if stage_name == "generate":
        kind = (devices or {}).get("generate")
        if kind is not None:  # painting time is GPU time only where the painting ran on a GPU
            items = [i.replace("painting time:", f"painting time ({kind}):", 1) for i in items]
        painting = _aggregate(members, "generate_seconds", "sum")
        images = sum(int(m.get("count_out", 0) or 0) for m in members)
        if painting:
            items.append(f"images per painting-second: {_sig(images / painting)}")
    items += dropped_tokens_items(members)
    return "<br>".join(items) or "-"


def dropped_tokens_items(members: Sequence[dict[str, Any]]) -> list[str]:
    """'records with dropped tokens (<encoder>): n', summed over shards, from the markers of stages whose text
    encoders truncate (generate: SDXL's, clip_score: the CLIP scorer's; synthvlm.tokens); encoders that
    dropped none are left out."""
    totals: dict[str, int] = {}
    for marker in members:
        for encoder, n in (marker.get("records_with_dropped_tokens") or {}).items():
            totals[encoder] = totals.get(encoder, 0) + int(n)
    return [f"records with dropped tokens ({html.escape(k)}): {n:,}" for k, n in sorted(totals.items()) if n]


def _group_by_stage(all_stats: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for stats in all_stats:
        groups.setdefault(str(stats.get("stage", "?")), []).append(stats)
    return groups


def _sum_rejects(members: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for m in members:
        for reason, count in (m.get("rejects") or {}).items():
            total[reason] = total.get(reason, 0) + count
    return total


def _kept(count_in: int, count_out: int) -> str:
    # More out than in (requests in, keywords out; one prompt, several images): no share was "kept".
    return f"{100 * count_out / count_in:.1f}%" if count_in and count_out <= count_in else "-"


def _seconds_cell(members: Sequence[dict[str, Any]]) -> str:
    seconds = _aggregate(members, "seconds", "sum")
    return _duration(seconds) if seconds is not None else "-"


def _shard_rows_html(groups: dict[str, list[dict[str, Any]]]) -> str:
    """Every output (shard) on its own row, folded away in a <details> element."""
    n_outputs = sum(len(members) for members in groups.values())
    rows = [
        f"<details class='shards'><summary>Per-shard rows ({n_outputs} outputs)</summary>"
        "<table class='stages shard-rows'><thead><tr><th>stage</th><th>output</th><th>in</th><th>out</th>"
        "<th>kept</th><th>rejects by reason</th><th>wall time</th></tr></thead><tbody>"
    ]
    for stage_name, members in groups.items():
        for m in members:
            count_in, count_out = int(m.get("count_in", 0) or 0), int(m.get("count_out", 0) or 0)
            output = str(m.get("output", "-")).rsplit("/", 1)[-1]
            rows.append(
                f"<tr class='shard'><td>{html.escape(stage_name)}</td>"
                f"<td><code>{html.escape(output)}</code></td>"
                f"<td>{count_in}</td><td>{count_out}</td><td>{_kept(count_in, count_out)}</td>"
                f"<td>{_format_rejects(m.get('rejects') or {})}</td><td>{_seconds_cell([m])}</td></tr>"
            )
    rows.append("</tbody></table></details>")
    return "".join(rows)


def stages_table_html(all_stats: Sequence[dict[str, Any]], devices: Mapping[str, str] | None = None) -> str:
    """One row per stage, summed over its shards, with a few key numbers; per-shard rows in <details>.
    `devices` (stage_devices) names where the GPU stages ran, for the labels of their times."""
    groups = _group_by_stage(all_stats)
    rows = [
        "<table class='stages'><thead><tr><th>stage</th><th>shards</th><th>in</th><th>out</th><th>kept</th>"
        "<th>rejects by reason</th><th title='wall-clock seconds of the stage runs, summed over shards'>"
        "wall time<br>(sum over shards)</th><th>key numbers</th></tr></thead><tbody>"
    ]
    for stage_name, members in groups.items():
        count_in = sum(int(m.get("count_in", 0) or 0) for m in members)
        count_out = sum(int(m.get("count_out", 0) or 0) for m in members)
        rows.append(
            f"<tr><td>{html.escape(stage_name)}</td><td class='shards'>{len(members)}</td>"
            f"<td class='count-in'>{count_in}</td><td class='count-out'>{count_out}</td>"
            f"<td>{_kept(count_in, count_out)}</td><td>{_format_rejects(_sum_rejects(members))}</td>"
            f"<td class='seconds'>{_seconds_cell(members)}</td>"
            f"<td class='key-numbers'>{_key_numbers_html(stage_name, members, devices)}</td></tr>"
        )
    rows.append("</tbody></table>")
    rows.append(_shard_rows_html(groups))
    return "".join(rows)


def settings_table_html(all_stats: Sequence[dict[str, Any]]) -> str:
    """Per stage: the fingerprint its outputs were made under and its output-affecting settings (the shards
    of one stage share one fingerprint: one row, every output listed)."""
    rows = [
        "<table class='stages settings'><thead><tr><th>stage</th><th>fingerprint</th><th>outputs</th>"
        "<th>settings (output-affecting)</th></tr></thead><tbody>"
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for stats in all_stats:
        key = (str(stats.get("stage", "?")), str(stats.get("fingerprint", "-")))
        groups.setdefault(key, []).append(stats)
    for (stage_name, fingerprint), members in groups.items():
        settings = {**members[0].get("settings", {}), **members[0].get("params", {})}
        text = json.dumps(settings, sort_keys=True, ensure_ascii=False)
        outputs = "<br>".join(f"<code>{html.escape(str(m.get('output', '-')))}</code>" for m in members)
        rows.append(
            f"<tr><td>{html.escape(stage_name)}</td>"
            f"<td class='fingerprint'><code>{html.escape(fingerprint[:16])}</code></td>"
            f"<td>{outputs}</td><td class='settings'><code>{html.escape(text)}</code></td></tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def image_html(image_uri: str | None, size: int, alt: str, what: str = "") -> tuple[str, bool]:
    """An inline <img> thumbnail of `image_uri` (alt text escaped here), or a placeholder saying why not;
    and whether the image could be read. `what` names the item in the log line."""
    if not image_uri:
        return "<div class='missing'>no image</div>", False
    try:
        src = thumbnail_data_uri(image_uri, size)
    except _image_errors() as exc:
        log.warning("report: cannot read image of %s (%s): %s", what or "?", image_uri, exc)
        return f"<div class='missing'>image unreadable: {html.escape(str(exc))}</div>", False
    return f'<img src="{src}" alt="{html.escape(alt)}">', True


def _grid_cell(record: Record, config: ReportConfig, reason: str | None = None) -> tuple[str, bool]:
    """One figure of the grid, or given `reason` (which names the score), of a rejected record; and whether
    its image could be read."""
    score = score_of(record, config.score_key)
    score_txt = f"{html.escape(config.score_key)} {score:.4f}" if score is not None else "no score"
    image, shown = image_html(record.image_uri, config.thumbnail_size, record.caption, record.id)
    head = f"<span class='reason'>{html.escape(reason)}</span><br>" if reason else ""
    head += "" if reason else f"<span class='score'>{score_txt}</span> "
    cell = (
        f"<figure>{image}<figcaption>{head}<span class='id'>{html.escape(record.id)}</span><br>"
        f"{html.escape(record.caption)}</figcaption></figure>"
    )
    return cell, shown


def selection_cut(select: Mapping[str, Any] | None, kept_scores: Sequence[float]) -> float | None:
    """The score a record needed to be kept: the threshold in threshold mode, else the lowest kept score."""
    settings = (select or {}).get("settings") or {}
    if (select or {}).get("mode", settings.get("mode")) == "threshold":
        threshold = _number((select or {}).get("threshold", settings.get("threshold")))
        if threshold is not None:
            return threshold
    return min(kept_scores) if kept_scores else None


def selection_reason(score: float | None, select: Mapping[str, Any] | None, cut: float | None) -> str:
    """Why selection dropped a record with this score, in words ("score 0.2100 below cut 0.2700 (not in
    the top k = 100,000)")."""
    if score is None:
        return "no score"
    select = select or {}
    settings = select.get("settings") or {}
    mode = select.get("mode", settings.get("mode"))
    if cut is not None and score < cut:
        if mode == "threshold":
            return f"score {score:.4f} not above threshold {cut:.4g}"
        k = _number(select.get("k", settings.get("k")))
        rank = f" (not in the top k = {k:,.0f})" if k is not None else ""
        if mode == "top_fraction" and _number(settings.get("fraction")) is not None:
            rank = f" (not in the top {100 * float(settings['fraction']):.4g}%{rank.replace(' (', ', ')}"
        return f"score {score:.4f} below cut {cut:.4f}{rank}"
    other = [r for r in (select.get("rejects") or {}) if r in ("near duplicate", "not best of n")]
    if other:
        return f"score {score:.4f} at or above the cut: {' or '.join(other)}"
    return f"score {score:.4f} tied with the cut, not kept"


@dataclass
class RejectGroup:
    """The records one stage dropped for one reason: how many, and a few examples (id, text, detail)."""

    stage: str
    reason: str
    count: int
    examples: list[tuple[str, str, str]]


def read_jsonl_rows(uri: str | None) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a missing file gives none, a malformed line is skipped (logged)."""
    if not uri or not storage.exists(uri):
        return []
    rows = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            log.warning("report: %s line %d is not JSON (%s): skipped", uri, lineno, exc)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def short_text(value: Any, limit: int = 160) -> str:
    """`value` as one line of at most `limit` characters (dicts and lists as compact JSON)."""
    if value is None or value == {} or value == []:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def generate_rejects_uri(shard_output: str) -> str:
    """generate's sidecar: `<version>/shards/shard-X.jsonl` -> `<version>/rejects/shard-X.jsonl`."""
    folder, _, name = shard_output.rpartition("/")
    return f"{folder.rpartition('/')[0]}/rejects/{name}"


def _reject_rows(
    stats: dict[str, Any], captions_of: dict[str, dict[str, str]] | None = None
) -> list[tuple[str, str, str, str]]:
    """(reason key as counted in the marker, id, text, detail) of every reject row a stage's sidecar holds.
    `captions_of` caches generate's input captions (id -> caption) by URI: all shards share one input."""
    name = str(stats.get("stage", ""))
    out = []
    if stats.get("rejects_manifest"):  # curate: id, caption, stage (its step), reason, details
        for row in read_jsonl_rows(str(stats["rejects_manifest"])):
            key = f"{row.get('stage')}.{row.get('reason')}" if row.get("stage") else str(row.get("reason"))
            out.append(
                (key, str(row.get("id", "?")), str(row.get("caption", "")), short_text(row.get("details")))
            )
    elif name == "generate" and stats.get("output"):  # id, reason; the caption is in generate's input
        rows = read_jsonl_rows(generate_rejects_uri(str(stats["output"])))
        captions: dict[str, str] = {}
        source = ((stats.get("inputs") or {}).get("captions") or {}).get("uri")
        cache = captions_of if captions_of is not None else {}
        if rows and source and source not in cache and storage.exists(source):
            cache[source] = {r.id: r.caption for r in read_manifest(source)}
        captions = cache.get(source, {}) if source else {}
        for row in rows:
            record_id = str(row.get("id", "?"))
            text = captions.get(record_id.split("~", 1)[0], "")
            out.append((str(row.get("reason")), record_id, text, short_text(row.get("detail"))))
    else:  # a stage without a rejects file: the ids its marker keeps per reason
        for reason, ids in (stats.get("reject_examples") or {}).items():
            out.extend((str(reason), str(i), "", "") for i in (ids if isinstance(ids, list) else []))
    return out


def collect_rejects(
    all_stats: Sequence[dict[str, Any]], max_examples: int, skip: Iterable[str] = ("select",)
) -> list[RejectGroup]:
    """Per stage and reason: the count (from the markers) and up to `max_examples` examples (from the
    stages' rejects files: curate's rejects manifest, generate's rejects/ sidecar; else marker ids)."""
    groups: list[RejectGroup] = []
    skipped = set(skip)
    captions_of: dict[str, dict[str, str]] = {}
    for stage_name, members in _group_by_stage(all_stats).items():
        if stage_name in skipped:
            continue
        counts = _sum_rejects(members)
        examples: dict[str, list[tuple[str, str, str]]] = {}
        for member in members:
            for reason, record_id, text, detail in _reject_rows(member, captions_of):
                examples.setdefault(reason, []).append((record_id, text, detail))
        for reason in sorted(set(counts) | set(examples), key=lambda r: (-int(counts.get(r, 0) or 0), r)):
            count = int(counts.get(reason, len(examples.get(reason, []))) or 0)
            groups.append(RejectGroup(stage_name, reason, count, examples.get(reason, [])[:max_examples]))
    return groups


def rejects_table_html(groups: Sequence[RejectGroup]) -> str:
    """A table of reject groups: stage, reason, count and the examples with their text and detail."""
    rows = ["<table class='stages rejects'><thead><tr><th>stage</th><th>reason</th><th>count</th>"
            "<th>examples (id, text, detail)</th></tr></thead><tbody>"]  # fmt: skip
    for group in groups:
        items = "".join(
            f"<li><code>{html.escape(record_id)}</code> {html.escape(text)}"
            + (f" <span class='detail'>{html.escape(detail)}</span>" if detail else "")
            + "</li>"
            for record_id, text, detail in group.examples
        )
        examples = f"<ul>{items}</ul>" if items else "<span class='detail'>no examples recorded</span>"
        rows.append(
            f"<tr class='reject'><td>{html.escape(group.stage)}</td><td class='reason'>"
            f"{html.escape(group.reason)}</td><td>{group.count:,}</td>"
            f"<td class='examples'>{examples}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def _scores(records: Sequence[Record], score_key: str) -> list[float]:
    return [s for s in (score_of(r, score_key) for r in records) if s is not None]


def _summary_line(kept: Sequence[float], n_selected: int, n_all: int | None, score_key: str) -> str:
    text = f"{n_selected} records selected"
    if n_all is not None:
        text += f" of {n_all} scored"
    if kept:
        text += f"; {score_key}: mean {np.mean(kept):.4f}, min {min(kept):.4f}, max {max(kept):.4f}"
    return text


# Model names of the random-weight test models (synthvlm.run_config's tiny presets).
_TINY_GENERATE_PREFIX, _TINY_CLIP_PREFIX = "synthvlm/tiny", "synthvlm-tiny"


def first_marker(all_stats: Sequence[dict[str, Any]], *stage_names: str) -> dict[str, Any] | None:
    for stats in all_stats:
        name = str(stats.get("stage", ""))
        if name in stage_names or any(name.startswith(f"{n}_") for n in stage_names):
            return stats
    return None


def _revision(value: Any) -> str:
    return "default branch" if value is None else str(value)


def model_lines(all_stats: Sequence[dict[str, Any]]) -> list[str]:
    """'role: model (revision)' of the generate and CLIP score stages, as their markers name them."""
    out = []
    generate = first_marker(all_stats, "generate")
    if generate is not None:
        settings = generate.get("settings") or {}
        if settings.get("model") is not None:
            out.append(
                f"image generator: {settings['model']} (revision: {_revision(settings.get('revision'))})"
            )
        if settings.get("refiner_model") is not None:
            revision = _revision(settings.get("refiner_revision"))
            out.append(f"refiner: {settings['refiner_model']} (revision: {revision})")
    clip = first_marker(all_stats, "clip_score")
    if clip is not None:
        settings = clip.get("settings") or {}
        if settings.get("model") is not None:
            pretrained = settings.get("pretrained")
            weights = "none (random init)" if pretrained is None else str(pretrained)
            out.append(f"CLIP scorer: {settings['model']} (pretrained: {weights})")
    return out


def random_test_models(all_stats: Sequence[dict[str, Any]]) -> bool:
    """Whether the run used the random-weight test models (tiny generator or tiny CLIP)."""
    generate = first_marker(all_stats, "generate")
    clip = first_marker(all_stats, "clip_score")
    gen_model = str(((generate or {}).get("settings") or {}).get("model") or "")
    clip_model = str(((clip or {}).get("settings") or {}).get("model") or "")
    return gen_model.startswith(_TINY_GENERATE_PREFIX) or clip_model.startswith(_TINY_CLIP_PREFIX)


def _data_root(all_stats: Sequence[dict[str, Any]], selected_uri: str) -> str:
    export = first_marker(all_stats, "export")
    if export is not None:
        root = (export.get("params") or {}).get("data_root") or export.get("data_root")
        if root:
            return str(root)
    if selected_uri:
        return selected_uri.rstrip("/").rsplit("/", 1)[0] + "/"
    return "-"


def header_rows_html(items: Sequence[tuple[str, str]]) -> str:
    """The header table: (label, HTML value) rows."""
    rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{value}</td></tr>" for label, value in items)
    return f"<table class='header'>{rows}</table>"


def banner_html(text: str) -> str:
    """A red banner; `text` is HTML."""
    return f"<div class='banner' role='alert'>{text}</div>"


def written_at(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def preset_text(preset: str | None) -> str:
    return preset if preset else "not recorded (report setting `preset`)"


def header_html(
    all_stats: Sequence[dict[str, Any]],
    selected_uri: str = "",
    now: datetime | None = None,
    *,
    pipeline: str = "synthvlm",
    preset: str | None = None,
) -> str:
    """Pipeline, preset, date written, data root, models with revisions and selection fingerprint; a banner
    for test models."""
    select = first_marker(all_stats, "select")
    fingerprint = str((select or {}).get("fingerprint") or "-")[:16]
    models = model_lines(all_stats) or ["- (no generate or CLIP score marker given)"]
    items = [
        ("pipeline", html.escape(pipeline)),
        ("preset", html.escape(preset_text(preset))),
        ("written", html.escape(written_at(now))),
        ("data root", f"<code>{html.escape(_data_root(all_stats, selected_uri))}</code>"),
        ("models", "<br>".join(html.escape(m) for m in models)),
        ("selection fingerprint", f"<code class='fingerprint'>{html.escape(fingerprint)}</code>"),
    ]
    parts = []
    if random_test_models(all_stats):
        parts.append(
            banner_html(
                "<strong>Random-weight test models:</strong> images are noise and scores meaningless."
            )
        )
    parts.append(header_rows_html(items))
    return "".join(parts)


STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table.stages{border-collapse:collapse}table.stages td,table.stages th{border:1px solid #ccc;padding:4px 8px;
text-align:right;vertical-align:top}table.stages td:first-child{text-align:left}
table.stages th{background:#f3f3f3}table.stages td.key-numbers{text-align:left;font-size:13px}
table.stages td.text{text-align:left}table.stages tr.total td,table.stages tr.total th{background:#f7f7f7}
table.settings td{text-align:left;font-size:12px;max-width:60em;word-break:break-all}
table.header th{text-align:left;padding:2px 12px 2px 0;vertical-align:top;color:#555}
table.header td{padding:2px 0}
.banner{background:#fdecea;border:2px solid #c0392b;color:#7b1d13;padding:10px 14px;margin:0 0 1em;
font-size:18px}
details.shards{margin-top:.6em}details.shards summary{cursor:pointer;color:#245}
table.shard-rows{margin-top:.4em;font-size:13px}
p.cost{font-size:13px;color:#444;max-width:70em}p.prices{font-size:14px;font-weight:bold;max-width:70em}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{width:%(size)dpx;margin:0;font-size:12px}
figure img{max-width:100%%;display:block}.missing{height:%(size)dpx;background:#eee;color:#900;padding:4px}
.score{font-weight:bold}.id{color:#777}.bar.all{fill:#c8c8c8}.bar.kept{fill:#3b75c4;fill-opacity:.85}
svg text{font-size:11px}svg text.axis-label{font-size:12px}svg text.cut-label{font-size:12px;font-weight:bold}
.side-by-side{display:grid;grid-template-columns:1fr 1fr;gap:24px}
.side-by-side section{border:1px solid #ddd;padding:0 12px 12px}.side-by-side section.kept{background:#f4f8fd}
.side-by-side section.rejected{background:#fdf5f4}.side-by-side h3{margin:.6em 0}
.grid.small figure{width:150px}.grid.small .missing{height:150px}
.reason{color:#a5281b;font-weight:bold}.detail{color:#666;font-size:12px}p.none{color:#555}
table.rejects td,table.rejects td:first-child{text-align:left;font-size:13px}
table.rejects td:nth-child(3){text-align:right}
table.rejects ul{margin:0;padding-left:1.2em}table.rejects th{text-align:left}
"""


def side_by_side_html(
    config: ReportConfig,
    selected: Sequence[Record],
    rejected: Sequence[Record],
    select: Mapping[str, Any] | None,
    cut: float | None,
) -> tuple[str, int]:
    """The highest-scoring kept records next to the lowest-scoring ones selection rejected (each with its
    reason); and the number of thumbnails."""
    n = config.examples_per_side
    best = [
        r
        for r in grid_records(selected, len(selected), config.score_key)
        if score_of(r, config.score_key) is not None
    ]
    kept_cells = [_grid_cell(r, config) for r in best[:n]]
    worst = sorted(rejected, key=lambda r: (score_of(r, config.score_key) or 0.0, r.id))[:n]
    rejected_cells = [
        _grid_cell(r, config, "rejected: " + selection_reason(score_of(r, config.score_key), select, cut))
        for r in worst
    ]
    if rejected_cells:
        right = "".join(cell for cell, _ in rejected_cells)
    elif rejected:
        right = "<p>none shown (report setting examples_per_side = 0)</p>"
    else:
        right = (
            "<p class='none'>No rejected records to show: selection kept every scored record, or the "
            "pre-selection manifests were not given to the report.</p>"
        )
    doc = (
        "<div class='side-by-side'>"
        f"<section class='kept'><h3>Kept: the {len(kept_cells)} highest scores</h3>"
        f"<div class='grid small'>{''.join(cell for cell, _ in kept_cells)}</div></section>"
        f"<section class='rejected'><h3>Rejected by selection: the {len(rejected_cells)} lowest scores</h3>"
        f"<div class='grid small'>{right}</div></section></div>"
    )
    return doc, sum(shown for _, shown in kept_cells + rejected_cells)


def render_html(
    config: ReportConfig,
    selected: Sequence[Record],
    all_stats: Sequence[dict[str, Any]],
    all_scores: Sequence[float] | None,
    selected_uri: str = "",
    rejected: Sequence[Record] = (),
) -> tuple[str, int]:
    """The report document and the number of thumbnails it holds. `rejected`: the lowest-scoring records
    selection dropped (shown next to the best kept ones)."""
    kept_scores = _scores(selected, config.score_key)
    hist = compute_histogram(kept_scores, all_scores, config.histogram_bins)
    select = first_marker(all_stats, "select")
    cut = selection_cut(select, kept_scores)
    threshold_mode = cut is not None and (select or {}).get("mode") == "threshold"
    devices = stage_devices(all_stats, selected)
    cells = [_grid_cell(rec, config) for rec in grid_records(selected, config.max_images, config.score_key)]
    side, n_side = side_by_side_html(config, selected, rejected, select, cut)
    n_all = len(all_scores) if all_scores is not None else None
    summary = _summary_line(kept_scores, len(selected), n_all, config.score_key)
    legend = "grey: all scored records, blue: kept" if all_scores is not None else "kept records"
    if cut is not None:
        legend += "; red dashed line: the selection cut " + (
            "(threshold)" if threshold_mode else "(lowest kept score)"
        )
    groups = collect_rejects(all_stats, config.max_reject_examples)
    early = (
        rejects_table_html(groups)
        if groups
        else "<p class='none'>No record was rejected before selection.</p>"
    )
    doc = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(config.pipeline)} report</title>"
        f"<style>{STYLE % {'size': config.thumbnail_size}}</style></head><body>"
        f"<h1>{html.escape(config.pipeline)} report</h1>"
        f"{header_html(all_stats, selected_uri, pipeline=config.pipeline, preset=config.preset)}"
        f"<p class='summary'>{html.escape(summary)}</p>"
        f"<p class='cost'>{html.escape(cost_line(all_stats, config.gpu_hour_usd, devices))}</p>"
        f"<h2>Stages</h2>{stages_table_html(all_stats, devices)}"
        f"<h2>Cost: billed time</h2>{cost_table_html(all_stats, config, devices)}"
        f"<h2>{html.escape(config.score_key)} scores</h2><p>{legend}; "
        f"{len(selected) - len(kept_scores)} selected record(s) without a score are not counted.</p>"
        f"{histogram_svg(hist, config.score_key, cut, 'threshold' if threshold_mode else 'cut')}"
        f"<h2>Kept and rejected</h2>{side}"
        "<h2>Rejected before selection</h2><p>By curation, generation and safety checks, CLIP scoring: "
        f"counts from the stage markers, examples from their rejects files.</p>{early}"
        f"<h2>Kept images</h2><p>{len(cells)} of {len(selected)} selected records, spread from the highest "
        f"to the lowest score.</p><div class='grid'>{''.join(cell for cell, _ in cells)}</div>"
        f"<h2>What made this data</h2>{settings_table_html(all_stats)}"
        "</body></html>\n"
    )
    return doc, n_side + sum(shown for _, shown in cells)


def read_markers(stage_outputs: Sequence[str]) -> list[dict[str, Any]]:
    """The done markers of `stage_outputs`, in order; an output without one is an error."""
    out = []
    for uri in stage_outputs:
        require_done(uri)
        out.append(read_stats(uri))
    return out


def _read_scored(
    manifests: Sequence[str], score_key: str, kept_ids: set[str], n_lowest: int
) -> tuple[list[float] | None, list[Record]]:
    """All scores of the pre-selection manifests (None without them), and the `n_lowest` lowest-scoring
    records not kept (one manifest in memory at a time)."""
    if not manifests:
        return None, []
    from synthvlm.manifest_table import read_columns

    scores: list[float] = []
    lowest: list[tuple[float, str, Record]] = []
    for uri in manifests:  # column-wise: the full records are built only for the few shown
        columns = read_columns(uri)
        values, present = columns.score(score_key)
        scores.extend(values[present].tolist())
        ids = columns.ids.to_pylist()
        candidates = [
            (float(values[i]), ids[i], i) for i in np.flatnonzero(present) if ids[i] not in kept_ids
        ]
        chosen = heapq.nsmallest(n_lowest, candidates, key=lambda t: (t[0], t[1]))
        records = columns.records([i for _, _, i in chosen]) if chosen else []
        merged = [*lowest, *((score, rid, rec) for (score, rid, _), rec in zip(chosen, records, strict=True))]
        lowest = heapq.nsmallest(n_lowest, merged, key=lambda t: (t[0], t[1]))
    return scores, [rec for _, _, rec in lowest]


def _process(config: ReportConfig, run: StageRun) -> StageStats:
    stats = StageStats(stage="report")
    selected = read_manifest(run.inputs["selected"])
    stats.count_in = len(selected)
    all_stats = read_markers(run.inputs["stage_outputs"])
    kept_ids = {rec.id for rec in selected}
    all_scores, rejected = _read_scored(
        run.inputs["all_scores"], config.score_key, kept_ids, config.examples_per_side
    )
    doc, n_images = render_html(config, selected, all_stats, all_scores, run.inputs["selected"], rejected)
    storage.write_text(run.output, doc, content_type="text/html; charset=utf-8")
    stats.count_out = n_images
    log.info("report with %d images", n_images)
    return stats


# Every setting changes the HTML (gpu_hour_usd, cpu_hour_usd and llm_prices the cost).
REPORT = Stage(name="report", process=_process)


def write_report(
    config: ReportConfig,
    selected_manifest: str,
    stage_outputs: Sequence[str],
    output_uri: str,
    all_scores_manifests: Sequence[str] = (),
) -> str:
    """Write the HTML report of `selected_manifest`; returns the versioned report (a copy is published
    at `output_uri`).

    `stage_outputs` are outputs with done markers, shown in order as the stage table; their rejects files
    (curate's, generate's) give the examples of what was dropped before selection.
    `all_scores_manifests` (optional) are the pre-selection manifests, drawn behind the kept scores; the
    lowest-scoring records among them that selection dropped are shown next to the best kept ones.
    """
    for uri in stage_outputs:
        require_done(uri)
    inputs = {
        "selected": selected_manifest,
        "stage_outputs": list(stage_outputs),
        "all_scores": list(all_scores_manifests),
    }
    return run_stage(REPORT, config, inputs, output_uri)


def report_markdown(config: ReportConfig, selected_manifest: str, stage_outputs: Sequence[str]) -> str:
    """A short Markdown summary (stage counts + score summary) for a KFP Markdown artifact."""
    selected = read_manifest(selected_manifest)
    kept = _scores(selected, config.score_key)
    markers = read_markers(stage_outputs)
    lines = [
        f"# {config.pipeline} report",
        "",
        md_cell(_summary_line(kept, len(selected), None, config.score_key)),
        "",
        md_cell(cost_line(markers, config.gpu_hour_usd, stage_devices(markers, selected))),
        "",
        *cost_markdown(markers, config, stage_devices(markers, selected)),
        "",
        "| stage | in | out | rejects | seconds |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for stats in markers:
        rejects = ", ".join(f"{k}: {v}" for k, v in sorted(stats.get("rejects", {}).items())) or "-"
        cells = [stats.get("stage", "?"), stats.get("count_in", 0), stats.get("count_out", 0), rejects]
        cells.append(stats.get("seconds", "-"))
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
