"""Export a selected manifest as LLaVA pretraining data (the format of LLaVA's blip_laion_cc_sbu_558k.json).

Each record becomes one single-turn conversation: the human asks for a brief description of the image
(one of the instructions of LLaVA's Table 8, "brief image description", chosen deterministically per
record id) and the answer is the caption. `image` is the path relative to the data root, which is
what LLaVA's `--image_folder` is set to. The dataset manifest (ids, seeds, scores, provenance) is
written next to the JSON so every exported sample stays regenerable.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import InputError
from synthvlm.llava_format import ImageRoot, brief_instruction, human_turn
from synthvlm.manifest_table import read_columns, write_lines
from synthvlm.records import Record
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats

log = logging.getLogger(__name__)

LLAVA_JSON_NAME = "llava_pretrain.json"
MANIFEST_NAME = "manifest.jsonl"
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

    write_lines(storage.join(run.dir, MANIFEST_NAME), columns.lines(), source=input_manifest)
    storage.write_text(run.output, json.dumps(samples, ensure_ascii=False), content_type="application/json")
    stats.count_out = len(samples)
    stats.extra.update(data_root=data_root, image_placement=config.image_placement)
    log.info("exported %d LLaVA samples", len(samples))
    return stats


# Every setting changes the JSON; the data root is a param (image paths are relative to it).
EXPORT_LLAVA = Stage(name="export_llava", process=_process, sidecars=(MANIFEST_NAME,))


def export_llava(config: ExportConfig, input_manifest: str, data_root: str, output_dir: str) -> str:
    """Write `llava_pretrain.json` and `manifest.jsonl`; returns the versioned JSON URI (copies are
    published in `output_dir`)."""
    return run_stage(
        EXPORT_LLAVA,
        config,
        {"selected": input_manifest},
        storage.join(output_dir, LLAVA_JSON_NAME),
        params={"data_root": data_root},
        context={"data_root": data_root},
    )
