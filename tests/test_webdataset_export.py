"""WebDataset shards: written atomically, sized as configured, read back by `webdataset` and HF `datasets`."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from synthvlm import storage
from synthvlm.config import build_config
from synthvlm.errors import InputError
from synthvlm.webdataset_export import (
    Sample,
    ShardSet,
    WebDatasetConfig,
    image_extension,
    sample_key,
    write_index,
    write_shards,
)

wds = pytest.importorskip("webdataset", reason="webdataset is a dev extra (pip install -e '.[dev]')")


def _image(path: Path, color: tuple[int, int, int], fmt: str = "JPEG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)
    return str(path)


def _samples(root: Path, n: int, images: int = 1) -> list[Sample]:
    out = []
    for i in range(n):
        uris = [_image(root / f"s{i}-{j}.jpg", (i * 30 % 256, j * 80, 0)) for j in range(images)]
        out.append(Sample(id=f"id.{i}%x", image_uris=uris, meta={"id": f"id.{i}%x", "caption": f"thing {i}"}))
    return out


def _read_wds(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_keys_encode_dots_and_percent() -> None:
    assert sample_key("a.b%c~1") == "a%2Eb%25c~1"
    assert sample_key("a%2Eb") != sample_key("a.b")  # no two ids share a key
    assert "." not in sample_key("x.y.z")


def test_image_extension() -> None:
    assert image_extension("gs://b/x/a.JPEG") == "jpg"
    assert image_extension("/x/a.webp") == "webp"
    with pytest.raises(InputError, match="a.gif"):
        image_extension("/x/a.gif")


def test_config_bool_switch_and_prefix() -> None:
    assert WebDatasetConfig.model_validate(False).enabled is False
    with pytest.raises(ValueError, match="prefix"):
        WebDatasetConfig(prefix="a.b")


def test_shards_round_trip_through_webdataset(tmp_path: Path) -> None:
    samples = _samples(tmp_path / "img", 7)
    shard_set = ShardSet(prefix="synth", folder=str(tmp_path / "out" / "webdataset"), relative="webdataset")
    write_shards(samples, shard_set, WebDatasetConfig(max_samples=3))

    assert [s.name for s in shard_set.shards] == [f"synth-{i:06d}.tar" for i in range(3)]
    assert [s.samples for s in shard_set.shards] == [3, 3, 1]
    assert shard_set.fields == ["jpg", "json"]
    assert not [p for p in (tmp_path / "out" / "webdataset").iterdir() if p.name.startswith(".")]
    read = _read_wds(shard_set.uris())
    assert [r["__key__"] for r in read] == [sample_key(s.id) for s in samples]
    for row, sample in zip(read, samples, strict=True):
        assert row["jpg"] == Path(sample.image_uris[0]).read_bytes()  # the bytes as stored
        assert json.loads(row["json"]) == sample.meta
    # Deterministic: the same samples give the same bytes.
    again = ShardSet(prefix="synth", folder=str(tmp_path / "again"), relative="x")
    write_shards(samples, again, WebDatasetConfig(max_samples=3))
    assert [Path(u).read_bytes() for u in again.uris()] == [Path(u).read_bytes() for u in shard_set.uris()]


def test_max_bytes_closes_shards_and_a_big_sample_gets_its_own(tmp_path: Path) -> None:
    small = _samples(tmp_path / "img", 4)
    big = tmp_path / "img" / "big.jpg"
    Image.frombytes("RGB", (120, 120), random.Random(0).randbytes(120 * 120 * 3)).save(big, quality=100)
    limit = 20_000
    assert big.stat().st_size > limit
    samples = [*small[:2], Sample(id="big", image_uris=[str(big)], meta={"id": "big"}), *small[2:]]
    shard_set = ShardSet(prefix="p", folder=str(tmp_path / "o"), relative="o")
    write_shards(samples, shard_set, WebDatasetConfig(max_bytes=limit, max_samples=100))
    sizes = {s.name: s.bytes for s in shard_set.shards}
    assert [s.samples for s in shard_set.shards] == [2, 1, 2]
    assert sizes["p-000001.tar"] > limit  # the big one alone
    assert sizes["p-000000.tar"] <= limit and sizes["p-000002.tar"] <= limit
    assert [r["__key__"] for r in _read_wds(shard_set.uris())] == [sample_key(s.id) for s in samples]


def test_mixed_shapes_in_one_set_are_refused(tmp_path: Path) -> None:
    one = _samples(tmp_path / "a", 1)
    two = _samples(tmp_path / "b", 1, images=2)
    shard_set = ShardSet(prefix="m", folder=str(tmp_path / "o"), relative="o")
    with pytest.raises(ValueError, match="one shape"):
        write_shards([*one, *two], shard_set, WebDatasetConfig())
    # The shard being written is dropped, nothing half-written is left.
    assert not list((tmp_path / "o").iterdir())


def test_multi_image_samples_and_hf_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is a dev extra (pip install -e '.[dev]')")
    samples = _samples(tmp_path / "img", 5, images=2)
    shard_set = ShardSet(prefix="pairs", folder=str(tmp_path / "ds" / "wd"), relative="wd")
    write_shards(samples, shard_set, WebDatasetConfig(max_samples=2))
    assert shard_set.fields == ["0.jpg", "1.jpg", "json"]
    index = write_index(str(tmp_path / "ds" / "webdataset.json"), {"pairs": shard_set})
    assert index["samples"] == 5 and index["subsets"]["pairs"]["pattern"] == "wd/pairs-*.tar"

    ds = datasets.load_dataset(
        "webdataset",
        data_files={"train": str(tmp_path / "ds" / "wd" / "pairs-*.tar")},
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert len(ds) == 5
    assert sorted(ds["__key__"]) == sorted(sample_key(s.id) for s in samples)
    row = ds[0]
    assert row["json"]["caption"].startswith("thing")
    assert row["0.jpg"].size == (8, 8) and row["1.jpg"].size == (8, 8)


def test_interrupted_shard_temp_files_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "o"
    folder.mkdir()
    stale = folder / ".p-000000.tar.abcd1234.tmp"
    stale.write_bytes(b"half")
    other = folder / ".other.json.abcd1234.tmp"
    other.write_bytes(b"not ours")
    write_shards(_samples(tmp_path / "img", 1), ShardSet("p", str(folder), "o"), WebDatasetConfig())
    assert not stale.exists() and other.exists()


def test_set_flag_from_cli_style_override() -> None:
    from synthvlm.stages.export_llava import ExportConfig

    config = build_config(ExportConfig, sets=["webdataset=false", "card.license=cc-by-4.0"])
    assert config.webdataset.enabled is False and config.card.license == "cc-by-4.0"


@pytest.fixture
def gcs_emulator(monkeypatch: pytest.MonkeyPatch):
    from gcp_storage_emulator.server import create_server

    server = create_server("localhost", 0, in_memory=True, default_bucket="bkt")
    server.start()
    host, port = server._api._httpd.server_address[:2]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:{port}")
    storage.reset_client()
    yield "gs://bkt"
    server.stop()
    storage.reset_client()


def test_shards_on_gcs(gcs_emulator: str, tmp_path: Path) -> None:
    images = []
    for i in range(3):
        uri = f"{gcs_emulator}/run/images/g{i}.png"
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (i, 0, 0)).save(buf, format="PNG")
        storage.write_bytes(uri, buf.getvalue())
        images.append((uri, buf.getvalue()))
    samples = [Sample(id=f"g{i}", image_uris=[u], meta={"id": f"g{i}"}) for i, (u, _) in enumerate(images)]
    shard_set = ShardSet(prefix="s", folder=f"{gcs_emulator}/run/export/webdataset", relative="webdataset")
    write_shards(samples, shard_set, WebDatasetConfig(max_samples=2))
    assert storage.list_uris(f"{gcs_emulator}/run/export/webdataset") == shard_set.uris()
    members = []
    for uri in shard_set.uris():
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [name for name, _ in members] == ["g0.png", "g0.json", "g1.png", "g1.json", "g2.png", "g2.json"]
    assert [data for name, data in members if name.endswith(".png")] == [b for _, b in images]
