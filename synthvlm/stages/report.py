"""A self-contained HTML report of a run: image grid, score histogram and per-stage counts.

The file has no external assets (thumbnails are inline base64 JPEG, the histogram is inline SVG), so
it opens from a bucket, a laptop or the KFP UI's HTML artifact viewer alike. Captions are user data
and are HTML-escaped everywhere. `report_markdown` gives a short summary for a KFP Markdown artifact.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.records import Record, read_manifest
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, read_stats, require_done

log = logging.getLogger(__name__)

_JPEG_QUALITY = 85  # our choice: thumbnails only need to be recognisable, and small
_SVG_WIDTH, _SVG_HEIGHT, _SVG_MARGIN = 640, 240, 40
_STATS_COLUMNS = ("stage", "count_in", "count_out", "rejects", "seconds")
# What the runner writes into every marker: shown in the settings table, not in the stage table.
_RUN_KEYS = (
    "fingerprint",
    "format_version",
    "settings",
    "params",
    "inputs",
    "output",
    "excluded_from_fingerprint",
    "published_from",
)


class ReportConfig(StageConfig):
    """Settings of the HTML report."""

    # our choice: one screenful of thumbnails; also bounds the HTML size (~15 KB per thumbnail).
    max_images: int = Field(default=64, ge=0)
    # our choice: longer side in pixels; large enough to judge a caption against its image.
    thumbnail_size: int = Field(default=256, ge=16)
    # our choice: enough resolution to see the selection threshold at 100K-1M scores.
    histogram_bins: int = Field(default=20, ge=1)
    # key in Record.scores written by the CLIP scoring stage (SynthVLM's CLIPScore filter).
    score_key: str = "clip"
    # our assumption: roughly the on-demand price of one A100 GPU-hour on public clouds; set your own.
    gpu_hour_usd: float = Field(default=3.0, ge=0)


# Stages that hold one GPU per pod, and the statistic that measures how long they held it.
GPU_STAGE_SECONDS = {"generate": "generate_seconds", "clip_score": "seconds"}


def gpu_seconds(all_stats: Sequence[dict[str, Any]]) -> float:
    """GPU-seconds of the GPU stages (one GPU per shard pod), summed over shards."""
    total = 0.0
    for stats in all_stats:
        key = GPU_STAGE_SECONDS.get(stats.get("stage", ""))
        if key is not None:
            total += float(stats.get(key, stats.get("seconds", 0.0)))
    return total


def cost_line(all_stats: Sequence[dict[str, Any]], gpu_hour_usd: float) -> str:
    seconds = gpu_seconds(all_stats)
    return (
        f"GPU stages (generate + CLIP score): {seconds:.1f} GPU-seconds ({seconds / 3600:.3f} GPU-hours); "
        f"estimated cost ${seconds / 3600 * gpu_hour_usd:.2f} at ${gpu_hour_usd:.2f} per GPU-hour"
    )


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
    plot_h = _SVG_HEIGHT - 2 * _SVG_MARGIN
    height = plot_h * count / max_count if max_count else 0.0
    y = _SVG_HEIGHT - _SVG_MARGIN - height
    return (
        f'<rect class="bar {cls}" data-count="{count}" x="{x:.2f}" y="{y:.2f}" '
        f'width="{width:.2f}" height="{height:.2f}"><title>{html.escape(label)}</title></rect>'
    )


def histogram_svg(hist: Histogram, score_key: str) -> str:
    """Inline SVG: grey bars for all scores (when given) behind blue bars for kept scores."""
    n_bins = len(hist.kept_counts)
    max_count = max(hist.kept_counts + (hist.all_counts or []) + [0])
    plot_w = _SVG_WIDTH - 2 * _SVG_MARGIN
    bar_w = plot_w / n_bins
    bottom = _SVG_HEIGHT - _SVG_MARGIN
    parts = [
        f'<svg class="histogram" width="{_SVG_WIDTH}" '
        f'height="{_SVG_HEIGHT}" viewBox="0 0 {_SVG_WIDTH} {_SVG_HEIGHT}" role="img">'
    ]
    for i in range(n_bins):
        x = _SVG_MARGIN + i * bar_w
        lo, hi = hist.edges[i], hist.edges[i + 1]
        if hist.all_counts is not None:
            label = f"[{lo:.4f}, {hi:.4f}): {hist.all_counts[i]} all"
            parts.append(_bar(x, bar_w - 1, hist.all_counts[i], max_count, "all", label))
        label = f"[{lo:.4f}, {hi:.4f}): {hist.kept_counts[i]} kept"
        parts.append(_bar(x, bar_w - 1, hist.kept_counts[i], max_count, "kept", label))
    right = _SVG_WIDTH - _SVG_MARGIN
    parts.append(f'<line x1="{_SVG_MARGIN}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
    label_y = bottom + 16
    parts.append(f'<text x="{_SVG_MARGIN}" y="{label_y}" text-anchor="start">{hist.edges[0]:.4f}</text>')
    parts.append(f'<text x="{right}" y="{label_y}" text-anchor="end">{hist.edges[-1]:.4f}</text>')
    parts.append(
        f'<text x="{_SVG_WIDTH / 2}" y="{label_y + 16}" text-anchor="middle">{html.escape(score_key)}</text>'
    )
    parts.append(f'<text x="{_SVG_MARGIN}" y="{_SVG_MARGIN - 8}" text-anchor="start">max {max_count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _format_rejects(rejects: dict[str, Any]) -> str:
    if not rejects:
        return "-"
    items = sorted(rejects.items(), key=lambda kv: (-kv[1], kv[0]))
    return "<br>".join(f"{html.escape(str(reason))}: {count}" for reason, count in items)


def _format_extra(stats: dict[str, Any]) -> str:
    extra = sorted((k, v) for k, v in stats.items() if k not in _STATS_COLUMNS and k not in _RUN_KEYS)
    return "<br>".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in extra) or "-"


def stages_table_html(all_stats: Sequence[dict[str, Any]]) -> str:
    rows = [
        "<table class='stages'><thead><tr><th>stage</th><th>in</th><th>out</th><th>kept</th>"
        "<th>rejects by reason</th><th>seconds</th><th>other</th></tr></thead><tbody>"
    ]
    for stats in all_stats:
        count_in, count_out = stats.get("count_in", 0), stats.get("count_out", 0)
        kept = f"{100 * count_out / count_in:.1f}%" if count_in else "-"
        rows.append(
            f"<tr><td>{html.escape(str(stats.get('stage', '?')))}</td>"
            f"<td class='count-in'>{count_in}</td><td class='count-out'>{count_out}</td><td>{kept}</td>"
            f"<td>{_format_rejects(stats.get('rejects', {}))}</td>"
            f"<td>{html.escape(str(stats.get('seconds', '-')))}</td><td>{_format_extra(stats)}</td></tr>"
        )
    rows.append("</tbody></table>")
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


def _grid_cell(record: Record, config: ReportConfig) -> tuple[str, bool]:
    """One figure of the grid and whether its image could be read."""
    score = score_of(record, config.score_key)
    score_txt = f"{html.escape(config.score_key)} {score:.4f}" if score is not None else "no score"
    caption = html.escape(record.caption)
    image_html, shown = "<div class='missing'>no image</div>", False
    if record.image_uri:
        try:
            src = thumbnail_data_uri(record.image_uri, config.thumbnail_size)
            image_html, shown = f'<img src="{src}" alt="{caption}">', True
        except _image_errors() as exc:
            log.warning("report: cannot read image of %s (%s): %s", record.id, record.image_uri, exc)
            image_html = f"<div class='missing'>image unreadable: {html.escape(str(exc))}</div>"
    cell = (
        f"<figure>{image_html}<figcaption><span class='score'>{score_txt}</span> "
        f"<span class='id'>{html.escape(record.id)}</span><br>{caption}</figcaption></figure>"
    )
    return cell, shown


def _scores(records: Sequence[Record], score_key: str) -> list[float]:
    return [s for s in (score_of(r, score_key) for r in records) if s is not None]


def _summary_line(kept: Sequence[float], n_selected: int, n_all: int | None, score_key: str) -> str:
    text = f"{n_selected} records selected"
    if n_all is not None:
        text += f" of {n_all} scored"
    if kept:
        text += f"; {score_key}: mean {np.mean(kept):.4f}, min {min(kept):.4f}, max {max(kept):.4f}"
    return text


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table.stages{border-collapse:collapse}table.stages td,table.stages th{border:1px solid #ccc;padding:4px 8px;
text-align:right;vertical-align:top}table.stages td:first-child{text-align:left}
table.settings td{text-align:left;font-size:12px;max-width:60em;word-break:break-all}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{width:%(size)dpx;margin:0;font-size:12px}
figure img{max-width:100%%;display:block}.missing{height:%(size)dpx;background:#eee;color:#900;padding:4px}
.score{font-weight:bold}.id{color:#777}.bar.all{fill:#c8c8c8}.bar.kept{fill:#3b75c4;fill-opacity:.85}
svg text{font-size:11px}
"""


def render_html(
    config: ReportConfig,
    selected: Sequence[Record],
    all_stats: Sequence[dict[str, Any]],
    all_scores: Sequence[float] | None,
) -> tuple[str, int]:
    """The report document and the number of thumbnails it holds."""
    kept_scores = _scores(selected, config.score_key)
    hist = compute_histogram(kept_scores, all_scores, config.histogram_bins)
    cells = [_grid_cell(rec, config) for rec in grid_records(selected, config.max_images, config.score_key)]
    n_all = len(all_scores) if all_scores is not None else None
    summary = _summary_line(kept_scores, len(selected), n_all, config.score_key)
    legend = "grey: all scored records, blue: kept" if all_scores is not None else "kept records"
    doc = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>synthvlm report</title>"
        f"<style>{_STYLE % {'size': config.thumbnail_size}}</style></head><body>"
        f"<h1>synthvlm report</h1><p class='summary'>{html.escape(summary)}</p>"
        f"<p class='cost'>{html.escape(cost_line(all_stats, config.gpu_hour_usd))}</p>"
        f"<h2>Stages</h2>{stages_table_html(all_stats)}"
        f"<h2>What made this data</h2>{settings_table_html(all_stats)}"
        f"<h2>{html.escape(config.score_key)} scores</h2><p>{legend}; "
        f"{len(selected) - len(kept_scores)} selected record(s) without a score are not counted.</p>"
        f"{histogram_svg(hist, config.score_key)}"
        f"<h2>Images</h2><p>{len(cells)} of {len(selected)} selected records, spread from the highest to "
        f"the lowest score.</p><div class='grid'>{''.join(cell for cell, _ in cells)}</div>"
        "</body></html>\n"
    )
    return doc, sum(shown for _, shown in cells)


def _read_stats(stage_outputs: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for uri in stage_outputs:
        require_done(uri)
        out.append(read_stats(uri))
    return out


def _read_all_scores(manifests: Sequence[str], score_key: str) -> list[float] | None:
    if not manifests:
        return None
    scores: list[float] = []
    for uri in manifests:
        scores.extend(_scores(read_manifest(uri), score_key))
    return scores


def _process(config: ReportConfig, run: StageRun) -> StageStats:
    stats = StageStats(stage="report")
    selected = read_manifest(run.inputs["selected"])
    stats.count_in = len(selected)
    all_stats = _read_stats(run.inputs["stage_outputs"])
    all_scores = _read_all_scores(run.inputs["all_scores"], config.score_key)
    doc, n_images = render_html(config, selected, all_stats, all_scores)
    storage.write_text(run.output, doc, content_type="text/html; charset=utf-8")
    stats.count_out = n_images
    log.info("report with %d images", n_images)
    return stats


# Every setting changes the HTML (gpu_hour_usd the cost line).
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

    `stage_outputs` are outputs with done markers, shown in order as the stage table;
    `all_scores_manifests` (optional) are the pre-selection manifests, drawn behind the kept scores.
    """
    for uri in stage_outputs:
        require_done(uri)
    inputs = {
        "selected": selected_manifest,
        "stage_outputs": list(stage_outputs),
        "all_scores": list(all_scores_manifests),
    }
    return run_stage(REPORT, config, inputs, output_uri)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def report_markdown(config: ReportConfig, selected_manifest: str, stage_outputs: Sequence[str]) -> str:
    """A short Markdown summary (stage counts + score summary) for a KFP Markdown artifact."""
    selected = read_manifest(selected_manifest)
    kept = _scores(selected, config.score_key)
    lines = [
        "# synthvlm report",
        "",
        _md_cell(_summary_line(kept, len(selected), None, config.score_key)),
        "",
        _md_cell(cost_line(_read_stats(stage_outputs), config.gpu_hour_usd)),
        "",
        "| stage | in | out | rejects | seconds |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for stats in _read_stats(stage_outputs):
        rejects = ", ".join(f"{k}: {v}" for k, v in sorted(stats.get("rejects", {}).items())) or "-"
        cells = [stats.get("stage", "?"), stats.get("count_in", 0), stats.get("count_out", 0), rejects]
        cells.append(stats.get("seconds", "-"))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
