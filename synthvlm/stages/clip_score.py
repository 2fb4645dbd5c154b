"""Score image-caption alignment with CLIP and store it in each record's `scores`.

SynthVLM §3.1 defines CLIPScore as the cosine similarity of the CLIP image and caption embeddings
and uses it twice (caption vs raw web image, caption vs generated image, §3.2); StableLLaVA keeps
pairs whose CLIP score is >= 0.25. Hessel et al. (2021) scale it as 2.5 * max(cos, 0); both forms
are offered. Keep/drop is a separate stage (`synthvlm.stages.select`), so scores can be reused.

Images are read through `synthvlm.storage` (local paths or gs://) by a small thread pool, one batch
ahead of the model, so reading and decoding overlap with GPU work. The L2-normalised image embeddings
are kept in a sidecar `.npy` next to the scored manifest (`synthvlm.embeddings`), so selection
can remove near duplicates without running CLIP again. The model-level pieces (config, score forms,
`TensorScorer` for generation's in-pod scoring) are in `synthvlm.scoring`.

CLIP reads 75 caption tokens (77 with start and end). Each record's scorer provenance says how many
tokens of its caption the text encoder never saw (`dropped_tokens`), the marker counts such records, and
`long_captions: chunk_mean` scores long captions over chunks that each fit (see ScoreConfig).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from synthvlm.embeddings import EMBEDDINGS_SUFFIX, write_embeddings
from synthvlm.models.clip import load_clip
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.scoring import (
    REJECT_NON_FINITE,
    ScoreConfig,
    apply_form,
    prefetched_batches,
    resolve_runtime,
    score_pixels,
    with_score,
)
from synthvlm.stage import StageStats
from synthvlm.tokens import dropped_token_counts

logger = logging.getLogger(__name__)

MAX_REJECT_EXAMPLES = 10  # our choice: ids per reject reason kept in the stats, enough to start debugging


class _Rejects:
    """Counts and example ids per reject reason; every reject is also logged."""

    def __init__(self, stats: StageStats, source: str):
        self.stats, self.source = stats, source
        self.examples: dict[str, list[str]] = {}

    def add(self, record: Record, reason: str) -> None:
        logger.warning(
            "%s: rejecting %s (%s, image_uri=%s)", self.source, record.id, reason, record.image_uri
        )
        self.stats.rejects[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < MAX_REJECT_EXAMPLES:
            ids.append(record.id)


def _process(config: ScoreConfig, run: StageRun) -> StageStats:
    input_manifest: str = run.inputs["images"]
    stats = StageStats(stage="clip_score")
    records = read_manifest(input_manifest)
    stats.count_in = len(records)
    device, dtype = resolve_runtime(config)
    loading = time.monotonic()
    model, preprocess, tokenizer = load_clip(config.model, config.pretrained, device, dtype)
    stats.extra["load_seconds"] = round(time.monotonic() - loading, 3)  # the report's cost splits it
    rejects = _Rejects(stats, input_manifest)
    scored: list[Record] = []
    embeddings: list[torch.Tensor] = []
    with (
        ThreadPoolExecutor(max_workers=config.read_workers) as pool,
        run.progress(len(records), "images", label=input_manifest.rsplit("/", 1)[-1]) as progress,
    ):
        for batch, loaded in prefetched_batches(pool, records, config.batch_size, preprocess):
            batch_scored, batch_embeddings = _score_loaded(model, tokenizer, batch, loaded, config, rejects)
            scored.extend(batch_scored)
            if batch_scored:
                embeddings.append(batch_embeddings.half())  # what the sidecar stores: half the memory
            progress.update(len(batch))
    if config.save_embeddings:
        width = embeddings[0].shape[1] if embeddings else 0
        write_embeddings(run.output, torch.cat(embeddings).numpy() if embeddings else np.empty((0, width)))
    write_manifest(run.output, scored)
    stats.count_out = len(scored)
    stats.extra.update(_summary(config, device, dtype, scored, rejects.examples))
    return stats


CLIP_SCORE = Stage(
    name="clip_score",
    process=_process,
    excluded={
        "batch_size": "each image and caption is encoded on its own; the batch only groups the work",
        "read_workers": "parallel reads of the same images",
    },
    sidecars=("{name}" + EMBEDDINGS_SUFFIX,),
)


def score(config: ScoreConfig, input_manifest: str, output_manifest: str) -> str:
    """Score every record of `input_manifest`; returns the versioned scored manifest (a copy is
    published at `output_manifest`).

    Records without a readable image are left out of the output and counted in the stats' rejects
    by reason ("no image_uri", "image missing", "image not decodable", "non-finite score"). With
    `save_embeddings`, the image embeddings go to the sidecar `<manifest>.image_embeddings.npy`.
    """
    return run_stage(CLIP_SCORE, config, {"images": input_manifest}, output_manifest)


def _score_loaded(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    batch: list[Record],
    loaded: list[tuple[torch.Tensor | None, str | None]],
    config: ScoreConfig,
    rejects: _Rejects,
) -> tuple[list[Record], torch.Tensor]:
    """(scored records, their image embeddings, one row each)."""
    good: list[tuple[Record, torch.Tensor]] = []
    for record, (pixels, reason) in zip(batch, loaded, strict=True):
        if pixels is None:
            rejects.add(record, reason or "unknown")
        else:
            good.append((record, pixels))
    if not good:
        return [], torch.empty(0, 0)
    pixels = torch.stack([p for _, p in good])
    captions = [r.caption for r, _ in good]
    cosines, embeddings, texts = score_pixels(model, tokenizer, pixels, captions, config.long_captions)
    out: list[Record] = []
    rows: list[int] = []
    for row, ((record, _), cosine) in enumerate(zip(good, cosines.tolist(), strict=True)):
        if not math.isfinite(cosine):
            rejects.add(record, REJECT_NON_FINITE)
            continue
        out.append(with_score(record, apply_form(cosine, config.form), config, texts, row))
        rows.append(row)
    return out, embeddings[rows]


def records_with_dropped_tokens(records: list[Record], config: ScoreConfig) -> dict[str, int]:
    """{"<score_key>_scorer": how many of `records` have a caption this scorer's text encoder did not see
    whole} (upstream stages' counts, e.g. generation's, are theirs to report)."""
    key = f"{config.score_key}_scorer"
    return {key: dropped_token_counts(rec.provenance for rec in records).get(key, 0)}


def _summary(
    config: ScoreConfig,
    device: torch.device,
    dtype: torch.dtype,
    scored: list[Record],
    reject_examples: dict[str, list[str]],
) -> dict[str, Any]:
    values = [rec.scores[config.score_key] for rec in scored]
    return {
        "score_key": config.score_key,
        "model": config.model,
        "pretrained": config.pretrained,
        "form": config.form,
        "long_captions": config.long_captions,
        # how many records' captions lost tokens to the text encoder's context (the report shows it)
        "records_with_dropped_tokens": records_with_dropped_tokens(scored, config),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "mean_score": sum(values) / len(values) if values else None,
        "min_score": min(values, default=None),
        "max_score": max(values, default=None),
        "reject_examples": reject_examples,
    }
