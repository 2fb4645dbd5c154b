"""The perplexity and BLIP image-text matching filters, with tiny models built from configs (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthvlm.curation.image_text_matching import ImageTextMatchConfig, ImageTextMatcher
from synthvlm.curation.perplexity import TINY_LM, PerplexityConfig, PerplexityScorer
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.runner import describe
from synthvlm.stages.curate import CurateConfig, curate
from tests.curation.tiny_models import CORPUS, tiny_blip_itm, tiny_causal_lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> str:
    return tiny_causal_lm(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def itm(tmp_path_factory) -> str:
    return tiny_blip_itm(tmp_path_factory.mktemp("itm"))


def test_paper_thresholds_are_the_defaults() -> None:
    assert PerplexityConfig().max_perplexity == 5500  # issue 13 / data-juicer max_ppl
    assert ImageTextMatchConfig().min_score == 0.8  # issue 13
    assert ImageTextMatchConfig().model == "Salesforce/blip-itm-base-coco"
    assert not PerplexityConfig().enabled and not ImageTextMatchConfig().enabled  # on in --preset paper


def test_perplexity_is_exp_of_the_mean_token_nll(lm: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = PerplexityScorer(PerplexityConfig(model=lm, device="cpu", batch_size=3))
    values = scorer.perplexities([*CORPUS, "zq"])
    tokenizer, model = AutoTokenizer.from_pretrained(lm), AutoModelForCausalLM.from_pretrained(lm)
    for text, value in zip([*CORPUS, "zq"], values, strict=True):
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean NLL of tokens 1..T given the prefix
        assert value == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    # batching and padding do not change a caption's value
    one = PerplexityScorer(PerplexityConfig(model=lm, device="cpu", batch_size=1)).perplexities(CORPUS)
    assert one == pytest.approx(values[:4], rel=1e-5)


def test_builtin_tiny_lm_scores_bytes() -> None:
    scorer = PerplexityScorer(PerplexityConfig(model=TINY_LM, device="cpu"))
    values = scorer.perplexities(["A cat.", "A small boat on a calm lake at dawn."])
    assert all(200 < v < 320 for v in values)  # random weights over 257 symbols


def write_input(path: Path, records: list[Record]) -> str:
    write_manifest(str(path), records)
    return str(path)


def stage_config(**overrides) -> CurateConfig:
    return CurateConfig.model_validate(
        {"judge": {"enabled": False}, "clip": {"enabled": False}, "sample_size": None, **overrides}
    )


def rejects(out: str) -> dict[str, dict]:
    path = Path(out).parent / "rejects.jsonl"
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_perplexity_threshold_filters_in_the_stage(tmp_path: Path, lm: str) -> None:
    captions = {f"c{i}": text for i, text in enumerate(CORPUS)}
    values = PerplexityScorer(PerplexityConfig(model=lm, device="cpu")).perplexities(list(captions.values()))
    ranked = sorted(values)
    threshold = (ranked[1] + ranked[2]) / 2  # between the 2nd and 3rd: two kept, two dropped
    source = write_input(tmp_path / "in.jsonl", [Record(id=k, caption=v) for k, v in captions.items()])
    cfg = stage_config(
        perplexity={"enabled": True, "model": lm, "max_perplexity": threshold, "device": "cpu"}
    )

    out = curate(cfg, source, str(tmp_path / "out" / "curated.jsonl"))

    expected = {rid for rid, v in zip(captions, values, strict=True) if v <= threshold}
    kept = read_manifest(out)
    assert {r.id for r in kept} == expected and len(expected) == 2
    assert all(r.scores["perplexity"] == pytest.approx(values[int(r.id[1:])], abs=1e-3) for r in kept)
    rows = rejects(out)
    assert {rid: (row["stage"], row["reason"]) for rid, row in rows.items()} == {
        rid: ("perplexity", "perplexity_high") for rid in set(captions) - expected
    }
    assert all(row["details"]["max_perplexity"] == threshold for row in rows.values())
    # the weights' identity is part of the fingerprint (a local folder: its content hash)
    assert "content_sha256" in describe(out)["params"]["weights"]["perplexity"]


def noise_png(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_itm_threshold_filters_records_with_a_raw_image(tmp_path: Path, itm: str) -> None:
    images = [noise_png(tmp_path / f"{i}.png", i) for i in range(4)]
    matcher = ImageTextMatcher(ImageTextMatchConfig(model=itm, device="cpu", batch_size=2))
    values = [
        matcher.scores([Image.open(p).convert("RGB")], [c])[0] for p, c in zip(images, CORPUS, strict=True)
    ]
    assert all(0 <= v <= 1 for v in values)
    distinct = sorted(set(values))
    threshold = (distinct[0] + distinct[1]) / 2  # drops the lowest (random weights: scores are close)
    records = [Record(id=f"i{i}", caption=c, image_uri=images[i]) for i, c in enumerate(CORPUS)]
    records += [
        Record(id="no-image", caption="A quiet harbour with fishing boats at sunrise."),
        Record(
            id="missing",
            caption="A field of sunflowers under a clear sky.",
            image_uri=str(tmp_path / "x.png"),
        ),
    ]
    source = write_input(tmp_path / "in.jsonl", records)
    cfg = stage_config(
        itm={"enabled": True, "model": itm, "min_score": threshold, "device": "cpu", "batch_size": 3}
    )

    out = curate(cfg, source, str(tmp_path / "out" / "curated.jsonl"))

    above = {f"i{i}" for i, v in enumerate(values) if v >= threshold}
    kept = read_manifest(out)
    assert {r.id for r in kept} == above | {"no-image"} and 1 <= len(above) < 4
    for record in kept:
        if record.id != "no-image":
            assert record.scores["itm"] == pytest.approx(values[int(record.id[1:])], abs=1e-5)
    rows = rejects(out)
    assert rows["missing"]["stage"] == "itm" and rows["missing"]["reason"] == "image_missing"
    low = {rid for rid, row in rows.items() if row["reason"] == "itm_below_threshold"}
    assert low == {f"i{i}" for i in range(4)} - above
    assert "itm" in describe(out)["params"]["weights"]
