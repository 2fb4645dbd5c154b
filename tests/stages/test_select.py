from __future__ import annotations

import random
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from synthvlm.config import validate
from synthvlm.embeddings import embeddings_uri, read_embeddings, write_embeddings
from synthvlm.errors import ConfigError, InputError
from synthvlm.manifest_table import read_columns
from synthvlm.ranking import fraction_count, source_id
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stage import is_done, read_stats
from synthvlm.stages import select as select_stage
from synthvlm.stages.select import SelectConfig, drop_near_duplicates, select, select_records
from tests.published import published


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


def test_threshold_keeps_scores_strictly_above_it() -> None:
    """StableLLaVA v2 §4.4: scores *exceeding* gamma are retained; a score equal to it is not."""
    records = [rec("at", 0.25), rec("below", 0.2499), rec("above", 0.31), rec("just", 0.2501)]
    kept = select_records(records, SelectConfig(mode="threshold", threshold=0.25))
    assert ids(kept) == ["above", "just"]


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

    assert published(select(config, uris, output), output)

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
    first_uri = select(SelectConfig(k=5), uris, output)
    first = Path(output).read_bytes()
    # Same settings and inputs: the finished selection is returned without reading a record again.
    unread = AssertionError("inputs were read")
    with (
        mock.patch.object(select_stage, "read_manifest", side_effect=unread),
        mock.patch.object(select_stage, "read_columns", side_effect=unread),
    ):
        assert select(SelectConfig(k=5), uris, output) == first_uri
    assert Path(output).read_bytes() == first
    # Another k: a new selection in its own folder; the first stays readable.
    second_uri = select(SelectConfig(k=50), uris, output)
    assert second_uri != first_uri and published(second_uri, output)
    assert Path(first_uri).read_bytes() == first and len(read_manifest(output)) == 50


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


def variant(source: str, n: int, score: float) -> Record:
    """Image n of caption `source`, as the generation stage names it with images_per_prompt > 1."""
    return Record(
        id=f"{source}~{n}",
        caption=f"caption {source}",
        scores={"clip": score},
        provenance={"source_id": source, "image_index": n},
    )


VARIANTS = [
    variant("a", 0, 0.20),
    variant("a", 1, 0.35),
    variant("a", 2, 0.30),
    variant("b", 0, 0.32),
    variant("b", 1, 0.10),
    rec("c", 0.31),  # one image generated, no source_id: its own source
]


def test_source_id_falls_back_to_the_record_id() -> None:
    assert source_id(VARIANTS[1]) == "a" and source_id(VARIANTS[5]) == "c"


def test_best_of_n_keeps_the_best_image_per_caption() -> None:
    everything = SelectConfig(mode="top_fraction", fraction=1.0, best_of_n=True)
    assert ids(select_records(VARIANTS, everything)) == ["a~1", "b~0", "c"]
    assert ids(select_records(VARIANTS, SelectConfig(k=4, best_of_n=True))) == ["a~1", "b~0", "c"]
    # Without best_of_n a second image of caption a takes the fourth place.
    assert ids(select_records(VARIANTS, SelectConfig(k=4))) == ["a~1", "b~0", "c", "a~2"]


def test_best_of_n_with_threshold_and_fraction_of_captions() -> None:
    kept = select_records(VARIANTS, SelectConfig(mode="threshold", threshold=0.315, best_of_n=True))
    assert ids(kept) == ["a~1", "b~0"]
    # The fraction is of the captions left (3), not of the images (6): ceil(0.5 * 3) = 2.
    half = SelectConfig(mode="top_fraction", fraction=0.5, best_of_n=True)
    assert ids(select_records(VARIANTS, half)) == ["a~1", "b~0"]


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def test_near_duplicates_are_dropped_greedily_by_score() -> None:
    ranked = [rec("p", 0.9), rec("q", 0.8), rec("r", 0.7), rec("s", 0.6)]
    embeddings = {
        "p": unit(1, 0, 0),
        "q": unit(1, 0.1, 0),  # cosine 0.995 with p: a near duplicate of a better image
        "r": unit(0, 1, 0),
        "s": unit(0.7, 0.7, 0),  # cosine 0.71 with p and r: different enough at 0.9
    }
    kept, dropped = drop_near_duplicates(ranked, embeddings, threshold=0.9)
    assert (ids(kept), dropped) == (["p", "r", "s"], 1)
    kept, dropped = drop_near_duplicates(ranked, embeddings, threshold=0.7)
    assert (ids(kept), dropped) == (["p", "r"], 2)
    # With a limit the walk stops once enough are kept: s is never looked at.
    kept, dropped = drop_near_duplicates(ranked, embeddings, threshold=0.9, limit=2)
    assert (ids(kept), dropped) == (["p", "r"], 1)


def test_dedup_fills_top_k_from_further_down_the_ranking() -> None:
    records = [rec(f"r{i}", 1 - i / 10) for i in range(6)]
    # r0..r2 are the same picture; r3..r5 are all different.
    embeddings = {f"r{i}": unit(1, 0, 0) for i in range(3)}
    embeddings |= {"r3": unit(0, 1, 0), "r4": unit(0, 0, 1), "r5": unit(0, -1, 0)}
    config = SelectConfig(k=3, dedup_threshold=0.95)
    assert ids(select_records(records, config, embeddings)) == ["r0", "r3", "r4"]
    with pytest.raises(ConfigError, match="needs image embeddings"):
        select_records(records, config)


def test_dedup_blocks_check_within_and_across_blocks(monkeypatch) -> None:
    from synthvlm.stages import select as select_module

    monkeypatch.setattr(select_module, "_DEDUP_BLOCK", 3)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8))
    records = [rec(f"x{i:02d}", 1 - i / 100) for i in range(40)]
    # Each base vector appears twice, the copy at a random later rank: 20 duplicates to find.
    order = list(range(20)) + list(rng.permutation(20))
    embeddings = {
        r.id: unit(*(base[j] + 1e-3 * rng.normal(size=8))) for r, j in zip(records, order, strict=True)
    }
    kept, dropped = drop_near_duplicates(records, embeddings, threshold=0.99)
    assert ids(kept) == ids(records[:20]) and dropped == 20


def write_scored_with_embeddings(root: Path) -> tuple[list[str], list[Record], dict[str, np.ndarray]]:
    """Two shards of 3 captions x 3 images; images of a caption are near duplicates of each other
    except variant 2 of each, which is a picture of its own."""
    rng = np.random.default_rng(1)
    uris, union, vectors = [], [], {}
    for shard, sources in enumerate((["s0", "s1", "s2"], ["s3", "s4", "s5"])):
        records, rows = [], []
        for source in sources:
            picture = rng.normal(size=16)
            for n in range(3):
                record = variant(source, n, round(float(rng.uniform(0.1, 0.4)), 3))
                vector = picture + 0.01 * rng.normal(size=16) if n < 2 else rng.normal(size=16)
                records.append(record)
                rows.append(unit(*vector))
                vectors[record.id] = rows[-1]
        uri = str(root / f"scored-{shard}.jsonl")
        write_manifest(uri, records)
        write_embeddings(uri, np.stack(rows))
        uris.append(uri)
        union += records
    return uris, union, vectors


def test_select_removes_near_duplicates_with_the_sidecars(tmp_path: Path) -> None:
    uris, union, vectors = write_scored_with_embeddings(tmp_path)
    np.testing.assert_allclose(
        read_embeddings(uris[0], 9), np.stack([vectors[r.id] for r in union[:9]]), atol=1e-3
    )
    output = str(tmp_path / "selected.jsonl")
    config = SelectConfig(mode="threshold", threshold=0.0, dedup_threshold=0.9)
    select(config, uris, output)

    kept = read_manifest(output)
    expected, _ = drop_near_duplicates(sorted(union, key=lambda r: (-r.scores["clip"], r.id)), vectors, 0.9)
    assert ids(kept) == ids(expected)
    # Of each caption's two look-alike images only one survives; the distinct third image stays.
    for source in ("s0", "s1", "s2", "s3", "s4", "s5"):
        assert sum(r.id in (f"{source}~0", f"{source}~1") for r in kept) == 1
        assert f"{source}~2" in ids(kept)
    stats = read_stats(output)
    assert stats["rejects"] == {"near duplicate": 6} and stats["near_duplicates"] == 6
    assert stats["count_in"] == 18 == stats["count_out"] + 6


def test_best_of_n_and_dedup_over_shards_account_for_every_record(tmp_path: Path) -> None:
    uris, union, _ = write_scored_with_embeddings(tmp_path)
    output = str(tmp_path / "selected.jsonl")
    select(SelectConfig(k=4, best_of_n=True, dedup_threshold=0.9), uris, output)
    kept = read_manifest(output)
    best = {}
    for r in sorted(union, key=lambda r: (-r.scores["clip"], r.id)):
        best.setdefault(source_id(r), r)
    assert ids(kept) == ids(sorted(best.values(), key=lambda r: (-r.scores["clip"], r.id))[:4])
    stats = read_stats(output)
    assert stats["rejects"] == {"not best of n": 12, "not in top-k": 2}
    assert stats["count_in"] == 18 and stats["count_out"] == 4 and stats["best_of_n"] is True


def test_dedup_needs_the_sidecar(tmp_path: Path) -> None:
    shard = str(tmp_path / "scored.jsonl")
    write_manifest(shard, [rec("a", 0.3), rec("b", 0.2)])
    with pytest.raises(
        InputError, match=r"no image embeddings .*scored\.jsonl\.image_embeddings\.npy missing"
    ):
        select(SelectConfig(dedup_threshold=0.9), [shard], str(tmp_path / "out.jsonl"))
    write_embeddings(shard, np.ones((3, 4)))
    with pytest.raises(InputError, match=r"expected 2 rows \(one per record\), got shape \(3, 4\)"):
        select(SelectConfig(dedup_threshold=0.9), [shard], str(tmp_path / "out.jsonl"))
    assert embeddings_uri(shard) == shard + ".image_embeddings.npy"


@pytest.mark.parametrize("seed", range(4))
def test_streamed_best_of_n_top_k_equals_the_brute_force(tmp_path: Path, seed: int) -> None:
    """Per-shard pruning with best_of_n, with a caption's images spread over several shards."""
    rng = random.Random(seed)
    records = [variant(f"s{i:02d}", n, round(rng.random(), 2)) for i in range(15) for n in range(4)]
    rng.shuffle(records)
    uris = []
    for shard in range(3):
        uri = str(tmp_path / f"shard-{shard}.jsonl")
        write_manifest(uri, records[shard::3])
        uris.append(uri)
    output = str(tmp_path / "out.jsonl")
    select(SelectConfig(k=5, best_of_n=True), uris, output)
    best = {}
    for r in sorted(records, key=lambda r: (-r.scores["clip"], r.id)):
        best.setdefault(source_id(r), r)
    assert ids(read_manifest(output)) == ids(list(best.values())[:5])
    assert read_stats(output)["rejects"] == {"not best of n": 45, "not in top-k": 10}


@pytest.mark.parametrize(
    ("data", "field"), [({"dedup_threshold": 1.5}, "dedup_threshold"), ({"best_of_n": "x"}, "best_of_n")]
)
def test_new_fields_are_validated(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        validate(SelectConfig, data)


def random_shards(root: Path, seed: int) -> tuple[list[str], list[Record], dict[str, np.ndarray]]:
    """Shards of random records with many ties (scores of 1 decimal, -0.0 among them), ids that sort
    differently as str and as numbers, several images per caption, in JSONL and Parquet, one shard whose
    score keys differ between records (read record by record), one empty shard; plus embeddings."""
    rng = random.Random(seed)
    records = []
    for i in range(300):
        source = f"c{rng.randrange(120)}"
        score = rng.choice([-0.0, 0.0]) if rng.random() < 0.05 else round(rng.uniform(-0.2, 0.6), 1)
        scores = {"clip": score, "llm": rng.random()}
        provenance = {"source_id": source} if rng.random() < 0.8 else {}
        records.append(
            Record(id=f"{source}~{i}", caption=f"caption {i}", scores=scores, provenance=provenance)
        )
    vectors = {
        r.id: unit(*np.random.default_rng(len(r.id) + i).normal(size=6)) for i, r in enumerate(records)
    }
    # Near duplicates: some records share their source's picture.
    for r in records[::3]:
        vectors[r.id] = unit(*np.random.default_rng(hash(source_id(r)) % 2**32).normal(size=6))
    uris, cuts = [], sorted(rng.sample(range(1, 300), 5))
    for n, (start, stop) in enumerate(zip([0, *cuts], [*cuts, 300], strict=True)):
        shard = records[start:stop]
        if n == 3:  # score keys differ: read record by record
            shard = [r.model_copy(update={"scores": {"clip": r.scores["clip"]}}) for r in shard]
            shard[0] = shard[0].model_copy(update={"scores": {**shard[0].scores, "llm": 0.5}})
        uri = str(root / f"shard-{n}.{'parquet' if n == 1 else 'jsonl'}")
        write_manifest(uri, shard)
        write_embeddings(uri, np.stack([vectors[r.id] for r in shard]) if shard else np.empty((0, 6)))
        uris.append(uri)
        assert read_columns(uri).fast is (n != 3)
    empty = str(root / "shard-empty.jsonl")
    write_manifest(empty, [])
    write_embeddings(empty, np.empty((0, 6)))
    union = [r for uri in uris for r in read_manifest(uri)]
    return [*uris, empty], union, vectors


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "config",
    [
        SelectConfig(k=17),
        SelectConfig(k=17, best_of_n=True),
        SelectConfig(k=1),
        SelectConfig(k=1000),
        SelectConfig(mode="threshold", threshold=0.2),
        SelectConfig(mode="threshold", threshold=0.0, best_of_n=True),
        SelectConfig(mode="top_fraction", fraction=0.3),
        SelectConfig(mode="top_fraction", fraction=0.3, best_of_n=True),
        SelectConfig(k=20, dedup_threshold=0.95),
        SelectConfig(mode="threshold", threshold=0.1, best_of_n=True, dedup_threshold=0.9),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.model_dump().items() if k in c.model_fields_set),
)
def test_column_wise_select_equals_the_record_path(tmp_path: Path, seed: int, config: SelectConfig) -> None:
    """The shards read column-wise give the records, order and stats of select_records over the union
    (ranking by score descending then id, best of n, cut, near duplicates), ties included."""
    uris, union, vectors = random_shards(tmp_path, seed)
    output = str(tmp_path / "out.jsonl")
    for ordering in (uris, uris[::-1]):
        select(config, ordering, output)
        expected, dropped = select_stage._select(union, config, vectors)
        assert read_manifest(output) == expected
        stats = read_stats(output)
        kept_scores = [r.scores["clip"] for r in expected]
        assert stats["count_out"] == len(expected) and stats["count_in"] == len(union)
        assert stats["near_duplicates"] == dropped
        assert stats["min_score_kept"] == min(kept_scores, default=None)
        assert stats["mean_score_in"] == pytest.approx(sum(r.scores["clip"] for r in union) / len(union))
        n_sources = len({source_id(r) for r in union})
        if config.best_of_n:
            assert stats["rejects"].get("not best of n") == len(union) - n_sources
        assert sum(stats["rejects"].values()) == len(union) - len(expected)


def test_output_lines_are_the_input_lines(tmp_path: Path) -> None:
    """The kept records are written as their shards hold them: the same bytes as write_manifest's."""
    uris, union = write_shards(tmp_path)
    output = str(tmp_path / "out.jsonl")
    select(SelectConfig(k=30), uris, output)
    expected = sorted(union, key=lambda r: (-r.scores["clip"], r.id))[:30]
    assert Path(output).read_text() == "".join(r.model_dump_json() + "\n" for r in expected)


def test_first_error_is_the_record_paths(tmp_path: Path) -> None:
    """A duplicate id across shards 1 and 2 comes before a bad record in shard 3, as when read record by
    record; the column-wise pass finds the bad record first and replays the record path to name it."""
    uris = [str(tmp_path / f"s{n}.jsonl") for n in range(3)]
    write_manifest(uris[0], [rec("a", 0.1), rec("b", 0.2)])
    write_manifest(uris[1], [rec("c", 0.3), rec("a", 0.4)])
    write_manifest(uris[2], [rec("d", 0.3), rec("unscored", None)])
    with pytest.raises(
        InputError, match=r"s1\.jsonl, line 2, field 'id': duplicate id 'a': also in .*s0\.jsonl"
    ):
        select(SelectConfig(), uris, str(tmp_path / "out.jsonl"))
    with pytest.raises(InputError, match=r"s2\.jsonl, line 2, field 'scores\.clip': record 'unscored'"):
        select(SelectConfig(), [uris[0], uris[2]], str(tmp_path / "out.jsonl"))
    Path(uris[2]).write_text('{"id": "d", "caption": "c", "scores": {"clip": NaN}}\n')
    with pytest.raises(
        InputError, match=r"s2\.jsonl, line 1, field 'scores\.clip': record 'd' has a non-finite"
    ):
        select(SelectConfig(), [uris[0], uris[2]], str(tmp_path / "out.jsonl"))
