from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from synthvlm.records import Record, write_manifest
from synthvlm.stage import StageStats, is_done, mark_done, read_stats
from synthvlm.stages.report import (
    ReportConfig,
    compute_histogram,
    grid_records,
    report_markdown,
    settings_table_html,
    write_report,
)
from tests.published import published

XSS_CAPTION = 'a cat <script>alert("x")</script> & a "dog"'


class _Collector(HTMLParser):
    """Collects <img> srcs, histogram bars and script tags of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.img_srcs: list[str] = []
        self.bars: dict[str, list[int]] = {"all": [], "kept": []}
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "img":
            self.img_srcs.append(attr["src"] or "")
        if tag == "rect" and "bar" in (attr.get("class") or ""):
            kind = "kept" if "kept" in (attr["class"] or "") else "all"
            self.bars[kind].append(int(attr["data-count"] or 0))
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            value = attr.get(name) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)


def _parse(doc: str) -> _Collector:
    parser = _Collector()
    parser.feed(doc)
    return parser


def _section(doc: str, title: str) -> str:
    """The document from the <h2> with this title to the next <h2>."""
    start = doc.index(f"<h2>{title}</h2>")
    end = doc.find("<h2>", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


def _kept_grid(doc: str) -> _Collector:
    return _parse(_section(doc, "Kept images"))


def _records(tmp_path: Path, n: int, score_key: str = "clip") -> list[Record]:
    out = []
    for i in range(n):
        path = tmp_path / "images" / f"r{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 20), (i * 7 % 256, 100, 50)).save(path)
        caption = XSS_CAPTION if i == 0 else f"caption number {i}"
        out.append(
            Record(id=f"r{i:03d}", caption=caption, image_uri=str(path), scores={score_key: 0.2 + i / 200})
        )
    return out


def _stage_output(tmp_path: Path, name: str, count_in: int, count_out: int, rejects: dict[str, int]) -> str:
    uri = str(tmp_path / f"{name}.jsonl")
    Path(uri).write_text("")
    stats = StageStats(stage=name, count_in=count_in, count_out=count_out)
    stats.rejects.update(rejects)
    stats.extra["gpu_seconds"] = 12.5
    mark_done(uri, stats)
    return uri


@pytest.fixture
def run(tmp_path: Path) -> tuple[str, list[Record], list[str]]:
    records = _records(tmp_path, 10)
    selected = str(tmp_path / "selected.jsonl")
    write_manifest(selected, records)
    outputs = [
        _stage_output(tmp_path, "curate", 1000, 400, {"too_short": 350, "llm_judge": 250}),
        _stage_output(tmp_path, "select", 400, 10, {"below_top_k": 390}),
    ]
    return selected, records, outputs


def test_report_has_one_img_per_record_and_is_self_contained(run, tmp_path: Path) -> None:
    selected, records, outputs = run
    out = str(tmp_path / "report.html")
    assert published(write_report(ReportConfig(thumbnail_size=16), selected, outputs, out), out)
    parsed = _parse(Path(out).read_text())
    assert len(_kept_grid(Path(out).read_text()).img_srcs) == len(records)
    # ... and the 8 best of them again, side by side with the (here: no) rejected ones
    assert len(parsed.img_srcs) == len(records) + 8
    assert parsed.external == []
    assert "<link" not in Path(out).read_text()
    src = parsed.img_srcs[0]
    assert src.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) == 16
    assert is_done(out) and read_stats(out)["count_out"] == len(records) + 8


def test_report_caps_images_at_max_images(run, tmp_path: Path) -> None:
    selected, _, outputs = run
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(max_images=4, thumbnail_size=16), selected, outputs, out)
    assert len(_kept_grid(Path(out).read_text()).img_srcs) == 4


def test_caption_is_escaped(run, tmp_path: Path) -> None:
    selected, _, outputs = run
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, out)
    doc = Path(out).read_text()
    assert "<script>" not in doc
    assert _parse(doc).scripts == 0
    assert "a cat &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a &quot;dog&quot;" in doc


def test_report_shows_stage_counts_from_markers(run, tmp_path: Path) -> None:
    selected, _, outputs = run
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, out)
    doc = Path(out).read_text()
    rows = re.findall(
        r"<tr><td>(\w+)</td><td class='shards'>(\d+)</td><td class='count-in'>(\d+)</td>"
        r"<td class='count-out'>(\d+)</td>",
        doc,
    )
    assert rows == [("curate", "1", "1000", "400"), ("select", "1", "400", "10")]
    assert "too_short: 350" in doc and "llm_judge: 250" in doc and "below_top_k: 390" in doc
    assert "gpu seconds: 12.5 s" in doc


def test_histogram_counts_add_up(run, tmp_path: Path) -> None:
    selected, records, outputs = run
    all_records = _records(tmp_path / "all", 30)
    all_manifest = str(tmp_path / "all.jsonl")
    write_manifest(all_manifest, all_records)
    out = str(tmp_path / "report.html")
    config = ReportConfig(thumbnail_size=16, histogram_bins=7)
    write_report(config, selected, outputs, out, all_scores_manifests=[all_manifest])
    bars = _parse(Path(out).read_text()).bars
    assert len(bars["kept"]) == len(bars["all"]) == 7
    assert sum(bars["kept"]) == len(records)
    assert sum(bars["all"]) == len(all_records)


def test_histogram_without_all_scores_has_only_kept_bars(run, tmp_path: Path) -> None:
    selected, records, outputs = run
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, out)
    bars = _parse(Path(out).read_text()).bars
    assert bars["all"] == [] and len(bars["kept"]) == 20
    assert sum(bars["kept"]) == len(records)


def test_compute_histogram_shares_bins_over_both_ranges() -> None:
    hist = compute_histogram([0.5, 0.6], [0.0, 0.1, 0.5, 1.0], bins=4)
    assert hist.edges == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert hist.kept_counts == [0, 0, 2, 0]
    assert hist.all_counts == [2, 0, 1, 1]


def test_compute_histogram_empty_and_constant() -> None:
    assert sum(compute_histogram([], None, bins=5).kept_counts) == 0
    assert sum(compute_histogram([0.3, 0.3, 0.3], None, bins=5).kept_counts) == 3


def test_grid_spreads_from_best_to_worst(tmp_path: Path) -> None:
    records = [Record(id=f"r{i}", caption="c", scores={"clip": i / 10}) for i in range(10)]
    records.append(Record(id="unscored", caption="c"))
    picked = grid_records(records, 3, "clip")
    assert [r.id for r in picked] == ["r9", "r4", "unscored"]
    assert [r.id for r in grid_records(records[:3], 5, "clip")] == ["r2", "r1", "r0"]


def test_unreadable_image_is_reported_not_fatal(run, tmp_path: Path) -> None:
    selected, records, outputs = run
    Path(records[1].image_uri).write_bytes(b"not an image")
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, out)
    doc = Path(out).read_text()
    assert len(_kept_grid(doc).img_srcs) == len(records) - 1
    assert "image unreadable" in doc


def test_unfinished_stage_output_is_an_error(run, tmp_path: Path) -> None:
    selected, _, outputs = run
    with pytest.raises(FileNotFoundError, match="not marked complete"):
        write_report(
            ReportConfig(), selected, [*outputs, str(tmp_path / "nope.jsonl")], str(tmp_path / "r.html")
        )


def test_report_is_idempotent(run, tmp_path: Path) -> None:
    selected, _, outputs = run
    out = tmp_path / "report.html"
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, str(out))
    out.write_text("kept")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, str(out))
    assert out.read_text() == "kept"


def test_report_markdown(run) -> None:
    selected, records, outputs = run
    md = report_markdown(ReportConfig(), selected, outputs)
    assert f"{len(records)} records selected" in md
    assert "| curate | 1000 | 400 | llm_judge: 250, too_short: 350 |" in md
    assert "| select | 400 | 10 | below_top_k: 390 |" in md


def test_settings_table_shows_each_fingerprint_once_with_its_settings() -> None:
    shard = {"stage": "generate", "fingerprint": "a" * 64, "settings": {"steps": 60}, "params": {}}
    stats = [
        {**shard, "output": "/d/generate/generate-aaaa/shards/shard-0.jsonl"},
        {**shard, "output": "/d/generate/generate-aaaa/shards/shard-1.jsonl"},
        {
            "stage": "select",
            "fingerprint": "b" * 64,
            "settings": {"k": 3},
            "params": {},
            "output": "/d/s.jsonl",
        },
    ]
    table = settings_table_html(stats)
    assert table.count("<tr><td>generate</td>") == 1 and table.count("<tr><td>select</td>") == 1
    assert "a" * 16 in table and "a" * 17 not in table
    assert "shard-0.jsonl" in table and "shard-1.jsonl" in table
    assert "&quot;steps&quot;: 60" in table and "&quot;k&quot;: 3" in table


def _marker(stage: str, output: str, count_in: int, count_out: int, **extra) -> dict:
    return {
        "stage": stage,
        "fingerprint": (stage[0] * 64),
        "settings": extra.pop("settings", {}),
        "params": extra.pop("params", {}),
        "output": output,
        "count_in": count_in,
        "count_out": count_out,
        "rejects": extra.pop("rejects", {}),
        "seconds": extra.pop("seconds", 1.0),
        **extra,
    }


def _pipeline_stats(gen_model: str = "stabilityai/sdxl", clip_model: str = "ViT-L-14") -> list[dict]:
    gen = {"model": gen_model, "revision": None, "steps": 30}
    return [
        _marker("captions", "/d/captions.jsonl", 20, 10, rejects={"beyond max_records": 10}),
        _marker("generate", "/d/g/shard-0.jsonl", 5, 5, settings=gen, generate_seconds=1800.123456),
        _marker(
            "generate", "/d/g/shard-1.jsonl", 5, 4, settings=gen, generate_seconds=1700.0, rejects={"nsfw": 1}
        ),
        _marker(
            "clip_score",
            "/d/s/shard-0.jsonl",
            5,
            5,
            settings={"model": clip_model, "pretrained": "openai"},
            mean_score=0.312345678,
            min_score=0.2,
            max_score=0.4,
            reject_examples={"x": ["y"]},
        ),
        _marker(
            "clip_score",
            "/d/s/shard-1.jsonl",
            4,
            4,
            settings={"model": clip_model, "pretrained": "openai"},
            mean_score=0.3,
            min_score=0.25,
            max_score=0.35,
            reject_examples={"x": ["y"]},
        ),
        _marker("select", "/d/select/selected.jsonl", 9, 3, settings={"k": 3}, steps={"a": {"in": 1}}),
        _marker("export_llava", "/d/e.json", 3, 3, params={"data_root": "gs://bucket/run-1"}),
    ]


def test_stage_table_has_one_row_per_stage_and_shard_rows_in_details() -> None:
    from synthvlm.stages.report import stages_table_html

    table = stages_table_html(_pipeline_stats(), {"generate": "GPU", "clip_score": "GPU"})
    main, details = table.split("<details", 1)
    for stage in ("captions", "generate", "clip_score", "select", "export_llava"):
        assert main.count(f"<tr><td>{stage}</td>") == 1
    assert re.search(
        r"<tr><td>generate</td><td class='shards'>2</td><td class='count-in'>10</td>"
        r"<td class='count-out'>9</td>",
        main,
    )
    assert "nsfw: 1" in main
    assert "painting time (GPU): 58 min 20 s" in main  # 3500.1 s summed over the shards
    assert "mean score: 0.3069" in main  # weighted by the records each shard scored
    details = "<details" + details
    assert details.count("<tr class='shard'>") == 7
    assert "shard-0.jsonl" in details and "shard-1.jsonl" in details
    assert "</details>" in details


def test_stage_table_has_no_raw_python_reprs() -> None:
    from synthvlm.stages.report import stages_table_html

    table = stages_table_html(_pipeline_stats())
    main = table.split("<details", 1)[0]
    assert "{" not in main and "}" not in main and "[" not in main
    assert "0.312345678" not in table and "1800.123456" not in table
    assert "None" not in main


def test_header_names_date_root_models_and_selection_fingerprint() -> None:
    from datetime import UTC, datetime

    from synthvlm.stages.report import header_html

    header = header_html(
        _pipeline_stats(), "/d/select/selected.jsonl", now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert "2026-01-02 03:04:05 UTC" in header
    assert "gs://bucket/run-1" in header
    assert "stabilityai/sdxl (revision: default branch)" in header
    assert "ViT-L-14 (pretrained: openai)" in header
    assert "s" * 16 in header and "s" * 17 not in header  # the select marker's fingerprint, 16 hex
    assert "banner" not in header and "Random-weight" not in header
    without_export = header_html(_pipeline_stats()[:-1], "/d/select/selected.jsonl")
    assert "/d/select/" in without_export


@pytest.mark.parametrize(
    ("gen_model", "clip_model"),
    [("synthvlm/tiny-sdxl", "ViT-L-14"), ("stabilityai/sdxl", "synthvlm-tiny-clip")],
)
def test_random_test_models_banner(gen_model: str, clip_model: str) -> None:
    from synthvlm.stages.report import header_html

    header = header_html(_pipeline_stats(gen_model, clip_model))
    assert "class='banner'" in header
    assert "images are noise and scores meaningless" in header


def test_header_escapes_user_text() -> None:
    from synthvlm.stages.report import header_html

    header = header_html(_pipeline_stats(gen_model="<b>evil</b>"))
    assert "<b>" not in header and "&lt;b&gt;evil&lt;/b&gt;" in header


def test_histogram_has_axes_ticks_and_a_cut_line(run, tmp_path: Path) -> None:
    selected, records, outputs = run
    all_manifest = str(tmp_path / "all.jsonl")
    write_manifest(all_manifest, _records(tmp_path / "all", 30))
    out = str(tmp_path / "report.html")
    write_report(ReportConfig(thumbnail_size=16), selected, outputs, out, all_scores_manifests=[all_manifest])
    doc = Path(out).read_text()
    svg = doc[doc.index("<svg") : doc.index("</svg>")]
    assert svg.count('<line class="cut"') == 1 and ">cut 0.2<" in svg  # lowest kept score is 0.2
    assert "clip score</text>" in svg and "count (records)</text>" in svg
    assert (
        len(re.findall(r'<text class="tick x"', svg)) >= 3
        and len(re.findall(r'<text class="tick y"', svg)) >= 2
    )
    # The cut line sits at the lowest kept score, the left edge of the plot (scores span 0.2 .. 0.345).
    x_cut = float(re.search(r'<line class="cut" x1="([\d.]+)"', svg).group(1))
    x_axis = float(re.search(r'<line class="axis" x1="([\d.]+)"', svg).group(1))
    assert x_cut == pytest.approx(x_axis)


def test_histogram_svg_without_scores_has_no_cut_line() -> None:
    from synthvlm.stages.report import histogram_svg

    svg = histogram_svg(compute_histogram([], None, bins=5), "clip")
    assert 'class="cut"' not in svg


def _done_output(tmp_path: Path, name: str, marker: dict) -> str:
    """An output whose marker holds exactly `marker` (fixed seconds, unlike mark_done's clock)."""
    import json

    from synthvlm.stage import done_uri

    uri = str(tmp_path / f"{name}.out")
    Path(uri).write_text("")
    Path(done_uri(uri)).write_text(json.dumps({"count_in": 1, "count_out": 1, "rejects": {}, **marker}))
    return uri


def test_report_cost_includes_load_time_training_and_llm_tokens(run, tmp_path: Path) -> None:
    from synthvlm.billing import cost_rows
    from synthvlm.stages.report import read_markers

    selected, _, _ = run
    outputs = [
        _done_output(
            tmp_path,
            "curate",
            {
                "stage": "curate",
                "seconds": 100.0,
                "llm_model": "gpt-4o-mini",
                "llm_prompt_tokens": 2_000_000,
                "llm_completion_tokens": 1_000_000,
            },
        ),
        _done_output(
            tmp_path,
            "generate",
            {
                "stage": "generate",
                "seconds": 1000.0,
                "load_seconds": 120.0,
                "generate_seconds": 800.0,
                "settings": {"device": "cuda"},
            },
        ),
        _done_output(
            tmp_path,
            "train",
            {
                "stage": "train_finetune",
                "seconds": 3600.0,
                "load_seconds": 300.0,
                "train_seconds": 3000.0,
                "settings": {"gpus_per_node": 8, "num_nodes": 2},
            },
        ),
    ]
    config = ReportConfig(gpu_hour_usd=2.0, cpu_hour_usd=0.05, llm_prices={"gpt-4o-mini": (0.15, 0.60)})
    rows = {row.stage: row for row in cost_rows(read_markers(outputs), config)}
    gen, train, curate = rows["generate"], rows["train_finetune"], rows["curate"]
    assert (gen.unit, gen.units, gen.load, gen.work, gen.idle) == ("GPU", 1.0, 120.0, 800.0, 80.0)
    assert gen.usd == pytest.approx(1000 / 3600 * 2.0)
    # training: gpus_per_node x num_nodes GPUs for its whole wall time, loading included
    assert (train.unit, train.units, train.load, train.work, train.idle) == (
        "GPU",
        16.0,
        300.0,
        3000.0,
        300.0,
    )
    assert train.usd == pytest.approx(16 * 3600 / 3600 * 2.0)
    assert (curate.unit, curate.units) == ("vCPU", 2.0) and curate.usd == pytest.approx(100 * 2 / 3600 * 0.05)

    out = str(tmp_path / "report.html")
    write_report(config, selected, outputs, out)
    section = _section(Path(out).read_text(), "Cost: billed time")
    assert "<td>generate</td><td>1</td><td>1 GPU</td><td>1,000.0</td><td>120.0</td><td>800.0</td>" in section
    assert "<td>train_finetune</td><td>1</td><td>16 GPU</td><td>3,600.0</td><td>300.0</td>" in section
    assert "<td>57,600.0</td><td>$2.000</td><td>$32.00</td>" in section  # 16 GPUs x 3600 s at $2/GPU-hour
    # LLM tokens: 2M input x $0.15 + 1M output x $0.60 per 1M tokens = $0.90
    assert "LLM gpt-4o-mini: 2,000,000 input + 1,000,000 output tokens" in section and "$0.90" in section
    assert "gpu_hour_usd = $2.00" in section and "gpt-4o-mini: $0.15 / $0.60" in section
    total = 1000 / 3600 * 2.0 + 32.0 + 100 * 2 / 3600 * 0.05 + 0.90
    assert f"<th>total</th><td colspan='8'></td><th>${total:,.2f}</th>" in section
    md = report_markdown(config, selected, outputs)
    assert "| train_finetune | 16 GPU x 1 pod(s) | 3600.0 | 300.0 | 3000.0 | 300.0 | $32.00 |" in md
    assert f"| total | | | | | | ${total:.2f} |" in md
