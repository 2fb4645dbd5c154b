"""The demo StableLLaVA run (template LLM, tiny SDXL, tiny CLIP) through to its exports: the eval set read by
`synthvlm evaluate` as written, interleaved dialogues whose later turns bring new images, the LLaVA-1.5 file
with single images only, the interleaved file read by HF's LlavaProcessor and by our trainer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from synthvlm.evaluation.benchmarks import load_benchmark
from synthvlm.records import read_manifest
from synthvlm.run_config import PRESETS, StableLLaVARunConfig
from synthvlm.stages import stablellava as sl
from synthvlm.stages.clip_score import score
from synthvlm.stages.evaluate import EvalConfig, evaluate
from synthvlm.stages.generate import generate
from synthvlm.stages.select import select
from synthvlm.webdataset_export import shard_uris


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The stablellava demo preset's stages, with 2 denoising steps at 64x64."""
    root = tmp_path_factory.mktemp("demo")
    run = StableLLaVARunConfig.model_validate({**PRESETS["stablellava"]["demo"](), "data_root": str(root)})
    gen = run.generate.model_copy(update={"steps": 2, "height": 64, "width": 64, "device": "cpu"})
    kw = sl.generate_keywords(run.keywords, str(root / "keywords.json"))
    prompts = sl.generate_prompts(run.prompts, kw, str(root / "prompts.jsonl"))
    shard = generate(gen, prompts, str(root))
    scored = score(run.score.model_copy(update={"device": "cpu"}), shard, str(root / "s.jsonl"))
    selected = select(run.select, [scored], str(root / "selected.jsonl"))
    dialogues = sl.generate_dialogues(run.dialogues, prompts, str(root / "dialogues.jsonl"))
    export = root / "export"
    sft = sl.export_stablellava(run.export, selected, dialogues, str(root), str(export))
    return {"root": root, "export": export, "sft": Path(sft), "prompts": prompts, "dialogues": dialogues}


def _images(sample: dict) -> list[str]:
    image = sample.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


class Oracle:
    """Answers every eval question right (by its reference), as a perfect model would."""

    def __init__(self, rows: list[dict]):
        self.rows = {row["question"]: row for row in rows}

    def answer(self, image_paths: Sequence[str], question: str, choices: Sequence[str] | None = None) -> str:
        row = self.rows[question.split("\n")[0]]
        assert all(Path(p).is_file() for p in image_paths)  # resolved by the loader, as written
        if choices:
            return "AB"[list(choices).index(row["answer"])]
        return f"It is {row.get('answer') or row['answers'][0]}."


@pytest.mark.slow
def test_demo_eval_set_is_evaluated_unmodified(demo: dict) -> None:
    eval_file = demo["export"] / sl.EVAL_JSONL
    rows = [json.loads(line) for line in eval_file.read_text().splitlines()]
    assert rows
    for row in rows:
        assert Path(row["image"]).is_absolute() and Path(row["image"]).is_file()
        assert ("answer" in row) != ("answers" in row)
        assert row["type"] in ("keyword", "yes_no", "multiple_choice")  # by question kind, not the kind
        if row["type"] == "multiple_choice":
            assert row["answer"] in row["choices"] and len(row["choices"]) == 2
        if row["type"] == "yes_no":
            assert row["answer"] in ("yes", "no")
    bench = load_benchmark(str(eval_file))  # the loader of `synthvlm evaluate`, on the file as written
    assert len(bench.items) == len(rows)
    # The published copy and the versioned one read the same (absolute image paths).
    versioned = demo["sft"].parent / sl.EVAL_JSONL
    assert versioned != eval_file
    assert load_benchmark(str(versioned)).items == bench.items

    out = demo["root"] / "eval" / "demo.json"
    doc_uri = evaluate(EvalConfig(), "tiny-oracle", [str(eval_file)], str(out), answerer=Oracle(rows))
    results = json.loads(Path(doc_uri).read_text())["benchmarks"]["stablellava_eval"]
    assert results["n"] == len(rows)
    for metrics in results["metrics"].values():
        assert metrics["accuracy"] == 1.0
    assert set(results["by_ability"]) == {row["ability"] for row in rows}


@pytest.mark.slow
def test_demo_has_an_interleaved_dialogue_with_images_in_different_turns(demo: dict) -> None:
    interleaved = json.loads((demo["export"] / sl.INTERLEAVED_JSON).read_text())
    dialogues = [s for s in interleaved if s["id"].startswith("interleaved-")]
    assert dialogues
    for sample in dialogues:
        humans = [t["value"] for t in sample["conversations"] if t["from"] == "human"]
        with_image = [i for i, text in enumerate(humans) if "<image>" in text]
        assert len(sample["image"]) >= 2 and len(set(with_image)) >= 2  # images in different human turns
        assert with_image[0] == 0
    for sample in interleaved:  # every <image> count matches its images, in every file
        assert isinstance(sample["image"], list)
        assert sum(t["value"].count("<image>") for t in sample["conversations"]) == len(sample["image"])
        assert all((demo["root"] / p).is_file() for p in sample["image"])
    records = read_manifest(demo["prompts"])
    inter = [r for r in records if r.provenance["kind"] == "interleaved"]
    assert inter and all(r.provenance["weighted_prompt"] for r in inter)  # emphasis: weight (the default)


@pytest.mark.slow
def test_llava15_file_has_single_images_only_and_the_guide_names_trainers(demo: dict) -> None:
    sft = json.loads(demo["sft"].read_text())
    interleaved = json.loads((demo["export"] / sl.INTERLEAVED_JSON).read_text())
    assert sft and not [s for s in sft if isinstance(s.get("image"), list)]
    for sample in sft:
        assert sum(t["value"].count("<image>") for t in sample["conversations"]) == len(_images(sample)) <= 1
        assert sample["conversations"][0]["value"].startswith("<image>\n")
    assert {s["id"] for s in sft} < {s["id"] for s in interleaved}  # the rest are multi-image
    assert {s["id"] for s in interleaved} - {s["id"] for s in sft} == {
        s["id"] for s in interleaved if len(s["image"]) > 1
    }
    guide = json.loads((demo["export"] / sl.EXPORTS_JSON).read_text())["files"]
    assert any("LLaVA-1.5" in fit for fit in guide[sl.SFT_JSON]["fits"])
    assert any("OneVision" in fit for fit in guide[sl.INTERLEAVED_JSON]["fits"])
    assert not any("LLaVA-1.5" in fit for fit in guide[sl.INTERLEAVED_JSON]["fits"])
    readme = (demo["export"] / sl.README_MD).read_text()
    assert sl.SFT_JSON in readme and sl.INTERLEAVED_JSON in readme and "lmms" in readme
    assert (demo["export"] / "lmms_eval_task" / "utils.py").is_file()


@pytest.mark.slow
def test_our_trainer_and_hf_llava_processor_read_both_files(demo: dict) -> None:
    import numpy as np
    from PIL import Image

    from synthvlm.train.data import SampleTable
    from synthvlm.train.model import build_tiny_llava

    for path in (demo["sft"], demo["export"] / sl.INTERLEAVED_JSON):
        table = SampleTable(str(path))
        assert len(table) and table.num_images.max() >= 1
    interleaved = SampleTable(str(demo["export"] / sl.INTERLEAVED_JSON))
    assert interleaved.num_images.max() >= 2

    _, processor = build_tiny_llava()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for index in np.argsort(-interleaved.num_images)[:3]:
        sample = interleaved[int(index)]
        images = [Image.open(demo["root"] / p).convert("RGB") for p in sample.images]
        text = " ".join(turn.text for turn in sample.turns)
        batch = processor(text=[text], images=images, return_tensors="pt")
        per_image = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else None
        count = int((batch["input_ids"] == image_id).sum())
        assert batch["pixel_values"].shape[0] == len(images)
        assert count % len(images) == 0 and count >= len(images)
        if per_image:
            assert count == per_image * len(images)


# --- WebDataset shards and the dataset card (hand-made records and dialogues, no models) -----------------


def _jpeg(path: Path, shade: int) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 40, 90)).save(path, format="JPEG")
    return str(path)


def _made(root: Path) -> tuple[str, str, list]:
    from synthvlm.records import Record, write_manifest
    from synthvlm.stablellava.dialogues import Dialogue, Turn

    subjects = [
        "teal bicycle",
        "coral kettle",
        "amber lamp",
        "olive teapot",
        "ivory vase",
        "scarlet kite",
        "navy hat",
    ]
    records = [
        Record(
            id=f"r{i}",
            caption=f"{subject}, studio light, 8k",
            seed=100 + i,
            image_uri=_jpeg(root / "images" / f"r{i}.jpg", 30 * i),
            scores={"clip": 0.26 + i / 100},
            provenance={
                "ability": "colour",
                "raw_prompt": f"(({subject})), studio light, 8k",
                "kind": "single",
                "split": "eval" if i == 6 else "train",
                "generation": {"model": "tiny/sdxl", "steps": 2},
                "clip_scorer": {"model": "tiny-clip"},
            },
        )
        for i, subject in enumerate(subjects)
    ]
    manifest = str(root / "selected.jsonl")
    write_manifest(manifest, records)
    turn = Turn(question="What colour is it?", answer="Teal.")
    llm = {"llm": {"backend": "template", "model": "template"}}

    def dialogue(did: str, kind: str, ids: list[str], **extra) -> Dialogue:
        return Dialogue(
            id=did, kind=kind, record_ids=ids, ability="colour", turns=[turn], provenance=llm, **extra
        )

    dialogues = [
        dialogue("r0-caption", "caption", ["r0"]),
        dialogue("r1-caption", "caption", ["r1"]),
        dialogue("r2-qa", "qa", ["r2"]),
        dialogue("r3-multi_turn", "multi_turn", ["r3"]),
        dialogue("r4.r5-multi_image", "multi_image", ["r4", "r5"], relation="difference"),
        dialogue("r6-eval", "eval", ["r6"], answer_keywords=["navy"], question_type="wh"),
    ]
    dialogues_uri = root / "dialogues.jsonl"
    dialogues_uri.write_text("".join(d.model_dump_json() + "\n" for d in dialogues))
    return manifest, str(dialogues_uri), records


def test_export_writes_webdataset_subsets_and_card(tmp_path: Path) -> None:
    import webdataset as wds

    from synthvlm.dataset_card import parse_header
    from synthvlm.webdataset_export import sample_key

    manifest, dialogues_uri, records = _made(tmp_path)
    out = tmp_path / "export"
    sft_uri = sl.export_stablellava(
        sl.StableLLaVAExportConfig(), manifest, dialogues_uri, str(tmp_path), str(out)
    )
    version = Path(sft_uri).parent
    index = json.loads((out / "webdataset.json").read_text())
    assert {name: s["samples"] for name, s in index["subsets"].items()} == {
        "pretrain": 2,
        "sft": 2,
        "sft_2images": 1,
        "eval": 1,
    }
    shards = sorted(p.name for p in (version / "webdataset").glob("*.tar"))
    assert shards == [
        "stablellava-eval-000000.tar",
        "stablellava-pretrain-000000.tar",
        "stablellava-sft-000000.tar",
        "stablellava-sft_2images-000000.tar",
    ]
    # Published to the stable folder (hard links), where the index's relative paths lead.
    assert sorted(p.name for p in (out / "webdataset").glob("*.tar")) == shards
    assert all((out / "webdataset" / name).samefile(version / "webdataset" / name) for name in shards)
    assert shard_uris(str(out / "webdataset.json"))["eval"] == [str(out / "webdataset" / shards[0])]
    interleaved = {s["id"]: s for s in json.loads((out / sl.INTERLEAVED_JSON).read_text())}
    by_id = {r.id: r for r in records}

    pairs = list(wds.WebDataset(str(out / "webdataset" / shards[3]), shardshuffle=False))
    (pair,) = pairs
    assert pair["__key__"] == sample_key("r4.r5-multi_image") == "r4%2Er5-multi_image"
    assert pair["0.jpg"] == Path(by_id["r4"].image_uri).read_bytes()
    assert pair["1.jpg"] == Path(by_id["r5"].image_uri).read_bytes()
    meta = json.loads(pair["json"])
    assert meta["conversations"] == interleaved["r4.r5-multi_image"]["conversations"]
    assert meta["images"] == interleaved["r4.r5-multi_image"]["image"] and meta["record_ids"] == ["r4", "r5"]
    assert meta["seeds"] == [104, 105] and meta["scores"] == {"clip": [0.30, 0.31]}
    assert meta["model"] == "tiny/sdxl" and meta["relation"] == "difference" and meta["kind"] == "multi_image"
    assert json.loads(meta["dialogue_provenance"])["llm"]["backend"] == "template"
    assert [json.loads(r)["id"] for r in meta["manifest_records"]] == ["r4", "r5"]
    (eval_row,) = wds.WebDataset(str(out / "webdataset" / shards[0]), shardshuffle=False)
    eval_meta = json.loads(eval_row["json"])
    assert (
        eval_meta["answers"] == ["navy"] and eval_meta["metric"] == "keyword" and eval_meta["choices"] == []
    )

    card = (out / sl.README_MD).read_text()
    head = parse_header(card)
    assert head["license"] == "other" and head["license_name"]
    assert head["task_categories"] == ["visual-question-answering", "image-text-to-text"]
    assert head["size_categories"] == ["n<1K"]
    configs = {c["config_name"]: c for c in head["configs"]}
    assert list(configs) == ["pretrain", "sft", "sft_2images", "eval"] and configs["pretrain"]["default"]
    assert configs["eval"]["data_files"] == [{"split": "test", "path": "webdataset/stablellava-eval-*.tar"}]
    assert sl.SFT_JSON in card and sl.INTERLEAVED_JSON in card and "lmms" in card  # the file guide inside
    assert '`llm.backend` | `"template"`' in card and "## Score distribution" in card

    datasets = pytest.importorskip("datasets")
    for name, expected in (("sft", {"r2-qa", "r3-multi_turn"}), ("sft_2images", {"r4.r5-multi_image"})):
        (files,) = configs[name]["data_files"]
        # The stable folder with the card's configs, as the Hub would serve it.
        ds = datasets.load_dataset(
            str(out), name, split=files["split"], cache_dir=str(tmp_path / "hf" / name)
        )
        assert {row["json"]["id"] for row in ds} == expected
        assert all(url.startswith(str(out / "webdataset")) for url in ds["__url__"])
        assert all(row["json"]["conversations"][0]["from"] == "human" for row in ds)


def test_card_off_keeps_the_file_guide(tmp_path: Path) -> None:
    manifest, dialogues_uri, _ = _made(tmp_path)
    out = tmp_path / "export"
    config = sl.StableLLaVAExportConfig(webdataset=False, card=False)
    sft_uri = sl.export_stablellava(config, manifest, dialogues_uri, str(tmp_path), str(out))
    assert (out / sl.README_MD).read_text().startswith("# StableLLaVA export")
    assert not (out / "webdataset.json").exists() and not (Path(sft_uri).parent / "webdataset").exists()


@pytest.mark.slow
def test_demo_webdataset_shards_read_back(demo: dict, tmp_path: Path) -> None:
    import webdataset as wds

    from synthvlm.dataset_card import parse_header

    export = demo["export"]
    index = json.loads((export / "webdataset.json").read_text())
    assert index["samples"] > 0
    uris = shard_uris(str(export / "webdataset.json"))
    for name, subset in index["subsets"].items():
        # Read from the stable export folder, where every shard was published.
        assert uris[name] and all(uri.startswith(str(export / "webdataset") + "/") for uri in uris[name])
        rows = list(wds.WebDataset(uris[name], shardshuffle=False))
        assert len(rows) == subset["samples"]
        assert all(json.loads(r["json"])["conversations"] for r in rows)
    head = parse_header((export / sl.README_MD).read_text())
    assert {c["config_name"] for c in head["configs"]} == set(index["subsets"])
    datasets = pytest.importorskip("datasets")
    for config in head["configs"]:
        (files,) = config["data_files"]
        ds = datasets.load_dataset(
            str(export),
            config["config_name"],
            split=files["split"],
            cache_dir=str(tmp_path / config["config_name"]),
        )
        assert len(ds) == index["subsets"][config["config_name"]]["samples"]
