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

Shards are read column-wise (`synthvlm.manifest_table`: validated as strictly as `read_manifest`, with
its errors) and ranked with pyarrow; the kept records are written as their shards' own JSON lines, so no
record is built. For top_k the candidates are cut back to the k best whenever 2k have gathered, so memory
stays bounded by k. `select_records` is the same selection over `Record`s (the reference the tests
compare with).

top_fraction keeps ceil(fraction * n) records, with the fraction taken as the decimal it is written
as (0.1 of 30 keeps 3, not 4 from 0.1 * 30 = 3.0000000000000004 in binary floating point); ceil so
that any fraction > 0 of a non-empty input keeps at least one record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from synthvlm.config import StageConfig
from synthvlm.embeddings import read_embeddings
from synthvlm.errors import ConfigError, InputError
from synthvlm.manifest_table import ManifestColumns, read_columns, write_lines
from synthvlm.ranking import fraction_count, source_id
from synthvlm.records import Record, read_manifest
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats

if TYPE_CHECKING:
    import pyarrow as pa

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
    # StableLLaVA v2 §4.4: "entries with scores exceeding gamma = 0.25 are retained": strictly above.
    threshold: float = 0.25
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

    def vectors(start: int, stop: int) -> np.ndarray:
        return np.stack([embeddings[rec.id] for rec in ranked[start:stop]])

    positions, dropped = near_duplicate_walk(vectors, len(ranked), threshold, limit)
    return [ranked[i] for i in positions], dropped


def near_duplicate_walk(
    vectors: Callable[[int, int], np.ndarray], n: int, threshold: float, limit: int | None = None
) -> tuple[list[int], int]:
    """drop_near_duplicates over positions 0..n-1 of a ranking; `vectors(start, stop)` gives the embeddings
    of positions [start, stop). Returns (kept positions in rank order, number dropped)."""
    kept: list[int] = []
    kept_vectors: np.ndarray | None = None  # rows [0, len(kept)) are the kept records' embeddings
    dropped = 0
    for start in range(0, n, _DEDUP_BLOCK):
        if limit is not None and len(kept) >= limit:
            break
        stop = min(start + _DEDUP_BLOCK, n)
        block = _normalised(vectors(start, stop))
        if kept_vectors is None:
            kept_vectors = np.empty((min(limit or n, n), block.shape[1]), np.float32)
        earlier = kept_vectors[: len(kept)]
        max_earlier = (block @ earlier.T).max(axis=1) if len(kept) else np.full(len(block), -np.inf)
        # Within the block, each row is checked against the rows of the block kept before it.
        within = block @ block.T
        chosen: list[int] = []
        for i in range(stop - start):
            if limit is not None and len(kept) >= limit:
                break
            if max_earlier[i] > threshold or (chosen and within[i, chosen].max() > threshold):
                dropped += 1
                continue
            chosen.append(i)
            kept_vectors[len(kept)] = block[i]
            kept.append(start + i)
    return kept, dropped


def _cut(config: SelectConfig, n_candidates: int) -> int | None:
    """How many of the ranked candidates the mode keeps at most (None: all above the threshold)."""
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
        ranked = [rec for rec in ranked if record_score(rec, config.score_key) > config.threshold]
    if config.dedup_threshold is None:
        return ranked[:limit], 0
    if embeddings is None:
        raise ConfigError("dedup_threshold needs image embeddings (the scoring stage's sidecar .npy)")
    return drop_near_duplicates(ranked, embeddings, config.dedup_threshold, limit)


def _read_checked(uri: str, score_key: str, seen: dict[str, str]) -> list[Record]:
    """Read one shard record by record; every record must have the score and an id unseen in earlier
    shards. The reference path: its errors, in its order, are the ones select raises."""
    records = read_manifest(uri)
    for line, rec in enumerate(records, start=1):
        record_score(rec, score_key, source=uri, line=line)
        if rec.id in seen:
            raise InputError(uri, f"duplicate id {rec.id!r}: also in {seen[rec.id]}", line=line, field="id")
        seen[rec.id] = uri
    return records


def _raise_first_error(config: SelectConfig, uris: Sequence[str]) -> None:
    """Raise the first error the record-by-record reading of `uris` meets (none: return).

    The column-wise pass checks cross-shard duplicate ids only at the end, and reads a shard's sidecar
    after the shard: when it finds bad input, replaying the reference path up to that shard raises the
    error a record-by-record run would have raised first, with its message."""
    seen: dict[str, str] = {}
    for uri in uris:
        records = _read_checked(uri, config.score_key, seen)
        if config.dedup_threshold is not None:
            read_embeddings(uri, len(records))


def _checked_scores(columns: ManifestColumns, score_key: str) -> np.ndarray:
    """The shard's scores; a record without the score or with a non-finite one raises record_score's error."""
    values, present = columns.score(score_key)
    bad = ~present | ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        record_score(columns.records([row])[0], score_key, source=columns.uri, line=row + 1)
    return values


_SCORE, _KEY, _ID, _SOURCE, _LINE, _ROW = "score", "key", "id", "source", "line", "row"


def _rank(table: pa.Table, best_of_n: bool) -> np.ndarray:
    """Positions of `table`'s rows in rank order: score descending, then id ascending (UTF-8 byte order is
    code point order, as Python compares str); with best_of_n only the first (best) row of each source."""
    import pyarrow.compute as pc

    keys = [(_KEY, "descending"), (_ID, "ascending")]
    order = pc.sort_indices(table.select([_KEY, _ID]), sort_keys=keys).to_numpy()
    if best_of_n and len(order):
        codes = pc.dictionary_encode(_combined(table[_SOURCE])).indices.to_numpy(zero_copy_only=False)
        _, first = np.unique(codes[order], return_index=True)
        order = order[np.sort(first)]
    return order


def _combined(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _take(table: pa.Table, positions: np.ndarray) -> pa.Table:
    """The rows at `positions`, in that order, as one chunk. The JSON lines are gathered chunk by chunk:
    pyarrow's take over a chunked binary column is slow, and combining it first would copy every line."""
    import pyarrow as pa

    small = table.drop_columns([_LINE]).take(pa.array(positions, pa.int64())).combine_chunks()
    lines = table[_LINE]
    starts = np.cumsum([0] + [len(chunk) for chunk in lines.chunks])
    which = np.searchsorted(starts, positions, side="right") - 1
    pieces, placed = [], []
    for chunk in np.unique(which):
        at = np.flatnonzero(which == chunk)
        pieces.append(lines.chunk(int(chunk)).take(pa.array(positions[at] - starts[chunk], pa.int64())))
        placed.append(at)
    gathered = pa.concat_arrays(pieces) if pieces else pa.array([], pa.large_binary())
    if placed:
        gathered = gathered.take(pa.array(np.argsort(np.concatenate(placed)), pa.int64()))
    return small.append_column(_LINE, gathered).select(table.column_names)


class _Candidates:
    """The records that may still be kept, as columns: score, sort key, id, source (best_of_n), JSON line,
    global row (dedup). Top-k keeps only what can still be in the global top-k: a record scoring below
    the k-th best so far is never kept (nor is it the best of its source in the end), and the k-th best
    only rises as shards are added; threshold keeps what is at or above it; otherwise everything."""

    def __init__(self, config: SelectConfig):
        self.config = config
        self.prune = config.mode == "top_k" and config.dedup_threshold is None
        self.parts: list[pa.Table] = []
        self.rows = 0
        self.cutoff: float | None = config.threshold if config.mode == "threshold" else None

    def add(self, part: pa.Table) -> None:
        import pyarrow.compute as pc

        if self.cutoff is not None:
            part = part.filter(pc.greater_equal(part[_SCORE], self.cutoff))
        self.parts.append(part)
        self.rows += part.num_rows
        # Pruning sorts: do it when twice k have gathered, so its cost is spread over k new records.
        if self.prune and self.rows > 2 * self.config.k:
            table = self.table()
            kept = _take(table, _rank(table, self.config.best_of_n)[: self.config.k])
            self.parts, self.rows = [kept], kept.num_rows
            if kept.num_rows == self.config.k:
                self.cutoff = kept[_SCORE][-1].as_py()

    def table(self) -> pa.Table:
        import pyarrow as pa

        return pa.concat_tables(self.parts)


def _process(config: SelectConfig, run: StageRun) -> StageStats:
    import pyarrow as pa
    import pyarrow.compute as pc

    input_manifests: list[str] = list(run.inputs["scored"])
    if not input_manifests:
        raise ConfigError("select needs at least one input manifest")
    stats = StageStats(stage="select")
    total_score = 0.0
    all_ids: list[pa.Array] = []
    all_sources: list[pa.Array] = []
    embeddings: list[np.ndarray] | None = [] if config.dedup_threshold is not None else None
    candidates = _Candidates(config)
    for index, uri in enumerate(input_manifests):
        try:
            columns = read_columns(uri)
            values = _checked_scores(columns, config.score_key)
            vectors = read_embeddings(uri, len(columns)) if embeddings is not None else None
        except InputError:
            _raise_first_error(config, input_manifests[: index + 1])
            raise
        ids = columns.ids.cast(pa.string())
        sources = columns.sources().cast(pa.string()) if config.best_of_n else None
        all_ids.append(ids)
        if sources is not None:
            all_sources.append(sources)
        if vectors is not None:
            embeddings.append(vectors)
        part = {
            _SCORE: pa.array(values, pa.float64()),
            _KEY: pa.array(values + 0.0, pa.float64()),  # -0.0 -> 0.0: equal scores tie, as in Python
            _ID: ids,
            _LINE: columns.lines().cast(pa.large_binary()),
        }
        if sources is not None:
            part[_SOURCE] = sources
        if vectors is not None:
            part[_ROW] = pa.array(np.arange(stats.count_in, stats.count_in + len(columns)), pa.int64())
        stats.count_in += len(columns)
        total_score += sum(values.tolist())  # summed as the record path sums: the same float
        candidates.add(pa.table(part))
        logger.info("%s: read %d records (%d so far)", uri, len(columns), stats.count_in)
    if all_ids and pc.count_distinct(pa.chunked_array(all_ids)).as_py() != stats.count_in:
        _raise_first_error(config, input_manifests)  # a duplicate id: the reference path names it
        raise AssertionError("duplicate ids the record path does not see")  # pragma: no cover
    table = candidates.table()
    ranked = _rank(table, config.best_of_n)
    limit = _cut(config, len(ranked))
    if config.mode == "threshold":
        scores = _combined(table[_SCORE]).to_numpy()
        ranked = ranked[scores[ranked] > config.threshold]
    near_duplicates = 0
    if config.dedup_threshold is None:
        kept = _take(table, ranked[:limit])
    else:
        matrix = np.concatenate(embeddings) if embeddings else np.empty((0, 0))
        rows = _combined(table[_ROW]).to_numpy()[ranked]
        positions, near_duplicates = near_duplicate_walk(
            lambda start, stop: matrix[rows[start:stop]], len(ranked), config.dedup_threshold, limit
        )
        kept = _take(table, ranked[np.asarray(positions, dtype=np.int64)])
    write_lines(run.output, kept[_LINE], source=run.output)
    stats.count_out = kept.num_rows
    n_sources = pc.count_distinct(pa.chunked_array(all_sources, pa.string())).as_py() if all_sources else 0
    not_best = stats.count_in - n_sources if config.best_of_n else 0
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
    n_candidates = n_sources if config.best_of_n else stats.count_in
    kept_scores = kept[_SCORE].to_pylist()
    stats.extra.update(
        _summary(config, stats.count_in, n_candidates, total_score, kept_scores, len(input_manifests))
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
    kept_scores: list[float],
    shards: int,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "mode": config.mode,
        "score_key": config.score_key,
        "best_of_n": config.best_of_n,
        "dedup_threshold": config.dedup_threshold,
        "shards": shards,
        "kept_fraction": len(kept_scores) / count_in if count_in else None,
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
