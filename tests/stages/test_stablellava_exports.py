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
