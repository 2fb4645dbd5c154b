"""Exact and near-duplicate caption removal: normalized-text match, then MinHash + LSH over word shingles.

Captions are compared in input order and the first of a group is kept; a later caption is a near duplicate
of an earlier *kept* one (so there is no chaining: A ~ B ~ C with A and C dissimilar keeps C).

- **exact**: equal after `normalize_text` (Unicode NFKC, casefold, every run of characters other than
  letters and digits -> one space, trimmed), so "A dog, running." == "a dog running". Every caption of such
  a group but the first is an exact duplicate of the first.
- **near**: Jaccard similarity of the sets of word `shingle_size`-grams of the normalized text (a caption
  with fewer words is one shingle) >= `jaccard`. Candidates come from MinHash LSH: `num_perm` hash
  functions h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 (multiply-shift, a_i odd; a, b from
  numpy.random.default_rng(seed)) over 64-bit blake2b hashes of the shingles, cut into `bands` bands of
  num_perm / bands rows, each band's rows folded into one 64-bit bucket key; two captions are candidates
  when any band key is equal. Every candidate is then verified with the exact Jaccard of the shingle hash
  sets, so LSH only decides which pairs are compared (recall), never which are duplicates. With 16 bands x
  4 rows, a pair at Jaccard 0.8 is a candidate with probability 1 - (1 - 0.8^4)^16 = 0.9998; at 0.7, 0.988.

The work is split so that it scales out (synthvlm.curation.sharded): `compute_features` per caption (any
shard), `exact_pairs` and `candidate_pairs` + `verify_pairs` per partition of the digests and of the
(band, key) buckets (any number of partitions, each holding 1/partitions of the bucket entries), and
`resolve`, which turns all pairs into the drop decisions above in input order, whatever the partitioning.
In a bucket, each caption is paired with the first `max_bucket_size` captions (input order) before it,
which bounds the cost of very common templated captions. Memory in one pod (`find_duplicates`): the
features, about 8 bytes per shingle + 8 per band + 40 per caption (~300 bytes for a 20-word caption at 16
bands), plus the bucket entries while sorting. Deterministic: no Python `hash()` (salted per process), no
unseeded randomness.
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
    max_bucket_size: int = Field(256, ge=1)  # our choice: bounds the comparisons per caption and bucket

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


# ---- features, candidates, verification, resolution (one pod or partitioned over many) ------------------

_KEY_MIX_SEED = 0x5EED  # the constants that fold a band's rows into one 64-bit key (fixed: part of the data)


@dataclass
class DedupFeatures:
    """What dedup needs of each caption, as arrays: global position, 128-bit hash of the normalized text,
    its sorted unique shingle hashes (flat, with offsets) and one 64-bit LSH key per band (rows of a caption
    without shingles are 0 and `has_shingles` is False)."""

    pos: np.ndarray  # int64 (n,)
    digest: np.ndarray  # uint64 (n, 2)
    offsets: np.ndarray  # int64 (n + 1,)
    shingles: np.ndarray  # uint64 (offsets[-1],)
    keys: np.ndarray  # uint64 (n, bands)
    has_shingles: np.ndarray  # bool (n,)

    def __len__(self) -> int:
        return len(self.pos)

    def shingles_of(self, index: int) -> np.ndarray:
        return self.shingles[self.offsets[index] : self.offsets[index + 1]]

    def to_bytes(self) -> bytes:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(self, name) for name in self.__dataclass_fields__})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, fields: Sequence[str] | None = None) -> DedupFeatures:
        """Load (only `fields`, when given; the others are empty) from `to_bytes` output."""
        import io

        with np.load(io.BytesIO(data)) as arrays:
            names = fields or list(cls.__dataclass_fields__)
            return cls(**{n: arrays[n] if n in names else np.empty(0) for n in cls.__dataclass_fields__})

    @classmethod
    def concat(cls, parts: Sequence[DedupFeatures]) -> DedupFeatures:
        sizes = [p.offsets[-1] if len(p.offsets) else 0 for p in parts]
        starts = np.cumsum([0, *sizes[:-1]])
        offsets = [p.offsets[:-1] + s for p, s in zip(parts, starts, strict=True)]
        return cls(
            pos=np.concatenate([p.pos for p in parts]),
            digest=np.concatenate([p.digest for p in parts]),
            offsets=np.concatenate([*offsets, [sum(sizes)]]).astype(np.int64),
            shingles=np.concatenate([p.shingles for p in parts]),
            keys=np.concatenate([p.keys for p in parts]),
            has_shingles=np.concatenate([p.has_shingles for p in parts]),
        )


def _key_mixers(config: DedupConfig) -> np.ndarray:
    """(bands, rows) odd 64-bit constants: key = sum_r row_r * c_r (mod 2^64) + band, per band."""
    rows = config.num_perm // config.bands
    rng = np.random.default_rng(_KEY_MIX_SEED)
    return rng.integers(0, 2**64, size=(config.bands, rows), dtype=np.uint64, endpoint=False) | np.uint64(1)


def compute_features(
    texts: Sequence[str], positions: Sequence[int] | np.ndarray, config: DedupConfig, chunk: int = 4096
) -> DedupFeatures:
    """Features of `texts` (their global input positions `positions`)."""
    n = len(texts)
    digest = np.zeros((n, 2), dtype=np.uint64)
    hash_lists: list[np.ndarray] = []
    for i, text in enumerate(texts):
        normalized = normalize_text(text)
        raw = hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()
        digest[i] = np.frombuffer(raw, dtype="<u8")
        hash_lists.append(shingle_hashes(normalized, config.shingle_size) if config.near else _EMPTY)
    lengths = np.array([len(h) for h in hash_lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shingles = np.concatenate(hash_lists) if hash_lists else _EMPTY
    has = lengths > 0
    keys = np.zeros((n, config.bands if config.near else 0), dtype=np.uint64)
    if config.near and has.any():
        hasher = MinHasher(config.num_perm, config.seed)
        mixers = _key_mixers(config)
        rows = config.num_perm // config.bands
        band_ids = np.arange(config.bands, dtype=np.uint64)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            flat = shingles[offsets[start] : offsets[stop]]
            if not len(flat):
                continue
            with np.errstate(over="ignore"):
                values = (flat[:, None] * hasher.a[None, :] + hasher.b[None, :]) >> _SHIFT
                local = offsets[start:stop] - offsets[start]
                nonempty = lengths[start:stop] > 0
                signatures = np.minimum.reduceat(values, local[nonempty], axis=0)
                folded = signatures.reshape(-1, config.bands, rows) * mixers[None, :, :]
                keys[start:stop][nonempty] = folded.sum(axis=2, dtype=np.uint64) + band_ids[None, :]
    return DedupFeatures(np.asarray(positions, dtype=np.int64), digest, offsets, shingles, keys, has)


_EMPTY = np.empty(0, dtype=np.uint64)


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    """Which of `parts` partitions a 64-bit key (or digest word) belongs to."""
    with np.errstate(over="ignore"):
        mixed = values * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(40)) % np.uint64(parts)).astype(np.int64)


def exact_pairs(features: DedupFeatures, part: int = 0, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(first, duplicate) positions of every exact group (equal normalized text) in this partition."""
    mask = partition_of(features.digest[:, 0], parts) == part
    pos, digest = features.pos[mask], features.digest[mask]
    if not len(pos):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order = np.lexsort((pos, digest[:, 1], digest[:, 0]))
    pos, digest = pos[order], digest[order]
    new_group = np.ones(len(pos), dtype=bool)
    new_group[1:] = (digest[1:] != digest[:-1]).any(axis=1)
    first = np.maximum.accumulate(np.where(new_group, np.arange(len(pos)), 0))
    dup = ~new_group
    return pos[first[dup]], pos[dup]


Entries = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # key, band, position, digest (n, 2)


def bucket_entries(features: DedupFeatures, config: DedupConfig, part: int = 0, parts: int = 1) -> Entries:
    """The (band key, band, position, digest) entries of the captions with shingles whose key falls in
    partition `part` of `parts`: what `pairs_from_entries` needs, 1/parts of all entries."""
    has = features.has_shingles
    if not config.near or not len(has) or not has.any():
        return (
            np.empty(0, np.uint64),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
            np.empty((0, 2), np.uint64),
        )
    bands = features.keys.shape[1]
    keys = features.keys[has].reshape(-1)
    mask = partition_of(keys, parts) == part
    rows = np.repeat(np.flatnonzero(has), bands)[mask]
    band = np.tile(np.arange(bands, dtype=np.int64), int(has.sum()))[mask]
    return keys[mask], band, features.pos[rows], features.digest[rows]


def concat_entries(parts: Sequence[Entries]) -> Entries:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def pairs_from_entries(entries: Entries, config: DedupConfig) -> np.ndarray:
    """Unique (earlier, later) position pairs sharing a bucket, as an (m, 2) int64 array sorted by (later,
    earlier).

    In each bucket, captions with the same normalized text count once (the first: the others are its exact
    duplicates) when exact dedup is on; each member is paired with the first `max_bucket_size` members
    (input order) before it."""
    keys, band, pos, digest = entries
    if not len(keys):
        return np.empty((0, 2), dtype=np.int64)
    if config.exact:  # one entry per (bucket, text): the first position
        order = np.lexsort((pos, digest[:, 1], digest[:, 0], keys, band))
        keys, band, pos, digest = keys[order], band[order], pos[order], digest[order]
        first = np.ones(len(pos), dtype=bool)
        first[1:] = (
            (keys[1:] != keys[:-1]) | (band[1:] != band[:-1]) | (digest[1:] != digest[:-1]).any(axis=1)
        )
        keys, band, pos = keys[first], band[first], pos[first]
    order = np.lexsort((pos, keys, band))
    keys, band, pos = keys[order], band[order], pos[order]
    boundary = np.ones(len(pos) + 1, dtype=bool)
    boundary[1:-1] = (keys[1:] != keys[:-1]) | (band[1:] != band[:-1])
    starts = np.flatnonzero(boundary)
    pairs: list[np.ndarray] = []
    cap = config.max_bucket_size
    for begin, end in zip(starts[:-1], starts[1:], strict=True):
        size = end - begin
        if size < 2:
            continue
        members = pos[begin:end]
        later = np.arange(1, size)
        counts = np.minimum(later, cap)
        right = np.repeat(later, counts)
        left = np.concatenate([np.arange(c) for c in counts])
        pairs.append(np.stack([members[left], members[right]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    found = np.unique(np.concatenate(pairs), axis=0)
    return found[np.lexsort((found[:, 0], found[:, 1]))]


def candidate_pairs(
    features: DedupFeatures, config: DedupConfig, part: int = 0, parts: int = 1
) -> np.ndarray:
    """`pairs_from_entries` of the bucket entries of this partition (see there)."""
    return pairs_from_entries(bucket_entries(features, config, part, parts), config)


def verify_pairs(
    pairs: np.ndarray, features: DedupFeatures, config: DedupConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose exact Jaccard is >= the threshold, and their Jaccard."""
    index = {int(p): i for i, p in enumerate(features.pos)}
    keep = np.zeros(len(pairs), dtype=bool)
    values = np.zeros(len(pairs), dtype=np.float64)
    for n, (a, b) in enumerate(pairs):
        similarity = jaccard(features.shingles_of(index[int(a)]), features.shingles_of(index[int(b)]))
        if similarity >= config.jaccard:
            keep[n], values[n] = True, similarity
    return pairs[keep], values[keep]


def resolve(
    exact: tuple[np.ndarray, np.ndarray], near: tuple[np.ndarray, np.ndarray]
) -> dict[int, Duplicate]:
    """Position -> why it is dropped, from all exact pairs and all verified near pairs.

    Exact duplicates are dropped in favour of the first caption of their group. Then, in input order, a
    caption is a near duplicate of the earlier *kept* caption it shares the highest Jaccard with (ties: the
    earliest); a dropped caption removes nothing (no chaining). Deterministic and independent of how the
    pairs were partitioned."""
    out: dict[int, Duplicate] = {}
    firsts, dups = exact
    for first, dup in zip(firsts.tolist(), dups.tolist(), strict=True):
        out[dup] = Duplicate("exact", first, 1.0)
    pairs, values = near
    if len(pairs):
        order = np.lexsort((pairs[:, 0], -values, pairs[:, 1]))
        for (a, b), value in zip(pairs[order].tolist(), values[order].tolist(), strict=True):
            if b in out or a in out:
                continue
            out[b] = Duplicate("near", a, value)
    return out


def find_duplicates(texts: Sequence[str], config: DedupConfig) -> list[Duplicate | None]:
    """For each text, None (keep) or the `Duplicate` it is of an earlier text (indices = input order)."""
    features = compute_features(texts, np.arange(len(texts)), config)
    exact = exact_pairs(features) if config.exact else (np.empty(0, np.int64), np.empty(0, np.int64))
    near = verify_pairs(candidate_pairs(features, config), features, config)
    dropped = resolve(exact, near)
    return [dropped.get(i) for i in range(len(texts))]
