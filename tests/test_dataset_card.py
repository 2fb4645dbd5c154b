"""The dataset card: a YAML header the Hub reads, and a body built from markers, provenance and scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from synthvlm.dataset_card import (
    CardConfig,
    CardData,
    Subset,
    parse_header,
    render,
    settings_summary,
    size_category,
    text_histogram,
    upstream_stages,
)


def _data(**overrides) -> CardData:
    values = dict(
        recipe="SynthVLM",
        summary="Synthetic pairs.",
        how_made=["captions", "images"],
        task_categories=["image-to-text"],
        subsets=[Subset("default", 12_345, "webdataset/synthvlm-*.tar", shards=13)],
        samples=12_345,
        images=12_345,
        scores={"clip": [0.2, 0.25, 0.3, 0.31, 0.35]},
        provenance=[{"generation": {"model": "m", "steps": 60}, "ability": "x"}] * 3,
        upstream=[],
    )
    return CardData(**{**values, **overrides})


@pytest.mark.parametrize(
    ("n", "bucket"),
    [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (100_000, "100K<n<1M"), (2_000_000, "1M<n<10M")],
)
def test_size_category(n: int, bucket: str) -> None:
    assert size_category(n) == bucket


def test_header_parses_and_has_the_hub_fields() -> None:
    card = render(CardConfig(), _data(), ["generation"])
    head = parse_header(card)
    assert head == yaml.safe_load(card.split("---\n")[1])
    assert head["license"] == "other" and head["license_name"] and head["license_link"].startswith("https://")
    assert head["size_categories"] == ["10K<n<100K"] and head["task_categories"] == ["image-to-text"]
    assert head["configs"][0]["data_files"] == [{"split": "train", "path": "webdataset/synthvlm-*.tar"}]
    assert "synthvlm-{000000..000012}.tar" in card  # the webdataset brace range names every shard
    assert "`generation.steps` | `60`" in card and "ability" not in card.split("## Models")[1].split("##")[0]
    assert "| 5 | 0.2820 |" in card  # n and mean of the score table


def test_license_settings() -> None:
    head = parse_header(
        render(CardConfig(license="cc-by-4.0", license_name=None, license_link=None), _data(), [])
    )
    assert head["license"] == "cc-by-4.0" and "license_name" not in head
    with pytest.raises(ValueError, match="license_name"):
        CardConfig(license_name=None)
    assert CardConfig.model_validate(False).enabled is False


def test_text_histogram_and_settings_summary() -> None:
    lines = text_histogram([0.1, 0.1, 0.15, 0.3], bins=2, width=10).splitlines()
    assert lines[0].endswith("########## 3") and lines[1].endswith("#### 1")
    summary = settings_summary(
        [{"clip_scorer": {"model": "B"}, "generation": {"seed": 1}}, {"clip_scorer": {"model": "B"}}],
        ["*_scorer"],
    )
    assert summary == {"clip_scorer.model": {'"B"': 2}}


def test_upstream_stages_follow_markers(tmp_path: Path) -> None:
    def marker(name: str, stage: str, inputs: dict) -> str:
        uri = str(tmp_path / name)
        Path(uri + ".done").write_text(
            json.dumps(
                {
                    "stage": stage,
                    "fingerprint": name,
                    "settings": {"k": name},
                    "inputs": inputs,
                    "count_out": 2,
                }
            )
        )
        return uri

    gen = [marker(f"gen{i}", "generate", {}) for i in range(2)]
    scored = marker("scored", "clip_score", {"shards": [{"uri": u, "fingerprint": "x"} for u in gen]})
    selected = marker("selected", "select", {"scored": {"uri": scored, "fingerprint": "x"}})
    stages = upstream_stages([selected])
    assert [s["stage"] for s in stages] == ["generate", "clip_score", "select"]
    assert stages[0]["outputs"] == 2 and stages[0]["count_out"] == 4 and stages[0]["versions"] == 2
    card = render(CardConfig(), _data(upstream=[selected]), [])
    assert "| `generate` | 2 | 0 | 4 |" in card and "<code>select</code> settings" in card
