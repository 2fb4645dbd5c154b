"""A dataset card (README.md with the HF Hub's YAML header) for an export.

The header carries what the Hub reads (huggingface.co/docs/hub/datasets-cards): license, task categories,
size category, language, tags and `configs` whose `data_files` point at the WebDataset shards (paths
relative to the card, which sits beside `webdataset/` in the export's folder: the fingerprint folder it was
written to and the stable folder the runner publishes card and shards to). The body says how the data
was made (the recipe and every upstream stage found through the completion markers, with its settings),
the models and settings as recorded in the records' provenance, counts, the score (CLIPScore)
distribution as quantiles and a text histogram, and the limitations.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from pydantic import Field, model_validator

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.stage import done_uri

SDXL_LICENSE_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"
# The Hub's size buckets (huggingface.co/docs/hub/datasets-cards, `size_categories`).
_SIZE_BUCKETS = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
]
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
_MAX_MARKERS = 5000  # upstream markers read for "how it was made" (64 generation shards are 64)
_MAX_VALUES_SHOWN = 3  # a setting with more distinct values is per image (a seed), not a run setting


class CardConfig(StageConfig):
    """The dataset card (README.md) of an export (`true`/`false` alone switches it on/off)."""

    enabled: bool = True  # our choice: a dataset published on the HF Hub needs a card
    # our choice: "other". The images are SDXL outputs, under the model's CreativeML Open RAIL++-M
    # (its use restrictions pass on to the outputs' users); the captions come from your caption source
    # (SynthVLM) or an LLM's terms (StableLLaVA). No single Hub license id covers both, so the card says
    # "other" with a name and a link; set `license` to a Hub id (e.g. "openrail++", "cc-by-4.0") and
    # license_name/license_link to null when one license does cover your data.
    license: str = "other"
    license_name: str | None = "sdxl-openrail-pp-m-and-caption-source-terms"  # our choice (Hub: a slug)
    license_link: str | None = SDXL_LICENSE_URL  # the image license; the card names the text's source
    pretty_name: str | None = None  # None: "<recipe> synthetic data"
    language: list[str] = Field(default_factory=lambda: ["en"])  # both papers' captions/prompts: English
    tags: list[str] = Field(default_factory=lambda: ["synthetic", "webdataset"])  # our choice

    @model_validator(mode="before")
    @classmethod
    def _bool_switch(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _other_needs_a_name(self) -> CardConfig:
        if self.license == "other" and not self.license_name:
            raise ValueError('license "other" needs license_name (the Hub asks for it)')
        return self


@dataclass
class Subset:
    """One HF config of the card: its shards (relative glob) and sample count."""

    name: str
    samples: int
    data_files: str | None = None  # glob relative to the card; None when no shards were written
    shards: int = 0
    split: str = "train"
    description: str = ""


@dataclass
class CardData:
    recipe: str  # "SynthVLM" / "StableLLaVA"
    summary: str  # one paragraph: what the data is
    how_made: list[str]  # the recipe's steps, in order
    task_categories: list[str]
    subsets: list[Subset]
    samples: int  # training samples (size_categories)
    images: int
    scores: dict[str, list[float]]  # score key -> the exported images' values
    provenance: list[Mapping[str, Any]]  # per record (or dialogue): what made it
    upstream: list[str]  # input URIs whose markers lead back through the pipeline
    counts: dict[str, Any] = field(default_factory=dict)  # extra rows of the counts table
    files: str = ""  # markdown: the other files of the export
    text_source: str = ""  # where the text comes from (licenses)


def size_category(n: int) -> str:
    for limit, name in _SIZE_BUCKETS:
        if n < limit:
            return name
    return "n>1B" if n < 10_000_000_000 else "n>1T"


def header(config: CardConfig, data: CardData) -> dict[str, Any]:
    """The YAML header as data."""
    head: dict[str, Any] = {"license": config.license}
    if config.license_name:
        head["license_name"] = config.license_name
    if config.license_link:
        head["license_link"] = config.license_link
    head["pretty_name"] = config.pretty_name or f"{data.recipe} synthetic data"
    head["language"] = list(config.language)
    head["task_categories"] = list(data.task_categories)
    head["size_categories"] = [size_category(data.samples)]
    head["tags"] = list(dict.fromkeys([*config.tags, data.recipe.lower()]))
    configs = []
    for index, subset in enumerate(s for s in data.subsets if s.data_files):
        entry: dict[str, Any] = {
            "config_name": subset.name,
            "data_files": [{"split": subset.split, "path": subset.data_files}],
        }
        if index == 0:
            entry["default"] = True
        configs.append(entry)
    if configs:
        head["configs"] = configs
    return head


def score_stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    qs = np.quantile(arr, QUANTILES)
    stats = {"n": float(len(arr)), "mean": float(arr.mean()), "std": float(arr.std())}
    stats.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)})
    return stats


def text_histogram(values: Sequence[float], bins: int = 10, width: int = 40) -> str:
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(arr, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    lines = []
    for count, left, right in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "#" * math.ceil(width * int(count) / top) if count else ""
        lines.append(f"{left:8.4f} .. {right:8.4f} | {bar} {int(count)}")
    return "\n".join(lines)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Leaves by dotted path; a scalar stays itself (tagged by type: 1, 1.0 and true are distinct settings),
    anything else as its JSON. Each distinct value is written as JSON once, by settings_summary."""
    if isinstance(value, Mapping):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    elif value is None or isinstance(value, str | int | float):
        out[prefix] = (type(value), value)
    else:
        out[prefix] = (str, json.dumps(value, sort_keys=True, ensure_ascii=False), "json")


def _as_json(leaf: tuple[Any, ...]) -> str:
    return leaf[1] if len(leaf) == 3 else json.dumps(leaf[1], sort_keys=True, ensure_ascii=False)


def settings_summary(
    provenance: Iterable[Mapping[str, Any]], sections: Sequence[str]
) -> dict[str, Counter[str]]:
    """Distinct values (as JSON) of every setting under the given provenance keys (a key ending in `*`
    matches every key with that suffix, e.g. "*_scorer"), counted over the records."""
    seen: dict[str, Counter[Any]] = {}
    for prov in provenance:
        flat: dict[str, Any] = {}
        for key, value in prov.items():
            if any(key == s or (s.startswith("*") and key.endswith(s[1:])) for s in sections):
                _flatten(key, value, flat)
        for key, value in flat.items():
            seen.setdefault(key, Counter())[value] += 1
    out: dict[str, Counter[str]] = {}
    for key, counts in sorted(seen.items()):
        out[key] = Counter()
        for leaf, count in counts.items():
            out[key][_as_json(leaf)] += count
    return out


def upstream_stages(uris: Iterable[str]) -> list[dict[str, Any]]:
    """The stages that made these inputs, found through the completion markers' `inputs`, upstream first:
    per stage its settings (the first marker's; `versions` counts distinct fingerprints), outputs and
    records in/out."""
    todo = [uri for uri in uris if uri]
    seen: set[str] = set()
    order: list[str] = []
    stages: dict[str, dict[str, Any]] = {}
    while todo and len(seen) < _MAX_MARKERS:
        uri = todo.pop(0).rstrip("/")
        if uri in seen:
            continue
        seen.add(uri)
        marker_uri = done_uri(uri)
        if not storage.exists(marker_uri):
            continue
        try:
            marker = json.loads(storage.read_text(marker_uri))
        except (ValueError, OSError):
            continue
        name = str(marker.get("stage", "?"))
        entry = stages.get(name)
        if entry is None:
            entry = stages[name] = {
                "stage": name,
                "settings": marker.get("settings") or {},
                "params": marker.get("params") or {},
                "fingerprints": set(),
                "outputs": 0,
                "count_in": 0,
                "count_out": 0,
            }
            order.append(name)
        if marker.get("fingerprint") not in entry["fingerprints"]:
            entry["fingerprints"].add(marker.get("fingerprint"))
            entry["outputs"] += 1
            entry["count_in"] += int(marker.get("count_in") or 0)
            entry["count_out"] += int(marker.get("count_out") or 0)
        for value in (marker.get("inputs") or {}).values():
            items = value if isinstance(value, list) else [value]
            todo += [item["uri"] for item in items if isinstance(item, dict) and item.get("uri")]
    out = []
    for name in reversed(order):
        entry = stages[name]
        out.append({**entry, "versions": len(entry.pop("fingerprints"))})
    return out


def _table(rows: Iterable[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return lines


def _settings_lines(summary: Mapping[str, Counter[str]], total: int) -> list[str]:
    rows = []
    for key, values in summary.items():
        if len(values) > _MAX_VALUES_SHOWN:
            rows.append((f"`{key}`", f"{len(values)} distinct values (per sample)"))
            continue
        shown = []
        for value, count in values.most_common():
            text = value if len(value) <= 120 else value[:117] + "..."
            text = text.replace("|", "\\|")
            shown.append(f"`{text}`" + (f" ({count} of {total})" if len(values) > 1 else ""))
        rows.append((f"`{key}`", "; ".join(shown)))
    return _table(rows, ("setting", "value")) if rows else ["(no provenance recorded)"]


def render(config: CardConfig, data: CardData, settings_sections: Sequence[str]) -> str:
    """README.md: the YAML header and the body."""
    head = yaml.safe_dump(header(config, data), sort_keys=False, allow_unicode=True, width=1000)
    title = config.pretty_name or f"{data.recipe} synthetic data"
    body = [f"# {title}", "", data.summary, ""]

    body += ["## Loading", ""]
    with_shards = [s for s in data.subsets if s.data_files]
    if with_shards:
        first = with_shards[0]
        body += [
            "WebDataset tar shards: each sample is `<key>.<image extension>` (the image bytes as",
            "generated) and `<key>.json`; several images are `<key>.0.jpg`, `<key>.1.jpg`, ... in `<image>`",
            "order. Keys are the ids with `%` and `.` percent-encoded. `manifest_record(s)` is the full",
            "manifest record as a JSON string (its provenance varies in shape, and HF `datasets` needs one",
            "schema per subset). Paths are relative to this card's folder (the export folder, the one to",
            "upload to the Hub); `webdataset.json` lists every shard with its path, samples and bytes.",
            "",
            "```python",
            "from datasets import load_dataset",
            "# the configs above, from this folder or its Hub repository",
            f'ds = load_dataset("<folder or repo id>", "{first.name}", split="{first.split}")',
            f'ds = load_dataset("webdataset", data_files={{"{first.split}": "{first.data_files}"}}, '
            f'split="{first.split}")',
            "",
            "import webdataset as wds",
            f'ds = wds.WebDataset("{_brace(first)}", shardshuffle=False).decode("pil")',
            "```",
            "",
        ]
        body += _table(
            (
                (f"`{s.name}`", f"{s.samples} samples, split `{s.split}`, `{s.data_files}`. {s.description}")
                for s in with_shards
            ),
            ("config", "content"),
        )
        body.append("")
    else:
        body += ["No WebDataset shards were written (the export's `webdataset.enabled` is off).", ""]

    body += ["## How it was made", ""]
    body += [f"{i}. {step}" for i, step in enumerate(data.how_made, 1)]
    body.append("")
    stages = upstream_stages(data.upstream)
    if stages:
        body += ["Stages of this run (from their completion markers, upstream first):", ""]
        body += ["| stage | outputs | records in | records out |", "| --- | --- | --- | --- |"]
        body += [f"| `{s['stage']}` | {s['outputs']} | {s['count_in']} | {s['count_out']} |" for s in stages]
        body.append("")
        for s in stages:
            settings = json.dumps(
                {"settings": s["settings"], "params": s["params"]}, indent=1, sort_keys=True
            )
            note = f" ({s['versions']} versions; the first shown)" if s["versions"] > 1 else ""
            body += [
                f"<details><summary><code>{s['stage']}</code> settings{note}</summary>",
                "",
                "```json",
                settings,
                "```",
                "",
                "</details>",
                "",
            ]

    body += [
        "## Models and settings",
        "",
        "As recorded in each sample's provenance (values shared by every sample",
        "are run settings; the rest are counted):",
        "",
    ]
    body += _settings_lines(settings_summary(data.provenance, settings_sections), len(data.provenance))
    body.append("")

    body += ["## Counts", ""]
    rows = [("training samples", data.samples), ("images", data.images)]
    rows += [(s.name, s.samples) for s in data.subsets]
    rows += list(data.counts.items())
    body += _table(rows, ("what", "count"))
    body.append("")

    body += ["## Score distribution", ""]
    if not data.scores:
        body += ["(no scores recorded)", ""]
    for key, values in sorted(data.scores.items()):
        if not values:
            continue
        stats = score_stats(values)
        body += [
            f"`{key}` ({'CLIPScore, ' if 'clip' in key else ''}cosine similarity of image and text "
            f"embeddings) over {int(stats['n'])} images:",
            "",
        ]
        body += [
            "| n | mean | std | min | 5% | 25% | median | 75% | 95% | max |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        q = [stats[k] for k in ("mean", "std", "q00", "q05", "q25", "q50", "q75", "q95", "q100")]
        body.append(f"| {int(stats['n'])} | " + " | ".join(f"{v:.4f}" for v in q) + " |")
        body += ["", "```", text_histogram(values), "```", ""]

    if data.files:
        body += ["## Files", "", data.files.strip(), ""]

    body += ["## Limitations", ""]
    body += [
        "- The images are synthetic (text-to-image model outputs), not photographs: they carry the "
        "generator's artefacts and biases (anatomy, text rendering, counting, composition), and a model "
        "trained on them learns those too. Scores measure caption-image agreement as one CLIP model sees it, "
        "not correctness; CLIP reads at most 77 tokens of a caption.",
        f"- Licenses: the images fall under the generation model's license ({_image_license(data)}), whose "
        "use restrictions apply to them; the text comes from "
        f"{data.text_source or 'the caption source'}, under its terms. Check both before redistributing "
        "or training a commercial model.",
        "- Safety filtering is only as good as the filters enabled in the run (see the settings above); "
        "captions may carry the source's personal data, stereotypes or errors.",
        "",
    ]
    return f"---\n{head}---\n\n" + "\n".join(body).rstrip() + "\n"


def _brace(subset: Subset) -> str:
    """The shards as a brace range, as `webdataset` expands it."""
    assert subset.data_files is not None
    last = max(subset.shards - 1, 0)
    return subset.data_files.replace("*", f"{{000000..{last:06d}}}" if last else "000000")


def _image_license(data: CardData) -> str:
    models = dict.fromkeys(
        str(g["model"])
        for p in data.provenance
        if isinstance(g := p.get("generation"), Mapping) and "model" in g
    )
    names = ", ".join(models) if models else "the generation model"
    return f"{names}; SDXL: CreativeML Open RAIL++-M, {SDXL_LICENSE_URL}"


def write_card(uri: str, config: CardConfig, data: CardData, settings_sections: Sequence[str]) -> str:
    text = render(config, data, settings_sections)
    storage.write_text(uri, text, content_type="text/markdown; charset=utf-8")
    return text


def parse_header(text: str) -> dict[str, Any]:
    """The YAML header of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        raise ValueError("no YAML header")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])
