"""Exact and near-duplicate caption removal (normalized match, MinHash LSH verified by exact Jaccard)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from synthvlm.curation.dedup import (
    DedupConfig,
    Duplicate,
    MinHasher,
    find_duplicates,
    jaccard,
    normalize_text,
    shingle_hashes,
)

_VOCABULARY = (
    "red blue green small large old new wooden stone glass dog cat horse bird car boat house tree river "
    "street park beach mountain city table chair window door lamp book cup plate child woman man chef "
    "sunny rainy night morning evening under over beside near behind with without on in at"
)
WORDS = _VOCABULARY.split()


def brute_force(texts: list[str], config: DedupConfig) -> list[Duplicate | None]:
    """The reference: exact duplicates of the first equal text; else each text against every earlier kept
    text, exact Jaccard, best match first."""
    kept: list[tuple[int, str, np.ndarray]] = []
    first: dict[str, int] = {}
    out: list[Duplicate | None] = []
    for index, text in enumerate(texts):
        normalized = normalize_text(text)
        if normalized in first:
            out.append(Duplicate("exact", first[normalized], 1.0))
            continue
        first[normalized] = index
        hashes = shingle_hashes(normalized, config.shingle_size)
        scored = [(jaccard(hashes, h), -i) for i, _, h in kept if len(hashes)]
        best = max(scored, default=None)
        if best is not None and best[0] >= config.jaccard:
            out.append(Duplicate("near", -best[1], best[0]))
            continue
        kept.append((index, normalized, hashes))
        out.append(None)
    return out


def test_normalize_text() -> None:
    assert normalize_text("  A Dog, running_FAST!  ") == "a dog running fast"
    assert normalize_text("Ｃａｆé 中文\tx") == "café 中文 x"  # NFKC folds full-width letters; scripts stay
    assert normalize_text("...") == ""


def test_shingles_and_jaccard_by_hand() -> None:
    quiet = shingle_hashes(normalize_text("a red car parked on a quiet street at night"), 3)
    dark = shingle_hashes(normalize_text("a red car parked on a dark street at night"), 3)
    # 8 word 3-grams each; shared: a red car, red car parked, car parked on, parked on a, street at night
    assert len(quiet) == len(dark) == 8
    assert jaccard(quiet, dark) == pytest.approx(5 / 11)
    assert len(shingle_hashes("two words", 3)) == 1  # shorter than a shingle: the whole text is one
    assert len(shingle_hashes("", 3)) == 0
    assert jaccard(quiet, quiet) == 1.0


def test_exact_duplicates_after_normalization_keep_the_first() -> None:
    texts = ["A dog, running.", "a dog running", "A cat sleeping.", "A DOG RUNNING!!"]
    assert find_duplicates(texts, DedupConfig()) == [
        None,
        Duplicate("exact", 0, 1.0),
        None,
        Duplicate("exact", 0, 1.0),
    ]


def test_near_duplicates_need_jaccard_at_least_the_threshold() -> None:
    sign = "a man in a red shirt is standing in front of a tall building with a sign"
    flag = "a man in a red shirt is standing in front of a tall building with a flag"
    quiet = "a red car parked on a quiet street at night"
    dark = "a red car parked on a dark street at night"

    result = find_duplicates([sign, quiet, flag, dark], DedupConfig())

    # 17 words -> 15 3-grams each, the last differs: 14 shared of 16 = 0.875 >= 0.8; quiet/dark 5/11.
    assert result == [None, None, Duplicate("near", 0, 14 / 16), None]


def test_threshold_is_inclusive_and_there_is_no_chaining() -> None:
    config = DedupConfig(shingle_size=1, jaccard=0.8, exact=False)
    a = "w1 w2 w3 w4 w5 w6 w7 w8 w9"
    at_threshold = "w1 w2 w3 w4 w5 w6 w7 w8 w10"  # 8 shared of 10 words: exactly 0.8
    first = "q1 q2 q3 q4 q5 q6 q7 q8 q9 q10"
    second = "q1 q2 q3 q4 q5 q6 q7 q8 q9 q11"  # vs first: 9/11 = 0.818 -> dropped
    third = "q1 q2 q3 q4 q5 q6 q7 q8 q11 q12"  # vs first 8/12 = 0.67, vs (dropped) second 9/11

    result = find_duplicates([a, at_threshold, first, second, third], config)

    assert result[1] == Duplicate("near", 0, 0.8)
    assert result[3] == Duplicate("near", 2, 9 / 11)
    assert result[4] is None  # compared with kept captions only, so near-dups do not chain


def test_switches_turn_each_kind_off() -> None:
    texts = [
        "A dog running.",
        "a dog running",
        "a brown dog running on the beach",
        "a brown dog running on the beach.",
    ]
    assert find_duplicates(texts, DedupConfig(exact=False, near=False)) == [None] * 4
    near_only = find_duplicates(texts, DedupConfig(exact=False))
    assert [d.kind if d else None for d in near_only] == [None, "near", None, "near"]
    exact_only = find_duplicates(texts, DedupConfig(near=False))
    assert [d.kind if d else None for d in exact_only] == [None, "exact", None, "exact"]


def test_lsh_finds_what_brute_force_finds_and_is_deterministic() -> None:
    rng = np.random.default_rng(7)
    texts: list[str] = []
    for _ in range(150):
        base = list(rng.choice(WORDS, size=int(rng.integers(12, 30))))
        texts.append(" ".join(base))
        for _ in range(int(rng.integers(0, 3))):  # variants: one or two words changed or dropped
            variant = list(base)
            for _ in range(int(rng.integers(1, 3))):
                position = int(rng.integers(0, len(variant)))
                if rng.random() < 0.5:
                    variant[position] = str(rng.choice(WORDS))
                else:
                    del variant[position]
            texts.append(" ".join(variant))
    order = rng.permutation(len(texts))
    texts = [texts[i] for i in order]
    config = DedupConfig()

    result = find_duplicates(texts, config)

    assert result == brute_force(texts, config)
    assert sum(d is not None and d.kind == "near" for d in result) > 20  # the test exercises near dups
    assert find_duplicates(texts, config) == result
    assert find_duplicates(texts, DedupConfig(seed=123)) == result  # other hash functions, same verdicts


def test_minhash_agreement_estimates_jaccard() -> None:
    a = np.arange(0, 100, dtype=np.uint64) * np.uint64(2654435761)
    b = np.arange(50, 150, dtype=np.uint64) * np.uint64(2654435761)  # 50 shared of 150: J = 1/3
    hasher = MinHasher(512, seed=0)

    agreement = float(np.mean(hasher.signature(a) == hasher.signature(b)))

    assert agreement == pytest.approx(1 / 3, abs=0.07)
    assert np.array_equal(MinHasher(512, seed=0).signature(a), hasher.signature(a))
    assert hasher.signature(a).max() < 2**32


def test_bands_must_divide_the_permutations() -> None:
    with pytest.raises(ValidationError, match="multiple of bands"):
        DedupConfig(num_perm=64, bands=10)
    DedupConfig(num_perm=64, bands=10, near=False)  # irrelevant when near-dedup is off
