from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from synthvlm.evaluation import answerers
from synthvlm.evaluation.benchmarks import parse_benchmark
from synthvlm.stablellava.dialogues import Dialogue, Turn
from synthvlm.stablellava.export import (
    LMMS_TASK,
    LMMS_UTILS,
    LMMS_YAML,
    conversations,
    eval_row,
    fits_llava15,
    image_token_problem,
    interleaved_sample,
    llava15_sample,
    lmms_task_files,
)


def dialogue(kind: str, record_ids: list[str], turns: int = 1, **extra) -> Dialogue:
    return Dialogue(
        id=f"{record_ids[0]}-{kind}",
        kind=kind,
        record_ids=record_ids,
        ability="colour",
        turns=[Turn(question=f"q{i}", answer=f"a{i}") for i in range(turns)],
        **extra,
    )


def interleaved_dialogue() -> Dialogue:
    turns = [
        Turn(question="How do I make tea? Here is my kitchen <image>", answer="Boil water."),
        Turn(question="Done, what next?", answer="Add the leaves."),
        Turn(question="Like this? <image>", answer="Yes, now wait."),
    ]
    return Dialogue(
        id="interleaved-00000",
        kind="interleaved",
        record_ids=["i-1", "i-2"],
        ability="interleaved",
        turns=turns,
        image_turns=[0, 2],
    )


def test_llava15_sample_is_one_image_as_a_string() -> None:
    sample = llava15_sample(dialogue("qa", ["c0"]), ["images/c0.jpg"])
    assert sample == {
        "id": "c0-qa",
        "image": "images/c0.jpg",
        "conversations": [{"from": "human", "value": "<image>\nq0"}, {"from": "gpt", "value": "a0"}],
    }
    multi = dialogue("multi_image", ["p-1", "p-2"], relation="difference")
    assert not fits_llava15(multi)
    with pytest.raises(ValueError, match="one image"):
        llava15_sample(multi, ["a.jpg", "b.jpg"])


def test_multi_turn_has_one_image_token() -> None:
    sample = llava15_sample(dialogue("multi_turn", ["c0"], turns=3), ["images/c0.jpg"])
    values = [turn["value"] for turn in sample["conversations"]]
    assert [turn["from"] for turn in sample["conversations"]] == ["human", "gpt"] * 3
    assert sum(v.count("<image>") for v in values) == 1


def test_interleaved_format_lists_images_in_marker_order() -> None:
    pair = interleaved_sample(
        dialogue("multi_image", ["p-1", "p-2"], relation="difference"), ["i/p-1.jpg", "i/p-2.jpg"]
    )
    assert pair["image"] == ["i/p-1.jpg", "i/p-2.jpg"]
    assert pair["conversations"][0]["value"] == "<image>\n<image>\nq0"
    single = interleaved_sample(dialogue("qa", ["c0"]), ["c0.jpg"])
    assert single["image"] == ["c0.jpg"] and image_token_problem(single) is None
    sample = interleaved_sample(interleaved_dialogue(), ["i/1.jpg", "i/2.jpg"])
    humans = [t["value"] for t in sample["conversations"] if t["from"] == "human"]
    assert [h.count("<image>") for h in humans] == [1, 0, 1]  # each image where its turn shows it
    assert image_token_problem(sample) is None
    with pytest.raises(ValueError):
        interleaved_sample(interleaved_dialogue(), ["only-one.jpg"])


def test_image_token_problem() -> None:
    bad = {"image": ["a", "b"], "conversations": [{"from": "human", "value": "<image> q"}]}
    assert "1 <image> marker(s) for 2 image(s)" in image_token_problem(bad)
    text_only = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert image_token_problem(text_only) is None


def test_dialogue_markers_must_match_image_turns() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Dialogue(**{**interleaved_dialogue().model_dump(), "image_turns": [0, 1]})
    with pytest.raises(ValueError, match="without image_turns"):
        Dialogue(**{**interleaved_dialogue().model_dump(), "image_turns": None})


def eval_items() -> list[Dialogue]:
    return [
        dialogue("eval", ["e0"], question_type="wh", answer_keywords=["teal", "blue-green"]),
        dialogue("eval", ["e1"], question_type="yes_no", answer_keywords=["no"]),
        dialogue(
            "eval", ["e2"], question_type="either_or", answer_keywords=["teal"], choices=["red", "teal"]
        ),
    ]


def test_eval_rows_carry_the_metric_of_their_question_kind() -> None:
    rows = [eval_row(d, f"/data/images/{d.record_ids[0]}.jpg") for d in eval_items()]
    assert rows[0] == {
        "id": "e0-eval",
        "image": "/data/images/e0.jpg",
        "question": "q0",
        "type": "keyword",
        "answers": ["teal", "blue-green"],
        "ability": "colour",
    }
    assert (rows[1]["type"], rows[1]["answer"]) == ("yes_no", "no")
    assert (rows[2]["type"], rows[2]["choices"], rows[2]["answer"]) == (
        "multiple_choice",
        ["red", "teal"],
        "teal",
    )
    judged = eval_row(eval_items()[0], "/x.jpg", {"wh": "judge"})
    assert (judged["type"], judged["answer"]) == ("judge", "a0")  # the full reference answer
    # The loader of `synthvlm evaluate` takes every row as it is.
    body = "".join(json.dumps(r) + "\n" for r in [*rows, {**judged, "id": "j"}]).encode()
    items = parse_benchmark("/data/eval.jsonl", body, "eval")
    assert [i.type for i in items] == ["keyword", "yes_no", "multiple_choice", "judge"]


def test_conversations_without_image() -> None:
    assert conversations(dialogue("qa", ["c0"]))[0]["value"] == "<image>\nq0"


class _Rows(list):
    """The part of a datasets.Dataset that process_docs uses."""

    def filter(self, keep):
        return _Rows(row for row in self if keep(row))


def _as_json_loader_gives(rows: list[dict]) -> list[dict]:
    """HF's json loader gives every row every column (None where a row has none)."""
    keys = {k for row in rows for k in row}
    return [{k: row.get(k) for k in keys} for row in rows]


def test_lmms_eval_task_parses_and_its_functions_work(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("e0", "e1", "e2"):
        Image.new("RGB", (8, 8), (0, 128, 128)).save(images / f"{name}.jpg")
    export = tmp_path / "export"
    export.mkdir()
    rows = [eval_row(d, str(images / f"{d.record_ids[0]}.jpg")) for d in eval_items()]
    judged = {**eval_row(eval_items()[0], str(images / "e0.jpg"), {"wh": "judge"}), "id": "j"}
    eval_file = export / "stablellava_eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in [*rows, judged]))
    for rel, text in lmms_task_files(str(eval_file)).items():
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        (export / rel).write_text(text)

    class TaggedLoader(yaml.SafeLoader):
        pass

    TaggedLoader.add_constructor(
        "!function", lambda loader, node: ("function", loader.construct_scalar(node))
    )
    config = yaml.load((export / LMMS_YAML).read_text(), Loader=TaggedLoader)
    assert config["task"] == LMMS_TASK and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(eval_file)
    assert config["test_split"] == "test" and config["output_type"] == "generate_until"
    assert [m["metric"] for m in config["metric_list"]] == ["accuracy"]

    spec = importlib.util.spec_from_file_location("lmms_task_utils_under_test", export / LMMS_UTILS)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for key in ("process_docs", "doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        kind, name = config[key]
        assert kind == "function" and callable(getattr(utils, name.removeprefix("utils.")))

    docs = utils.process_docs(_Rows(_as_json_loader_gives([*rows, judged])))
    assert [d["id"] for d in docs] == ["e0-eval", "e1-eval", "e2-eval"]  # judge items need the judge
    wh, yes_no, choice = docs
    assert [im.size for im in utils.doc_to_visual(wh)] == [(8, 8)]
    assert utils.doc_to_text(wh) == "q0"
    assert utils.doc_to_text(yes_no) == f"q0\n{answerers.SHORT_ANSWER_INSTRUCTION}"
    assert utils.doc_to_text(choice) == f"q0\nA. red\nB. teal\n{answerers.MC_INSTRUCTION}"
    assert [utils.doc_to_target(d) for d in docs] == ["teal | blue-green", "no", "B"]
    assert utils.process_results(wh, ["It is blue-green."]) == {"accuracy": 1.0}
    assert utils.process_results(wh, ["It is red."]) == {"accuracy": 0.0}
    assert utils.process_results(yes_no, ["No."]) == {"accuracy": 1.0}
    assert utils.process_results(choice, ["B"]) == {"accuracy": 1.0}
    assert utils.process_results(choice, ["A"]) == {"accuracy": 0.0}


def test_lmms_eval_loads_the_task_with_its_own_loader(tmp_path: Path) -> None:
    pytest.importorskip(
        "lmms_eval", reason="lmms-eval is installed in the eval image only (synthvlm.evaluation.lmms)"
    )
    from lmms_eval.tasks import TaskManager

    Image.new("RGB", (8, 8)).save(tmp_path / "e0.jpg")
    eval_file = tmp_path / "stablellava_eval.jsonl"
    eval_file.write_text(json.dumps(eval_row(eval_items()[0], str(tmp_path / "e0.jpg"))) + "\n")
    for rel, text in lmms_task_files(str(eval_file)).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    manager = TaskManager(include_path=str(tmp_path / LMMS_YAML.rpartition("/")[0]), include_defaults=False)
    assert LMMS_TASK in manager.all_tasks
    task = manager.load_task_or_group([LMMS_TASK])[LMMS_TASK]
    doc = task.test_docs()[0]
    assert task.doc_to_target(doc) == "teal | blue-green"
