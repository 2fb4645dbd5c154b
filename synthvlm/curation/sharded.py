"""Caption curation spread over pods, with the same result as the one-pod stage (synthvlm.stages.curate).

Three kinds of task, each a runner stage (fingerprints, skip on rerun, atomic outputs):

1. `curate_shard(rank, world_size)`, one per shard: streams the input, takes the records at input positions
   p with p % world_size == rank, runs the per-caption steps (heuristics, perplexity, judge, ITM, raw CLIP
   score; `stages.curate.filter_records`) and writes the survivors (input order), their rejects and an
   index (`.index.npz`): position, sample key, raw CLIP score, and the dedup features (normalized-text
   digest, shingle hashes, LSH band keys; `curation.dedup.compute_features`).
2. `dedup_partition(part, parts)`, one per partition: reads the digests and band keys of every shard, keeps
   the exact groups and (band, key) buckets that hash to its partition, pairs candidates, then reads the
   shingle hashes of just those captions and verifies each pair by exact Jaccard. Output: the pairs.
3. `merge`, one task: resolves all pairs in input order (`curation.dedup.resolve`), ranks the raw CLIP
   scores left (top fraction), samples, and streams the survivors of every shard in input order into the
   curated manifest and the rejects manifest (per-caption rejects merged by step and position, then dedup,
   CLIP rank and sample rejects: the one-pod stage's order).

Memory per pod, for a pool of N captions in S shards (= partitions):
- a shard filters `scale.records_per_shard` records at a time (~5 KB each as pydantic records) besides the
  filters' models, and keeps its index (~40 bytes per record, a few hundred per survivor);
- a partition holds 1/S of the N x bands bucket entries (32 bytes each while sorting), its candidates'
  shingles and 1/S of the id keys (the pool-wide unique-id check);
- the merge is out of core: each shard's index columns, a bit per input position (drops, targets), the
  drops in input order and the duplicates' target ids go to files on the pod's local disk (about 60 bytes
  per caption that passed the filters), read through memory maps or a slice at a time; the shards are
  streamed (a remote one in ranged reads of 1 MiB each, `storage.iter_lines`). It holds one shard's
  columns, the pairs that end in one range of `records_per_shard` positions and the captions tied at a cut;
  the CLIP top fraction and the sample are cuts found by bisection over per-shard sorted keys
  (`kth_smallest`).
What grows with N/S (indexes, partitions) stays near 1 GB while S grows with N: up to `scale.max_shards`
(1000 by default, 200M captions at 200K per shard); past that, raise max_shards.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from synthvlm import storage
from synthvlm.curation.dedup import (
    DedupFeatures,
    bucket_entries,
    compute_features,
    concat_entries,
    exact_pairs,
    pairs_from_entries,
    partition_of,
    verify_pairs,
)
from synthvlm.errors import InputError
from synthvlm.ranking import fraction_count
from synthvlm.records import Record, _record_or_error, strip_bom
from synthvlm.runner import Stage, StageRun, run_stage
from synthvlm.stage import StageStats, done_uri

log = logging.getLogger(__name__)

SHARD_STAGE = "curate_shard"
DEDUP_STAGE = "curate_dedup"
INDEX_SUFFIX = ".index.npz"
REJECTS_SUFFIX = ".rejects.jsonl"
ORDER_KEY = "_order"  # [step index, input position] of a shard's reject row, for the merge


# ---- reading the input in shards ---------------------------------------------------------------------------


def count_records(uri: str) -> int:
    """Records in a JSONL (non-blank lines) or Parquet manifest, streamed."""
    with storage.local_copy(uri) as path:
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())


def num_shards(count: int, records_per_shard: int, max_shards: int) -> int:
    return max(1, min(max_shards, math.ceil(count / records_per_shard)))


def iter_shard(uri: str, rank: int, world_size: int) -> Iterator[tuple[int, Record]]:
    """(input position, record) of the records at positions p with p % world_size == rank, streamed."""
    with storage.local_copy(uri) as path:
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            pos = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
                for row in batch.to_pylist():
                    if pos % world_size == rank:
                        for key in ("scores", "provenance"):
                            if isinstance(row.get(key), str):
                                row[key] = json.loads(row[key])
                        yield pos, _record_or_error(uri, pos + 1, row, "row")
                    pos += 1
            return
        pos = 0
        with open(path, "rb") as handle:
            for lineno, line in enumerate(handle, start=1):
                if lineno == 1:
                    line = strip_bom(line)
                if not line.strip():
                    continue
                if pos % world_size == rank:
                    try:
                        data = json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise InputError(uri, f"not valid JSON/UTF-8: {exc}", line=lineno) from None
                    yield pos, _record_or_error(uri, lineno, data, "line")
                pos += 1


def plan(input_manifest: str, config_json: str) -> list[dict[str, Any]]:
    """One ParallelFor item per filter shard, carrying everything the shard task needs."""
    from synthvlm.stages.curate import CurateConfig

    config = CurateConfig.model_validate_json(config_json)
    count, scale = count_records(input_manifest), config.scale
    shards = num_shards(count, scale.records_per_shard, scale.max_shards)
    if count > shards * scale.records_per_shard:
        log.warning(
            "curate: %d captions in %d shards (scale.max_shards) is %d per shard, over "
            "scale.records_per_shard (%d): the filter tasks take longer and the dedup tasks hold more; raise "
            "scale.max_shards to keep every task's memory where it is",
            count,
            shards,
            math.ceil(count / shards),
            scale.records_per_shard,
        )
    return [
        {"manifest": input_manifest, "shard": i, "num_shards": shards, "config_json": config_json}
        for i in range(shards)
    ]


# ---- streamed writes -------------------------------------------------------------------------------------


def _lines(uri: str) -> Iterator[str]:
    """Streamed: the merge reads every shard at once, so a remote shard is read in ranges, not copied."""
    yield from storage.iter_lines(uri)


# ---- 1. the filter shards ----------------------------------------------------------------------------------


def sample_words(ids: Sequence[str], seed: int) -> np.ndarray:
    """(n, 4) big-endian uint64 words of sha256(f"{seed}:{id}"): their lexicographic order is that of
    `stages.curate.sample_key` (the hex digest)."""
    raw = b"".join(hashlib.sha256(f"{seed}:{rid}".encode()).digest() for rid in ids)
    return np.frombuffer(raw, dtype=">u8").reshape(-1, 4).astype(np.uint64)


def _batches(items: Iterator[tuple[int, Record]], size: int) -> Iterator[list[tuple[int, Record]]]:
    batch: list[tuple[int, Record]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _shard_process(config: Any, run: StageRun) -> StageStats:
    """The per-caption steps over the shard, `scale.records_per_shard` records at a time: a shard larger than
    that (a pool over `max_shards` x `records_per_shard`) costs time, not memory."""
    from synthvlm.stages.curate import (
        PER_CAPTION_STEPS,
        STEPS,
        Models,
        _Run,
        filter_records,
        make_judge_backend,
    )

    rank, world_size = run.context["rank"], run.context["world_size"]
    source = run.inputs["captions"]
    stats = StageStats(SHARD_STAGE)
    backend = make_judge_backend(config, run.data_root)
    models = Models()
    key = config.clip.score.score_key
    step_counts: dict[str, dict[str, int]] = {}
    every_pos: list[np.ndarray] = []  # every record's position and id key: the pool-wide unique-id check
    every_id: list[np.ndarray] = []
    kept_features: list[DedupFeatures] = []
    kept_sample: list[np.ndarray] = []
    kept_score: list[np.ndarray] = []

    with tempfile.TemporaryDirectory(prefix="synthvlm-shard-") as tmp:
        # reject rows of each step, in input order: concatenated in step order they are sorted by ORDER_KEY
        spills = {step: open(os.path.join(tmp, step), "w+", encoding="utf-8") for step in PER_CAPTION_STEPS}  # noqa: SIM115

        def survivors() -> Iterator[str]:
            for batch in _batches(iter_shard(source, rank, world_size), config.scale.records_per_shard):
                positions: dict[str, int] = {}
                for pos, record in batch:
                    if record.id in positions:
                        message = f"duplicate id {record.id!r} (first at record {positions[record.id] + 1})"
                        raise InputError(source, message, line=pos + 1, field="id", unit="record")
                    positions[record.id] = pos
                records = [record for _, record in batch]
                batch_pos = np.array([pos for pos, _ in batch], dtype=np.int64)
                batch_words = sample_words([r.id for r in records], config.sample_seed)
                every_pos.append(batch_pos)
                every_id.append(batch_words)
                chunk = StageStats(SHARD_STAGE)
                steps = _Run(chunk)
                kept = filter_records(records, config, backend, steps, models)
                stats.count_in += len(batch)
                stats.rejects.update(chunk.rejects)
                for name, value in chunk.extra.items():
                    stats.extra[name] = stats.extra.get(name, 0) + value
                for step, counts in steps.steps.items():
                    total = step_counts.setdefault(step, {"in": 0, "out": 0, "rejected": 0})
                    for name, value in counts.items():
                        total[name] += value
                for row in steps.rows:
                    row = {**row, ORDER_KEY: [STEPS.index(row["stage"]), positions[row["id"]]]}
                    spills[row["stage"]].write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                row_of = {r.id: i for i, r in enumerate(records)}
                rows = np.array([row_of[r.id] for r in kept], dtype=np.int64)
                kept_features.append(
                    compute_features([r.caption for r in kept], batch_pos[rows], config.dedup)
                )
                kept_sample.append(batch_words[rows])
                kept_score.append(
                    np.array([r.scores.get(key, np.nan) if r.image_uri else np.nan for r in kept], np.float64)
                )
                for record in kept:
                    yield record.model_dump_json() + "\n"
                log.info("curate shard %d/%d: %d records read", rank + 1, world_size, stats.count_in)

        stats.count_out = storage.write_lines(run.output, survivors())

        def rejects() -> Iterator[str]:
            for step in PER_CAPTION_STEPS:
                spills[step].seek(0)
                yield from spills[step]

        storage.write_lines(run.output + REJECTS_SUFFIX, rejects())
        for handle in spills.values():
            handle.close()

    features = DedupFeatures.concat(
        kept_features or [compute_features([], np.empty(0, np.int64), config.dedup)]
    )
    index = {
        **{f"dedup_{name}": getattr(features, name) for name in DedupFeatures.__dataclass_fields__},
        "sample": np.concatenate(kept_sample) if kept_sample else np.empty((0, 4), np.uint64),
        "score": np.concatenate(kept_score) if kept_score else np.empty(0, np.float64),
        "id_pos": np.concatenate(every_pos) if every_pos else np.empty(0, np.int64),
        "id_sample": np.concatenate(every_id) if every_id else np.empty((0, 4), np.uint64),
    }
    _write_npz(run.output + INDEX_SUFFIX, index)
    stats.extra["steps"] = step_counts
    if backend is not None:
        stats.extra["llm"] = {k: v for k, v in backend.metrics().items() if isinstance(v, int | float)}
        stats.extra.update({"llm_backend": backend.name, "llm_model": backend.model})
    return stats


def _write_npz(uri: str, arrays: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(uri, buffer.getvalue(), content_type="application/octet-stream")


def _read_npz(uri: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(storage.read_bytes(uri))) as arrays:
        return {name: arrays[name] for name in names}


def _features(uri: str, fields: Sequence[str]) -> DedupFeatures:
    arrays = _read_npz(uri + INDEX_SUFFIX, [f"dedup_{name}" for name in fields])
    empty = np.empty(0)
    return DedupFeatures(
        **{name: arrays.get(f"dedup_{name}", empty) for name in DedupFeatures.__dataclass_fields__}
    )


CURATE_SHARD = Stage(
    name=SHARD_STAGE,
    process=_shard_process,
    sidecars=("{output}" + INDEX_SUFFIX, "{output}" + REJECTS_SUFFIX),
)


def shard_uri(output_dir: str, rank: int, world_size: int) -> str:
    return storage.join(output_dir, "shards", f"shard-{rank:05d}-of-{world_size:05d}.jsonl")


def curate_shard(
    config: Any,
    input_manifest: str,
    output_dir: str,
    rank: int,
    world_size: int,
    *,
    data_root: str | None = None,
) -> str:
    """Run the per-caption steps on shard `rank` of `world_size`; returns the shard's versioned survivors."""
    from synthvlm.stages.curate import EXCLUDED, model_params

    stage = Stage(name=SHARD_STAGE, process=_shard_process, excluded=EXCLUDED, sidecars=CURATE_SHARD.sidecars)
    return run_stage(
        stage,
        config,
        {"captions": input_manifest},
        shard_uri(output_dir, rank, world_size),
        params=model_params(config),
        context={"rank": rank, "world_size": world_size},
        root=output_dir,
        data_root=data_root or output_dir,
    )


# ---- 2. dedup partitions ---------------------------------------------------------------------------------


def _dedup_process(config: Any, run: StageRun) -> StageStats:
    part, parts = run.context["part"], run.context["parts"]
    shards = list(run.inputs["shards"])
    stats = StageStats(DEDUP_STAGE)
    dedup = config.dedup
    exact_parts, entry_parts = [], []
    id_parts = []
    for uri in shards:  # per shard, only this partition's digests, bucket entries and id keys are kept
        index = _read_npz(uri + INDEX_SUFFIX, ("id_pos", "id_sample"))
        mask = partition_of(index["id_sample"][:, 0], parts) == part
        id_parts.append((index["id_pos"][mask], index["id_sample"][mask]))
        del index
        light = _features(uri, ("pos", "digest", "keys", "has_shingles"))
        stats.count_in += len(light.pos)
        if dedup.exact:
            mask = partition_of(light.digest[:, 0], parts) == part
            exact_parts.append((light.pos[mask], light.digest[mask]))
        entry_parts.append(bucket_entries(light, dedup, part, parts))
        del light
    _check_unique_ids(shards, id_parts)
    del id_parts
    firsts, dups = np.empty(0, np.int64), np.empty(0, np.int64)
    if exact_parts:
        subset = DedupFeatures(
            pos=np.concatenate([p for p, _ in exact_parts]),
            digest=np.concatenate([d for _, d in exact_parts]).reshape(-1, 2),
            offsets=np.empty(0, np.int64),
            shingles=np.empty(0, np.uint64),
            keys=np.empty((0, 0), np.uint64),
            has_shingles=np.empty(0, bool),
        )
        firsts, dups = exact_pairs(subset, part, parts)
    candidates = pairs_from_entries(concat_entries(entry_parts), dedup)
    del entry_parts
    needed = np.unique(candidates)
    parts_needed = []
    for uri in shards:  # the shingles of the candidates only
        full = _features(uri, ("pos", "offsets", "shingles"))
        rows = np.flatnonzero(np.isin(full.pos, needed))
        lengths = full.offsets[rows + 1] - full.offsets[rows]
        pieces = [full.shingles[full.offsets[i] : full.offsets[i + 1]] for i in rows]
        parts_needed.append(
            DedupFeatures(
                pos=full.pos[rows],
                digest=np.empty((0, 2), np.uint64),
                offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                shingles=np.concatenate(pieces) if pieces else np.empty(0, np.uint64),
                keys=np.empty((0, 0), np.uint64),
                has_shingles=np.empty(0, bool),
            )
        )
    subset = DedupFeatures.concat(parts_needed)
    near, values = verify_pairs(candidates, subset, dedup)
    _write_npz(run.output, {"exact_first": firsts, "exact_dup": dups, "near": near, "near_jaccard": values})
    stats.count_out = len(dups) + len(near)
    stats.extra.update({"candidates": len(candidates), "exact_pairs": len(dups), "near_pairs": len(near)})
    return stats


def _check_unique_ids(shards: Sequence[str], id_parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Ids are unique across the whole pool, as the one-pod stage requires: each partition checks the id keys
    (sha256 of seed:id, of every input record) that fall in it, so no task holds them all."""
    pos = np.concatenate([p for p, _ in id_parts]) if id_parts else np.empty(0, np.int64)
    words = np.concatenate([w for _, w in id_parts]).reshape(-1, 4) if id_parts else np.empty((0, 4))
    if len(pos) < 2:
        return
    order = np.lexsort((pos, *words.T[::-1]))
    same = np.flatnonzero((words[order][1:] == words[order][:-1]).all(axis=1))
    if not len(same):
        return
    first, second = int(pos[order[same[0]]]), int(pos[order[same[0] + 1]])
    marker = json.loads(storage.read_text(done_uri(shards[0])))
    source = marker["inputs"]["captions"]["uri"]
    rid = next(record.id for p, record in iter_shard(source, 0, 1) if p == second)  # only to name it
    message = f"duplicate id {rid!r} (first at record {first + 1})"
    raise InputError(source, message, line=second + 1, field="id", unit="record")


def dedup_partition(config: Any, shard_outputs: Sequence[str], output_dir: str, part: int, parts: int) -> str:
    """Exact groups and verified near pairs of partition `part` of `parts`; returns the versioned pairs."""
    from synthvlm.stages.curate import EXCLUDED

    stage = Stage(name=DEDUP_STAGE, process=_dedup_process, excluded=EXCLUDED)
    only = {"dedup": config.dedup.model_dump(mode="json")}
    return run_stage(
        stage,
        type(config).model_validate(only),
        {"shards": list(shard_outputs)},
        storage.join(output_dir, "dedup", f"pairs-{part:05d}-of-{parts:05d}.npz"),
        params={"part": part, "parts": parts},
        context={"part": part, "parts": parts},
        root=output_dir,
    )


# ---- 3. the global merge -----------------------------------------------------------------------------------
#
# Out of core: what grows with the pool lives in files on the pod's local disk (each shard's index columns,
# a drop bitmap of one bit per input position, the drops in input order, the ids of duplicates' targets in
# sqlite), read through memory maps or in slices; what is held at once is one shard's columns, one position
# range's pairs, and per shard a few bytes per caption while a cut is searched. The CLIP and sample cuts are
# found by bisection over the merged order of per-shard sorted keys, never merging them.

_ROW_KEPT, _ROW_DEDUP, _ROW_CLIP, _ROW_SAMPLE = 0, 1, 2, 3
_TARGET = 8  # flag in a row's code: a later caption is a duplicate of this one
_ALL_ONES = (1 << 64) - 1
_DROP = np.dtype([("pos", "<i8"), ("of", "<i8"), ("jaccard", "<f8"), ("exact", "u1")])


class _Bits:
    """One bit per input position in a file on local disk (1 bit/caption: 125 MB per billion positions)."""

    def __init__(self, path: str, size: int):
        self.array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(1, (size + 7) // 8),))

    def set(self, positions: np.ndarray) -> None:
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions):
            np.bitwise_or.at(self.array, positions >> 3, (1 << (positions & 7)).astype(np.uint8))

    def get(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return ((self.array[positions >> 3] >> (positions & 7).astype(np.uint8)) & 1).astype(bool)


def _float_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys in the order of the float64 values (no NaN); -0.0 and 0.0 get one key, as they compare."""
    bits = (np.asarray(values, dtype=np.float64) + 0.0).view(np.uint64)
    sign = bits >> np.uint64(63)
    return np.where(sign == 1, ~bits, bits | np.uint64(1 << 63))


def _key_float(key: int) -> float:
    bits = key ^ (1 << 63) if key >> 63 else ~key & 0xFFFFFFFFFFFFFFFF
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def kth_smallest(sorted_arrays: Sequence[np.ndarray], k: int) -> int:
    """The k-th smallest (1-based) of the union of ascending uint64 arrays, by bisection over the key space:
    64 rounds of one binary search per array, however large the arrays (memory maps are fine)."""
    total = sum(len(a) for a in sorted_arrays)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    lo, hi = 0, (1 << 64) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int(np.searchsorted(a, np.uint64(mid), side="right")) for a in sorted_arrays) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _below_and_at(sorted_arrays: Sequence[np.ndarray], key: int) -> tuple[int, int]:
    """How many keys of the ascending arrays are below `key`, and how many equal it."""
    below = sum(int(np.searchsorted(a, np.uint64(key), side="left")) for a in sorted_arrays)
    up_to = sum(int(np.searchsorted(a, np.uint64(key), side="right")) for a in sorted_arrays)
    return below, up_to - below


def _spill(path: str, values: np.ndarray) -> np.ndarray:
    """`values` written to a local .npy file and mapped back: the pages are the kernel's to drop."""
    np.save(path, values)
    return np.load(path, mmap_mode="r")


class _Cut:
    """Rows of a key up to `key` pass; rows equal to it pass only if their position is in `tied_kept` (None:
    all of them pass)."""

    def __init__(self, key: int, tied_kept: np.ndarray | None):
        self.key, self.tied_kept = np.uint64(key), tied_kept

    def passes(self, keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
        ok = keys < self.key
        tied = keys == self.key
        if self.tied_kept is None:
            return ok | tied
        return ok | (tied & np.isin(pos, self.tied_kept))


class _Columns:
    """Each shard's index columns (input position, CLIP score, sample words), spilled to local .npy files and
    opened as memory maps, one shard at a time."""

    def __init__(self, shards: Sequence[str], work: str):
        self.work, self.sizes = work, []
        for i, uri in enumerate(shards):
            index = _read_npz(uri + INDEX_SUFFIX, ("dedup_pos", "sample", "score"))
            for name, values in (("pos", index["dedup_pos"]), ("score", index["score"])):
                np.save(self._path(i, name), values)
            np.save(self._path(i, "sample"), np.ascontiguousarray(index["sample"]))
            self.sizes.append(len(index["dedup_pos"]))
            del index

    def _path(self, shard: int, name: str) -> str:
        return os.path.join(self.work, f"shard-{shard}-{name}.npy")

    def __len__(self) -> int:
        return len(self.sizes)

    def get(self, shard: int, name: str) -> np.ndarray:
        return np.load(self._path(shard, name), mmap_mode="r")


def _pair_columns(pair_files: Sequence[str], work: str) -> list[dict[str, np.ndarray]]:
    """Each dedup partition's pairs, spilled to local .npy files (sorted by the later position) and mapped."""
    out = []
    for i, uri in enumerate(pair_files):
        pairs = _read_npz(uri, ("exact_first", "exact_dup", "near", "near_jaccard"))
        near = pairs["near"].reshape(-1, 2).astype(np.int64)
        first, dup = pairs["exact_first"].astype(np.int64), pairs["exact_dup"].astype(np.int64)
        by_dup, by_later = np.argsort(dup, kind="stable"), np.argsort(near[:, 1], kind="stable")
        columns = {
            "exact_first": first[by_dup],
            "exact_dup": dup[by_dup],
            "near_a": near[by_later, 0],
            "near_b": near[by_later, 1],
            "near_jaccard": pairs["near_jaccard"][by_later],
        }
        del pairs, near
        out.append(
            {name: _spill(os.path.join(work, f"pairs-{i}-{name}.npy"), v) for name, v in columns.items()}
        )
    return out


def _resolve_by_range(
    pairs: Sequence[dict[str, np.ndarray]],
    positions: int,
    step: int,
    dropped: _Bits,
    targets: _Bits,
    out: Any,
) -> Counter[str]:
    """`curation.dedup.resolve`, one range of `step` input positions at a time: a caption's fate depends only
    on earlier positions, so each range needs the pairs ending in it and the drop bits written before it.
    Writes the drops in input order to `out` (`_DROP` rows); returns the count per kind."""
    kinds: Counter[str] = Counter()
    for lo in range(0, positions, step):
        hi = lo + step

        def ending_here(later: str, *names: str, lo: int = lo, hi: int = hi) -> list[np.ndarray]:
            pieces: list[list[np.ndarray]] = [[] for _ in names]
            for p in pairs:
                a, b = np.searchsorted(p[later], [lo, hi])
                for piece, name in zip(pieces, names, strict=True):
                    piece.append(np.asarray(p[name][a:b]))
            return [np.concatenate(piece) if piece else np.empty(0) for piece in pieces]

        first, dup = (x.astype(np.int64) for x in ending_here("exact_dup", "exact_first", "exact_dup"))
        dropped.set(dup)
        targets.set(first)
        a, b, value = ending_here("near_b", "near_a", "near_b", "near_jaccard")
        a, b = a.astype(np.int64), b.astype(np.int64)
        order = np.lexsort((a, -value, b))
        a, b, value = a[order], b[order], value[order]
        before = dropped.get(a) | dropped.get(b)  # exact drops anywhere, near drops of earlier ranges
        here: dict[int, tuple[int, float]] = {}
        for i, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
            if before[i] or y in here or x in here:
                continue
            here[y] = (x, float(value[i]))
        near_b = np.fromiter(here, dtype=np.int64, count=len(here))
        dropped.set(near_b)
        targets.set(np.fromiter((x for x, _ in here.values()), dtype=np.int64, count=len(here)))
        rows = np.empty(len(dup) + len(here), dtype=_DROP)
        rows["pos"] = np.concatenate([dup, near_b])
        rows["of"] = np.concatenate([first, [x for x, _ in here.values()]]).astype(np.int64)
        rows["jaccard"] = np.concatenate([np.ones(len(dup)), [v for _, v in here.values()]])
        rows["exact"] = np.concatenate([np.ones(len(dup), np.uint8), np.zeros(len(here), np.uint8)])
        rows.sort(order="pos")
        rows.tofile(out)
        kinds["exact"] += len(dup)
        kinds["near"] += len(here)
    return kinds


class _TargetIds:
    """The ids of captions that later captions duplicate, by input position: needed when the later one's
    reject row is written, held in sqlite on local disk (a pool may have billions of them)."""

    def __init__(self, path: str):
        import sqlite3

        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE ids (pos INTEGER PRIMARY KEY, id TEXT NOT NULL)")
        self.pending: dict[int, str] = {}

    def add(self, pos: int, rid: str) -> None:
        self.pending[pos] = rid
        if len(self.pending) >= 100_000:
            self.db.executemany("INSERT INTO ids VALUES (?, ?)", self.pending.items())
            self.pending.clear()

    def __getitem__(self, pos: int) -> str:
        if pos in self.pending:
            return self.pending[pos]
        return self.db.execute("SELECT id FROM ids WHERE pos = ?", (pos,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()


def _merge_process(config: Any, run: StageRun) -> StageStats:
    from synthvlm.stages.curate import STAGE, STEPS

    shards, pair_files = list(run.inputs["shards"]), list(run.inputs["pairs"])
    stats = StageStats(STAGE)
    steps: dict[str, dict[str, int]] = {}
    rejects: Counter[str] = Counter()
    llm: Counter[str] = Counter()
    judge: dict[str, Any] = {}
    pods = []  # what billing needs of the filter and dedup tasks, which no report reads otherwise
    for uri in pair_files:
        marker = json.loads(storage.read_text(done_uri(uri)))
        pods.append({"stage": DEDUP_STAGE, "seconds": marker.get("seconds", 0.0)})
    for uri in shards:
        marker = json.loads(storage.read_text(done_uri(uri)))
        pods.append({k: marker[k] for k in ("stage", "seconds", "load_seconds") if k in marker})
        judge = {k: marker.get(k) for k in ("llm_backend", "llm_model")}  # as the one-pod stage records
        stats.count_in += marker["count_in"]
        rejects.update(marker["rejects"])
        llm.update(marker.get("llm", {}))
        for name in ("clip_records_without_image", "itm_records_without_image"):
            if name in marker:
                stats.extra[name] = stats.extra.get(name, 0) + marker[name]
        for step, counts in marker["steps"].items():
            total = steps.setdefault(step, {"in": 0, "out": 0, "rejected": 0})
            for key, value in counts.items():
                total[key] += value

    with tempfile.TemporaryDirectory(prefix="synthvlm-merge-") as work:
        columns = _Columns(shards, work)
        rows = sum(columns.sizes)
        dropped = _Bits(os.path.join(work, "dropped.bits"), stats.count_in)
        targets = _Bits(os.path.join(work, "targets.bits"), stats.count_in)

        # dedup
        drops_path = os.path.join(work, "drops.bin")
        kinds: Counter[str] = Counter()
        with open(drops_path, "wb") as out:
            if config.dedup.exact or config.dedup.near:
                pairs = _pair_columns(pair_files, work)
                step = max(1, config.scale.records_per_shard)
                kinds = _resolve_by_range(pairs, stats.count_in, step, dropped, targets, out)
                del pairs
        n_dropped = kinds["exact"] + kinds["near"]
        if config.dedup.exact or config.dedup.near:
            steps["dedup"] = {"in": rows, "out": rows - n_dropped, "rejected": n_dropped}

        def alive(shard: int, clip: _Cut | None = None) -> np.ndarray:
            pos = columns.get(shard, "pos")
            ok = ~dropped.get(pos)
            if clip is not None:
                score = np.asarray(columns.get(shard, "score"))
                scored = ~np.isnan(score)
                keys = ~_float_keys(np.where(scored, score, 0.0))  # descending scores as ascending keys
                ok &= ~scored | clip.passes(keys, pos)
            return ok

        # clip rank: the best top_fraction of the scored captions left, ties at the cut by id
        key = config.clip.score.score_key
        clip_cut: _Cut | None = None
        n_ranked_out = n_sampled_out = 0
        if config.clip.enabled and config.clip.mode == "top_fraction":
            sorted_keys, n_scored, total = [], 0, 0.0
            for s in range(len(columns)):
                score = np.asarray(columns.get(s, "score"))
                values = score[alive(s) & ~np.isnan(score)]
                n_scored += len(values)
                total += float(np.sum(values))
                sorted_keys.append(
                    _spill(os.path.join(work, f"clip-keys-{s}.npy"), np.sort(~_float_keys(values)))
                )
            k = fraction_count(n_scored, config.clip.top_fraction)
            min_kept: float | None = None
            if k == 0:
                clip_cut = _Cut(0, np.empty(0, np.int64))  # no key is below 0 and no tie passes
            elif k < n_scored:
                cut = kth_smallest(sorted_keys, k)
                cut_value = _key_float(~cut & _ALL_ONES)
                above, tied = _below_and_at(sorted_keys, cut)
                tied_kept = None
                if k - above < tied:
                    tied_kept = _tied_by_id(columns, shards, alive, cut_value, k - above)
                clip_cut, min_kept = _Cut(cut, tied_kept), cut_value
            elif n_scored:  # all kept: the lowest score left is the largest descending key
                min_kept = _key_float(~int(max(a[-1] for a in sorted_keys if len(a))) & _ALL_ONES)
            before = rows - n_dropped
            after = sum(int(alive(s, clip_cut).sum()) for s in range(len(columns)))
            n_ranked_out = before - after
            steps["clip_rank"] = {"in": before, "out": after, "rejected": n_ranked_out}
            if n_scored:
                stats.extra[f"{key}_mean_in"] = total / n_scored
                stats.extra[f"{key}_min_kept"] = min_kept
            for path in (os.path.join(work, f"clip-keys-{s}.npy") for s in range(len(columns))):
                os.remove(path)

        # sample: the `size` captions left with the smallest sample keys (sha256 of seed:id)
        size = config.sample_size
        sample_cut: _Cut | None = None
        before = sum(int(alive(s, clip_cut).sum()) for s in range(len(columns)))
        if size is not None and before > size:
            sorted_words = []
            for s in range(len(columns)):
                words = np.sort(np.asarray(columns.get(s, "sample")[:, 0])[alive(s, clip_cut)])
                sorted_words.append(_spill(os.path.join(work, f"sample-words-{s}.npy"), words))
            cut = kth_smallest(sorted_words, size)
            below, tied = _below_and_at(sorted_words, cut)
            tied_kept = None
            if size - below < tied:  # equal first words: order by the full 256-bit key
                found_pos, found_words = [], []
                for s in range(len(columns)):
                    words = np.asarray(columns.get(s, "sample"))
                    rows_ = np.flatnonzero(alive(s, clip_cut) & (words[:, 0] == np.uint64(cut)))
                    found_pos.append(np.asarray(columns.get(s, "pos"))[rows_])
                    found_words.append(words[rows_])
                tied_pos, tied_words = np.concatenate(found_pos), np.concatenate(found_words)
                order = np.lexsort(tied_words.T[::-1])
                tied_kept = np.sort(tied_pos[order[: size - below]])
            sample_cut = _Cut(cut, tied_kept)
        del before

        def codes(shard: int) -> np.ndarray:
            """Per index row: kept, or the step that dropped it; plus the target flag."""
            pos = np.asarray(columns.get(shard, "pos"))
            code = np.full(len(pos), _ROW_KEPT, dtype=np.uint8)
            after_dedup = ~dropped.get(pos)
            after_clip = alive(shard, clip_cut)
            code[~after_dedup] = _ROW_DEDUP
            code[after_dedup & ~after_clip] = _ROW_CLIP
            if sample_cut is not None:
                words = np.asarray(columns.get(shard, "sample")[:, 0])
                code[after_clip & ~sample_cut.passes(words, pos)] = _ROW_SAMPLE
            code[targets.get(pos)] |= _TARGET
            return code

        code_maps = [_spill(os.path.join(work, f"codes-{s}.npy"), codes(s)) for s in range(len(columns))]
        n_sampled_out = sum(int(((c & 7) == _ROW_SAMPLE).sum()) for c in code_maps)
        after_sample = sum(int(((c & 7) == _ROW_KEPT).sum()) for c in code_maps)
        steps["sample"] = {"in": after_sample + n_sampled_out, "out": after_sample, "rejected": n_sampled_out}

        stats.count_out = _write_merged(
            config, run, shards, columns, code_maps, drops_path, os.path.join(work, "targets.sqlite")
        )

    rejects.update(
        {
            **({f"dedup.{k}_duplicate": v for k, v in kinds.items() if v}),
            **({"clip.not_in_top_fraction": n_ranked_out} if n_ranked_out else {}),
            **({"sample.not_sampled": n_sampled_out} if n_sampled_out else {}),
        }
    )
    stats.rejects = rejects
    ordered = {step: steps[step] for step in STEPS if step in steps}
    rejected_by_step: Counter[str] = Counter()
    for name, count in rejects.items():
        rejected_by_step[name.split(".", 1)[0]] += count
    stats.extra.update(
        {
            "steps": ordered,
            "kept_fraction": stats.count_out / stats.count_in if stats.count_in else None,
            "rejects_manifest": storage.join(run.dir, run.context["rejects_name"]),
            "rejected_by_step": dict(rejected_by_step),
            "shards": len(shards),
            "dedup_partitions": len(pair_files),
            "pods": sorted(pods, key=lambda pod: pod["stage"], reverse=True),
        }
    )
    stats.extra.update({k: v for k, v in judge.items() if v is not None})
    if llm:
        stats.extra.update({k: v for k, v in llm.items()})
    return stats


def _tied_by_id(columns: _Columns, shards: Sequence[str], alive: Any, cut: float, need: int) -> np.ndarray:
    """Positions of the `need` smallest ids among the captions left whose score equals the cut (one pass
    over the shards' survivors; ties of float scores are few)."""
    wanted: list[np.ndarray] = []
    for s in range(len(columns)):
        score = np.asarray(columns.get(s, "score"))
        wanted.append(np.asarray(columns.get(s, "pos"))[alive(s) & (score == cut)])
    tied = set(np.concatenate(wanted).tolist())
    found: list[tuple[str, int]] = []
    for s, uri in enumerate(shards):
        for p, line in zip(columns.get(s, "pos").tolist(), _lines(uri), strict=False):
            if p in tied:
                found.append((json.loads(line)["id"], p))
    return np.sort(np.array([p for _, p in sorted(found)[:need]], dtype=np.int64))


def _write_merged(
    config: Any,
    run: StageRun,
    shards: Sequence[str],
    columns: _Columns,
    code_maps: Sequence[np.ndarray],
    drops_path: str,
    ids_path: str,
) -> int:
    """Stream every shard's survivors in input order into the curated manifest, and the rejects (per-caption
    steps merged by step and position, then dedup, CLIP rank, sample) into the rejects manifest."""
    from synthvlm.stages.curate import _caption_only

    key, size, seed = config.clip.score.score_key, config.sample_size, config.sample_seed
    target_ids = _TargetIds(ids_path)
    drops = (
        np.memmap(drops_path, dtype=_DROP, mode="r") if os.path.getsize(drops_path) else np.empty(0, _DROP)
    )
    spill_dir = os.path.dirname(drops_path)
    spill_files = {
        name: open(os.path.join(spill_dir, f"rejects-{name}.jsonl"), "w+", encoding="utf-8")  # noqa: SIM115
        for name in ("dedup", "clip_rank", "sample")
    }

    def reject_row(record: dict[str, Any], step: str, reason: str, details: dict[str, Any]) -> str:
        row = {"id": record["id"], "caption": record["caption"], "stage": step, "reason": reason}
        return json.dumps({**row, "details": details}, ensure_ascii=False, sort_keys=True) + "\n"

    def survivors() -> Iterator[str]:
        next_drop = 0
        with ExitStack() as stack:
            progress = stack.enter_context(run.progress(sum(columns.sizes), "captions", label="merge"))
            streams = []
            for s, uri in enumerate(shards):
                lines = stack.enter_context(_closing(_lines(uri)))
                rows = zip(_chunked(columns.get(s, "pos")), _chunked(code_maps[s]), strict=True)
                streams.append(((p, c, line) for (p, c), line in zip(rows, lines, strict=False)))
            for p, c, line in heapq.merge(*streams, key=lambda item: item[0]):
                progress.update()
                row_kind = c & 7
                if row_kind == _ROW_KEPT:
                    record = Record.model_validate_json(line)
                    if c & _TARGET:
                        target_ids.add(p, record.id)
                    yield _caption_only(record).model_dump_json() + "\n"
                    continue
                data = json.loads(line)
                if c & _TARGET:
                    target_ids.add(p, data["id"])
                if row_kind == _ROW_DEDUP:
                    drop = drops[next_drop]
                    next_drop += 1
                    assert int(drop["pos"]) == p, "drops out of input order"
                    details = {
                        "duplicate_of": target_ids[int(drop["of"])],
                        "jaccard": round(float(drop["jaccard"]), 4),
                    }
                    reason = "exact_duplicate" if drop["exact"] else "near_duplicate"
                    spill_files["dedup"].write(reject_row(data, "dedup", reason, details))
                elif row_kind == _ROW_CLIP:
                    details = {key: data["scores"][key], "top_fraction": config.clip.top_fraction}
                    spill_files["clip_rank"].write(reject_row(data, "clip", "not_in_top_fraction", details))
                else:
                    details = {"sample_size": size, "sample_seed": seed}
                    spill_files["sample"].write(reject_row(data, "sample", "not_sampled", details))

    try:
        count = storage.write_lines(run.output, survivors())

        def all_rejects() -> Iterator[str]:
            with ExitStack() as stack:
                streams = []
                for uri in shards:
                    lines = stack.enter_context(_closing(_lines(uri + REJECTS_SUFFIX)))
                    streams.append(json.loads(line) for line in lines)
                for row in heapq.merge(*streams, key=lambda r: r[ORDER_KEY]):
                    row.pop(ORDER_KEY)
                    yield json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
            for name in ("dedup", "clip_rank", "sample"):
                handle = spill_files[name]
                handle.seek(0)
                yield from handle

        storage.write_lines(storage.join(run.dir, run.context["rejects_name"]), all_rejects())
    finally:
        for handle in spill_files.values():
            handle.close()
        target_ids.close()
    return count


def _chunked(values: np.ndarray, chunk: int = 65_536) -> Iterator[Any]:
    """The items of a (memory-mapped) array as Python values, a chunk at a time."""
    for start in range(0, len(values), chunk):
        yield from np.asarray(values[start : start + chunk]).tolist()


class _closing:
    """Close a generator at the end of a with block."""

    def __init__(self, generator: Iterator[str]):
        self.generator = generator

    def __enter__(self) -> Iterator[str]:
        return self.generator

    def __exit__(self, *exc: object) -> None:
        self.generator.close()  # type: ignore[attr-defined]


def merge(
    config: Any,
    shard_outputs: Sequence[str],
    pair_outputs: Sequence[str],
    output_manifest: str,
    rejects_manifest: str | None = None,
    *,
    root: str | None = None,
) -> str:
    """Dedup resolution, CLIP top fraction and sample over all shards; writes the curated manifest and the
    rejects beside it (as `stages.curate.curate`). Returns the versioned curated manifest."""
    from synthvlm.stages.curate import EXCLUDED, STAGE

    rejects_name = (rejects_manifest or "rejects.jsonl").rstrip("/").rpartition("/")[2]
    stage = Stage(name=STAGE, process=_merge_process, excluded=EXCLUDED, sidecars=("{rejects}",), version=2)
    return run_stage(
        stage,
        config,
        {"shards": list(shard_outputs), "pairs": list(pair_outputs)},
        output_manifest,
        context={"rejects_name": rejects_name},
        names={"rejects": rejects_name},
        root=root,
    )


def curate_sharded(
    config: Any,
    input_manifest: str,
    output_manifest: str,
    rejects_manifest: str | None = None,
    *,
    shards: int | None = None,
    work_dir: str | None = None,
    data_root: str | None = None,
) -> str:
    """All three kinds of task in this process, one after the other (what the pipeline runs as pods)."""
    work_dir = work_dir or output_manifest.rstrip("/").rpartition("/")[0] or "."
    if shards is None:
        shards = num_shards(
            count_records(input_manifest), config.scale.records_per_shard, config.scale.max_shards
        )
    outs = [
        curate_shard(config, input_manifest, work_dir, r, shards, data_root=data_root) for r in range(shards)
    ]
    pairs = [dedup_partition(config, outs, work_dir, p, shards) for p in range(shards)]
    return merge(config, outs, pairs, output_manifest, rejects_manifest)
