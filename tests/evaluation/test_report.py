from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from synthvlm.evaluation.report import comparison_html, flat_metrics, write_comparison
from synthvlm.stage import StageStats, mark_done

XSS = '<script>alert("x")</script>&'


def doc(model: str, pope_acc: float, color_acc: float | None = None, model_uri: str = "gs://b/m") -> dict:
    by_ability = {"color": {"vqa": {"n": 2.0, "accuracy": color_acc}}} if color_acc is not None else {}
    return {
        "model": model,
        "model_uri": model_uri,
        "benchmarks": {
            "pope": {"n": 4, "metrics": {"yes_no": {"n": 4.0, "accuracy": pope_acc, "yes_ratio": 0.5}}},
            "colors": {"n": 2, "metrics": {"vqa": {"n": 2.0, "accuracy": 0.5}}, "by_ability": by_ability},
        },
    }


class Table(HTMLParser):
    """Rows of <td>/<th> texts, the classes of <td>s, and any <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.classes: list[list[str]] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
            self.classes.append([])
        elif tag in ("td", "th"):
            self._cell = []
            self.classes[-1].append(dict(attrs).get("class") or "")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html_doc: str) -> Table:
    table = Table()
    table.feed(html_doc)
    return table


def test_flat_metrics_names() -> None:
    flat = flat_metrics(doc("m", 0.75, color_acc=1.0))
    assert flat["pope.yes_no.accuracy"] == 0.75
    assert flat["colors.vqa.n"] == 2.0
    assert flat["colors.ability.color.vqa.accuracy"] == 1.0
    assert all(isinstance(v, float) for v in flat.values())


def test_comparison_rows_columns_and_best_value() -> None:
    table = parse(comparison_html([doc("base", 0.5, 0.0), doc("synth", 0.75, 1.0)]))
    assert table.rows[0] == ["benchmark", "ability", "metric", "base", "synth"]
    body = {tuple(row[:3]): row[3:] for row in table.rows[1:]}
    assert body[("pope", "all", "yes_no accuracy")] == ["0.500", "0.750"]
    assert body[("colors", "color", "vqa accuracy")] == ["0.000", "1.000"]
    assert body[("pope", "all", "yes_no n")] == ["4", "4"]  # counts without decimals
    # Overall rows of a benchmark come before its ability rows; benchmarks sorted by name.
    keys = [tuple(row[:2]) for row in table.rows[1:]]
    assert keys.index(("colors", "all")) < keys.index(("colors", "color")) < keys.index(("pope", "all"))
    # The better model is bold for accuracy, but not for yes_ratio (not a higher-is-better metric).
    pope_acc = next(i for i, row in enumerate(table.rows) if row[:3] == ["pope", "all", "yes_no accuracy"])
    assert table.classes[pope_acc][3:] == ["value", "best"]
    ratio = next(i for i, row in enumerate(table.rows) if row[:3] == ["pope", "all", "yes_no yes_ratio"])
    assert "best" not in table.classes[ratio]


def test_missing_values_and_duplicate_model_names() -> None:
    table = parse(comparison_html([doc("m", 0.5), doc("m", 0.6, color_acc=1.0)]))
    assert table.rows[0][3:] == ["m", "m (2)"]
    body = {tuple(row[:3]): row[3:] for row in table.rows[1:]}
    assert body[("colors", "color", "vqa accuracy")] == ["\u2013", "1.000"]


def test_everything_is_escaped() -> None:
    hostile = doc(XSS, 0.5, color_acc=1.0, model_uri=XSS)
    hostile["benchmarks"][XSS] = {"metrics": {XSS: {XSS: 1.0}}, "by_ability": {XSS: {"vqa": {"n": 1.0}}}}
    html_doc = comparison_html([hostile], title=XSS)
    table = parse(html_doc)
    assert table.scripts == 0
    assert "<script>" not in html_doc
    assert XSS in table.rows[0]  # the model name survives as text
    assert any(row[:3] == [XSS, "all", f"{XSS} {XSS}"] for row in table.rows)
    assert any(row[:2] == [XSS, XSS] for row in table.rows)


def test_write_comparison_reads_finished_results(tmp_path: Path) -> None:
    uris = []
    for name, acc in (("a", 0.25), ("b", 0.5)):
        uri = str(tmp_path / f"{name}.json")
        Path(uri).write_text(json.dumps(doc(name, acc)))
        mark_done(uri, StageStats(stage="evaluate"))
        uris.append(uri)
    out = write_comparison(uris, str(tmp_path / "cmp.html"))
    table = parse(Path(out).read_text())
    assert table.rows[0][3:] == ["a", "b"]
    unfinished = str(tmp_path / "c.json")
    Path(unfinished).write_text(json.dumps(doc("c", 1.0)))
    with pytest.raises(FileNotFoundError, match="not marked complete"):
        write_comparison([unfinished], str(tmp_path / "x.html"))
