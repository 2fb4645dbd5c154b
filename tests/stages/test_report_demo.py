"""Both reports on demo-like runs: the real stages on the tiny random models and the offline template LLM,
small enough for a test, with some rejects at every step that can make them."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from synthvlm.llm.backend import BackendConfig
from synthvlm.models.clip import TINY_CLIP
from synthvlm.models.sdxl import TINY_SDXL
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.scoring import ScoreConfig
from synthvlm.stage import read_stats
from synthvlm.stages import stablellava as sl
from synthvlm.stages.captions import CaptionsConfig, load_captions
from synthvlm.stages.clip_score import score
from synthvlm.stages.curate import CurateConfig, curate
from synthvlm.stages.export_llava import ExportConfig, export_llava
from synthvlm.stages.generate import GenerateConfig, generate
from synthvlm.stages.report import ReportConfig, write_report
from synthvlm.stages.select import SelectConfig, select
from synthvlm.stages.stablellava_report import (
    Sample,
    StableLLaVAReportConfig,
    dialogue_html,
    images_of,
    read_samples,
    write_stablellava_report,
)

TEMPLATE = BackendConfig(backend="template")
TINY_GENERATE = dict(model=TINY_SDXL, steps=2, height=64, width=64, batch_size=4, device="cpu")
TINY_SCORE = dict(model=TINY_CLIP, pretrained=None, device="cpu", batch_size=16)
CAPTIONS = [
    "A red bicycle leaning against a white brick wall on a sunny afternoon.",
    "A bowl of ramen with a soft-boiled egg and green onions on a wooden table.",
    "An orange tabby cat sleeping on a stack of old books by a window.",
    "A field of sunflowers under a clear blue sky with a single oak tree in the distance.",
    "A lighthouse on a rocky cliff at dusk, waves crashing below.",
    "A yellow taxi driving through a rainy city street at night.",
    "A red bicycle leaning against a white brick wall on a sunny afternoon.",  # exact duplicate: curation
    "A snow-covered cabin in a pine forest with smoke rising from the chimney.",
    "Two golden retrievers playing with a blue ball on a green lawn.",
]


class _Page(HTMLParser):
    """Tags, <img> count and scripts of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs = 0
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        self.imgs += tag == "img"
        self.scripts += tag == "script"
        for name in ("src", "href"):
            value = attr.get(name) or ""
            if value and not value.startswith("data:"):
                self.external.append(value)


def _page(doc: str) -> _Page:
    page = _Page()
    page.feed(doc)
    return page


def _header(doc: str) -> dict[str, str]:
    table = doc[doc.index("<table class='header'>") :]
    table = table[: table.index("</table>")]
    return dict(re.findall(r"<tr><th>([^<]+)</th><td>(.*?)</td></tr>", table))


def _section(doc: str, title: str) -> str:
    start = doc.index(f"<h2>{title}</h2>")
    end = doc.find("<h2>", start + 1)
    return doc[start : end if end >= 0 else len(doc)]


def _main_rows(doc: str) -> list[str]:
    """The stage names of the aggregated stage table (not the per-shard rows)."""
    stages = _section(doc, "Stages").split("<details", 1)[0]
    return re.findall(r"<tr><td>(\w+)</td><td class='shards'>", stages)


# ---- SynthVLM -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthvlm_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthvlm")
    source = root / "input.jsonl"
    write_manifest(str(source), [Record(id=f"demo-{i:04d}", caption=c) for i, c in enumerate(CAPTIONS, 1)])
    captions = load_captions(CaptionsConfig(captions=str(source)), str(root / "captions" / "captions.jsonl"))
    curated = curate(
        CurateConfig.model_validate({"judge": {"llm": {"backend": "template"}}, "sample_size": None}),
        captions,
        str(root / "curate" / "curated.jsonl"),
    )
    # The blocklist turns one prompt away before painting: a generation reject with its reason.
    gen_config = GenerateConfig(**TINY_GENERATE, safety={"blocklist": ["ramen"]})
    shards = [generate(gen_config, curated, str(root / "generate"), rank, 2) for rank in range(2)]
    scored = [
        score(ScoreConfig(**TINY_SCORE), shard, str(root / "scores" / shard.rpartition("/")[2]))
        for shard in shards
    ]
    selected = select(SelectConfig(mode="top_k", k=4), scored, str(root / "select" / "selected.jsonl"))
    exported = export_llava(ExportConfig(), selected, str(root), str(root / "export"))
    outputs = [captions, curated, *shards, *scored, selected, exported]
    out = str(root / "report.html")
    write_report(
        ReportConfig(max_images=16, preset="demo"), selected, outputs, out, all_scores_manifests=scored
    )
    return {"root": root, "doc": Path(out).read_text(), "selected": selected, "scored": scored, "out": out}


def test_synthvlm_report_header_names_pipeline_preset_date_root_models_fingerprint(synthvlm_run) -> None:
    doc = synthvlm_run["doc"]
    header = _header(doc)
    assert header["pipeline"] == "synthvlm" and header["preset"] == "demo"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", header["written"])
    assert str(synthvlm_run["root"]) in header["data root"]
    assert "synthvlm/tiny-sdxl (revision: default branch)" in header["models"]
    assert "synthvlm-tiny-clip (pretrained: none (random init))" in header["models"]
    fingerprint = read_stats(synthvlm_run["selected"])["fingerprint"][:16]
    assert fingerprint in header["selection fingerprint"]
    assert "class='banner'" in doc and "Random-weight test models" in doc
    page = _page(doc)
    assert page.scripts == 0 and page.external == []


def test_synthvlm_report_has_one_aggregated_row_per_stage(synthvlm_run) -> None:
    doc = synthvlm_run["doc"]
    assert _main_rows(doc) == ["captions", "curate", "generate", "clip_score", "select", "export_llava"]
    # the two generation shards are one row, with the shard rows folded away
    assert "<td>generate</td><td class='shards'>2</td>" in doc
    assert _section(doc, "Stages").count("<tr class='shard'><td>generate</td>") == 2


def test_synthvlm_report_labels_painting_time_with_the_device_used(synthvlm_run) -> None:
    stages = _section(synthvlm_run["doc"], "Stages")
    assert "painting time (CPU):" in stages and "painting time (GPU)" not in stages
    cost = re.search(r"<p class='cost'>(.*?)</p>", synthvlm_run["doc"]).group(1)
    assert "ran on CPU here" in cost and "CPU-seconds, not priced as GPU time" in cost
    assert "0.0 GPU-seconds" in cost


def test_synthvlm_report_histogram_has_a_cut_line_at_the_lowest_kept_score(synthvlm_run) -> None:
    doc = synthvlm_run["doc"]
    svg = doc[doc.index("<svg") : doc.index("</svg>")]
    lowest = min(r.scores["clip"] for r in read_manifest(synthvlm_run["selected"]))
    assert svg.count('<line class="cut"') == 1 and f">cut {lowest:.4g}<" in svg


def test_synthvlm_report_shows_kept_and_rejected_side_by_side_with_reasons(synthvlm_run) -> None:
    side = _section(synthvlm_run["doc"], "Kept and rejected")
    kept_part, rejected_part = side.split("<section class='rejected'>", 1)
    selected = read_manifest(synthvlm_run["selected"])
    best = max(selected, key=lambda r: r.scores["clip"])
    assert best.id in kept_part and _page(kept_part).imgs == len(selected)
    all_scored = [r for uri in synthvlm_run["scored"] for r in read_manifest(uri)]
    rejected = sorted(
        (r for r in all_scored if r.id not in {s.id for s in selected}), key=lambda r: r.scores["clip"]
    )
    assert rejected and _page(rejected_part).imgs == len(rejected)
    cut = min(r.scores["clip"] for r in selected)
    worst = rejected[0]
    assert worst.id in rejected_part
    assert (
        f"rejected: score {worst.scores['clip']:.4f} below cut {cut:.4f} (not in the top k = 4)"
        in rejected_part
    )


def test_synthvlm_report_shows_curation_and_generation_rejects_with_reasons(synthvlm_run) -> None:
    early = _section(synthvlm_run["doc"], "Rejected before selection")
    rows = re.findall(
        r"<tr class='reject'><td>(\w+)</td><td class='reason'>([^<]+)</td><td>(\d+)</td>", early
    )
    assert ("curate", "dedup.exact_duplicate", "1") in rows
    assert ("generate", "blocked_prompt", "1") in rows
    # each with an example: the id and the caption it concerned
    assert "demo-0007" in early and "demo-0002" in early and "A bowl of ramen" in early


def test_synthvlm_report_stats(synthvlm_run) -> None:
    stats = read_stats(synthvlm_run["out"])
    assert stats["count_out"] == _page(synthvlm_run["doc"]).imgs > 0


# ---- StableLLaVA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stablellava_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stablellava")
    abilities = ["colour", "animal"]
    kw = sl.generate_keywords(
        sl.KeywordsConfig(abilities=abilities, requests_per_ability=1, keywords_per_request=8, llm=TEMPLATE),
        str(root / "stablellava" / "keywords.json"),
    )
    prompts = sl.generate_prompts(
        sl.PromptsConfig(
            abilities=abilities,
            prompts_per_ability=3,
            eval_per_ability=1,
            pairs_per_relation=1,
            relations=["similarity", "difference"],
            round_size=4,
            llm=TEMPLATE,
        ),
        kw,
        str(root / "stablellava" / "prompts.jsonl"),
    )
    dialogues = sl.generate_dialogues(
        sl.DialoguesConfig(multi_turn_fraction=0.5, llm=TEMPLATE),
        prompts,
        str(root / "stablellava" / "dialogues.jsonl"),
    )
    shards = [
        generate(GenerateConfig(**TINY_GENERATE), prompts, str(root / "generate"), r, 2) for r in range(2)
    ]
    scored = [
        score(ScoreConfig(**TINY_SCORE), shard, str(root / "scores" / shard.rpartition("/")[2]))
        for shard in shards
    ]
    # gamma between the two lowest scores: one image fails the CLIP check and its dialogues are dropped,
    # the multi-image samples of the other pairs pass.
    lowest, second = sorted({r.scores["clip"] for uri in scored for r in read_manifest(uri)})[:2]
    gamma = (lowest + second) / 2
    selected = select(
        SelectConfig(mode="threshold", threshold=gamma), scored, str(root / "select" / "s.jsonl")
    )
    exported = sl.export_stablellava(
        sl.StableLLaVAExportConfig(), selected, dialogues, str(root), str(root / "stablellava" / "export")
    )
    out = str(root / "stablellava_report.html")
    config = StableLLaVAReportConfig(preset="demo", max_samples=40)
    write_stablellava_report(
        config,
        keywords=kw,
        prompts=prompts,
        dialogues=dialogues,
        generated=shards,
        scored=scored,
        selected=selected,
        exported=exported,
        output_uri=out,
    )
    return {
        "root": root,
        "doc": Path(out).read_text(),
        "gamma": gamma,
        "prompts": prompts,
        "selected": selected,
        "exported": exported,
        "out": out,
    }


def test_stablellava_report_header_and_banners(stablellava_run) -> None:
    doc = stablellava_run["doc"]
    header = _header(doc)
    assert header["pipeline"] == "stablellava" and header["preset"] == "demo"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", header["written"])
    assert str(stablellava_run["root"]) in header["data root"]
    assert "synthvlm/tiny-sdxl" in header["models"] and "synthvlm-tiny-clip" in header["models"]
    assert "LLM (prompts): template / template" in header["models"]
    assert read_stats(stablellava_run["exported"])["fingerprint"][:16] in header["export fingerprint"]
    assert "Random-weight test models" in doc and "Offline template LLM" in doc
    page = _page(doc)
    assert page.scripts == 0 and page.external == []


def test_stablellava_report_has_one_aggregated_row_per_stage(stablellava_run) -> None:
    assert _main_rows(stablellava_run["doc"]) == [
        "stablellava_keywords",
        "stablellava_prompts",
        "stablellava_dialogues",
        "generate",
        "clip_score",
        "select",
        "stablellava_export",
    ]


def test_stablellava_report_counts_per_ability_through_every_step(stablellava_run) -> None:
    table = _section(stablellava_run["doc"], "Per ability, through every step")
    rows = {
        name: [int(n.replace(",", "")) for n in re.findall(r"<td(?: class='bad')?>([\d,]+)</td>", cells)]
        for name, cells in re.findall(r"<tr class='ability'><td>(\w+)</td>(.*?)</tr>", table)
    }
    assert {"colour", "animal"} <= set(rows)  # (and any ability the prompts stage adds itself)
    prompts = read_manifest(stablellava_run["prompts"])
    selected = {r.id for r in read_manifest(stablellava_run["selected"])}
    for ability, counts in rows.items():
        mine = [r for r in prompts if r.provenance["ability"] == ability]
        # keywords (bank, rejected), prompts (accepted, rejected), images (made, rejected), CLIP (pass, fail)
        assert counts[2] == len(mine) and counts[4] == len(mine)
        assert counts[6] == sum(r.id in selected for r in mine)
        assert counts[7] == sum(r.id not in selected for r in mine)
    assert sum(counts[7] for counts in rows.values()) > 0  # the CLIP check dropped some


def test_stablellava_report_gamma_line_and_rejects_with_reasons(stablellava_run) -> None:
    doc = stablellava_run["doc"]
    svg = doc[doc.index("<svg") : doc.index("</svg>")]
    assert svg.count('<line class="cut"') == 1 and f">gamma {stablellava_run['gamma']:.4g}<" in svg
    rejects = _section(doc, "Rejects by reason")
    rows = re.findall(
        r"<tr class='reject'><td>([\w ]+)</td><td class='reason'>([^<]+)</td><td>(\d+)</td>", rejects
    )
    reasons = {(stage, reason) for stage, reason, _ in rows}
    assert ("CLIP check", "CLIP score not above gamma") in reasons
    assert ("export", sl.NOT_SELECTED) in reasons
    # an example names the item, its ability and prompt, and the score against gamma
    assert re.search(r"<li><code>[\w-]+</code> \[(colour|animal)\] \(\(", rejects)
    assert f"gamma {stablellava_run['gamma']:.4g}" in rejects


def test_stablellava_report_shows_samples_with_images_prompts_and_dialogues(stablellava_run) -> None:
    section = _section(stablellava_run["doc"], "Samples")
    export_dir = str(Path(read_stats(stablellava_run["exported"])["output"]).parent)
    samples = read_samples(export_dir)
    assert section.count("<div class='sample'>") == len(samples) > 0
    multi = [s for s in samples if len(s.images) >= 2]
    assert multi, "the demo exports multi-image samples when their images pass"
    # a multi-image sample: all its images in one card, one image tag per image in its turns
    card = section[section.index(f"<code>{multi[0].id}</code>") :]
    card = card[: card.find("<div class='sample'>") if "<div class='sample'>" in card else len(card)]
    assert _page(card).imgs == len(multi[0].images)
    dialogue = card[card.index("<div class='dialogue'>") :]
    for n in range(1, len(multi[0].images) + 1):
        assert f"<span class='token'>image {n}</span>" in dialogue
    assert "((" in card  # the bracketed SD prompt each image was painted from
    assert "<div class='turn gpt'>" in card


def test_stablellava_report_llm_table(stablellava_run) -> None:
    # the template backend asks nothing and costs nothing: no rows of zeros, no table
    llm = _section(stablellava_run["doc"], "LLM requests, tokens and cost")
    assert "template / template" not in llm and "<table" not in llm
    assert "No LLM requests, tokens or cost recorded." in llm


def test_stablellava_report_bills_every_stage(stablellava_run) -> None:
    cost = _section(stablellava_run["doc"], "Cost: billed time")
    assert cost.index("gpu_hour_usd = $3.00") < cost.index("<table class='stages cost'>")
    for stage in (
        "stablellava_keywords",
        "stablellava_prompts",
        "generate",
        "clip_score",
        "stablellava_export",
    ):
        assert f"<tr><td>{stage}</td>" in cost
    assert "LLM template" not in cost and "0 input + 0 output" not in cost
    assert cost.count("template LLM") == 1


def test_samples_are_read_whatever_form_image_takes(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "image": "x/a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}]},
        {"id": "b", "image": ["x/b1.jpg", "x/b2.jpg"], "conversations": [{"from": "gpt", "value": "ok"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "text only"}]},
        {"not": "a sample"},
    ]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    (tmp_path / "interleaved.json").write_text(json.dumps([rows[1]]))  # the same id again: shown once
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"id": "e", "image": "x/e.jpg", "question": "q", "answer": "a"})
    )
    (tmp_path / "x.rejects.jsonl").write_text(json.dumps({"id": "r", "image": "x/r.jpg", "question": "q"}))
    samples = {s.id: s for s in read_samples(str(tmp_path))}
    assert set(samples) == {"a", "b", "c", "e"}
    assert samples["a"].images == ["x/a.jpg"] and samples["b"].images == ["x/b1.jpg", "x/b2.jpg"]
    assert samples["c"].images == [] and samples["e"].turns[0] == ("human", "q")
    assert images_of({"image": None}) == [] and isinstance(samples["a"], Sample)


def test_image_tokens_are_numbered_across_turns() -> None:
    turns = [
        ("human", "<image>\nHere is step one."),
        ("gpt", "Fold it."),
        ("human", "Done. <image> And now?"),
        ("human", "<image>"),
        ("human", "<image> one token too many"),
    ]
    doc = dialogue_html(turns, 3)
    labels = re.findall(r"<span class='token'>([^<]+)</span>", doc)
    assert labels == ["image 1", "image 2", "image 3", "image 4: no such image"]
    assert "<div class='turn gpt'>" in doc and "Done." in doc
    assert "&lt;script" in dialogue_html([("human", "<script>x</script>")], 0)
