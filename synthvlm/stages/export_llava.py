"""Export a selected manifest as LLaVA pretraining data (the format of LLaVA's blip_laion_cc_sbu_558k.json).

Each record becomes one single-turn conversation: the human asks for a brief description of the image
(one of the instructions of LLaVA's Table 8, "brief image description", chosen deterministically per
record id) and the answer is the caption. `image` is the path relative to the data root, which is
what LLaVA's `--image_folder` is set to. The dataset manifest (ids, seeds, scores, provenance) is
written next to the JSON so every exported sample stays regenerable.

With `webdataset` on (the default), the same samples also go to WebDataset tar shards
(`webdataset/synthvlm-000000.tar`, ...: `{key}.jpg` as generated + `{key}.json` with the caption, the
LLaVA conversation, seed, scores and the manifest record; synthvlm.webdataset_export), listed in
`webdataset.json`; with `card` on (the default), a dataset card (`README.md`, HF Hub YAML header;
synthvlm.dataset_card) describes them. Everything is published to the stable export folder, the shards by
hard link or server-side copy (the runner's glob sidecar), so that folder is the dataset as a whole: the
card's `data_files` and the index's shard paths are relative to it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import Field

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.dataset_card import CardConfig, CardData, Subset, write_card
from synthvlm.errors import InputError
from synthvlm.llava_format import ImageRoot, brief_instruction, human_turn
from synthvlm.manifest_table import read_columns, write_lines
from synthvlm.records import Record
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats
from synthvlm.webdataset_export import (
    EXCLUDED as WDS_EXCLUDED,
)
from synthvlm.webdataset_export import (
    INDEX_NAME,
    SHARD_DIR,
    SHARD_GLOB,
    Sample,
    ShardSet,
    WebDatasetConfig,
    write_index,
    write_shards,
)

log = logging.getLogger(__name__)

LLAVA_JSON_NAME = "llava_pretrain.json"
MANIFEST_NAME = "manifest.jsonl"
CARD_NAME = "README.md"
_MAX_IDS_IN_ERROR = 5


class ExportConfig(StageConfig):
    """Settings of the LLaVA pretraining export."""

    # our choice: any fixed seed; changing it reshuffles which instruction each record gets.
    instruction_seed: int = 0
    # The released 558K JSON mixes both placements (its first record is "<instruction>\n<image>").
    # LLaVA's train.py does not care: preprocess_multimodal moves the token to the front
    # ("<image>\n<instruction>"), and the "plain" pretraining template replaces the whole human turn
    # by "<image>". "before" is that normalised form.
    image_placement: Literal["before", "after"] = "before"
    # WebDataset tar shards of the samples (on by default, our choice; shard size there).
    webdataset: WebDatasetConfig = Field(default_factory=WebDatasetConfig)
    # The dataset card, README.md (on by default, our choice; license settings there).
    card: CardConfig = Field(default_factory=CardConfig)


def llava_sample(record: Record, image_path: str, config: ExportConfig) -> dict[str, Any]:
    return _sample(record.id, record.caption, image_path, config)


def _sample(record_id: str, caption: str, image_path: str, config: ExportConfig) -> dict[str, Any]:
    instruction = brief_instruction(record_id, config.instruction_seed)
    return {
        "id": record_id,
        "image": image_path,
        "conversations": [
            {"from": "human", "value": human_turn(instruction, config.image_placement)},
            {"from": "gpt", "value": caption},
        ],
    }


def _image_paths(
    ids: list[str], image_uris: list[str | None], data_root: str, manifest_uri: str
) -> list[str]:
    """Relative image path per record; one error listing every record whose image is not under data_root.
    The data root is resolved once, not per record (ImageRoot)."""
    root = ImageRoot(data_root)
    paths: list[str] = []
    bad: list[str] = []
    for record_id, image_uri in zip(ids, image_uris, strict=True):
        rel = root.relative(image_uri) if image_uri else None
        if rel is None:
            bad.append(record_id)
        else:
            paths.append(rel)
    if bad:
        shown = ", ".join(repr(i) for i in bad[:_MAX_IDS_IN_ERROR])
        more = f" and {len(bad) - _MAX_IDS_IN_ERROR} more" if len(bad) > _MAX_IDS_IN_ERROR else ""
        raise InputError(
            manifest_uri,
            f"{len(bad)} record(s) have no image_uri under data_root {data_root!r} "
            f"(LLaVA's --image_folder): {shown}{more}",
            field="image_uri",
        )
    return paths


def _process(config: ExportConfig, run: StageRun) -> StageStats:
    input_manifest: str = run.inputs["selected"]
    data_root: str = run.context["data_root"]
    stats = StageStats(stage="export_llava")
    # Column-wise: validated as read_manifest validates, without one pydantic object per record.
    columns = read_columns(input_manifest)
    stats.count_in = len(columns)
    ids, captions = columns.column("id"), columns.column("caption")
    image_paths = _image_paths(ids, columns.column("image_uri"), data_root, input_manifest)
    samples = [
        _sample(record_id, caption, path, config)
        for record_id, caption, path in zip(ids, captions, image_paths, strict=True)
    ]

    lines = columns.lines()
    write_lines(storage.join(run.dir, MANIFEST_NAME), lines, source=input_manifest)
    storage.write_text(run.output, json.dumps(samples, ensure_ascii=False), content_type="application/json")
    stats.count_out = len(samples)
    stats.extra.update(data_root=data_root, image_placement=config.image_placement)
    if config.webdataset.enabled or config.card.enabled:
        records = [json.loads(line) for line in lines.to_pylist()]
        shard_set = _write_webdataset(config.webdataset, run, records, samples, input_manifest)
        if shard_set is not None:
            stats.extra.update(webdataset_shards=len(shard_set.shards), webdataset_bytes=shard_set.bytes)
        if config.card.enabled:
            write_card(
                run.path(CARD_NAME),
                config.card,
                _card_data(records, samples, shard_set, input_manifest),
                SETTINGS_SECTIONS,
            )
    log.info("exported %d LLaVA samples", len(samples))
    return stats


# Provenance keys whose settings the card lists (generation's, the scorers').
SETTINGS_SECTIONS = ("generation", "*_scorer")


def _write_webdataset(
    config: WebDatasetConfig,
    run: StageRun,
    records: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    source: str,
) -> ShardSet | None:
    """One shard set: `{key}.<image ext>` + `{key}.json` per sample; its index `webdataset.json`."""
    if not config.enabled:
        return None
    # Scores every record has (a key some records lack would change the JSON's schema, which HF
    # `datasets` infers from the first samples); the manifest record keeps all.
    common = set.intersection(*(set(r.get("scores") or {}) for r in records)) if records else set()
    shard_set = ShardSet(
        prefix=config.prefix or "synthvlm", folder=run.path(SHARD_DIR), relative=SHARD_DIR, split="train"
    )
    wds_samples = (
        Sample(
            id=record["id"],
            image_uris=[record["image_uri"]],
            meta={
                "id": record["id"],
                "caption": record["caption"],
                "conversations": sample["conversations"],
                "image": sample["image"],
                "seed": record.get("seed"),
                "scores": {key: float(record["scores"][key]) for key in sorted(common)},
                "model": str(((record.get("provenance") or {}).get("generation") or {}).get("model") or ""),
                "manifest_record": json.dumps(record, ensure_ascii=False, sort_keys=True),
            },
        )
        for record, sample in zip(records, samples, strict=True)
    )
    write_shards(wds_samples, shard_set, config, source=source)
    write_index(run.path(INDEX_NAME), {"default": shard_set})
    return shard_set


def _card_data(
    records: list[dict[str, Any]], samples: list[dict[str, Any]], shard_set: ShardSet | None, source: str
) -> CardData:
    scores: dict[str, list[float]] = {}
    for record in records:
        for key, value in (record.get("scores") or {}).items():
            scores.setdefault(key, []).append(float(value))
    files = "\n".join(
        [
            "| file | content |",
            "| --- | --- |",
            f"| `{LLAVA_JSON_NAME}` | LLaVA-1.5 pretraining JSON (image paths relative to the data root, "
            "LLaVA's `--image_folder`) |",
            f"| `{MANIFEST_NAME}` | the dataset manifest: id, caption, seed, image URI, scores, provenance "
            "(every image regenerable: `synthvlm regenerate`) |",
            *(
                [
                    f"| `{SHARD_DIR}/` | the WebDataset shards |",
                    f"| `{INDEX_NAME}` | the shards: names, paths (relative to this folder), samples, "
                    "bytes |",
                ]
                if shard_set
                else []
            ),
        ]
    )
    subsets = [
        Subset(
            name="default",
            samples=len(samples),
            data_files=shard_set.pattern if shard_set and shard_set.shards else None,
            shards=len(shard_set.shards) if shard_set else 0,
            description="caption + LLaVA pretraining conversation per image",
        )
    ]
    return CardData(
        recipe="SynthVLM",
        summary=(
            "Synthetic image-caption pairs made with the SynthVLM recipe (Liu et al., *SynthVLM: "
            "High-Efficiency and High-Quality Synthetic Data for Vision Language Models*): each caption was "
            "turned into an image by a text-to-image model (SDXL), the pairs were scored by CLIPScore "
            "(caption vs generated image) and the best kept. Made by synthvlm."
        ),
        how_made=[
            "Captions from your source, optionally curated (heuristics, dedup, LLM judge, CLIPScore of the "
            "caption against its raw image, keep the best fraction).",
            "One image per caption with SDXL (the paper: 1024x1024, 60 steps), every image regenerable from "
            "(prompt, seed, model + revision, scheduler, steps, guidance, resolution).",
            "CLIPScore of each caption against its generated image.",
            "Selection of the best pairs by CLIPScore (the paper: the top 100K of 1M).",
            "Export: LLaVA pretraining JSON, the manifest, WebDataset shards and this card.",
        ],
        task_categories=["image-to-text", "image-text-to-text"],
        subsets=subsets,
        samples=len(samples),
        images=len(samples),
        scores=scores,
        provenance=[record.get("provenance") or {} for record in records],
        upstream=[source],
        files=files,
        text_source="your caption source (the captions file the run started from)",
    )


# Every setting changes the JSON; the data root is a param (image paths are relative to it).
# Version 2: the shards are published too, and the index names them by relative paths.
EXPORT_LLAVA = Stage(
    name="export_llava",
    process=_process,
    excluded={f"webdataset.{key}": why for key, why in WDS_EXCLUDED.items()},
    sidecars=(MANIFEST_NAME, INDEX_NAME, CARD_NAME, SHARD_GLOB),
    version=2,
)


def export_llava(config: ExportConfig, input_manifest: str, data_root: str, output_dir: str) -> str:
    """Write `llava_pretrain.json`, `manifest.jsonl` and (by default) WebDataset shards with their index
    `webdataset.json` and the dataset card `README.md`; returns the versioned JSON URI (all of them are
    published in `output_dir`, the shards under `webdataset/`)."""
    return run_stage(
        EXPORT_LLAVA,
        config,
        {"selected": input_manifest},
        storage.join(output_dir, LLAVA_JSON_NAME),
        params={"data_root": data_root},
        context={"data_root": data_root},
    )
