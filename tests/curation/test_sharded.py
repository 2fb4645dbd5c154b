"""Curation over shards (filter shards -> dedup partitions -> merge) gives the one-pod stage's result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthvlm.curation.dedup import DedupConfig, find_duplicates
from synthvlm.curation.perplexity import TINY_LM
from synthvlm.curation.sharded import curate_sharded, iter_shard, plan
from synthvlm.models.clip import TINY_CLIP
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stage import read_stats
from synthvlm.stages.curate import CurateConfig, curate

WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "old",
    "wooden",
    "stone",
    "glass",
    "dog",
    "cat",
    "horse",
    "bird",
    "car",
    "boat",
    "house",
    "tree",
    "river",
    "street",
    "park",
    "beach",
    "mountain",
    "city",
    "table",
    "chair",
    "window",
    "door",
    "lamp",
    "book",
    "cup",
    "plate",
    "child",
    "woman",
    "man",
    "chef",
    "sunny",
    "rainy",
    "night",
    "morning",
    "evening",
]


def pool(n: int, seed: int = 0) -> list[Record]:
    """Captions with planted exact copies (case/punctuation changed), near copies (one word changed) and a
    few that the heuristics or the template judge drop."""
    rng = np.random.default_rng(seed)
    records: list[Record] = []
    bases: list[str] = []
    for i in range(n):
        roll = rng.random()
        if bases and roll < 0.15:
            caption = str(rng.choice(bases)).upper() + "!"
        elif bases and roll < 0.35:
            words = str(rng.choice(bases)).split()
            words[int(rng.integers(1, len(words)))] = str(rng.choice(WORDS))
            caption = " ".join(words)
        elif roll < 0.40:
            caption = "Buy a " + " ".join(rng.choice(WORDS, size=8)) + " on sale today"
        elif roll < 0.43:
            caption = "Photograph"
        else:
            caption = "A " + " ".join(rng.choice(WORDS, size=int(rng.integers(12, 20)))) + "."
            bases.append(caption)
        records.append(Record(id=f"r{i:04d}", caption=caption))
    return records


def config(**overrides) -> CurateConfig:
    data = {"judge": {"llm": {"backend": "template"}}, "sample_size": 40, **overrides}
    return CurateConfig.model_validate(data)


def run_both(tmp_path: Path, records: list[Record], cfg: CurateConfig, shard_counts=(1, 3)) -> dict:
    source = tmp_path / "in.jsonl"
    write_manifest(str(source), records)
    results = {}
    single = curate(cfg, str(source), str(tmp_path / "one" / "curated.jsonl"))
    results["single"] = (
        Path(single).read_bytes(),
        (Path(single).parent / "rejects.jsonl").read_bytes(),
        single,
    )
    for shards in shard_counts:
        out = curate_sharded(cfg, str(source), str(tmp_path / f"s{shards}" / "curated.jsonl"), shards=shards)
        results[shards] = (Path(out).read_bytes(), (Path(out).parent / "rejects.jsonl").read_bytes(), out)
    return results


def test_shards_take_every_record_once_in_input_order(tmp_path: Path) -> None:
    records = pool(23)
    source = tmp_path / "in.jsonl"
    write_manifest(str(source), records)
    seen = sorted(p for rank in range(4) for p, _ in iter_shard(str(source), rank, 4))
    assert seen == list(range(23))
    assert [r.id for _, r in iter_shard(str(source), 1, 4)] == [records[i].id for i in range(1, 23, 4)]
    items = plan(str(source), config(scale={"records_per_shard": 10}).model_dump_json())
    assert [(i["shard"], i["num_shards"]) for i in items] == [(0, 3), (1, 3), (2, 3)]


def test_sharded_curation_equals_the_one_pod_stage(tmp_path: Path) -> None:
    records = pool(150)
    results = run_both(tmp_path, records, config(), shard_counts=(1, 4))

    kept, rejects, _ = results["single"]
    for shards in (1, 4):
        assert results[shards][0] == kept, f"{shards} shards: other kept set"
        assert results[shards][1] == rejects, f"{shards} shards: other rejects"
    rows = [json.loads(line) for line in rejects.decode().splitlines()]
    reasons = {(r["stage"], r["reason"]) for r in rows}
    assert {("dedup", "exact_duplicate"), ("dedup", "near_duplicate"), ("sample", "not_sampled")} <= reasons
    assert ("judge", "answered_no") in reasons and ("heuristics", "special_char_ratio_low") in reasons
    assert len(read_manifest(results[4][2])) == 40
    one, many = read_stats(results["single"][2]), read_stats(results[4][2])
    assert many["rejects"] == one["rejects"] and many["steps"] == one["steps"]
    assert many["shards"] == 4 and many["count_in"] == 150


def noise_png(path: Path, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_with_perplexity_and_raw_clip_top_fraction(tmp_path: Path) -> None:
    records = pool(40, seed=3)
    records = [
        r.model_copy(update={"image_uri": noise_png(tmp_path / f"{r.id}.png", i)}) if i % 2 else r
        for i, r in enumerate(records)
    ]
    score = {"model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 1}
    cfg = config(
        perplexity={"enabled": True, "model": TINY_LM, "device": "cpu", "max_perplexity": 258.5},
        clip={"score": score},
        sample_size=None,
    )
    results = run_both(tmp_path, records, cfg, shard_counts=(3,))
    assert results[3][0] == results["single"][0]
    assert results[3][1] == results["single"][1]
    reasons = {(r["stage"], r["reason"]) for r in map(json.loads, results[3][1].decode().splitlines())}
    assert ("clip", "not_in_top_fraction") in reasons and ("perplexity", "perplexity_high") in reasons


def test_partitioned_dedup_equals_one_partition() -> None:
    from synthvlm.curation.dedup import candidate_pairs, compute_features, exact_pairs, resolve, verify_pairs

    texts = [r.caption for r in pool(300, seed=5)]
    cfg = DedupConfig()
    features = compute_features(texts, np.arange(len(texts)), cfg)
    exact = [exact_pairs(features, p, 5) for p in range(5)]
    near = [verify_pairs(candidate_pairs(features, cfg, p, 5), features, cfg) for p in range(5)]
    merged = resolve(
        (np.concatenate([e[0] for e in exact]), np.concatenate([e[1] for e in exact])),
        (np.concatenate([n[0] for n in near]), np.concatenate([n[1] for n in near])),
    )
    expected = find_duplicates(texts, cfg)
    assert [merged.get(i) for i in range(len(texts))] == expected
    assert sum(d is not None for d in expected) > 30


@pytest.mark.parametrize("cap", [1, 2])
def test_bucket_cap_is_by_input_order(cap: int) -> None:
    texts = [f"w1 w2 w3 w4 w5 w6 w7 w8 w9 x{i}" for i in range(5)]
    result = find_duplicates(texts, DedupConfig(shingle_size=1, jaccard=0.8, max_bucket_size=cap))
    assert result[0] is None and all(d is not None and d.of_index == 0 for d in result[1:])


# ---- the out-of-core merge ---------------------------------------------------------------------------------


def test_merge_resolves_duplicates_one_position_range_at_a_time(tmp_path: Path) -> None:
    """Ranges of 7 input positions: pairs cross many range boundaries; the result is still the one pod's."""
    records = pool(150, seed=11)
    results = run_both(tmp_path, records, config(scale={"records_per_shard": 7}), shard_counts=(4,))
    assert results[4][0] == results["single"][0]
    assert results[4][1] == results["single"][1]
    reasons = {json.loads(line)["reason"] for line in results[4][1].decode().splitlines()}
    assert {"exact_duplicate", "near_duplicate", "not_sampled"} <= reasons


def test_clip_cut_with_ties_and_signed_zeros_matches_the_one_pod_stage(tmp_path: Path, monkeypatch) -> None:
    """Few distinct scores (-0.0 and 0.0 among them): the top fraction ends inside a tie, broken by id."""
    import synthvlm.stages.curate as curate_module

    values = [0.5, 0.25, 0.0, -0.0, -0.25]

    def fake_scores(records, config):
        return [(values[int(r.id[1:]) % len(values)], None) for r in records]

    monkeypatch.setattr(curate_module, "_score_raw_images", fake_scores)
    records = [r.model_copy(update={"image_uri": str(tmp_path / f"{r.id}.png")}) for r in pool(90, seed=4)]
    score = {"model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 1}
    for fraction in (0.3, 0.5, 0.77):
        cfg = config(clip={"score": score, "top_fraction": fraction}, sample_size=None)
        results = run_both(tmp_path / str(fraction), records, cfg, shard_counts=(3,))
        assert results[3][0] == results["single"][0], fraction
        assert results[3][1] == results["single"][1], fraction
        assert b"not_in_top_fraction" in results[3][1]


def test_kth_smallest_by_bisection_equals_a_sort() -> None:
    from synthvlm.curation.sharded import kth_smallest

    rng = np.random.default_rng(0)
    arrays = [np.sort(rng.integers(0, 2**64, size=n, dtype=np.uint64)) for n in (0, 1, 50, 300)]
    arrays.append(np.sort(np.repeat(rng.integers(0, 2**64, size=20, dtype=np.uint64), 5)))  # ties
    merged = np.sort(np.concatenate(arrays))
    for k in (1, 2, 77, 200, len(merged) - 1, len(merged)):
        assert kth_smallest(arrays, k) == int(merged[k - 1])
    with pytest.raises(ValueError):
        kth_smallest(arrays, len(merged) + 1)


def test_float_keys_sort_as_the_floats_do() -> None:
    from synthvlm.curation.sharded import _float_keys, _key_float

    values = np.array([3.5, -np.inf, -1e-300, -0.0, 0.0, 1e-300, -2.0, np.inf, 0.25])
    keys = _float_keys(values)
    assert [float(v) for v in values[np.argsort(keys, kind="stable")]] == sorted(values.tolist())
    assert keys[3] == keys[4]  # -0.0 == 0.0, as the one-pod stage compares them
    assert [_key_float(int(k)) for k in keys] == [v + 0.0 for v in values.tolist()]


@pytest.mark.parametrize("first_caption", ["A small wooden house under tall old trees.", "Photograph"])
def test_a_duplicate_id_across_shards_is_an_input_error(tmp_path: Path, first_caption: str) -> None:
    """Also when the first copy is dropped by a filter: the one-pod stage refuses any duplicate id."""
    from synthvlm.errors import InputError

    records = pool(30, seed=2)
    records[4] = records[4].model_copy(update={"caption": first_caption})
    records[17] = records[17].model_copy(
        update={"id": records[4].id, "caption": "A red boat on a calm river."}
    )
    source = tmp_path / "in.jsonl"
    source.write_text("".join(r.model_dump_json() + "\n" for r in records))
    out = str(tmp_path / "out" / "curated.jsonl")
    with pytest.raises(
        InputError, match=r"in\.jsonl, record 18, field 'id': duplicate id 'r0004' \(first at record 5\)"
    ):
        curate_sharded(config(sample_size=None), str(source), out, shards=3)
    with pytest.raises(
        InputError, match=r"in\.jsonl, record 18, field 'id': duplicate id 'r0004' \(first at record 5\)"
    ):
        curate_sharded(config(sample_size=None, scale={"records_per_shard": 4}), str(source), out, shards=1)
    with pytest.raises(InputError, match="duplicate id 'r0004'"):
        curate(config(sample_size=None), str(source), str(tmp_path / "one" / "curated.jsonl"))


def test_merge_marker_lists_the_tasks_that_made_it_and_the_judge_model(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_manifest(str(source), pool(40, seed=8))
    out = curate_sharded(config(), str(source), str(tmp_path / "s" / "curated.jsonl"), shards=3)
    stats = read_stats(out)
    assert sorted(p["stage"] for p in stats["pods"]) == ["curate_dedup"] * 3 + ["curate_shard"] * 3
    assert all(p["seconds"] > 0 for p in stats["pods"])
    single = read_stats(curate(config(), str(source), str(tmp_path / "one" / "curated.jsonl")))
    assert (stats["llm_backend"], stats["llm_model"]) == (single["llm_backend"], single["llm_model"])


def test_plan_warns_when_max_shards_makes_shards_larger(tmp_path: Path, caplog) -> None:
    source = tmp_path / "in.jsonl"
    write_manifest(str(source), pool(25))
    cfg = config(scale={"records_per_shard": 5, "max_shards": 2})
    with caplog.at_level("WARNING"):
        items = plan(str(source), cfg.model_dump_json())
    assert [i["num_shards"] for i in items] == [2, 2]
    assert "25 captions in 2 shards (scale.max_shards) is 13 per shard" in caplog.text
