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

Memory per pod, for a pool of N captions in S shards (= partitions): a shard holds its N/S records (~5 KB
each as pydantic records) and the filters' models; a partition holds 1/S of the N x bands bucket entries
(32 bytes each while sorting) plus the shingles of its candidates; the merge holds ~60 bytes per caption
that survived the per-caption filters (position, sample key, score, flags) plus the pairs, and streams
records. With the default 200K records per shard a shard or partition stays near 1 GB whatever N is; the
merge reaches 4 GB at about 60M surviving captions.
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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
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
    resolve,
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
    shards = num_shards(
        count_records(input_manifest), config.scale.records_per_shard, config.scale.max_shards
    )
    return [
        {"manifest": input_manifest, "shard": i, "num_shards": shards, "config_json": config_json}
        for i in range(shards)
    ]


# ---- streamed writes -------------------------------------------------------------------------------------


def write_lines(uri: str, lines: Iterable[str]) -> int:
    """Write text lines to `uri` atomically without holding them in memory; returns how many."""
    count = 0
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "part")
            with open(local, "w", encoding="utf-8") as handle:
                for line in lines:
                    handle.write(line)
                    count += 1
            storage.upload_file(local, uri, content_type="application/jsonl")
        return count
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _lines(uri: str) -> Iterator[str]:
    with storage.local_copy(uri) as path, open(path, encoding="utf-8") as handle:
        yield from handle


# ---- 1. the filter shards ----------------------------------------------------------------------------------


def sample_words(ids: Sequence[str], seed: int) -> np.ndarray:
    """(n, 4) big-endian uint64 words of sha256(f"{seed}:{id}"): their lexicographic order is that of
    `stages.curate.sample_key` (the hex digest)."""
    raw = b"".join(hashlib.sha256(f"{seed}:{rid}".encode()).digest() for rid in ids)
    return np.frombuffer(raw, dtype=">u8").reshape(-1, 4).astype(np.uint64)


def _shard_process(config: Any, run: StageRun) -> StageStats:
    from synthvlm.stages.curate import (
        PER_CAPTION_STEPS,
        STEPS,
        Models,
        _Run,
        filter_records,
        make_judge_backend,
    )

    rank, world_size = run.context["rank"], run.context["world_size"]
    stats = StageStats(SHARD_STAGE)
    positions: dict[str, int] = {}
    records: list[Record] = []
    for pos, record in iter_shard(run.inputs["captions"], rank, world_size):
        if record.id in positions:
            raise InputError(run.inputs["captions"], f"duplicate id {record.id!r}", line=pos + 1, field="id")
        positions[record.id] = pos
        records.append(record)
    stats.count_in = len(records)
    steps = _Run(stats)
    backend = make_judge_backend(config, run.data_root)
    kept = filter_records(records, config, backend, steps, Models())
    del records

    rows = []
    for row in steps.rows:
        rows.append({**row, ORDER_KEY: [STEPS.index(row["stage"]), positions[row["id"]]]})
    assert all(row["stage"] in PER_CAPTION_STEPS for row in rows)
    write_lines(
        run.output + REJECTS_SUFFIX, (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    )
    key = config.clip.score.score_key
    pos = np.array([positions[r.id] for r in kept], dtype=np.int64)
    features = compute_features([r.caption for r in kept], pos, config.dedup)
    index = {
        **{f"dedup_{name}": getattr(features, name) for name in DedupFeatures.__dataclass_fields__},
        "sample": sample_words([r.id for r in kept], config.sample_seed),
        "score": np.array(
            [r.scores.get(key, np.nan) if r.image_uri else np.nan for r in kept], dtype=np.float64
        ),
    }
    _write_npz(run.output + INDEX_SUFFIX, index)
    stats.count_out = write_lines(run.output, (r.model_dump_json() + "\n" for r in kept))
    stats.extra["steps"] = steps.steps
    if backend is not None:
        stats.extra["llm"] = {k: v for k, v in backend.metrics().items() if isinstance(v, int | float)}
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
    for uri in shards:  # per shard, only this partition's digests and bucket entries are kept
        light = _features(uri, ("pos", "digest", "keys", "has_shingles"))
        stats.count_in += len(light.pos)
        if dedup.exact:
            mask = partition_of(light.digest[:, 0], parts) == part
            exact_parts.append((light.pos[mask], light.digest[mask]))
        entry_parts.append(bucket_entries(light, dedup, part, parts))
        del light
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


def _merge_process(config: Any, run: StageRun) -> StageStats:
    from synthvlm.stages.curate import STAGE, STEPS, _caption_only

    shards, pair_files = list(run.inputs["shards"]), list(run.inputs["pairs"])
    stats = StageStats(STAGE)
    steps: dict[str, dict[str, int]] = {}
    rejects: Counter[str] = Counter()
    llm: Counter[str] = Counter()
    for uri in shards:
        marker = json.loads(storage.read_text(done_uri(uri)))
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
    indices = [_read_npz(uri + INDEX_SUFFIX, ("dedup_pos", "sample", "score")) for uri in shards]
    sizes = [len(index["dedup_pos"]) for index in indices]
    pos = np.concatenate([index["dedup_pos"] for index in indices])
    sample = np.concatenate([index["sample"] for index in indices])
    score = np.concatenate([index["score"] for index in indices])
    del indices
    alive = np.ones(len(pos), dtype=bool)

    # dedup
    pairs = [_read_npz(uri, ("exact_first", "exact_dup", "near", "near_jaccard")) for uri in pair_files]
    exact = (
        np.concatenate([p["exact_first"] for p in pairs]).astype(np.int64),
        np.concatenate([p["exact_dup"] for p in pairs]).astype(np.int64),
    )
    near = (
        np.concatenate([p["near"].reshape(-1, 2) for p in pairs]).astype(np.int64),
        np.concatenate([p["near_jaccard"] for p in pairs]),
    )
    dropped = resolve(exact, near) if (config.dedup.exact or config.dedup.near) else {}
    targets = {d.of_index for d in dropped.values()}
    if config.dedup.exact or config.dedup.near:
        alive &= ~np.isin(pos, np.fromiter(dropped, dtype=np.int64, count=len(dropped)))
        steps["dedup"] = {"in": len(pos), "out": int(alive.sum()), "rejected": len(dropped)}

    # clip rank
    key = config.clip.score.score_key
    code = np.zeros(len(pos), dtype=np.int8)  # 0 kept, 1 dedup, 2 clip rank, 3 sample (per index row)
    n_ranked_out = n_sampled_out = 0
    if config.clip.enabled and config.clip.mode == "top_fraction":
        before = int(alive.sum())
        scored = np.flatnonzero(alive & ~np.isnan(score))
        k = fraction_count(len(scored), config.clip.top_fraction)
        chosen = _top(scored, score, k, shards, sizes, pos)
        out_rows = np.setdiff1d(scored, chosen)
        alive[out_rows] = False
        code[out_rows] = 2
        n_ranked_out = len(out_rows)
        steps["clip_rank"] = {"in": before, "out": int(alive.sum()), "rejected": n_ranked_out}
        if len(scored):
            stats.extra[f"{key}_mean_in"] = float(np.sum(score[scored]) / len(scored))
            stats.extra[f"{key}_min_kept"] = float(score[chosen].min()) if len(chosen) else None

    # sample
    size, seed = config.sample_size, config.sample_seed
    before = int(alive.sum())
    left = np.flatnonzero(alive)
    if size is not None and len(left) > size:
        words = sample[left]
        order = np.lexsort(words.T[::-1])
        out = left[order[size:]]
        alive[out] = False
        code[out] = 3
        n_sampled_out = len(out)
    steps["sample"] = {"in": before, "out": int(alive.sum()), "rejected": n_sampled_out}
    _check_unique(sample[np.flatnonzero(alive)])

    # stream the survivors in input order: 0 kept, 1 dedup, 2 clip rank, 3 sample (a row per index entry)
    code[np.isin(pos, np.fromiter(dropped, dtype=np.int64, count=len(dropped)))] = 1
    ids: dict[int, str] = {}
    spill = tempfile.TemporaryDirectory()
    spill_files = {
        name: open(os.path.join(spill.name, name), "w+", encoding="utf-8")  # noqa: SIM115 - closed below
        for name in ("dedup", "clip_rank", "sample")
    }

    def reject_row(record: dict[str, Any], step: str, reason: str, details: dict[str, Any]) -> str:
        row = {
            "id": record["id"],
            "caption": record["caption"],
            "stage": step,
            "reason": reason,
            "details": details,
        }
        return json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"

    def survivors() -> Iterator[str]:
        with ExitStack() as stack:
            streams = []
            start = 0
            for uri, n in zip(shards, sizes, strict=True):
                lines = stack.enter_context(_closing(_lines(uri)))
                rows = zip(pos[start : start + n].tolist(), code[start : start + n].tolist(), strict=True)
                streams.append(((p, c, line) for (p, c), line in zip(rows, lines, strict=False)))
                start += n
            for p, c, line in heapq.merge(*streams, key=lambda item: item[0]):
                if c == 0:
                    record = Record.model_validate_json(line)
                    if p in targets:
                        ids[p] = record.id
                    yield _caption_only(record).model_dump_json() + "\n"
                    continue
                data = json.loads(line)
                if p in targets:
                    ids[p] = data["id"]
                if c == 1:
                    d = dropped[p]
                    details = {"duplicate_of": ids[d.of_index], "jaccard": round(d.jaccard, 4)}
                    spill_files["dedup"].write(reject_row(data, "dedup", f"{d.kind}_duplicate", details))
                elif c == 2:
                    details = {key: data["scores"][key], "top_fraction": config.clip.top_fraction}
                    spill_files["clip_rank"].write(reject_row(data, "clip", "not_in_top_fraction", details))
                elif c == 3:
                    details = {"sample_size": size, "sample_seed": seed}
                    spill_files["sample"].write(reject_row(data, "sample", "not_sampled", details))

    stats.count_out = write_lines(run.output, survivors())
    rejects.update(
        {
            **({f"dedup.{k}_duplicate": v for k, v in Counter(d.kind for d in dropped.values()).items()}),
            **({"clip.not_in_top_fraction": n_ranked_out} if n_ranked_out else {}),
            **({"sample.not_sampled": n_sampled_out} if n_sampled_out else {}),
        }
    )

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
            handle.close()

    rejects_manifest = storage.join(run.dir, run.context["rejects_name"])
    write_lines(rejects_manifest, all_rejects())
    spill.cleanup()
    stats.rejects = rejects
    ordered = {step: steps[step] for step in STEPS if step in steps}
    rejected_by_step: Counter[str] = Counter()
    for name, count in rejects.items():
        rejected_by_step[name.split(".", 1)[0]] += count
    stats.extra.update(
        {
            "steps": ordered,
            "kept_fraction": stats.count_out / stats.count_in if stats.count_in else None,
            "rejects_manifest": rejects_manifest,
            "rejected_by_step": dict(rejected_by_step),
            "shards": len(shards),
            "dedup_partitions": len(pair_files),
        }
    )
    if llm:
        stats.extra.update({k: v for k, v in llm.items()})
    return stats


class _closing:
    """Close a generator at the end of a with block."""

    def __init__(self, generator: Iterator[str]):
        self.generator = generator

    def __enter__(self) -> Iterator[str]:
        return self.generator

    def __exit__(self, *exc: object) -> None:
        self.generator.close()  # type: ignore[attr-defined]


def _check_unique(words: np.ndarray) -> None:
    if len(words) < 2:
        return
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    if (ordered[1:] == ordered[:-1]).all(axis=1).any():
        raise InputError("curate input", "duplicate id among the curated captions")


def _top(
    scored: np.ndarray,
    score: np.ndarray,
    k: int,
    shards: Sequence[str],
    sizes: Sequence[int],
    pos: np.ndarray,
) -> np.ndarray:
    """Rows of the k best scores, ties at the cut broken by id (as stages.curate.top_fraction_ids)."""
    if k >= len(scored):
        return scored
    if k == 0:
        return scored[:0]
    values = score[scored]
    cut = np.sort(values)[::-1][k - 1]
    above = scored[values > cut]
    tied = scored[values == cut]
    need = k - len(above)
    if need < len(tied):  # ties at the cut: the smallest ids (one more pass over the survivors)
        wanted = set(pos[tied].tolist())
        found: dict[int, str] = {}
        start = 0
        for uri, n in zip(shards, sizes, strict=True):
            for p, line in zip(pos[start : start + n].tolist(), _lines(uri), strict=False):
                if p in wanted:
                    found[p] = json.loads(line)["id"]
            start += n
        row_of = {int(pos[r]): r for r in tied}
        tied = np.array(sorted((row_of[p] for p in wanted), key=lambda r: found[int(pos[r])]), dtype=np.int64)
    return np.sort(np.concatenate([above, tied[:need]]))


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
