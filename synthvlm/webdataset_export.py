"""WebDataset tar shards of an export: `{key}.jpg|png|webp` (the image bytes as stored) + `{key}.json`.

The layout is WebDataset's (github.com/webdataset/webdataset): consecutive tar members that share a key
(the file name up to its first dot) form one sample; the extension names the field. Both the `webdataset`
package and HF `datasets`' webdataset loader (`load_dataset("webdataset", data_files=...)`) read it.

- Keys are the record (or dialogue) ids with `%` and `.` percent-encoded: a dot would end the key early.
- Images are copied byte for byte (no re-encoding). A sample with several images (StableLLaVA pairs and
  interleaved dialogues) names them `{key}.0.jpg`, `{key}.1.jpg`, ... in `<image>` order.
- HF `datasets` infers one schema from the first samples of the first shard and fails (or silently drops
  fields) when a later sample differs, so a shard set holds samples with the same fields (the exports put
  samples with different image counts in different sets) and every JSON value keeps its type across
  samples; the full manifest record, whose provenance varies in shape, travels as a JSON string.
- Shards are `{prefix}-{index:06d}.tar`, closed at `max_samples` samples or before `max_bytes` bytes
  (a single bigger sample gets a shard of its own). Each is written to a temp file and then renamed into
  place (local) or uploaded as one object (gs://, s3://, through synthvlm.storage), so a reader never sees
  half a shard. Members carry fixed metadata (mtime 0, mode 0444, no owner): the same samples give the
  same bytes.
- The index (`webdataset.json`, beside `webdataset/`) names every shard by its path relative to the index's
  folder, like the card's `data_files`: the same index is right in the fingerprint folder and in the stable
  export folder the runner publishes the shards to, and after the folder is copied or uploaded elsewhere
  (`shard_uris` joins them to where the index is read from).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, field_validator, model_validator

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import InputError

log = logging.getLogger(__name__)

SHARD_DIR = "webdataset"  # the shards' folder, in the export's folder (fingerprint and stable alike)
SHARD_GLOB = f"{SHARD_DIR}/*.tar"  # every shard of an export (the runner's glob sidecar)
INDEX_NAME = "webdataset.json"  # beside the export's main output: every shard, its samples and bytes
FORMAT_VERSION = 2  # 2: shard paths relative to the index's folder (1: full URIs of the fingerprint folder)
_IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+$")
_TAR_HEADER = 512  # bytes per tar header block; members are padded to 512-byte blocks
_READ_CHUNK = 256  # images read ahead (in parallel) at a time


class WebDatasetConfig(StageConfig):
    """WebDataset tar shards of an export (`true`/`false` alone switches them on/off)."""

    # our choice: tar shards are the training format at scale (design.md); on, so pipelines write them.
    enabled: bool = True
    # our choice: 1000 samples is ~0.3 GB of 1024^2 JPEGs (~1.5 GB as PNG, then max_bytes closes the
    # shard first): large sequential reads, and the paper's 100K samples still spread over 100 shards.
    max_samples: int = Field(1000, ge=1)
    # our choice: 1 GB, a size object stores and streaming readers handle well; a single bigger sample
    # gets a shard of its own.
    max_bytes: int = Field(1_000_000_000, ge=1024)
    # None: the recipe's name ("synthvlm", "stablellava"); shards are `{prefix}[-{subset}]-{index:06d}.tar`.
    prefix: str | None = None
    # our choice: image reads in flight (gs:// / s3:// round trips); cannot change the shards.
    read_workers: int = Field(16, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _bool_switch(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str | None) -> str | None:
        if value is not None and not _PREFIX.match(value):
            raise ValueError(f"prefix {value!r} must be letters, digits, '-' or '_' (it starts shard names)")
        return value


# Fields of WebDatasetConfig that cannot change the shards (for Stage.excluded, prefixed by the field name).
EXCLUDED = {"read_workers": "how many image reads run at once; the shards are the same"}


def sample_key(sample_id: str) -> str:
    """A WebDataset key for an id: `%` and `.` percent-encoded (a dot would end the key)."""
    return sample_id.replace("%", "%25").replace(".", "%2E")


def image_extension(uri: str, source: str = "manifest") -> str:
    """`jpg`, `png` or `webp` from an image URI's suffix (`.jpeg` -> `jpg`)."""
    suffix = os.path.splitext(uri.rsplit("/", 1)[-1])[1].lower()
    if suffix not in _IMAGE_EXTENSIONS:
        raise InputError(source, f"image {uri!r}: not a .jpg/.jpeg/.png/.webp file", field="image_uri")
    return _IMAGE_EXTENSIONS[suffix]


@dataclass
class Sample:
    """One WebDataset sample: its id, its images (URIs, `<image>` order) and its JSON."""

    id: str
    image_uris: Sequence[str]
    meta: dict[str, Any]


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int


@dataclass
class ShardSet:
    """The shards of one subset (an HF `datasets` config): `{prefix}-{index:06d}.tar` in `folder`."""

    prefix: str
    folder: str  # the shards' folder (a local path or gs:// / s3:// URI)
    relative: str  # that folder relative to the export's folder (for the card's data_files)
    split: str = "train"
    shards: list[ShardInfo] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)  # member extensions of a sample ("jpg", "json")

    @property
    def samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def pattern(self) -> str:
        """The shards as a glob relative to the export's folder (HF data_files)."""
        return f"{self.relative}/{self.prefix}-*.tar"

    def uris(self) -> list[str]:
        return [storage.join(self.folder, shard.name) for shard in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "samples": self.samples,
            "bytes": self.bytes,
            "fields": self.fields,
            "pattern": self.pattern,
            "shards": [
                {"name": s.name, "path": f"{self.relative}/{s.name}", "samples": s.samples, "bytes": s.bytes}
                for s in self.shards
            ],
        }


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _member_size(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: its header plus its data padded to 512-byte blocks."""
    return _TAR_HEADER + -(-size // _TAR_HEADER) * _TAR_HEADER


class _Shard:
    """One shard being written: a local temp file, then renamed into place or uploaded."""

    def __init__(self, uri: str):
        self.uri = uri
        self.samples = 0
        self._out = storage.AtomicWriter(uri, content_type="application/x-tar")
        self._tar = tarfile.open(fileobj=self._out.file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> int:
        self._tar.close()
        return self._out.commit()

    def abort(self) -> None:
        self._out.discard()


def _read_image(sample: Sample, uri: str, source: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except Exception as exc:  # a missing object: FileNotFoundError, or google's NotFound for gs://
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFound":
            raise InputError(source, f"image of {sample.id!r} not found: {uri}", field="image_uri") from None
        raise


def _read_images(
    samples: Iterable[Sample], workers: int, source: str
) -> Iterator[tuple[Sample, list[bytes]]]:
    """Each sample with its images' bytes, in order; up to `_READ_CHUNK` samples' images read in parallel."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunk: list[Sample] = []

        def flush() -> Iterator[tuple[Sample, list[bytes]]]:
            jobs = [(sample, uri, source) for sample in chunk for uri in sample.image_uris]
            data = iter(list(pool.map(lambda job: _read_image(*job), jobs)))
            for sample in chunk:
                yield sample, [next(data) for _ in sample.image_uris]

        for sample in samples:
            chunk.append(sample)
            if len(chunk) >= _READ_CHUNK:
                yield from flush()
                chunk = []
        if chunk:
            yield from flush()


def write_shards(
    samples: Iterable[Sample],
    shard_set: ShardSet,
    config: WebDatasetConfig,
    *,
    source: str = "manifest",
) -> ShardSet:
    """Write `samples` as shards of `shard_set` (its `shards` and `fields` are filled in and it is returned).

    Every sample must have the same number of images of one extension (HF `datasets` needs one schema per
    shard set). Shards left by an interrupted write of this set are removed first."""
    storage.remove_interrupted_writes(
        shard_set.folder, owned=lambda name: name.startswith(shard_set.prefix + "-") and name.endswith(".tar")
    )
    shard: _Shard | None = None
    shard_bytes = 0
    fields: list[str] | None = None
    try:
        for sample, images in _read_images(samples, config.read_workers, source):
            key = sample_key(sample.id)
            extensions = [image_extension(uri, source) for uri in sample.image_uris]
            if len(extensions) == 1:
                names = [f"{extensions[0]}"]
            else:
                names = [f"{i}.{ext}" for i, ext in enumerate(extensions)]
            names.append("json")
            if fields is None:
                fields = names
            elif names != fields:
                raise ValueError(
                    f"sample {sample.id!r} has fields {names}, the shard set {shard_set.prefix!r} has "
                    f"{fields}: one shard set holds samples of one shape"
                )
            body = json.dumps(sample.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
            members = [*images, body]
            size = sum(_member_size(len(data)) + _TAR_HEADER for data in members)  # + a PAX header, at most
            if shard is not None and (
                shard.samples >= config.max_samples or shard_bytes + size > config.max_bytes
            ):
                shard_set.shards.append(_finish(shard))
                shard = None
            if shard is None:
                shard = _Shard(
                    storage.join(shard_set.folder, shard_name(shard_set.prefix, len(shard_set.shards)))
                )
                shard_bytes = tarfile.RECORDSIZE  # the end-of-archive blocks and the last record's padding
            for name, data in zip(names, members, strict=True):
                shard.add(f"{key}.{name}", data)
            shard.samples += 1
            shard_bytes += size
        if shard is not None:
            shard_set.shards.append(_finish(shard))
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    shard_set.fields = fields or []
    log.info(
        "webdataset: %d samples in %d shard(s) -> %s",
        shard_set.samples,
        len(shard_set.shards),
        shard_set.folder,
    )
    return shard_set


def _finish(shard: _Shard) -> ShardInfo:
    samples = shard.samples
    size = shard.close()
    return ShardInfo(name=shard.uri.rsplit("/", 1)[-1], samples=samples, bytes=size)


def write_index(uri: str, sets: dict[str, ShardSet]) -> dict[str, Any]:
    """`webdataset.json`: every subset's shards (names, paths relative to the index's folder, samples,
    bytes) and its data_files pattern."""
    body = {
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "samples": sum(s.samples for s in sets.values()),
        "subsets": {name: s.to_dict() for name, s in sets.items()},
    }
    storage.write_text(uri, json.dumps(body, indent=2, ensure_ascii=False) + "\n", "application/json")
    return body


def shard_uris(index_uri: str) -> dict[str, list[str]]:
    """Subset -> its shards' URIs, for an index read where it lies (`wds.WebDataset(uris["default"])`)."""
    folder = index_uri.rpartition("/")[0] or "."
    body = json.loads(storage.read_text(index_uri))
    return {
        name: [storage.join(folder, shard["path"]) for shard in subset["shards"]]
        for name, subset in body["subsets"].items()
    }
