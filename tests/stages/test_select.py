from __future__ import annotations

import random
from pathlib import Path

import pytest

from synthvlm.config import validate
from synthvlm.errors import ConfigError, InputError
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stage import is_done, read_stats
from synthvlm.stages.select import SelectConfig, fraction_count, select, select_records


def rec(rec_id: str, score: float | None, key: str = "clip") -> Record:
    return Record(id=rec_id, caption=f"caption {rec_id}", scores={} if score is None else {key: score})


def ids(records: list[Record]) -> list[str]:
    return [r.id for r in records]


SCORED = [rec("a", 0.30), rec("b", 0.10), rec("c", 0.40), rec("d", 0.25), rec("e", 0.20)]


def test_top_k_keeps_the_k_best_in_rank_order() -> None:
    assert ids(select_records(SCORED, SelectConfig(mode="top_k", k=2))) == ["c", "a"]


def test_top_k_larger_than_input_keeps_everything_ranked() -> None:
    assert ids(select_records(SCORED, SelectConfig(mode="top_k", k=100))) == ["c", "a", "d", "e", "b"]


def test_ties_are_broken_by_id_whatever_the_input_order() -> None:
    tied = [rec("x2", 0.5), rec("x1", 0.5), rec("x3", 0.5), rec("top", 0.9), rec("low", 0.1)]
    config = SelectConfig(mode="top_k", k=3)
    for seed in range(5):
        shuffled = tied[:]
        random.Random(seed).shuffle(shuffled)
        assert ids(select_records(shuffled, config)) == ["top", "x1", "x2"]


def test_threshold_keeps_scores_at_or_above_it() -> None:
    records = [rec("at", 0.25), rec("below", 0.2499), rec("above", 0.31)]
    kept = select_records(records, SelectConfig(mode="threshold", threshold=0.25))
    assert ids(kept) == ["above", "at"]


def test_threshold_can_keep_nothing() -> None:
    assert select_records(SCORED, SelectConfig(mode="threshold", threshold=0.9)) == []


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 0.25, 3),  # 2.5 rounds up
        (10, 0.4, 4),  # exact
        (30, 0.1, 3),  # 0.1 * 30 is 3.0000000000000004 in binary floating point; still 3
        (1_000_000, 0.1, 100_000),  # SynthVLM §3.2
        (7, 0.01, 1),  # a positive fraction of a non-empty input keeps at least one
        (7, 1.0, 7),
        (0, 0.5, 0),
    ],
)
def test_fraction_count_rounds_up(n: int, fraction: float, expected: int) -> None:
    assert fraction_count(n, fraction) == expected


def test_top_fraction_keeps_ceil_of_fraction() -> None:
    kept = select_records(SCORED, SelectConfig(mode="top_fraction", fraction=0.5))
    assert ids(kept) == ["c", "a", "d"]  # ceil(0.5 * 5) = 3


def test_missing_score_names_the_record() -> None:
    records = [rec("good", 0.3), rec("unscored", 0.7, key="llm")]
    with pytest.raises(InputError, match="'unscored' has no score 'clip'.*scores present: llm"):
        select_records(records, SelectConfig())


def test_non_finite_score_is_an_error() -> None:
    with pytest.raises(InputError, match="'nan' has a non-finite score"):
        select_records([rec("ok", 0.1), rec("nan", float("nan"))], SelectConfig())


def test_other_score_key() -> None:
    records = [rec("p", 0.9, key="llm"), rec("q", 0.95, key="llm")]
    assert ids(select_records(records, SelectConfig(k=1, score_key="llm"))) == ["q"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"k": 0}, "k"),
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"mode": "best"}, "mode"),
    ],
)
def test_config_validation(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        validate(SelectConfig, data)


def write_shards(root: Path) -> tuple[list[str], list[Record]]:
    """Three shards with uneven score distributions (shard 0 holds most of the best) and ties."""
    rng = random.Random(0)
    shards: list[list[Record]] = [[], [], []]
    for i in range(60):
        shard = 0 if i < 30 else 1 + i % 2
        base = 0.3 if shard == 0 else 0.1
        score = round(base + rng.random() * 0.2, 2)  # 2 decimals: many ties
        shards[shard].append(rec(f"s{shard}-{i:03d}", score))
    uris = [str(root / "shard-0.jsonl"), str(root / "shard-1.parquet"), str(root / "shard-2.jsonl")]
    for uri, records in zip(uris, shards, strict=True):
        write_manifest(uri, records)
    return uris, [r for shard in shards for r in shard]


def test_global_top_k_equals_top_k_of_the_union(tmp_path: Path) -> None:
    uris, union = write_shards(tmp_path)
    config = SelectConfig(mode="top_k", k=20)
    output = str(tmp_path / "selected.jsonl")

    assert select(config, uris, output) == output

    kept = read_manifest(output)
    brute_force = sorted(union, key=lambda r: (-r.scores["clip"], r.id))[:20]
    assert ids(kept) == ids(brute_force)
    # Not the same as taking an equal share from each shard: shard 0 holds more than a third.
    assert sum(r.id.startswith("s0-") for r in kept) > 20 // 3
    stats = read_stats(output)
    assert stats["count_in"] == 60
    assert stats["count_out"] == 20
    assert stats["rejects"] == {"not in top-k": 40}
    assert stats["kept_fraction"] == pytest.approx(20 / 60)
    assert stats["mean_score_kept"] == pytest.approx(sum(r.scores["clip"] for r in kept) / 20)
    assert stats["mean_score_in"] == pytest.approx(sum(r.scores["clip"] for r in union) / 60)
    assert stats["min_score_kept"] == kept[-1].scores["clip"]


def test_global_top_k_does_not_depend_on_shard_order(tmp_path: Path) -> None:
    uris, _ = write_shards(tmp_path)
    forward, backward = str(tmp_path / "fwd.jsonl"), str(tmp_path / "bwd.jsonl")
    select(SelectConfig(k=25), uris, forward)
    select(SelectConfig(k=25), uris[::-1], backward)
    assert ids(read_manifest(forward)) == ids(read_manifest(backward))


def test_global_threshold_and_fraction(tmp_path: Path) -> None:
    uris, union = write_shards(tmp_path)
    above = str(tmp_path / "above.jsonl")
    select(SelectConfig(mode="threshold", threshold=0.25), uris, above)
    expected_above = {r.id for r in union if r.scores["clip"] >= 0.25}
    assert set(ids(read_manifest(above))) == expected_above
    assert read_stats(above)["rejects"] == {"below threshold": 60 - len(expected_above)}

    top = str(tmp_path / "top.parquet")
    select(SelectConfig(mode="top_fraction", fraction=0.15), uris, top)
    assert len(read_manifest(top)) == 9  # ceil(0.15 * 60)
    assert read_stats(top)["k"] == 9


def test_duplicate_ids_across_shards_are_an_error(tmp_path: Path) -> None:
    first, second = str(tmp_path / "one.jsonl"), str(tmp_path / "two.jsonl")
    write_manifest(first, [rec("x", 0.1), rec("y", 0.2)])
    write_manifest(second, [rec("z", 0.3), rec("y", 0.4)])
    with pytest.raises(
        InputError, match=r"two\.jsonl, line 2, field 'id': duplicate id 'y': also in .*one\.jsonl"
    ):
        select(SelectConfig(), [first, second], str(tmp_path / "out.jsonl"))
    assert not is_done(str(tmp_path / "out.jsonl"))


def test_missing_score_in_a_shard_names_file_and_record(tmp_path: Path) -> None:
    shard = str(tmp_path / "shard.jsonl")
    write_manifest(shard, [rec("ok", 0.5), rec("unscored", None)])
    with pytest.raises(InputError, match=r"shard\.jsonl, line 2, field 'scores\.clip': record 'unscored'"):
        select(SelectConfig(), [shard], str(tmp_path / "out.jsonl"))


def test_select_is_idempotent(tmp_path: Path) -> None:
    uris, _ = write_shards(tmp_path)
    output = str(tmp_path / "selected.jsonl")
    select(SelectConfig(k=5), uris, output)
    first = Path(output).read_bytes()
    Path(uris[0]).unlink()  # inputs are not even read again
    assert select(SelectConfig(k=50), uris, output) == output
    assert Path(output).read_bytes() == first


def test_select_needs_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one input"):
        select(SelectConfig(), [], str(tmp_path / "out.jsonl"))


def test_empty_shards_give_an_empty_selection(tmp_path: Path) -> None:
    empty = str(tmp_path / "empty.jsonl")
    write_manifest(empty, [])
    output = str(tmp_path / "out.jsonl")
    select(SelectConfig(), [empty], output)
    assert read_manifest(output) == []
    stats = read_stats(output)
    assert (stats["count_in"], stats["count_out"], stats["rejects"]) == (0, 0, {})
    assert stats["mean_score_kept"] is None
