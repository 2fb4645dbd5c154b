from __future__ import annotations

import json
from pathlib import Path

import pytest

from synthvlm import storage
from synthvlm.errors import InputError
from synthvlm.evaluation.benchmarks import benchmark_name, load_benchmark, resolve_image

VALID = [
    {"image": "img/a.png", "question": "What is it?", "answer": "cat", "type": "vqa", "ability": "animal"},
    {
        "id": "mc-1",
        "image": ["img/a.png", "/abs/b.png"],
        "question": "Which?",
        "choices": ["dog", "cat"],
        "answer": "cat",
        "type": "multiple_choice",
    },
    {"image": "gs://bucket/c.png", "question": "Is it?", "answer": "Yes", "type": "yes_no"},
    {"image": "img/a.png", "question": "Say", "answers": ["cat", "kitten"], "type": "keyword"},
    {"image": "img/a.png", "question": "Describe", "answer": "A cat on a mat.", "type": "judge"},
]


def write_jsonl(path: Path, rows: list) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_load_valid_benchmark(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "tiny.jsonl", VALID)
    bench = load_benchmark(uri)
    assert bench.name == "tiny" and len(bench.items) == 5
    first, mc = bench.items[0], bench.items[1]
    assert first.id == "tiny-1"  # default id: name + line number
    assert first.images == [str(tmp_path / "img" / "a.png")]  # relative to the benchmark file
    assert mc.id == "mc-1"
    assert mc.images == [str(tmp_path / "img" / "a.png"), "/abs/b.png"]
    assert mc.correct_letter == "B"  # the answer was given as the choice text
    assert bench.items[2].images == ["gs://bucket/c.png"]
    assert bench.items[3].references == ["cat", "kitten"]


def test_blank_lines_are_skipped_and_ids_follow_line_numbers(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "b.jsonl", [VALID[0], "", VALID[0]])
    assert [item.id for item in load_benchmark(uri).items] == ["b-1", "b-3"]


def test_limit_keeps_the_first_items(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "b.jsonl", VALID)
    assert [item.type for item in load_benchmark(uri, limit=2).items] == ["vqa", "multiple_choice"]


def _with(**changes) -> dict:
    row = dict(VALID[0])
    for key, value in changes.items():
        if value is None:
            row.pop(key, None)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (_with(question=None), "question", "Field required"),
        (_with(question="  "), "question", "question is empty"),
        (_with(type="essay"), "type", "'vqa', 'multiple_choice'"),
        (_with(image=[]), "image", "no image given"),
        (_with(id="a/b"), "id", "path separator"),
        (_with(colour="red"), "colour", "Extra inputs are not permitted"),
        (_with(answer=None), "answer", "exactly one of 'answer' or 'answers'"),
        (_with(answers=["x"]), "answer", "exactly one of 'answer' or 'answers'"),
        (_with(answer=None, answers=[]), "answers", "empty reference answer"),
        (_with(choices=["a", "b"]), "choices", "only for multiple_choice items"),
        (_with(type="yes_no", answer="maybe"), "answer", "must be 'yes' or 'no'"),
        (_with(type="multiple_choice"), "choices", "need 2 to 26 choices"),
        (_with(type="multiple_choice", choices=["a"]), "choices", "need 2 to 26 choices"),
        (_with(type="multiple_choice", choices=["a", ""], answer="A"), "choices", "empty choice"),
        (
            _with(type="multiple_choice", choices=["dog", "fox"], answer="C"),
            "answer",
            "neither an option letter",
        ),
        (
            _with(type="multiple_choice", choices=["dog", "fox"], answer="cat"),
            "answer",
            "nor one of the choices",
        ),
    ],
)
def test_invalid_item_names_file_line_and_field(tmp_path: Path, row: dict, field: str, message: str) -> None:
    uri = write_jsonl(tmp_path / "bad.jsonl", [VALID[0], row])
    with pytest.raises(InputError) as info:
        load_benchmark(uri)
    err = info.value
    assert (err.file, err.line, err.field) == (uri, 2, field)
    assert message in str(err)
    assert str(err).startswith(f"{uri}, line 2, field '{field}': ")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png",', "malformed JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_unparseable_line(tmp_path: Path, line: str, message: str) -> None:
    uri = write_jsonl(tmp_path / "bad.jsonl", [VALID[0], VALID[0], line])
    with pytest.raises(InputError, match=message) as info:
        load_benchmark(uri)
    assert info.value.line == 3


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(VALID[0]).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(InputError, match="not valid UTF-8") as info:
        load_benchmark(str(path))
    assert info.value.line == 2


def test_duplicate_ids(tmp_path: Path) -> None:
    uri = write_jsonl(tmp_path / "dup.jsonl", [_with(id="q"), VALID[2], _with(id="q")])
    with pytest.raises(InputError, match=r"duplicate id 'q' \(first at line 1\)") as info:
        load_benchmark(uri)
    assert (info.value.line, info.value.field) == (3, "id")


def test_empty_missing_and_wrong_suffix(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="no benchmark items"):
        load_benchmark(str(tmp_path / "empty.jsonl"))
    with pytest.raises(InputError, match="not found"):
        load_benchmark(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match=r"\.jsonl"):
        load_benchmark(str(tmp_path / "bench.json"))


def test_bundled_fixture_loads_and_its_images_exist() -> None:
    bench = load_benchmark("bundled:eval_fixtures/colors.jsonl")
    assert bench.name == "colors"
    assert {item.type for item in bench.items} == {"vqa", "multiple_choice", "yes_no", "keyword"}
    for item in bench.items:
        assert all(Path(image).is_file() for image in item.images), item.id


def test_load_from_gcs(gcs_emulator: str) -> None:
    uri = storage.join(gcs_emulator, "evals", "remote.jsonl")
    storage.write_text(uri, json.dumps(VALID[0]) + "\n")
    bench = load_benchmark(uri)
    assert bench.name == "remote"
    assert bench.items[0].images == [f"{gcs_emulator}/evals/img/a.png"]


def test_names_and_image_resolution() -> None:
    assert benchmark_name("gs://b/evals/pope.jsonl") == "pope"
    assert benchmark_name("bundled:eval_fixtures/colors.jsonl") == "colors"
    assert resolve_image("x/y.png", "gs://b/evals/pope.jsonl") == "gs://b/evals/x/y.png"
    assert resolve_image("gs://other/z.png", "/data/pope.jsonl") == "gs://other/z.png"
    assert resolve_image("y.png", "pope.jsonl") == "./y.png"
