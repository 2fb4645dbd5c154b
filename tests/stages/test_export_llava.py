from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.llava_format import ImageRoot, brief_instruction, brief_instructions, relative_image_path
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stage import is_done, read_stats
from synthvlm.stages.export_llava import ExportConfig, export_llava
from synthvlm.webdataset_export import shard_uris
from tests.published import published


def _write_image(path: Path, color: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format="JPEG")
    return str(path)


def _records(data_root: Path, n: int) -> list[Record]:
    return [
        Record(
            id=f"rec{i:03d}",
            caption=f"a photo of thing {i}",
            seed=i,
            image_uri=_write_image(data_root / "images" / f"{i % 3:02d}" / f"rec{i:03d}.jpg", (i * 20, 0, 0)),
            scores={"clip": 0.2 + i / 100},
            provenance={"model": "tiny"},
        )
        for i in range(n)
    ]


@pytest.fixture
def selected(tmp_path: Path) -> tuple[str, Path, list[Record]]:
    data_root = tmp_path / "data"
    records = _records(data_root, 7)
    manifest = str(tmp_path / "selected.jsonl")
    write_manifest(manifest, records)
    return manifest, data_root, records


def test_brief_instructions_are_llava_table_8() -> None:
    options = brief_instructions()
    assert len(options) == 11
    assert options[0] == "Describe the image concisely."
    assert "Create a compact narrative representing the image presented." in options


def test_brief_instruction_is_deterministic_and_depends_on_seed() -> None:
    ids = [f"id{i}" for i in range(200)]
    first = [brief_instruction(i, seed=0) for i in ids]
    assert first == [brief_instruction(i, seed=0) for i in ids]
    assert set(first) <= set(brief_instructions())
    assert len(set(first)) == len(brief_instructions())  # 200 ids reach all 11 instructions
    assert first != [brief_instruction(i, seed=1) for i in ids]


def test_export_writes_llava_json_and_manifest(selected, tmp_path: Path) -> None:
    manifest, data_root, records = selected
    out_dir = str(tmp_path / "export")
    json_uri = export_llava(ExportConfig(), manifest, str(data_root), out_dir)

    assert published(json_uri, os.path.join(out_dir, "llava_pretrain.json"))
    samples = json.loads(Path(json_uri).read_text())
    assert [s["id"] for s in samples] == [r.id for r in records]
    for sample, rec in zip(samples, records, strict=True):
        assert set(sample) == {"id", "image", "conversations"}
        assert not os.path.isabs(sample["image"])
        assert (data_root / sample["image"]).is_file()
        assert Path(data_root / sample["image"]).resolve() == Path(rec.image_uri).resolve()
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": rec.caption}
        assert human["value"].startswith("<image>\n")
        assert human["value"].removeprefix("<image>\n") == brief_instruction(rec.id, 0)

    assert read_manifest(os.path.join(out_dir, "manifest.jsonl")) == records
    assert is_done(json_uri)
    stats = read_stats(json_uri)
    assert stats["count_in"] == stats["count_out"] == len(records)


def test_image_placement_after_and_seed(selected, tmp_path: Path) -> None:
    manifest, data_root, records = selected
    config = ExportConfig(image_placement="after", instruction_seed=5)
    samples = json.loads(
        Path(export_llava(config, manifest, str(data_root), str(tmp_path / "o"))).read_text()
    )
    for sample, rec in zip(samples, records, strict=True):
        assert sample["conversations"][0]["value"] == brief_instruction(rec.id, 5) + "\n<image>"


def test_export_is_idempotent(selected, tmp_path: Path) -> None:
    manifest, data_root, _ = selected
    out_dir = str(tmp_path / "export")
    json_uri = export_llava(ExportConfig(), manifest, str(data_root), out_dir)
    Path(json_uri).write_text("[]")  # a rerun after completion must not touch the output
    assert export_llava(ExportConfig(), manifest, str(data_root), out_dir) == json_uri
    assert Path(json_uri).read_text() == "[]"
    # Another data root changes every image path: a new export, never the old one.
    other = export_llava(ExportConfig(), manifest, str(data_root.parent), out_dir)
    assert other != json_uri and json.loads(Path(other).read_text())[0]["image"].startswith(data_root.name)


def test_image_outside_data_root_is_an_error_naming_the_id(selected, tmp_path: Path) -> None:
    manifest, data_root, records = selected
    outside = _write_image(tmp_path / "elsewhere" / "x.jpg", (0, 0, 255))
    bad = records[:2] + [records[2].model_copy(update={"image_uri": outside})]
    write_manifest(manifest, bad)
    out_dir = tmp_path / "export"
    with pytest.raises(InputError, match="rec002") as err:
        export_llava(ExportConfig(), manifest, str(data_root), str(out_dir))
    assert err.value.field == "image_uri"
    assert not (out_dir / "llava_pretrain.json").exists()
    assert not (out_dir / "llava_pretrain.json.done").exists()


def test_missing_image_uri_is_an_error(selected, tmp_path: Path) -> None:
    manifest, data_root, records = selected
    write_manifest(manifest, [records[0].model_copy(update={"image_uri": None})])
    with pytest.raises(InputError, match="rec000"):
        export_llava(ExportConfig(), manifest, str(data_root), str(tmp_path / "export"))


@pytest.mark.parametrize(
    ("image_uri", "data_root", "expected"),
    [
        ("gs://b/run/images/a.jpg", "gs://b/run", "images/a.jpg"),
        ("gs://b/run/images/a.jpg", "gs://b/run/", "images/a.jpg"),
        ("gs://b/run2/a.jpg", "gs://b/run", None),  # prefix of a sibling folder is not "under"
        ("gs://other/run/a.jpg", "gs://b/run", None),
        ("gs://b/run/../x.jpg", "gs://b/run", None),
        ("gs://b/run", "gs://b/run", None),
        ("/data/run/a.jpg", "gs://b/run", None),
        ("/data/run/sub/a.jpg", "/data/run", "sub/a.jpg"),
        ("/data/run/../a.jpg", "/data/run", None),
        ("/data/runx/a.jpg", "/data/run", None),
    ],
)
def test_relative_image_path(image_uri: str, data_root: str, expected: str | None) -> None:
    assert relative_image_path(image_uri, data_root) == expected


def test_export_resolves_the_data_root_once(selected, tmp_path: Path, monkeypatch) -> None:
    """No file-system call per record: the data root is resolved once, image paths are matched as text."""
    manifest, data_root, records = selected
    many = _records(data_root, 60)
    write_manifest(manifest, many)
    calls = []
    real_resolve = Path.resolve
    monkeypatch.setattr(
        Path, "resolve", lambda self, *a, **k: calls.append(self) or real_resolve(self, *a, **k)
    )
    samples = json.loads(
        Path(export_llava(ExportConfig(), manifest, str(data_root), str(tmp_path / "o"))).read_text()
    )
    assert [s["image"] for s in samples] == [f"images/{i % 3:02d}/rec{i:03d}.jpg" for i in range(60)]
    assert len(calls) <= 2


def test_image_root_through_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    image = real / "images" / "a.jpg"
    # The root spelled through a symlink or resolved, the image spelled either way: the same relative path.
    for root in (real, link):
        for spelled in (image, link / "images" / "a.jpg"):
            assert ImageRoot(str(root)).relative(str(spelled)) == "images/a.jpg"
    assert ImageRoot(str(real)).relative(str(real / "images" / ".." / ".." / "x.jpg")) is None
    assert ImageRoot(str(real)).relative(str(real)) is None
    assert ImageRoot("/").relative("/x/a.jpg") == "x/a.jpg"


@pytest.fixture
def gcs_emulator(monkeypatch: pytest.MonkeyPatch):
    from gcp_storage_emulator.server import create_server

    server = create_server("localhost", 0, in_memory=True, default_bucket="bkt")
    server.start()
    host, port = server._api._httpd.server_address[:2]  # the port picked by the OS
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{host}:{port}")
    storage.reset_client()
    yield "gs://bkt"
    server.stop()
    storage.reset_client()


def test_export_on_gcs(gcs_emulator: str) -> None:
    root = storage.join(gcs_emulator, "run")
    records = [
        Record(id=f"g{i}", caption=f"caption {i}", image_uri=storage.join(root, "images", f"g{i}.jpg"))
        for i in range(3)
    ]
    for i, rec in enumerate(records):  # the WebDataset shards hold the images themselves
        storage.write_bytes(rec.image_uri, f"jpeg bytes {i}".encode())
    manifest = storage.join(root, "selected.jsonl")
    write_manifest(manifest, records)
    out_dir = storage.join(root, "export")

    json_uri = export_llava(ExportConfig(), manifest, root, out_dir)

    assert published(json_uri, "gs://bkt/run/export/llava_pretrain.json")
    samples = json.loads(storage.read_text(json_uri))
    assert [s["image"] for s in samples] == ["images/g0.jpg", "images/g1.jpg", "images/g2.jpg"]
    assert read_manifest(storage.join(out_dir, "manifest.jsonl")) == records
    assert is_done(json_uri)
    index = json.loads(storage.read_text(storage.join(out_dir, "webdataset.json")))
    (shard,) = index["subsets"]["default"]["shards"]
    assert shard["path"] == "webdataset/synthvlm-000000.tar"  # relative: right in either folder
    # The shard is published (a server-side copy) beside the stable index, byte for byte the version's.
    stable_shard = storage.join(out_dir, shard["path"])
    assert shard_uris(storage.join(out_dir, "webdataset.json")) == {"default": [stable_shard]}
    version_shard = storage.join(json_uri.rpartition("/")[0], shard["path"])
    assert storage.read_bytes(stable_shard) == storage.read_bytes(version_shard)
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(stable_shard))) as tar:
        assert tar.extractfile("g1.jpg").read() == b"jpeg bytes 1"
        assert json.loads(tar.extractfile("g1.json").read())["caption"] == "caption 1"
    assert "configs" in storage.read_text(storage.join(out_dir, "README.md"))


def test_missing_image_is_an_input_error_naming_the_record(selected, tmp_path: Path) -> None:
    manifest, data_root, records = selected
    Path(records[3].image_uri).unlink()
    with pytest.raises(InputError, match="rec003") as err:
        export_llava(ExportConfig(), manifest, str(data_root), str(tmp_path / "export"))
    assert err.value.field == "image_uri"
    assert not (tmp_path / "export" / "llava_pretrain.json").exists()


# --- WebDataset shards and the dataset card -------------------------------------------------------------


def test_export_writes_webdataset_shards_and_card(selected, tmp_path: Path) -> None:
    import webdataset as wds
    import yaml

    from synthvlm.dataset_card import parse_header
    from synthvlm.webdataset_export import sample_key

    manifest, data_root, _ = selected
    records = [
        r.model_copy(
            update={
                "provenance": {
                    "generation": {"model": "tiny/sdxl", "steps": 2},
                    "clip_scorer": {"model": "B"},
                }
            }
        )
        for r in _records(data_root, 7)
    ]
    write_manifest(manifest, records)
    out_dir = tmp_path / "export"
    config = ExportConfig(webdataset={"max_samples": 3})
    json_uri = export_llava(config, manifest, str(data_root), str(out_dir))
    version = Path(json_uri).parent

    names = [f"synthvlm-{i:06d}.tar" for i in range(3)]
    assert sorted(p.name for p in (version / "webdataset").glob("*.tar")) == names
    # The stable folder holds the shards too, as hard links of the version's (no second copy on disk).
    shards = sorted((out_dir / "webdataset").glob("*.tar"))
    assert [p.name for p in shards] == names
    assert all(p.samefile(version / "webdataset" / p.name) for p in shards)
    index = json.loads((out_dir / "webdataset.json").read_text())  # published beside the JSON
    assert index == json.loads((version / "webdataset.json").read_text())  # relative paths fit both
    assert index["samples"] == 7 and [s["path"] for s in index["subsets"]["default"]["shards"]] == [
        f"webdataset/{name}" for name in names
    ]
    assert shard_uris(str(out_dir / "webdataset.json")) == {"default": [str(p) for p in shards]}
    rows = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert [r["__key__"] for r in rows] == [sample_key(r.id) for r in records]
    llava = {s["id"]: s for s in json.loads(Path(json_uri).read_text())}
    for row, rec in zip(rows, records, strict=True):
        assert row["jpg"] == Path(rec.image_uri).read_bytes()
        meta = json.loads(row["json"])
        assert meta["caption"] == rec.caption and meta["seed"] == rec.seed and meta["model"] == "tiny/sdxl"
        assert meta["scores"] == rec.scores and meta["conversations"] == llava[rec.id]["conversations"]
        assert meta["image"] == llava[rec.id]["image"]
        assert Record.model_validate_json(meta["manifest_record"]) == rec

    card = (out_dir / "README.md").read_text()
    assert card == (version / "README.md").read_text()
    head = parse_header(card)
    assert head == yaml.safe_load(card.split("---\n")[1])
    assert head["license"] == "other" and head["license_name"] and head["license_link"].startswith("https://")
    assert head["task_categories"] == ["image-to-text", "image-text-to-text"]
    assert head["size_categories"] == ["n<1K"]
    assert head["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "webdataset/synthvlm-*.tar"}],
            "default": True,
        }
    ]
    for section in ("## How it was made", "## Models and settings", "## Counts", "## Score distribution"):
        assert section in card
    assert '`generation.model` | `"tiny/sdxl"`' in card and "## Limitations" in card
    assert "| 0.2000 |" in card  # the clip scores' minimum in the quantile table

    datasets = pytest.importorskip("datasets")
    # The stable folder as the Hub would serve it: load_dataset reads the card's configs, whose data_files
    # are relative to the folder; and the shard folder alone, as data_dir.
    by_card = datasets.load_dataset(str(out_dir), "default", split="train", cache_dir=str(tmp_path / "hf-1"))
    by_dir = datasets.load_dataset(
        "webdataset", data_dir=str(out_dir / "webdataset"), split="train", cache_dir=str(tmp_path / "hf-2")
    )
    for ds in (by_card, by_dir):
        assert len(ds) == 7 and sorted(ds["__key__"]) == sorted(sample_key(r.id) for r in records)
        assert {row["json"]["id"] for row in ds} == {r.id for r in records}
        assert ds[0]["jpg"].size == (8, 8)
        assert all(url.startswith(str(out_dir / "webdataset")) for url in ds["__url__"])


def test_a_rerun_with_fewer_shards_removes_the_stale_shard(selected, tmp_path: Path) -> None:
    import webdataset as wds

    manifest, data_root, records = selected
    out_dir = tmp_path / "export"
    first = Path(
        export_llava(ExportConfig(webdataset={"max_samples": 3}), manifest, str(data_root), str(out_dir))
    )
    assert len(list((out_dir / "webdataset").glob("*.tar"))) == 3
    second = Path(
        export_llava(ExportConfig(webdataset={"max_samples": 4}), manifest, str(data_root), str(out_dir))
    )

    # Two shards now: the first version's third shard is gone from the stable folder (it stays in its own).
    shards = sorted((out_dir / "webdataset").glob("*.tar"))
    assert [p.name for p in shards] == ["synthvlm-000000.tar", "synthvlm-000001.tar"]
    assert all(p.samefile(second.parent / "webdataset" / p.name) for p in shards)
    assert (first.parent / "webdataset" / "synthvlm-000002.tar").is_file()
    rows = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert sorted(r["__key__"] for r in rows) == sorted(r.id for r in records)
    assert shard_uris(str(out_dir / "webdataset.json")) == {"default": [str(p) for p in shards]}

    # Back to the first settings: the skip republishes the first version, its third shard included.
    assert export_llava(
        ExportConfig(webdataset={"max_samples": 3}), manifest, str(data_root), str(out_dir)
    ) == str(first)
    shards = sorted((out_dir / "webdataset").glob("*.tar"))
    assert len(shards) == 3 and all(p.samefile(first.parent / "webdataset" / p.name) for p in shards)


def test_webdataset_and_card_can_be_switched_off(selected, tmp_path: Path) -> None:
    manifest, data_root, _ = selected
    out_dir = tmp_path / "export"
    export_llava(ExportConfig(), manifest, str(data_root), str(out_dir))
    assert (out_dir / "README.md").is_file() and (out_dir / "webdataset.json").is_file()
    json_uri = export_llava(
        ExportConfig(webdataset=False, card=False), manifest, str(data_root), str(out_dir)
    )
    assert not (Path(json_uri).parent / "webdataset").exists()
    # The stable folder no longer shows the older version's card, index and shards.
    assert not (out_dir / "README.md").exists() and not (out_dir / "webdataset.json").exists()
    assert not list((out_dir / "webdataset").glob("*"))
    # A card without shards says so and has no configs.
    json_uri = export_llava(ExportConfig(webdataset=False), manifest, str(data_root), str(out_dir))
    from synthvlm.dataset_card import parse_header

    card = (out_dir / "README.md").read_text()
    assert "configs" not in parse_header(card) and "No WebDataset shards" in card
