"""Keep the best-aligned records by score: global top-k, top fraction, or a threshold.

Selection is global over all shard manifests (fan-in after sharded scoring): the top-k of all shards
is the top-k of their union. Ranking is deterministic: score descending, then id ascending, so ties
at the cut are broken the same way on every run. The output lists kept records in that order.

Two optional steps come before the cut:
- best_of_n: of the images generated for one caption (same `provenance.source_id`; a record without
  one is its own source) only the best-scored is a candidate.
- near-duplicate removal (`dedup_threshold`): walking the ranking best first, a record is dropped when
  the cosine similarity of its image embedding with an image already kept exceeds the threshold
  (greedy by score). The embeddings come from the sidecar `<manifest>.image_embeddings.npy` that the
  scoring stage writes next to each scored manifest (rows in manifest order), so nothing is recomputed.

top_fraction keeps ceil(fraction * n) records, with the fraction taken as the decimal it is written
as (0.1 of 30 keeps 3, not 4 from 0.1 * 30 = 3.0000000000000004 in binary floating point); ceil so
that any fraction > 0 of a non-empty input keeps at least one record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from synthvlm.config import StageConfig
from synthvlm.embeddings import read_embeddings
from synthvlm.errors import ConfigError, InputError
from synthvlm.ranking import fraction_count, source_id
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats

logger = logging.getLogger(__name__)

SelectMode = Literal["top_k", "top_fraction", "threshold"]

REJECT_BELOW_THRESHOLD = "below threshold"
REJECT_NOT_IN_TOP_K = "not in top-k"
REJECT_NOT_BEST_OF_N = "not best of n"
REJECT_NEAR_DUPLICATE = "near duplicate"

_DEDUP_BLOCK = 1024  # our choice: rows compared per matrix product; bounds memory at any scale


class SelectConfig(StageConfig):
    """Which scored records to keep."""

    mode: SelectMode = "top_k"  # SynthVLM §3.2: the top 100K of 1M generated pairs
    k: int = Field(100_000, ge=1)  # SynthVLM §3.2: 100K
    # SynthVLM §3.2: 100K/1M = 0.1; for caption curation (§3.1) use 0.4 ("top 40%").
    fraction: float = Field(0.1, gt=0, le=1)
    threshold: float = 0.25  # StableLLaVA §4 "Alignment Check": keep CLIP score >= gamma = 0.25
    score_key: str = "clip"  # our choice: the key clip_score writes by default
    # Our choice: off (SynthVLM §3.1 makes one image per caption); on = keep the best image per caption.
    best_of_n: bool = False
    # Our choice: off. Else drop a record whose image embedding has cosine > this with a better kept one.
    dedup_threshold: float | None = Field(None, gt=-1, le=1)

    @field_validator("score_key")
    @classmethod
    def _non_empty_key(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("score_key is empty")
        return value


def record_score(record: Record, score_key: str, source: str = "records", line: int | None = None) -> float:
    """The record's score under `score_key`; a clear InputError if it is absent or not a number."""
    value = record.scores.get(score_key)
    field = f"scores.{score_key}"
    if value is None:
        have = ", ".join(sorted(record.scores)) or "none"
        raise InputError(
            source,
            f"record {record.id!r} has no score {score_key!r} (scores present: {have}); "
            "run the scoring stage first or set score_key",
            line=line,
            field=field,
        )
    if not math.isfinite(value):
        raise InputError(
            source, f"record {record.id!r} has a non-finite score {value!r}", line=line, field=field
        )
    return value


def _ranked(records: Iterable[Record], score_key: str) -> list[Record]:
    return sorted(records, key=lambda rec: (-record_score(rec, score_key), rec.id))


def best_per_source(records: Iterable[Record], score_key: str) -> list[Record]:
    """The best record of each source id (score descending, then id ascending), best first."""
    best: dict[str, Record] = {}
    for rec in _ranked(records, score_key):
        best.setdefault(source_id(rec), rec)
    return list(best.values())


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def drop_near_duplicates(
    ranked: Sequence[Record], embeddings: Mapping[str, np.ndarray], threshold: float, limit: int | None = None
) -> tuple[list[Record], int]:
    """Greedy by rank: keep a record unless its cosine with a kept one is > threshold; stop at `limit` kept.

    Returns (kept records in rank order, number dropped as near duplicates).
    """
    kept: list[Record] = []
    kept_vectors: np.ndarray | None = None  # rows [0, len(kept)) are the kept records' embeddings
    dropped = 0
    for start in range(0, len(ranked), _DEDUP_BLOCK):
        if limit is not None and len(kept) >= limit:
            break
        block = ranked[start : start + _DEDUP_BLOCK]
        vectors = _normalised(np.stack([embeddings[rec.id] for rec in block]))
        if kept_vectors is None:
            kept_vectors = np.empty((min(limit or len(ranked), len(ranked)), vectors.shape[1]), np.float32)
        earlier = kept_vectors[: len(kept)]
        max_earlier = (vectors @ earlier.T).max(axis=1) if len(kept) else np.full(len(block), -np.inf)
        # Within the block, each row is checked against the rows of the block kept before it.
        within = vectors @ vectors.T
        chosen: list[int] = []
        for i, rec in enumerate(block):
            if limit is not None and len(kept) >= limit:
                break
            if max_earlier[i] > threshold or (chosen and within[i, chosen].max() > threshold):
                dropped += 1
                continue
            chosen.append(i)
            kept_vectors[len(kept)] = vectors[i]
            kept.append(rec)
    return kept, dropped


def _cut(config: SelectConfig, n_candidates: int) -> int | None:
    """How many of the ranked candidates the mode keeps at most (None: all at or above the threshold)."""
    if config.mode == "top_k":
        return config.k
    if config.mode == "top_fraction":
        return fraction_count(n_candidates, config.fraction)
    return None


def select_records(
    records: Sequence[Record], config: SelectConfig, embeddings: Mapping[str, np.ndarray] | None = None
) -> list[Record]:
    """The kept records, best first (score descending, then id ascending).

    `embeddings` (id -> image embedding) is needed when `config.dedup_threshold` is set.
    """
    return _select(records, config, embeddings)[0]


def _select(
    records: Sequence[Record], config: SelectConfig, embeddings: Mapping[str, np.ndarray] | None = None
) -> tuple[list[Record], int]:
    """(kept records best first, number dropped as near duplicates)."""
    if config.best_of_n:
        ranked = best_per_source(records, config.score_key)
    else:
        ranked = _ranked(records, config.score_key)
    limit = _cut(config, len(ranked))
    if config.mode == "threshold":
        ranked = [rec for rec in ranked if record_score(rec, config.score_key) >= config.threshold]
    if config.dedup_threshold is None:
        return ranked[:limit], 0
    if embeddings is None:
        raise ConfigError("dedup_threshold needs image embeddings (the scoring stage's sidecar .npy)")
    return drop_near_duplicates(ranked, embeddings, config.dedup_threshold, limit)


def _read_checked(uri: str, score_key: str, seen: dict[str, str]) -> list[Record]:
    """Read one shard; every record must have the score and an id unseen in earlier shards."""
    records = read_manifest(uri)
    for line, rec in enumerate(records, start=1):
        record_score(rec, score_key, source=uri, line=line)
        if rec.id in seen:
            raise InputError(uri, f"duplicate id {rec.id!r}: also in {seen[rec.id]}", line=line, field="id")
        seen[rec.id] = uri
    return records


def _prune(candidates: list[Record], records: list[Record], config: SelectConfig) -> list[Record]:
    """Candidates after adding one shard's records, dropping only what can never be kept."""
    if config.dedup_threshold is not None or config.mode == "top_fraction":
        # Near-duplicate removal may reach past any bound, and k of top_fraction depends on the total.
        return candidates + records
    if config.mode == "top_k":
        # The global top-k (of the best per source, with best_of_n) is within the top-k of any subset
        # that contains it, and the k-th best score only rises as shards are added: pruning as we go
        # bounds memory by k without changing the result.
        return select_records(candidates + records, config)
    # Threshold: a record below it is never kept (nor is any other image of its source better for it).
    return candidates + [rec for rec in records if record_score(rec, config.score_key) >= config.threshold]


def _process(config: SelectConfig, run: StageRun) -> StageStats:
    input_manifests: list[str] = list(run.inputs["scored"])
    if not input_manifests:
        raise ConfigError("select needs at least one input manifest")
    stats = StageStats(stage="select")
    seen: dict[str, str] = {}
    total_score = 0.0
    sources: set[str] = set()
    embeddings: dict[str, np.ndarray] | None = {} if config.dedup_threshold is not None else None
    candidates: list[Record] = []
    for uri in input_manifests:
        records = _read_checked(uri, config.score_key, seen)
        stats.count_in += len(records)
        total_score += sum(rec.scores[config.score_key] for rec in records)
        sources.update(source_id(rec) for rec in records)
        if embeddings is not None:
            embeddings.update(
                zip((rec.id for rec in records), read_embeddings(uri, len(records)), strict=True)
            )
        candidates = _prune(candidates, records, config)
        logger.info("%s: read %d records (%d so far)", uri, len(records), stats.count_in)
    kept, near_duplicates = _select(candidates, config, embeddings)
    write_manifest(run.output, kept)
    stats.count_out = len(kept)
    not_best = stats.count_in - len(sources) if config.best_of_n else 0
    for reason, count in (
        (REJECT_NOT_BEST_OF_N, not_best),
        (REJECT_NEAR_DUPLICATE, near_duplicates),
        (
            REJECT_BELOW_THRESHOLD if config.mode == "threshold" else REJECT_NOT_IN_TOP_K,
            stats.count_in - stats.count_out - not_best - near_duplicates,
        ),
    ):
        if count:
            stats.rejects[reason] = count
    n_candidates = len(sources) if config.best_of_n else stats.count_in
    stats.extra.update(
        _summary(config, stats.count_in, n_candidates, total_score, kept, len(input_manifests))
    )
    stats.extra["near_duplicates"] = near_duplicates
    return stats


# Every setting changes which records are kept.
SELECT = Stage(name="select", process=_process)


def select(config: SelectConfig, input_manifests: list[str], output_manifest: str) -> str:
    """Select globally over all `input_manifests` and write the kept records; returns the versioned
    manifest (a copy is published at `output_manifest`)."""
    if not input_manifests:
        raise ConfigError("select needs at least one input manifest")
    return run_stage(SELECT, config, {"scored": list(input_manifests)}, output_manifest)


def _summary(
    config: SelectConfig,
    count_in: int,
    n_candidates: int,
    total_score: float,
    kept: list[Record],
    shards: int,
) -> dict[str, Any]:
    kept_scores = [rec.scores[config.score_key] for rec in kept]
    summary: dict[str, Any] = {
        "mode": config.mode,
        "score_key": config.score_key,
        "best_of_n": config.best_of_n,
        "dedup_threshold": config.dedup_threshold,
        "shards": shards,
        "kept_fraction": len(kept) / count_in if count_in else None,
        "mean_score_in": total_score / count_in if count_in else None,
        "mean_score_kept": sum(kept_scores) / len(kept_scores) if kept_scores else None,
        "min_score_kept": min(kept_scores, default=None),
    }
    if config.mode == "top_k":
        summary["k"] = config.k
    elif config.mode == "top_fraction":
        summary["fraction"] = config.fraction
        summary["k"] = fraction_count(n_candidates, config.fraction)  # of the candidates after best_of_n
    else:
        summary["threshold"] = config.threshold
    return summary
