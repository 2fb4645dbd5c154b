"""The caption curation stage: every step, the rejects manifest, stats, sampling, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from synthvlm.errors import SynthVLMError
from synthvlm.llm.fake_server import FakeLLMServer
from synthvlm.models.clip import TINY_CLIP, load_clip
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.scoring import clip_scores
from synthvlm.stage import done_uri, is_done, read_stats
from synthvlm.stages import curate as curate_module
from synthvlm.stages.curate import (
    JUDGE_PROMPT,
    CurateConfig,
    JudgeConfig,
    curate,
    parse_judge_answer,
    sample_key,
    template_caption_verdict,
)
from tests.published import published

KEY_ENV = "SYNTHVLM_TEST_CURATE_KEY"

GOOD = {
    "g1": "A red bicycle leaning against a white brick wall on a sunny afternoon.",
    "g2": "Two golden retrievers playing with a blue ball on a green lawn.",
    "g3": "A lighthouse on a rocky cliff at dusk, waves crashing below.",
    "g4": "A small boat on a calm lake at dawn.",
}
BAD = {  # id -> (caption, step, reason)
    "h1": ("Photograph of mountains", "heuristics", "special_char_ratio_low"),
    "h2": ("A nude model posing on a sofa in a bright studio.", "heuristics", "flagged_words"),
    "h3": ("dog dog dog dog dog dog dog dog.", "heuristics", "char_repetition_high"),
    "d1": (
        "a red bicycle leaning against a white brick wall on a sunny afternoon",
        "dedup",
        "exact_duplicate",
    ),
    "d2": ("A lighthouse on a rocky cliff at dusk, waves crashing below it.", "dedup", "near_duplicate"),
    "j1": ("Buy this lovely red dress on sale today, free shipping.", "judge", "answered_no"),
    "j2": ("A red car.", "judge", "answered_no"),  # passes the heuristics; too short for the template judge
}


def template_config(**overrides) -> CurateConfig:
    data = {"judge": {"llm": {"backend": "template"}}, "sample_size": None, **overrides}
    return CurateConfig.model_validate(data)


def write_input(path: Path, captions: dict[str, str], **fields) -> str:
    records = [Record(id=rid, caption=caption, **fields.get(rid, {})) for rid, caption in captions.items()]
    write_manifest(str(path), records)
    return str(path)


def rejects_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return {name: tmp_path / f"{name}.jsonl" for name in ("input", "output", "rejects")}


def run(config: CurateConfig, paths: dict[str, Path]) -> str:
    return curate(config, str(paths["input"]), str(paths["output"]), str(paths["rejects"]))


# ---- the judge's pieces ------------------------------------------------------------------------------


def test_judge_answers_are_parsed_from_the_first_word() -> None:
    assert [parse_judge_answer(t) for t in ("Yes", "yes.", " **YES** it is", "No", "no, too short")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert [parse_judge_answer(t) for t in ("Maybe", "Yesterday", "", None, "I think yes")] == [None] * 5


def test_template_verdict_rule() -> None:
    assert template_caption_verdict("A small boat on a calm lake at dawn.")
    assert not template_caption_verdict("Red car.")  # fewer than 5 words
    assert not template_caption_verdict("cat cat cat cat dog dog")  # fewer than half distinct
    assert not template_caption_verdict("Buy this lovely red dress on sale today, free shipping.")
    assert not template_caption_verdict("A lovely red dress, see www.example.com for details")


def test_judge_prompt_must_hold_the_caption() -> None:
    assert "{caption}" in JUDGE_PROMPT and "Answer Yes or No" in JUDGE_PROMPT
    with pytest.raises(ValidationError, match="caption"):
        JudgeConfig(prompt="Is this good?")
    with pytest.raises(ValidationError, match="format string"):
        JudgeConfig(prompt="Rate {caption} from {low}")
    # A partial llm section keeps the judge's own defaults (greedy, a few tokens).
    config = CurateConfig.model_validate({"judge": {"llm": {"backend": "template", "model": "x"}}})
    assert config.judge.llm.temperature == 0.0 and config.judge.llm.max_tokens == 8
    assert CurateConfig.model_validate_json(config.model_dump_json()) == config
    partial_clip = CurateConfig.model_validate({"clip": {"score": {"model": TINY_CLIP, "pretrained": None}}})
    assert partial_clip.clip.score.score_key == "raw_clip"  # never the generated-image key "clip"


def test_paper_defaults() -> None:
    config = CurateConfig()
    assert config.clip.mode == "top_fraction" and config.clip.top_fraction == 0.4
    assert config.clip.threshold == 0.28 and config.clip.score.score_key == "raw_clip"
    assert config.sample_size == 1_000_000
    assert config.judge.enabled and config.judge.llm.backend == "openai"


# ---- the whole stage with the template backend ------------------------------------------------------------


def test_each_step_drops_its_captions_with_reasons(paths) -> None:
    captions = {**GOOD, **{rid: caption for rid, (caption, _, _) in BAD.items()}}
    write_input(paths["input"], captions)

    out = run(template_config(), paths)

    kept = read_manifest(out)
    assert [r.id for r in kept] == list(GOOD)  # input order
    assert all(r.provenance["caption_judge"] == {"backend": "template", "model": "template"} for r in kept)
    rows = rejects_of(paths["rejects"])
    assert {row["id"]: (row["stage"], row["reason"]) for row in rows} == {
        rid: (step, reason) for rid, (_, step, reason) in BAD.items()
    }
    assert all(row["caption"] == captions[row["id"]] for row in rows)
    by_id = {row["id"]: row["details"] for row in rows}
    assert by_id["h1"]["special_char_ratio"] == pytest.approx(2 / 23)
    assert by_id["h2"]["flagged"] == ["nude"] and by_id["h2"]["failed"] == ["flagged_words"]
    assert by_id["d1"] == {"duplicate_of": "g1", "jaccard": 1.0}
    assert by_id["d2"]["duplicate_of"] == "g3" and 0.8 <= by_id["d2"]["jaccard"] < 1
    assert by_id["j1"]["answer"] == "No" and by_id["j1"]["backend"] == "template"

    stats = read_stats(out)
    assert stats["count_in"] == 11 and stats["count_out"] == 4 and stats["kept_fraction"] == 4 / 11
    assert stats["rejects"] == {
        "heuristics.special_char_ratio_low": 1,
        "heuristics.flagged_words": 1,
        "heuristics.char_repetition_high": 1,
        "dedup.exact_duplicate": 1,
        "dedup.near_duplicate": 1,
        "judge.answered_no": 2,
    }
    assert stats["steps"]["heuristics"] == {"in": 11, "out": 8, "rejected": 3}
    # the per-caption steps first (judge), then the steps that compare captions (dedup)
    assert stats["steps"]["judge"] == {"in": 8, "out": 6, "rejected": 2}
    assert stats["steps"]["dedup"] == {"in": 6, "out": 4, "rejected": 2}
    assert (
        stats["llm_backend"] == "template" and stats["llm_items"] == 8 and stats["llm_template_backend"] == 1
    )
    # The rejects are written beside the versioned output and published beside the stable one.
    versioned_rejects = Path(out).parent / paths["rejects"].name
    assert stats["rejects_manifest"] == str(versioned_rejects)
    assert versioned_rejects.read_bytes() == paths["rejects"].read_bytes()
    assert published(out, str(paths["output"]))


def test_steps_can_be_switched_off(paths) -> None:
    write_input(paths["input"], {**GOOD, "h1": BAD["h1"][0], "d1": BAD["d1"][0]})
    config = template_config(
        heuristics={"enabled": False}, dedup={"exact": False, "near": False}, judge={"enabled": False}
    )
    out = run(config, paths)
    assert len(read_manifest(out)) == 6 and paths["rejects"].read_text() == ""
    assert "llm_backend" not in read_stats(out)


def test_rerun_returns_the_finished_output_without_redoing_work(
    paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_input(paths["input"], {**GOOD, "h1": BAD["h1"][0]})
    out = run(template_config(), paths)
    assert published(out, str(paths["output"]))
    files = (paths["output"], paths["rejects"], Path(done_uri(out)), Path(out))
    before = {p: p.read_bytes() for p in files}

    def fail(*args, **kwargs):
        raise AssertionError("a finished output must not be recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(curate_module, "read_manifest", fail)  # a rerun that did the work again would fail
        # The same output-affecting settings (the judge's chunk size only batches requests): skipped.
        assert run(template_config(judge={"llm": {"backend": "template"}, "chunk_size": 1}), paths) == out

    assert {p: p.read_bytes() for p in before} == before

    # A changed setting is computed into a new version and published; the old version stays readable.
    second = run(template_config(sample_size=1), paths)
    assert second != out and published(second, str(paths["output"]))
    assert len(read_manifest(second)) == 1 and len(read_manifest(out)) == 4
    assert {p: p.read_bytes() for p in (Path(done_uri(out)), Path(out))} == {
        p: before[p] for p in (Path(done_uri(out)), Path(out))
    }
    assert {row["reason"] for row in rejects_of(paths["rejects"])} == {
        "special_char_ratio_low",
        "not_sampled",
    }


def test_sample_is_deterministic_and_independent_of_input_order(tmp_path: Path) -> None:
    captions = {
        f"cap-{i:02d}": f"A photo of a {word} on a wooden table near the window."
        for i, word in enumerate(
            ["cat", "dog", "cup", "lamp", "book", "plate", "vase", "clock", "phone", "apple"]
        )
    }
    config = template_config(sample_size=4, dedup={"near": False})

    def sampled(order: list[str], name: str, seed: int = 0) -> list[str]:
        source = write_input(tmp_path / f"{name}-in.jsonl", {rid: captions[rid] for rid in order})
        out = curate(
            config.model_copy(update={"sample_seed": seed}),
            source,
            str(tmp_path / f"{name}-out.jsonl"),
            str(tmp_path / f"{name}-rejects.jsonl"),
        )
        return [r.id for r in read_manifest(out)]

    ids = list(captions)
    first = sampled(ids, "a")
    assert first == sorted(sorted(ids, key=lambda rid: sample_key(rid, 0))[:4])  # kept in input order
    assert sampled(ids, "b") == first
    assert sorted(sampled(ids[::-1], "c")) == sorted(first)
    assert sampled(ids, "d", seed=1) != first
    rows = rejects_of(tmp_path / "a-rejects.jsonl")
    assert {row["id"] for row in rows} == set(ids) - set(first)
    assert {(row["stage"], row["reason"]) for row in rows} == {("sample", "not_sampled")}


# ---- the judge through the real client and a loopback server ---------------------------------------------


def judge_reply(prompt: str) -> str:
    caption = prompt.rsplit("Caption:", 1)[-1]
    return "Yes." if "golden" in caption or "lighthouse" in caption else "No"


def openai_config(server: FakeLLMServer, **judge) -> CurateConfig:
    llm = {"base_url": server.base_url, "model": "judge-model", "api_key_env": KEY_ENV, "max_retries": 0}
    return CurateConfig.model_validate(
        {"judge": {"llm": {**llm, **judge.pop("llm", {})}, **judge}, "sample_size": None}
    )


def test_judge_through_llm_client_and_fake_server(paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-curate-test")
    write_input(paths["input"], {**GOOD, "h1": BAD["h1"][0]})
    with FakeLLMServer(text_reply=judge_reply, api_key="sk-curate-test") as server:
        out = run(openai_config(server), paths)
        bodies = list(server.bodies)

    assert [r.id for r in read_manifest(out)] == ["g2", "g3"]
    assert all(
        r.provenance["caption_judge"] == {"backend": "openai", "model": "judge-model"}
        for r in read_manifest(out)
    )
    assert len(bodies) == 4  # the heuristics removed h1 before the judge
    assert all(
        b["temperature"] == 0.0 and b["max_tokens"] == 8 and b["model"] == "judge-model" for b in bodies
    )
    sent = sorted(json.dumps(b["messages"]) for b in bodies)  # arrival order varies (concurrent requests)
    expected = [[{"role": "user", "content": JUDGE_PROMPT.format(caption=c)}] for c in GOOD.values()]
    assert sent == sorted(json.dumps(m) for m in expected)
    rows = {row["id"]: row for row in rejects_of(paths["rejects"])}
    assert {rid: (row["stage"], row["reason"]) for rid, row in rows.items()} == {
        "h1": ("heuristics", "special_char_ratio_low"),
        "g1": ("judge", "answered_no"),
        "g4": ("judge", "answered_no"),
    }
    assert rows["g1"]["details"] == {"answer": "No", "backend": "openai", "model": "judge-model"}
    stats = read_stats(out)
    assert stats["llm_backend"] == "openai" and stats["llm_requests"] == 4 and stats["llm_produced"] == 4


def test_unclear_answers_and_failed_requests_are_rejected(paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk")
    write_input(paths["input"], GOOD)
    prompts = {rid: JUDGE_PROMPT.format(caption=caption) for rid, caption in GOOD.items()}
    with FakeLLMServer(text_reply=lambda p: "Maybe" if "boat" in p else judge_reply(p)) as server:
        server.script(prompts["g1"], "500")
        out = run(openai_config(server, max_failed_fraction=0.25), paths)

    rows = {row["id"]: row for row in rejects_of(paths["rejects"])}
    assert rows["g1"]["reason"] == "llm_failed" and rows["g1"]["details"]["reject_kind"] == "api_error"
    assert rows["g4"]["reason"] == "unclear_answer" and rows["g4"]["details"]["answer"] == "Maybe"
    assert [r.id for r in read_manifest(out)] == ["g2", "g3"]
    assert read_stats(out)["rejects"] == {"judge.llm_failed": 1, "judge.unclear_answer": 1}


def test_too_many_failed_requests_fail_the_stage_and_a_rerun_asks_only_those(
    paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk")
    write_input(paths["input"], GOOD)
    prompts = {rid: JUDGE_PROMPT.format(caption=caption) for rid, caption in GOOD.items()}
    with FakeLLMServer(text_reply=judge_reply) as server:
        server.script(prompts["g1"], "500")
        server.script(prompts["g2"], "500")
        config = openai_config(server, llm={"cache_dir": str(tmp_path / "cache")}, max_failed_fraction=0.25)
        with pytest.raises(SynthVLMError, match="judge failed for 2 of 4"):
            run(config, paths)
        assert not is_done(str(paths["output"])) and not paths["output"].exists()

        out = run(config, paths)  # the server answers now; the two answered captions come from the cache

        assert server.requests_by_prompt == {
            prompts["g1"]: 2,
            prompts["g2"]: 2,
            prompts["g3"]: 1,
            prompts["g4"]: 1,
        }
    assert [r.id for r in read_manifest(out)] == ["g2", "g3"]
    assert read_stats(out)["llm_cache_hits"] == 2


# ---- CLIPScore against the raw web image -----------------------------------------------------------------


def noise_png(path: Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def clip_case(tmp_path: Path) -> tuple[dict[str, str], dict[str, dict], dict[str, float]]:
    """Five captions with images, one whose image is missing, one without an image; expected scores."""
    captions = {
        f"i{k}": caption
        for k, caption in enumerate(
            list(GOOD.values())
            + [
                "A chef in a white uniform slicing vegetables in a busy kitchen.",
                "A vintage green armchair next to a floor lamp in a cozy living room.",
                "A field of sunflowers under a clear blue sky with a single oak tree.",
            ]
        )
    }
    fields = {
        rid: {"image_uri": noise_png(tmp_path / f"{rid}.png", k)} for k, rid in enumerate(list(captions)[:5])
    }
    fields["i5"] = {"image_uri": str(tmp_path / "missing.png")}
    model, preprocess, tokenizer = load_clip(TINY_CLIP, None, "cpu", torch.float32)
    images = [Image.open(fields[rid]["image_uri"]) for rid in list(captions)[:5]]
    values = clip_scores(model, preprocess, tokenizer, images, [captions[rid] for rid in list(captions)[:5]])
    return captions, fields, dict(zip(list(captions)[:5], values, strict=True))


def clip_config(**clip) -> CurateConfig:
    score = {"model": TINY_CLIP, "pretrained": None, "device": "cpu", "batch_size": 2, "read_workers": 2}
    return template_config(judge={"enabled": False}, clip={"score": score, **clip})


def test_raw_image_clipscore_keeps_the_top_40_percent(tmp_path: Path, paths) -> None:
    captions, fields, expected = clip_case(tmp_path)
    write_input(paths["input"], captions, **fields)

    out = run(clip_config(), paths)

    top_two = sorted(expected, key=lambda rid: (-expected[rid], rid))[:2]  # ceil(0.4 * 5) = 2
    kept = read_manifest(out)
    assert [r.id for r in kept] == sorted(top_two) + ["i6"]  # i6 has no image: passes unscored
    for record in kept[:2]:
        assert record.scores["raw_clip"] == pytest.approx(expected[record.id], abs=1e-5)
        assert record.provenance["raw_clip_scorer"]["model"] == TINY_CLIP
    assert "raw_clip" not in kept[2].scores
    # The curated set is captions only; the raw image is remembered in the provenance.
    assert [r.image_uri for r in kept] == [None] * 3
    assert kept[0].provenance["raw_image_uri"] == fields[kept[0].id]["image_uri"]
    rows = {row["id"]: row for row in rejects_of(paths["rejects"])}
    assert rows["i5"]["stage"] == "clip" and rows["i5"]["reason"] == "image_missing"
    dropped = set(expected) - set(top_two)
    assert {rid for rid, row in rows.items() if row["reason"] == "not_in_top_fraction"} == dropped
    for rid in dropped:
        assert rows[rid]["details"]["raw_clip"] == pytest.approx(expected[rid], abs=1e-5)
    stats = read_stats(out)
    assert stats["steps"]["clip"] == {"in": 7, "out": 6, "rejected": 1}  # the missing image
    assert stats["steps"]["clip_rank"] == {"in": 6, "out": 3, "rejected": 3}
    assert stats["clip_records_without_image"] == 1


def test_raw_image_clipscore_threshold(tmp_path: Path, paths) -> None:
    captions, fields, expected = clip_case(tmp_path)
    write_input(paths["input"], captions, **fields)
    threshold = float(np.median(list(expected.values())))  # the middle one is kept (>=)

    out = run(clip_config(mode="threshold", threshold=threshold), paths)

    above = {rid for rid, value in expected.items() if value >= threshold}
    assert len(above) == 3
    assert {r.id for r in read_manifest(out)} == above | {"i6"}
    reasons = {row["id"]: row["reason"] for row in rejects_of(paths["rejects"])}
    assert reasons == {**{rid: "below_threshold" for rid in set(expected) - above}, "i5": "image_missing"}


def test_paper_preset_curates_with_every_filter_of_the_recipe() -> None:
    from synthvlm.run_config import EndToEndRunConfig, SynthVLMRunConfig, preset

    config = SynthVLMRunConfig.model_validate({**preset("paper"), "data_root": "/d"})
    assert config.curate_captions  # SynthVLM §3.1 curates before generating
    curate_config = config.curate
    assert curate_config.heuristics.enabled and curate_config.dedup.exact and curate_config.dedup.near
    assert curate_config.judge.enabled and curate_config.judge.llm.backend == "openai"
    assert curate_config.clip.enabled and curate_config.clip.mode == "top_fraction"
    assert curate_config.clip.top_fraction == 0.4
    assert curate_config.perplexity.enabled and curate_config.perplexity.max_perplexity == 5500
    assert curate_config.itm.enabled and curate_config.itm.min_score == 0.8
    e2e = EndToEndRunConfig.model_validate(
        {**preset("paper", "end-to-end"), "data_root": "/d", "sft_datasets": '["x.json"]'}
    )
    assert e2e.curate_captions and e2e.curate.perplexity.enabled
    # the plain defaults (what the compiled pipelines carry) need no LLM endpoint nor filter models
    assert not SynthVLMRunConfig().curate_captions
