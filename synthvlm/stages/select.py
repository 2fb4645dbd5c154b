"""Keep the best-aligned records by score: global top-k, top fraction, or a threshold.

Selection is global over all shard manifests (fan-in after sharded scoring): the top-k of all shards
is the top-k of their union. Ranking is deterministic: score descending, then id ascending, so ties
at the cut are broken the same way on every run. The output lists kept records in that order.

top_fraction keeps ceil(fraction * n) records, with the fraction taken as the decimal it is written
as (0.1 of 30 keeps 3, not 4 from 0.1 * 30 = 3.0000000000000004 in binary floating point); ceil so
that any fraction > 0 of a non-empty input keeps at least one record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, field_validator

from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError, InputError
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stage import StageStats, is_done, mark_done

logger = logging.getLogger(__name__)

SelectMode = Literal["top_k", "top_fraction", "threshold"]

REJECT_BELOW_THRESHOLD = "below threshold"
REJECT_NOT_IN_TOP_K = "not in top-k"


class SelectConfig(StageConfig):
    """Which scored records to keep."""

    mode: SelectMode = "top_k"  # SynthVLM §3.2: the top 100K of 1M generated pairs
    k: int = Field(100_000, ge=1)  # SynthVLM §3.2: 100K
    # SynthVLM §3.2: 100K/1M = 0.1; for caption curation (§3.1) use 0.4 ("top 40%").
    fraction: float = Field(0.1, gt=0, le=1)
    threshold: float = 0.25  # StableLLaVA §4 "Alignment Check": keep CLIP score >= gamma = 0.25
    score_key: str = "clip"  # our choice: the key clip_score writes by default

    @field_validator("score_key")
    @classmethod
    def _non_empty_key(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("score_key is empty")
        return value


def fraction_count(n: int, fraction: float) -> int:
    """How many of `n` records top_fraction keeps: ceil(fraction * n), fraction read as a decimal."""
    return min(n, math.ceil(Fraction(str(fraction)) * n))


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


def select_records(records: Sequence[Record], config: SelectConfig) -> list[Record]:
    """The kept records, best first (score descending, then id ascending)."""
    ranked = _ranked(records, config.score_key)
    if config.mode == "top_k":
        return ranked[: config.k]
    if config.mode == "top_fraction":
        return ranked[: fraction_count(len(ranked), config.fraction)]
    return [rec for rec in ranked if record_score(rec, config.score_key) >= config.threshold]


def _read_checked(uri: str, score_key: str, seen: dict[str, str]) -> list[Record]:
    """Read one shard; every record must have the score and an id unseen in earlier shards."""
    records = read_manifest(uri)
    for line, rec in enumerate(records, start=1):
        record_score(rec, score_key, source=uri, line=line)
        if rec.id in seen:
            raise InputError(uri, f"duplicate id {rec.id!r}: also in {seen[rec.id]}", line=line, field="id")
        seen[rec.id] = uri
    return records


def select(config: SelectConfig, input_manifests: list[str], output_manifest: str) -> str:
    """Select globally over all `input_manifests` and write the kept records (idempotent)."""
    if is_done(output_manifest):
        logger.info("%s is already done; skipping", output_manifest)
        return output_manifest
    if not input_manifests:
        raise ConfigError("select needs at least one input manifest")
    stats = StageStats(stage="select")
    seen: dict[str, str] = {}
    total_score = 0.0
    candidates: list[Record] = []
    for uri in input_manifests:
        records = _read_checked(uri, config.score_key, seen)
        stats.count_in += len(records)
        total_score += sum(rec.scores[config.score_key] for rec in records)
        if config.mode == "top_k":
            # The global top-k is within the union of the per-shard top-k, so pruning as we go
            # bounds memory by k without changing the result.
            candidates = select_records(candidates + records, config)
        elif config.mode == "threshold":
            candidates.extend(select_records(records, config))
        else:
            candidates.extend(records)  # k depends on the total count: keep all until the end
        logger.info("%s: read %d records (%d so far)", uri, len(records), stats.count_in)
    kept = select_records(candidates, config)
    write_manifest(output_manifest, kept)
    stats.count_out = len(kept)
    reason = REJECT_BELOW_THRESHOLD if config.mode == "threshold" else REJECT_NOT_IN_TOP_K
    if stats.count_in > stats.count_out:
        stats.rejects[reason] = stats.count_in - stats.count_out
    stats.extra.update(_summary(config, stats.count_in, total_score, kept, len(input_manifests)))
    mark_done(output_manifest, stats)
    return output_manifest


def _summary(
    config: SelectConfig, count_in: int, total_score: float, kept: list[Record], shards: int
) -> dict[str, Any]:
    kept_scores = [rec.scores[config.score_key] for rec in kept]
    summary: dict[str, Any] = {
        "mode": config.mode,
        "score_key": config.score_key,
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
        summary["k"] = fraction_count(count_in, config.fraction)
    else:
        summary["threshold"] = config.threshold
    return summary
