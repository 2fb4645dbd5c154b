"""Exact and near-duplicate caption removal: normalized-text match, then MinHash + LSH over word shingles.

Captions are compared in input order and the first of a group is kept; a later caption is a duplicate
of an earlier *kept* one (so there is no chaining: A ~ B ~ C with A and C dissimilar keeps C).

- **exact**: equal after `normalize_text` (Unicode NFKC, casefold, every run of characters other than
  letters and digits -> one space, trimmed), so "A dog, running." == "a dog running".
- **near**: Jaccard similarity of the sets of word `shingle_size`-grams of the normalized text (a caption
  with fewer words is one shingle) >= `jaccard`. Candidates come from MinHash LSH: `num_perm` hash
  functions h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 (multiply-shift, a_i odd; a, b from
  numpy.random.default_rng(seed)) over 64-bit blake2b hashes of the shingles, cut into `bands` bands of
  num_perm / bands rows; two captions are candidates when any band is equal. Every candidate is then
  verified with the exact Jaccard of the shingle hash sets, so LSH only decides which pairs are compared
  (recall), never which are duplicates. With 16 bands x 4 rows, a pair at Jaccard 0.8 is a candidate
  with probability 1 - (1 - 0.8^4)^16 = 0.9998; at 0.7, 0.988.

Work is O(n) hashing plus the candidates of each caption's buckets; a bucket holds at most
`max_bucket_size` kept captions (later ones are still checked against those), which bounds the cost of
very common templated captions. Memory: a few hundred bytes per kept caption (its shingle hashes and
bucket entries). Deterministic: no Python `hash()` (salted per process), no unseeded randomness.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from synthvlm.config import StageConfig

_NON_ALNUM = re.compile(r"[\W_]+")  # Unicode-aware: letters and digits of every script stay
_SHIFT = np.uint64(32)


class DedupConfig(StageConfig):
    """Duplicate removal settings (SynthVLM §3.1 does not describe dedup; our choices, noted per field)."""

    exact: bool = True  # our choice: identical captions would give near-identical images
    near: bool = True  # our choice: captions that differ by a word or punctuation add no variety
    # our choice: conservative; "a red car parked on a quiet street at night" vs the same with "dark"
    # for "quiet" is 0.45 at 3-word shingles and is kept; a changed last word of a 15-word caption, 0.86.
    jaccard: float = Field(0.8, gt=0, le=1)
    shingle_size: int = Field(3, ge=1)  # our choice: captions are short (~10-20 words)
    num_perm: int = Field(64, ge=1)  # our choice: 64 hash functions; candidates are verified exactly
    bands: int = Field(16, ge=1)  # our choice: 16 bands x 4 rows -> 99.98% recall at Jaccard 0.8
    seed: int = 0  # our choice: fixed, so reruns find the same duplicates
    max_bucket_size: int = Field(256, ge=1)  # our choice: bounds the comparisons per caption

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupConfig:
        if self.near and self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


@dataclass(frozen=True)
class Duplicate:
    """Why a caption is dropped: a duplicate (`kind`) of the kept caption at index `of_index`."""

    kind: Literal["exact", "near"]
    of_index: int
    jaccard: float  # 1.0 for exact duplicates


def normalize_text(text: str) -> str:
    """NFKC, casefold, non-alphanumeric runs -> one space, trimmed."""
    return _NON_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingle_hashes(normalized: str, size: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word `size`-grams (the whole text when shorter)."""
    tokens = normalized.split()
    if not tokens:
        return np.empty(0, dtype=np.uint64)
    grams = [" ".join(tokens[i : i + size]) for i in range(max(1, len(tokens) - size + 1))]
    hashes = [
        int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little") for g in grams
    ]
    return np.unique(np.array(hashes, dtype=np.uint64))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays."""
    if not len(a) and not len(b):
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class MinHasher:
    """`num_perm` multiply-shift hash functions over 64-bit shingle hashes (see the module docstring)."""

    def __init__(self, num_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """The MinHash signature (num_perm uint64 values < 2^32) of a non-empty hash set."""
        # uint64 arithmetic wraps modulo 2^64, which is the "mod 2^64" of the hash family.
        with np.errstate(over="ignore"):
            values = (hashes[:, None] * self.a[None, :] + self.b[None, :]) >> _SHIFT
        return values.min(axis=0)


class _NearIndex:
    """LSH buckets of the kept captions plus their shingle hashes, for exact verification."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.hasher = MinHasher(config.num_perm, config.seed)
        self.rows = config.num_perm // config.bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(config.bands)]
        self.shingles: dict[int, np.ndarray] = {}

    def band_keys(self, hashes: np.ndarray) -> list[bytes]:
        signature = self.hasher.signature(hashes)
        return [signature[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.config.bands)]

    def best_match(self, hashes: np.ndarray, keys: list[bytes]) -> tuple[int, float] | None:
        """The earliest kept caption with the highest Jaccard >= threshold, if any."""
        candidates = sorted({i for band, key in enumerate(keys) for i in self.buckets[band].get(key, ())})
        best: tuple[int, float] | None = None
        for index in candidates:
            similarity = jaccard(hashes, self.shingles[index])
            if similarity >= self.config.jaccard and (best is None or similarity > best[1]):
                best = (index, similarity)
        return best

    def add(self, index: int, hashes: np.ndarray, keys: list[bytes]) -> None:
        self.shingles[index] = hashes
        for band, key in enumerate(keys):
            bucket = self.buckets[band].setdefault(key, [])
            if len(bucket) < self.config.max_bucket_size:
                bucket.append(index)


def find_duplicates(texts: Sequence[str], config: DedupConfig) -> list[Duplicate | None]:
    """For each text, None (keep) or the `Duplicate` it is of an earlier kept text."""
    exact_seen: dict[bytes, int] = {}
    near = _NearIndex(config) if config.near else None
    out: list[Duplicate | None] = []
    for index, text in enumerate(texts):
        normalized = normalize_text(text)
        digest = hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()
        if config.exact and digest in exact_seen:
            out.append(Duplicate("exact", exact_seen[digest], 1.0))
            continue
        if near is not None:
            hashes = shingle_hashes(normalized, config.shingle_size)
            if len(hashes):
                keys = near.band_keys(hashes)
                match = near.best_match(hashes, keys)
                if match is not None:
                    out.append(Duplicate("near", match[0], match[1]))
                    continue
                near.add(index, hashes, keys)
        exact_seen.setdefault(digest, index)
        out.append(None)
    return out
