"""Evaluation results: the results document, flat numbers for KFP Metrics, and an HTML model comparison.

The evaluate stage writes one results document (JSON) per model:

    {"model": "synthvlm-100k", "model_uri": "gs://...",
     "benchmarks": {"pope": {"uri": "...", "n": 3000,
                             "metrics": {"yes_no": {"accuracy": 0.86, "f1": 0.85, ...}},
                             "by_ability": {"adversarial": {"yes_no": {...}}}}}}

`flat_metrics` turns it into "pope.yes_no.f1"-style numbers; `comparison_html` puts several documents
side by side (rows: benchmark / ability / metric, columns: models), everything HTML-escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from synthvlm import storage
from synthvlm.stage import require_done

# Metrics where a larger value is better: the best model of a row is shown in bold.
HIGHER_IS_BETTER = frozenset({"accuracy", "precision", "recall", "f1", "score", "judge_score"})
COUNT_METRICS = frozenset({"n", "unparsed", "judge_failed"})
ABILITY_KEY = "ability"


def flat_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """{'<benchmark>.<type>.<metric>': v, '<benchmark>.ability.<ability>.<type>.<metric>': v}."""
    out: dict[str, float] = {}
    for bench, result in doc.get("benchmarks", {}).items():
        for kind, metrics in result.get("metrics", {}).items():
            for name, value in metrics.items():
                out[f"{bench}.{kind}.{name}"] = float(value)
        for ability, by_type in result.get("by_ability", {}).items():
            for kind, metrics in by_type.items():
                for name, value in metrics.items():
                    out[f"{bench}.{ABILITY_KEY}.{ability}.{kind}.{name}"] = float(value)
    return out


RowKey = tuple[str, str, str, str]  # benchmark, ability ("" = all items), item type, metric


def _rows(doc: Mapping[str, Any]) -> dict[RowKey, float]:
    rows: dict[RowKey, float] = {}
    for bench, result in doc.get("benchmarks", {}).items():
        for kind, metrics in result.get("metrics", {}).items():
            rows.update({(bench, "", kind, name): float(v) for name, v in metrics.items()})
        for ability, by_type in result.get("by_ability", {}).items():
            for kind, metrics in by_type.items():
                rows.update({(bench, ability, kind, name): float(v) for name, v in metrics.items()})
    return rows


def _model_names(docs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column titles: the documents' model names, made unique with ' (2)', ' (3)', ..."""
    names: list[str] = []
    for i, doc in enumerate(docs):
        base = str(doc.get("model") or f"model {i + 1}")
        name, k = base, 2
        while name in names:
            name, k = f"{base} ({k})", k + 1
        names.append(name)
    return names


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "&ndash;"
    if metric in COUNT_METRICS:
        return f"{value:.0f}"
    return f"{value:.3f}"


def _best(metric: str, values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if metric not in HIGHER_IS_BETTER or len(present) < 2 or len(set(present)) == 1:
        return None
    return max(present)


_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td.key,th.key{text-align:left}tr.overall td{background:#f4f6fa}td.best{font-weight:bold}
"""


def comparison_html(docs: Sequence[Mapping[str, Any]], title: str = "synthvlm evaluation") -> str:
    """One table: a row per (benchmark, ability, metric), a column per model; best value per row in bold."""
    names = _model_names(docs)
    per_model = [_rows(doc) for doc in docs]
    keys = sorted({key for rows in per_model for key in rows}, key=lambda k: (k[0], k[1] != "", k[1:]))
    esc = html.escape
    head = "".join(f"<th>{esc(name)}</th>" for name in names)
    body = []
    for key in keys:
        bench, ability, kind, metric = key
        values = [rows.get(key) for rows in per_model]
        best = _best(metric, values)
        cells = "".join(
            f"<td class='{'best' if best is not None and v == best else 'value'}'>{_format(metric, v)}</td>"
            for v in values
        )
        row_class = "overall" if not ability else "ability"
        keys_html = "".join(f"<td class='key'>{esc(text)}</td>" for text in (bench, ability or "all"))
        body.append(
            f"<tr class='{row_class}'>{keys_html}<td class='key'>{esc(kind)} {esc(metric)}</td>{cells}</tr>"
        )
    sources = "".join(
        f"<li>{esc(name)}: {esc(str(doc.get('model_uri', '')))}</li>"
        for name, doc in zip(names, docs, strict=True)
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"
        "<table class='comparison'><thead><tr><th class='key'>benchmark</th><th class='key'>ability</th>"
        f"<th class='key'>metric</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<h2>Models</h2><ul>{sources}</ul></body></html>\n"
    )


def read_results(uri: str) -> dict[str, Any]:
    """A finished evaluate stage's results document."""
    require_done(uri)
    return json.loads(storage.read_text(uri))


def write_comparison(results_uris: Sequence[str], output_uri: str, title: str = "synthvlm evaluation") -> str:
    """Write the comparison of several evaluate outputs (in the given column order) as HTML."""
    docs = [read_results(uri) for uri in results_uris]
    storage.write_text(output_uri, comparison_html(docs, title), content_type="text/html; charset=utf-8")
    return output_uri
