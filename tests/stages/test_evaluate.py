from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from synthvlm.errors import ConfigError
from synthvlm.evaluation.answerers import SHORT_ANSWER_INSTRUCTION, Question
from synthvlm.evaluation.judge import PREDICTION_LABEL, REFERENCE_LABEL
from synthvlm.evaluation.lmms import LMMSEvalUnavailable
from synthvlm.llm import LLMConfig
from synthvlm.llm.fake_server import FakeLLMServer
from synthvlm.stage import is_done, read_stats
from synthvlm.stages.evaluate import EvalConfig, evaluate, items_uri, predictions_uri, versioned_output
from tests.published import published

COLORS = "bundled:eval_fixtures/colors.jsonl"


class Scripted:
    """Answers from a function of (question, choices); records every call."""

    def __init__(self, reply: Callable[[str, Sequence[str] | None], str]):
        self.reply = reply
        self.calls: list[tuple[list[str], str, list[str] | None]] = []

    def answer(self, image_paths: Sequence[str], question: str, choices: Sequence[str] | None = None) -> str:
        self.calls.append((list(image_paths), question, list(choices) if choices else None))
        return self.reply(question, choices)


def write_bench(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


ROWS = [
    {"id": "v1", "image": "a.png", "question": "Color?", "answer": "red", "type": "vqa", "ability": "color"},
    {
        "id": "v2",
        "image": "a.png",
        "question": "Count?",
        "answers": ["2", "2", "3"],
        "type": "vqa",
        "ability": "count",
    },
    {
        "id": "m1",
        "image": "a.png",
        "question": "Animal?",
        "choices": ["cat", "dog", "fox"],
        "answer": "B",
        "type": "multiple_choice",
        "ability": "animal",
    },
    {
        "id": "y1",
        "image": "a.png",
        "question": "Dog?",
        "answer": "yes",
        "type": "yes_no",
        "ability": "animal",
    },
    {"id": "y2", "image": "a.png", "question": "Cat?", "answer": "no", "type": "yes_no", "ability": "animal"},
    {
        "id": "k1",
        "image": ["a.png", "b.png"],
        "question": "Describe.",
        "answers": ["beach"],
        "type": "keyword",
    },
]
REPLIES = {
    "Color?": "Red.",
    "Count?": "two",
    "Animal?": "B",
    "Dog?": "Yes",
    "Cat?": "Yes",
    "Describe.": "A beach.",
}


def reply_by_question(question: str, choices: Sequence[str] | None) -> str:
    return REPLIES[question.split("\n")[0]]


def test_scores_a_mixed_benchmark(tmp_path: Path, gcs_emulator: str) -> None:
    bench = write_bench(tmp_path / "mixed.jsonl", ROWS)
    stable = str(tmp_path / "eval" / "model-a.json")
    answerer = Scripted(reply_by_question)
    # (The model URI is fingerprinted by the runner: it looks for a marker, here in the emulator.)
    model_uri = f"{gcs_emulator}/models/model-a/"
    out = evaluate(EvalConfig(), model_uri, [bench], stable, answerer=answerer)
    assert published(out, stable)

    doc = json.loads(Path(out).read_text())
    assert doc["model"] == "model-a"  # from the model URI
    result = doc["benchmarks"]["mixed"]
    assert result["n"] == 6
    metrics = result["metrics"]
    # vqa: "Red." = "red" -> 1; "two" -> "2" said by 2 of 3 humans -> min(2/3, 1); mean (1 + 2/3) / 2 = 5/6
    assert metrics["vqa"]["accuracy"] == pytest.approx(5 / 6)
    assert metrics["multiple_choice"] == {"n": 1.0, "accuracy": 1.0, "unparsed": 0.0}
    # yes_no: Dog? yes/yes = TP, Cat? yes/no = FP -> accuracy 1/2, precision 1/2, recall 1/1, yes-ratio 1
    assert metrics["yes_no"]["accuracy"] == 0.5
    assert (metrics["yes_no"]["precision"], metrics["yes_no"]["recall"]) == (0.5, 1.0)
    assert metrics["yes_no"]["yes_ratio"] == 1.0
    assert metrics["keyword"] == {"n": 1.0, "accuracy": 1.0}
    by_ability = result["by_ability"]
    assert sorted(by_ability) == ["animal", "color", "count"]  # k1 has no ability
    assert by_ability["count"]["vqa"]["accuracy"] == pytest.approx(2 / 3)
    assert by_ability["animal"]["yes_no"]["accuracy"] == 0.5

    # The stage's statistics carry the flat metrics (-> KFP Metrics) and the counts.
    stats = read_stats(out)
    assert (stats["count_in"], stats["count_out"], stats["model"]) == (6, 6, "model-a")
    assert stats["mixed.vqa.accuracy"] == pytest.approx(5 / 6)
    assert stats["mixed.ability.animal.yes_no.accuracy"] == 0.5

    # Per-item scores with the parsed answers sit next to the results.
    rows = [json.loads(line) for line in Path(items_uri(out, "mixed")).read_text().splitlines()]
    by_id = {row["item_id"]: row for row in rows}
    assert by_id["m1"]["parsed"] == "B" and by_id["y2"]["parsed"] == "yes" and by_id["y2"]["gold"] == "no"
    assert by_id["v2"]["references"] == ["2", "2", "3"] and by_id["v2"]["outputs"] == ["two"]


def test_questions_as_asked(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "mixed.jsonl", ROWS)
    answerer = Scripted(reply_by_question)
    evaluate(EvalConfig(), "m", [bench], str(tmp_path / "out.json"), answerer=answerer)
    asked = {q.split("\n")[0]: (images, q, choices) for images, q, choices in answerer.calls}
    # LLaVA-1.5's short-answer prompt for VQA and yes/no, none for open-ended keyword questions.
    assert asked["Color?"][1] == f"Color?\n{SHORT_ANSWER_INSTRUCTION}"
    assert asked["Dog?"][1] == f"Dog?\n{SHORT_ANSWER_INSTRUCTION}"
    assert asked["Describe."][1] == "Describe."
    # Multiple choice: the options go to the answerer, which formats them with its MC instruction.
    assert asked["Animal?"][1:] == ("Animal?", ["cat", "dog", "fox"])
    assert asked["Describe."][0] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_circular_eval_asks_every_rotation(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "mc.jsonl", [ROWS[2]])

    def picks_dog(question: str, choices: Sequence[str] | None) -> str:
        assert choices is not None
        return "ABC"[list(choices).index("dog")]

    answerer = Scripted(picks_dog)
    out = evaluate(EvalConfig(circular=True), "m", [bench], str(tmp_path / "c.json"), answerer=answerer)
    assert [c[2] for c in answerer.calls] == [
        ["cat", "dog", "fox"],
        ["dog", "fox", "cat"],
        ["fox", "cat", "dog"],
    ]
    assert (
        json.loads(Path(out).read_text())["benchmarks"]["mc"]["metrics"]["multiple_choice"]["accuracy"] == 1.0
    )

    always_b = Scripted(lambda q, c: "B")
    out = evaluate(EvalConfig(circular=True), "m", [bench], str(tmp_path / "b.json"), answerer=always_b)
    assert (
        json.loads(Path(out).read_text())["benchmarks"]["mc"]["metrics"]["multiple_choice"]["accuracy"] == 0.0
    )


def test_done_output_is_not_redone(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "mixed.jsonl", ROWS)
    stable = str(tmp_path / "out.json")
    first = evaluate(EvalConfig(), "m", [bench], stable, answerer=Scripted(reply_by_question))
    assert published(first, stable)
    before = Path(first).read_bytes()
    again = Scripted(reply_by_question)
    # batch_size only groups the questions: the same fingerprint, nothing is asked again.
    assert evaluate(EvalConfig(batch_size=2), "m", [bench], stable, answerer=again) == first
    assert again.calls == []

    # A setting that changes the questions is evaluated again into a new version; the old one stays.
    changed = Scripted(reply_by_question)
    second = evaluate(EvalConfig(circular=True), "m", [bench], stable, answerer=changed)
    assert second != first and published(second, stable)
    assert len(changed.calls) == 8  # 5 single questions + 3 rotations of the multiple-choice item
    assert Path(first).read_bytes() == before and is_done(first)


def test_rerun_after_a_crash_reuses_finished_benchmarks(tmp_path: Path) -> None:
    first = write_bench(tmp_path / "first.jsonl", ROWS[:2])
    second = write_bench(tmp_path / "second.jsonl", ROWS[2:])
    out = str(tmp_path / "out.json")

    def crashes_on_second(question: str, choices: Sequence[str] | None) -> str:
        if question.startswith("Animal?"):
            raise RuntimeError("preempted")
        return reply_by_question(question, choices)

    with pytest.raises(RuntimeError, match="preempted"):
        evaluate(EvalConfig(), "m", [first, second], out, answerer=Scripted(crashes_on_second))
    (version,) = tmp_path.glob("evaluate-*")  # the fingerprint folder the crashed run wrote into
    crashed = str(version / "out.json")
    assert is_done(predictions_uri(crashed, "first")) and not is_done(crashed) and not is_done(out)
    resumed = Scripted(reply_by_question)
    assert evaluate(EvalConfig(), "m", [first, second], out, answerer=resumed) == crashed
    assert len(resumed.calls) == 4  # only the second benchmark's items
    assert set(json.loads(Path(out).read_text())["benchmarks"]) == {"first", "second"}
    assert published(crashed, out)


def test_changed_questions_are_asked_again(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "mc.jsonl", [ROWS[2]])
    stable = str(tmp_path / "first.json")
    first = evaluate(EvalConfig(), "m", [bench], stable, answerer=Scripted(lambda q, c: "B"))

    def crashes(question: str, choices: Sequence[str] | None) -> str:
        raise RuntimeError("preempted")

    # CircularEval gets its own fingerprint folder; a crashed start leaves nothing in it.
    with pytest.raises(RuntimeError, match="preempted"):
        evaluate(EvalConfig(circular=True), "m", [bench], stable, answerer=Scripted(crashes))
    second = versioned_output(EvalConfig(circular=True), "m", [bench], stable)
    assert Path(second).parent != Path(first).parent
    # Finished predictions of other questions (no rotations) found there are not reused: asked again.
    shutil.copytree(Path(predictions_uri(first, "mc")).parent, Path(predictions_uri(second, "mc")).parent)
    assert is_done(predictions_uri(second, "mc"))
    again = Scripted(lambda q, c: "B")
    assert evaluate(EvalConfig(circular=True), "m", [bench], stable, answerer=again) == second
    assert len(again.calls) == 3


class Batched(Scripted):
    """A BatchAnswerer: records the batch sizes it gets."""

    def __init__(self, reply: Callable[[str, Sequence[str] | None], str]):
        super().__init__(reply)
        self.batches: list[int] = []

    def answer_many(self, questions: Sequence[Question]) -> list[str]:
        self.batches.append(len(questions))
        return [self.answer(q.image_paths, q.text, q.choices) for q in questions]


def test_batch_answerers_get_batches_of_batch_size(tmp_path: Path) -> None:
    bench = write_bench(tmp_path / "mixed.jsonl", ROWS)
    answerer = Batched(reply_by_question)
    out = evaluate(EvalConfig(batch_size=4), "m", [bench], str(tmp_path / "o.json"), answerer=answerer)
    assert answerer.batches == [4, 2]  # 6 questions
    assert json.loads(Path(out).read_text())["benchmarks"]["mixed"]["metrics"]["keyword"]["accuracy"] == 1.0


def _judge_reply(prompt: str) -> dict:
    reference = next(x for x in prompt.splitlines() if x.startswith(REFERENCE_LABEL)).removeprefix(
        REFERENCE_LABEL
    )
    prediction = next(x for x in prompt.splitlines() if x.startswith(PREDICTION_LABEL))
    score = 4 if reference.lower() in prediction.lower() else 1
    return {"reason": "fake judge", "score": score}


def test_judge_items_and_also_judged_types(tmp_path: Path) -> None:
    rows = [
        {"id": "j1", "image": "a.png", "question": "Describe.", "answer": "a red car", "type": "judge"},
        {"id": "j2", "image": "a.png", "question": "Explain.", "answer": "a joke", "type": "judge"},
        {"id": "k1", "image": "a.png", "question": "Where?", "answers": ["beach"], "type": "keyword"},
        {"id": "v1", "image": "a.png", "question": "Color?", "answer": "red", "type": "vqa"},
    ]
    replies = {"Describe.": "I see a red car.", "Explain.": "No idea.", "Where?": "On a beach."}
    answerer = Scripted(lambda q, c: replies.get(q, "red"))
    bench = write_bench(tmp_path / "open.jsonl", rows)
    with FakeLLMServer(json_reply=_judge_reply) as server:
        config = EvalConfig(
            judge=LLMConfig(base_url=server.base_url, model="judge", temperature=0.0, max_retries=0),
            also_judge=["keyword"],
        )
        out = evaluate(config, "m", [bench], str(tmp_path / "out.json"), answerer=answerer)
        assert server.total_requests == 3  # j1, j2 and the keyword item; not the vqa item
    metrics = json.loads(Path(out).read_text())["benchmarks"]["open"]["metrics"]
    # judge: j1 contains the reference -> 4, j2 does not -> 1; mean (4 + 1) / 2 = 2.5
    assert metrics["judge"] == {"n": 2.0, "score": 2.5, "judge_failed": 0.0}
    assert metrics["keyword"] == {"n": 1.0, "accuracy": 1.0, "judge_score": 4.0, "judge_failed": 0.0}
    assert metrics["vqa"] == {"n": 1.0, "accuracy": 1.0}
    stats = read_stats(out)
    assert stats["llm_produced"] == 3 and stats["open.judge.score"] == 2.5


def test_judge_without_a_key_fails_before_answering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    bench = write_bench(
        tmp_path / "j.jsonl", [{"image": "a.png", "question": "Q", "answer": "A", "type": "judge"}]
    )
    answerer = Scripted(lambda q, c: "x")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        evaluate(EvalConfig(), "m", [bench], str(tmp_path / "out.json"), answerer=answerer)
    assert answerer.calls == []


def test_lmms_eval_task_fails_clearly_before_loading_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # not importable, whatever is installed
    with pytest.raises(LMMSEvalUnavailable, match="eval image"):
        evaluate(
            EvalConfig(), str(tmp_path / "no-model-here"), [COLORS, "lmms_eval:mme"], str(tmp_path / "o.json")
        )
    assert not is_done(str(tmp_path / "o.json"))


def test_benchmark_list_problems(tmp_path: Path) -> None:
    answerer = Scripted(lambda q, c: "x")
    with pytest.raises(ConfigError, match="no benchmarks"):
        evaluate(EvalConfig(), "m", [], str(tmp_path / "o.json"), answerer=answerer)
    with pytest.raises(ConfigError, match="repeated: colors"):
        evaluate(
            EvalConfig(),
            "m",
            [COLORS, "/elsewhere/colors.jsonl"],
            str(tmp_path / "o.json"),
            answerer=answerer,
        )


def test_config_rejects_unknown_fields_and_types() -> None:
    with pytest.raises(ValueError):
        EvalConfig(also_judge=["essay"])
    with pytest.raises(ValueError):
        EvalConfig(max_new_token=3)
    assert EvalConfig().judge.temperature == 0.0


# ---- with a real (tiny) LLaVA ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> str:
    from synthvlm.train.model import build_tiny_llava

    model, processor = build_tiny_llava()
    folder = tmp_path_factory.mktemp("tiny-llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_tiny_llava_on_the_bundled_benchmark(tiny_llava_dir: str, tmp_path: Path) -> None:
    out = evaluate(
        EvalConfig(device="cpu", max_new_tokens=3),
        tiny_llava_dir,
        [COLORS],
        str(tmp_path / "eval" / "tiny.json"),
        model_name="tiny",
    )
    doc = json.loads(Path(out).read_text())
    metrics = doc["benchmarks"]["colors"]["metrics"]
    assert set(metrics) == {"vqa", "multiple_choice", "yes_no", "keyword"}
    assert metrics["yes_no"]["n"] == 3.0 and 0.0 <= metrics["yes_no"]["accuracy"] <= 1.0
    outputs = [
        json.loads(line)["outputs"] for line in Path(predictions_uri(out, "colors")).read_text().splitlines()
    ]
    assert len(outputs) == 7 and all(isinstance(text, str) for row in outputs for text in row)


class _Metrics:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.logged[name] = value


def test_components(tiny_llava_dir: str, tmp_path: Path) -> None:
    from components.evaluate import compare_models, evaluate_model

    metrics, report = _Metrics(), SimpleNamespace(path=str(tmp_path / "report.html"))
    config_json = EvalConfig(device="cpu", max_new_tokens=2, limit=2).model_dump_json()
    out = evaluate_model.python_func(
        config_json=config_json,
        model=tiny_llava_dir,
        model_name="tiny",
        benchmarks=[COLORS],
        data_root=str(tmp_path / "run"),
        metrics=metrics,
        report=report,
    )
    assert published(out, str(tmp_path / "run" / "eval" / "tiny.json")) and is_done(out)
    assert metrics.logged["count_in"] == 2.0 and "colors.vqa.accuracy" in metrics.logged
    assert "<th>tiny</th>" in Path(report.path).read_text()

    cmp_report = SimpleNamespace(path=str(tmp_path / "cmp.html"))
    compare_models.python_func(results=[out, out], data_root=str(tmp_path / "run"), report=cmp_report)
    assert "<th>tiny (2)</th>" in Path(cmp_report.path).read_text()
