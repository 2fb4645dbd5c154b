"""StableLLaVA stages: offline end to end (template backend, tiny SDXL, tiny CLIP), and the real LLMClient
against the loopback FakeLLMServer for the prompt and dialogue steps."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from pathlib import Path

import pytest

from synthvlm import stage
from synthvlm.errors import InputError
from synthvlm.llm import LLMRequest
from synthvlm.llm.backend import BackendConfig
from synthvlm.llm.fake_server import FakeLLMServer
from synthvlm.models.clip import TINY_CLIP
from synthvlm.models.sdxl import TINY_SDXL
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.stablellava import templates
from synthvlm.stablellava.dialogues import Dialogue, Turn
from synthvlm.stablellava.filters import DIALOGUE_TOO_LONG, NON_VISUAL, OVERLAPS_EVAL, TOO_MANY_KEYWORDS
from synthvlm.stages import stablellava as sl
from synthvlm.stages.clip_score import ScoreConfig, score
from synthvlm.stages.generate import GenerateConfig, generate
from synthvlm.stages.select import SelectConfig, select
from tests.published import published

TEMPLATE = BackendConfig(backend="template")

# The opening sentence of each request text -> the template generator that answers it (for the fake server,
# which sees only the text).
OPENINGS = {
    "As an AI visual assistant specializing in prompt design": templates.sd_prompt_reply,
    "As an AI visual assistant, your responsibility is to create one pair prompt": templates.pair_reply,
    "As an AI visual assistant specializing in caption generation": templates.caption_reply,
    "As an AI visual assistant, your task is to design a question-answer pair about": templates.qa_reply,
    "As an AI visual assistant, your task is to construct a conversation": templates.multi_turn_reply,
    "As an AI visual assistant, your responsibility is to create one caption": templates.multi_image_reply,
    "As an AI visual assistant, your task is to design question-answer pair based": templates.eval_reply,
    "As an AI visual assistant, your task is to list": templates.keywords_reply,
}


def template_reply(text: str) -> dict:
    for opening, generator in OPENINGS.items():
        if text.startswith(opening):
            return json.loads(generator(LLMRequest.from_prompt("fake", text)))
    raise AssertionError(f"unexpected request: {text[:80]}")


def bucket(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % n


def fake_llm(server: FakeLLMServer) -> BackendConfig:
    return BackendConfig(
        base_url=server.base_url,
        model="fake",
        api_key_env="SYNTHVLM_TEST_UNSET_KEY",
        max_retries=0,
        timeout_s=10,
    )


def small_prompts(**overrides) -> sl.PromptsConfig:
    settings = dict(
        abilities=["colour", "animal"],
        prompts_per_ability=3,
        eval_per_ability=1,
        pairs_per_relation=1,
        round_size=2,
        llm=TEMPLATE,
    )
    return sl.PromptsConfig(**{**settings, **overrides})


def keywords(root: Path, abilities=("colour", "animal")) -> str:
    config = sl.KeywordsConfig(
        abilities=list(abilities), requests_per_ability=2, keywords_per_request=8, llm=TEMPLATE
    )
    return sl.generate_keywords(config, str(root / "keywords.json"))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_template_end_to_end_from_keywords_to_exports(tmp_path: Path) -> None:
    root = tmp_path / "data"
    kw_uri = keywords(root)
    banks = json.loads(Path(kw_uri).read_text())["abilities"]
    assert set(banks) == {"colour", "animal"} and all(len(words) >= 8 for words in banks.values())

    prompts_uri = sl.generate_prompts(small_prompts(), kw_uri, str(root / "prompts.jsonl"))
    records = read_manifest(prompts_uri)
    kinds = Counter((r.provenance["kind"], r.provenance["split"]) for r in records)
    # 3 relations x 2 pair members; one interleaved dialogue (as many as pairs per relation) of 3 images
    assert kinds == {
        ("single", "train"): 6,
        ("single", "eval"): 2,
        ("pair", "train"): 6,
        ("interleaved", "train"): 3,
    }
    for rec in records:
        assert "(" not in rec.caption  # diffusers gets the plain prompt ...
        assert rec.provenance["raw_prompt"].startswith("((")  # ... the bracketed one stays in provenance
        assert rec.caption.startswith(rec.provenance["emphasized"][0])  # the emphasized keyword comes first
        assert rec.provenance["llm"] == {"backend": "template", "model": "template"}

    # Shared stages, unchanged: tiny SDXL, tiny CLIP, threshold select (gamma set so that some records fail).
    gen_config = GenerateConfig(model=TINY_SDXL, steps=2, height=64, width=64, batch_size=7, device="cpu")
    shard = generate(gen_config, prompts_uri, str(root))
    scored = score(
        ScoreConfig(model=TINY_CLIP, pretrained=None, device="cpu", batch_size=8),
        shard,
        str(root / "scores" / "shard.jsonl"),
    )
    gamma = statistics.median(r.scores["clip"] for r in read_manifest(scored))
    selected_uri = select(
        SelectConfig(mode="threshold", threshold=gamma), [scored], str(root / "selected.jsonl")
    )
    selected = {r.id for r in read_manifest(selected_uri)}
    assert 0 < len(selected) < len(records)

    dialogues_uri = sl.generate_dialogues(
        sl.DialoguesConfig(multi_turn_fraction=1.0, llm=TEMPLATE), prompts_uri, str(root / "dialogues.jsonl")
    )
    dialogues = sl.read_dialogues(dialogues_uri)
    assert Counter(d.kind for d in dialogues) == {
        "caption": 6,
        "qa": 6,
        "multi_turn": 6,
        "eval": 2,
        "multi_image": 3,
        "interleaved": 1,
    }
    assert all(d.provenance["llm"]["backend"] == "template" for d in dialogues)

    sft_uri = sl.export_stablellava(
        sl.StableLLaVAExportConfig(), selected_uri, dialogues_uri, str(root), str(root / "export")
    )
    sft = json.loads(Path(sft_uri).read_text())
    pretrain = json.loads((root / "export" / sl.PRETRAIN_JSON).read_text())
    evals = read_jsonl(root / "export" / sl.EVAL_JSONL)
    rejects = read_jsonl(root / "export" / sl.REJECTS_NAME)
    interleaved = json.loads((root / "export" / sl.INTERLEAVED_JSON).read_text())
    exported_ids = {s["id"] for s in [*interleaved, *pretrain, *evals]}
    by_id = {d.id: d for d in dialogues}
    for dialogue_id in exported_ids:
        assert set(by_id[dialogue_id].record_ids) <= selected  # only images that passed the CLIP check
    assert {r["id"] for r in rejects} == set(by_id) - exported_ids
    assert {r["reason"] for r in rejects} == {sl.NOT_SELECTED}
    for sample in [*sft, *pretrain, *interleaved]:
        images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
        assert all(
            not Path(p).is_absolute() and (root / p).is_file() for p in images
        )  # relative to data root
    for sample in sft:
        assert isinstance(sample["image"], str)  # LLaVA-1.5: one image per sample
        assert sample["conversations"][0]["value"].count("<image>") == 1
    for row in evals:  # synthvlm evaluate's format: absolute image paths, the metric as type
        assert Path(row["image"]).is_absolute() and Path(row["image"]).is_file()
        assert row["type"] in ("keyword", "yes_no", "multiple_choice") and ("answer" in row) != (
            "answers" in row
        )
    stats = stage.read_stats(sft_uri)
    assert stats["count_out"] == len(interleaved) + len(pretrain) + len(evals)
    assert stats["rejects"][sl.NOT_SELECTED] == len(rejects)

    # With every image selected, each dialogue is exported: multi-image samples carry 2 images and 2 tokens.
    keep_all = min(r.scores["clip"] for r in read_manifest(scored))
    all_uri = select(SelectConfig(mode="threshold", threshold=keep_all), [scored], str(root / "all.jsonl"))
    all_sft = sl.export_stablellava(
        sl.StableLLaVAExportConfig(), all_uri, dialogues_uri, str(root), str(root / "all")
    )
    assert not [s for s in json.loads(Path(all_sft).read_text()) if isinstance(s["image"], list)]
    every = json.loads((root / "all" / sl.INTERLEAVED_JSON).read_text())
    multi = [s for s in every if s["id"].endswith("multi_image")]
    assert len(multi) == 3
    for sample in multi:
        assert len(sample["image"]) == 2 and sample["conversations"][0]["value"].count("<image>") == 2
    assert len(read_jsonl(root / "all" / sl.EVAL_JSONL)) == 2


def test_stages_are_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stable = {name: str(tmp_path / name) for name in ("keywords.json", "prompts.jsonl", "d.jsonl")}
    kw_uri = keywords(tmp_path)
    prompts_config = small_prompts(pairs_per_relation=0)
    prompts_uri = sl.generate_prompts(prompts_config, kw_uri, stable["prompts.jsonl"])
    dialogues_uri = sl.generate_dialogues(sl.DialoguesConfig(llm=TEMPLATE), prompts_uri, stable["d.jsonl"])
    returned = {"keywords.json": kw_uri, "prompts.jsonl": prompts_uri, "d.jsonl": dialogues_uri}
    for name, uri in returned.items():
        assert published(uri, stable[name])
        assert Path(sl.rejects_uri(uri)).read_bytes() == Path(sl.rejects_uri(stable[name])).read_bytes()
    files = [*returned.values(), *stable.values()]
    before = {p: Path(p).read_bytes() for p in files}

    real_make_backend = sl.make_backend

    def no_llm(*args, **kwargs):
        raise AssertionError("a finished stage must not call the LLM again")

    monkeypatch.setattr(sl, "make_backend", no_llm)
    # The same settings (and the LLM's runtime settings, left out of the fingerprint): nothing is redone.
    assert keywords(tmp_path) == kw_uri
    patient = TEMPLATE.model_copy(update={"timeout_s": 99.0})
    same_prompts = prompts_config.model_copy(update={"llm": patient})
    assert sl.generate_prompts(same_prompts, kw_uri, stable["prompts.jsonl"]) == prompts_uri
    assert (
        sl.generate_dialogues(sl.DialoguesConfig(llm=TEMPLATE), prompts_uri, stable["d.jsonl"])
        == dialogues_uri
    )
    assert {p: Path(p).read_bytes() for p in before} == before

    # A changed setting is computed again, into a new version; the old version stays readable.
    with pytest.raises(AssertionError, match="must not call the LLM"):
        sl.generate_prompts(small_prompts(), kw_uri, stable["prompts.jsonl"])
    monkeypatch.setattr(sl, "make_backend", real_make_backend)
    with_pairs = sl.generate_prompts(small_prompts(), kw_uri, stable["prompts.jsonl"])
    assert with_pairs != prompts_uri and published(with_pairs, stable["prompts.jsonl"])
    kinds = Counter(r.provenance["kind"] for r in read_manifest(with_pairs))
    assert kinds["pair"] > 0 and "pair" not in {r.provenance["kind"] for r in read_manifest(prompts_uri)}
    assert Path(prompts_uri).read_bytes() == before[prompts_uri]


def test_prompts_are_deterministic_given_a_seed(tmp_path: Path) -> None:
    kw_uri = keywords(tmp_path)

    def run(name: str, seed: int) -> list[Record]:
        config = small_prompts(prompts_per_ability=8, seed=seed, replace_fraction=0.5, pool_size=6)
        return read_manifest(sl.generate_prompts(config, kw_uri, str(tmp_path / name / "prompts.jsonl")))

    first = run("a", 0)
    assert first == run("b", 0)
    assert [r.caption for r in first] != [r.caption for r in run("c", 1)]
    assert stage.read_stats(str(tmp_path / "a" / "prompts.jsonl"))["pool_changes"] > 0


def test_prompts_with_llm_client_against_fake_server(tmp_path: Path) -> None:
    """The real LLMClient over loopback HTTP; some replies break the filters and must land in the rejects."""

    def reply(text: str) -> dict:
        answer = template_reply(text)
        if "prompt" in answer and bucket(text, 4) == 0:
            answer["prompt"] += ", " + ", ".join(f"extra{i}" for i in range(10))  # > 10 keywords
        elif "prompt" in answer and bucket(text, 4) == 1:
            answer["prompt"] += ", the smell of rain"
        return answer

    kw_uri = keywords(tmp_path)
    with FakeLLMServer(json_reply=reply) as server:
        config = small_prompts(
            prompts_per_ability=6, eval_per_ability=0, pairs_per_relation=0, llm=fake_llm(server)
        )
        uri = sl.generate_prompts(config, kw_uri, str(tmp_path / "prompts.jsonl"))
        bodies = list(server.bodies)
    records = read_manifest(uri)
    assert Counter(r.provenance["ability"] for r in records) == {"colour": 6, "animal": 6}
    rejects = read_jsonl(sl.rejects_uri(uri))
    reasons = Counter(r["reason"] for r in rejects)
    assert reasons[TOO_MANY_KEYWORDS] >= 1 and reasons[NON_VISUAL] >= 1
    assert all(r["detail"] and r["text"] for r in rejects)
    stats = stage.read_stats(uri)
    assert stats["count_in"] == len(bodies) == len(records) + len(rejects)
    assert stats["llm_requests"] == len(bodies) and stats["llm"] == {"backend": "openai", "model": "fake"}
    assert all(body["response_format"]["type"] == "json_schema" for body in bodies)
    # In-context pool refresh (v2 §4.3): prompts accepted in round 0 are shown as examples later.
    round0 = {r.provenance["raw_prompt"] for r in records if r.provenance["round"] == 0}
    later = [b["messages"][-1]["content"] for b in bodies if "-r0000-" not in json.dumps(b)]
    assert round0 and any(f"Prompt: {p}" in text for p in round0 for text in later)


def test_prompts_stop_and_report_shortfall_when_every_reply_fails(tmp_path: Path) -> None:
    kw_uri = keywords(tmp_path)
    with FakeLLMServer(json_reply=lambda text: {"prompt": "growing, thinking"}) as server:
        config = small_prompts(
            abilities=["colour"], prompts_per_ability=2, eval_per_ability=0, pairs_per_relation=0
        )
        config = config.model_copy(update={"llm": fake_llm(server), "max_request_factor": 2.0})
        uri = sl.generate_prompts(config, kw_uri, str(tmp_path / "prompts.jsonl"))
        assert server.total_requests == 4  # 2x the target, then it gives up
    assert read_manifest(uri) == []
    assert stage.read_stats(uri)["short_colour"] == 2


def test_dialogues_with_llm_client_reject_long_answers(tmp_path: Path) -> None:
    def reply(text: str) -> dict:
        answer = template_reply(text)
        if "answer" in answer and bucket(text, 2) == 0:
            answer["answer"] = "x" * 501
        return answer

    kw_uri = keywords(tmp_path)
    prompts_uri = sl.generate_prompts(small_prompts(pairs_per_relation=0), kw_uri, str(tmp_path / "p.jsonl"))
    with FakeLLMServer(json_reply=reply) as server:
        uri = sl.generate_dialogues(
            sl.DialoguesConfig(multi_turn_fraction=0.0, llm=fake_llm(server)),
            prompts_uri,
            str(tmp_path / "d.jsonl"),
        )
    dialogues = sl.read_dialogues(uri)
    rejects = read_jsonl(sl.rejects_uri(uri))
    assert rejects and {r["reason"] for r in rejects} == {DIALOGUE_TOO_LONG}  # v2 §4.4, per dialogue
    assert all(sum(len(t.question) + len(t.answer) for t in d.turns) <= 500 for d in dialogues)
    assert len(dialogues) + len(rejects) == 6 * 2 + 2  # caption + qa per train image, one eval item each


def _record(record_id: str, raw: str, split: str, root: Path) -> Record:
    image = root / "images" / f"{record_id}.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"jpeg")
    return Record(
        id=record_id,
        caption=raw.replace("(", "").replace(")", ""),
        image_uri=str(image),
        scores={"clip": 0.3},
        provenance={"ability": "colour", "raw_prompt": raw, "kind": "single", "split": split},
    )


def _dialogue(record_id: str, kind: str) -> Dialogue:
    turn = Turn(question="What colour is the bicycle?", answer="Teal.")
    extra = {"answer_keywords": ["teal"], "question_type": "wh"} if kind == "eval" else {}
    return Dialogue(
        id=f"{record_id}-{kind}", kind=kind, record_ids=[record_id], ability="colour", turns=[turn], **extra
    )


def test_export_drops_training_items_that_match_eval_items(tmp_path: Path) -> None:
    raw = "((teal bicycle)), brick wall, soft light, 8k"
    records = [
        _record("e0", raw, "eval", tmp_path),
        _record("t-copy", "((teal bicycle)), 8k, brick wall, soft light", "train", tmp_path),
        _record("t-other", "((coral kettle)), kitchen, soft light, 8k", "train", tmp_path),
    ]
    write_manifest(str(tmp_path / "selected.jsonl"), records)
    dialogues = [
        _dialogue("e0", "eval"),
        _dialogue("t-copy", "qa"),
        _dialogue("t-copy", "caption"),
        _dialogue("t-other", "qa"),
    ]
    (tmp_path / "d.jsonl").write_text("".join(d.model_dump_json() + "\n" for d in dialogues))
    out = tmp_path / "export"
    sft_uri = sl.export_stablellava(
        sl.StableLLaVAExportConfig(),
        str(tmp_path / "selected.jsonl"),
        str(tmp_path / "d.jsonl"),
        str(tmp_path),
        str(out),
    )
    assert [s["id"] for s in json.loads(Path(sft_uri).read_text())] == ["t-other-qa"]
    assert json.loads((out / sl.PRETRAIN_JSON).read_text()) == []
    assert [r["id"] for r in read_jsonl(out / sl.EVAL_JSONL)] == ["e0-eval"]  # the eval set stays whole
    rejects = read_jsonl(out / sl.REJECTS_NAME)
    assert {(r["id"], r["reason"]) for r in rejects} == {
        ("t-copy-qa", OVERLAPS_EVAL),
        ("t-copy-caption", OVERLAPS_EVAL),
    }
    assert "e0" in rejects[0]["detail"]
    assert [r.id for r in read_manifest(str(out / sl.MANIFEST_NAME))] == ["t-other", "e0"]


def test_export_needs_images_under_the_data_root(tmp_path: Path) -> None:
    record = _record("c0", "((teal bicycle)), wall", "train", tmp_path)
    write_manifest(
        str(tmp_path / "selected.jsonl"), [record.model_copy(update={"image_uri": "/elsewhere/c0.jpg"})]
    )
    (tmp_path / "d.jsonl").write_text(_dialogue("c0", "qa").model_dump_json() + "\n")
    with pytest.raises(InputError, match="data_root") as err:
        sl.export_stablellava(
            sl.StableLLaVAExportConfig(),
            str(tmp_path / "selected.jsonl"),
            str(tmp_path / "d.jsonl"),
            str(tmp_path),
            str(tmp_path / "x"),
        )
    assert err.value.field == "image_uri"


def test_bad_inputs_name_the_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown abilities"):
        sl.generate_keywords(
            sl.KeywordsConfig(abilities=["colour", "sound"], llm=TEMPLATE), str(tmp_path / "k.json")
        )
    kw_uri = keywords(tmp_path, abilities=("colour",))
    with pytest.raises(InputError) as err:
        sl.generate_prompts(small_prompts(), kw_uri, str(tmp_path / "p.jsonl"))
    assert err.value.field == "abilities.animal"
    (tmp_path / "d.jsonl").write_text('{"id": "x", "kind": "qa"}\n')
    with pytest.raises(InputError) as err:
        sl.read_dialogues(str(tmp_path / "d.jsonl"))
    assert err.value.line == 1 and err.value.field == "record_ids"


def test_emphasis_switch_decides_the_weighted_prompt(tmp_path: Path) -> None:
    kw_uri = keywords(tmp_path)
    weighted = read_manifest(sl.generate_prompts(small_prompts(), kw_uri, str(tmp_path / "w.jsonl")))
    stripped = read_manifest(
        sl.generate_prompts(small_prompts(emphasis="strip"), kw_uri, str(tmp_path / "s.jsonl"))
    )
    for rec in weighted:  # v2 §4.1: ((x)) is emphasis, weight 1.1^2 in compel's syntax
        assert rec.provenance["weighted_prompt"].startswith(f"({rec.provenance['emphasized'][0]})1.21")
    assert all("weighted_prompt" not in rec.provenance for rec in stripped)
    assert [r.caption for r in weighted] == [r.caption for r in stripped]  # the plain prompt either way
