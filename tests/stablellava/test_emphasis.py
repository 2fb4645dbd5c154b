from __future__ import annotations

import pytest

from synthvlm.stablellava.emphasis import (
    compel_fragment,
    contains_phrase,
    emphasis_level,
    keyword_text,
    keyword_weight,
    parse_prompt,
    plain_prompt,
    split_keywords,
    weighted_embeddings,
)


def test_split_keeps_commas_inside_brackets() -> None:
    assert split_keywords("((red, blue car)), street ,, 8k ") == ["((red, blue car))", "street", "8k"]


def test_emphasis_level_counts_wrapping_pairs_only() -> None:
    assert emphasis_level("car") == 0
    assert emphasis_level("(car)") == 1
    assert emphasis_level("(( red panda ))") == 2
    assert emphasis_level("((car:1.3))") == 2
    assert emphasis_level("(a) and (b)") == 0  # brackets that do not wrap the whole keyword


def test_keyword_text_drops_brackets_and_weights() -> None:
    assert keyword_text("((Red  panda:1.2))") == "Red panda"
    assert keyword_text("[blurry]") == "blurry"


def test_plain_prompt_is_what_diffusers_gets() -> None:
    raw = "((crimson umbrella)), wet street, (evening:1.1), [soft light]"
    assert plain_prompt(raw) == "crimson umbrella, wet street, evening, soft light"
    assert "(" not in plain_prompt(raw) and "[" not in plain_prompt(raw)


def test_parsed_prompt_keeps_emphasis_and_key_subject() -> None:
    parsed = parse_prompt("((Crimson Umbrella)), Wet street, ((rain))")
    assert parsed.emphasized == ("Crimson Umbrella", "rain")
    assert parsed.subject == "crimson umbrella"
    assert parsed.keyword_set == frozenset({"crimson umbrella", "wet street", "rain"})


def test_contains_phrase_matches_whole_words() -> None:
    assert contains_phrase("a Red car", "red")
    assert not contains_phrase("a bored cat", "red")
    assert contains_phrase("double-decker bus, street", "double-decker bus")
    assert not contains_phrase("anything", "")


def test_keyword_weights_follow_a1111() -> None:
    assert keyword_weight("car") == 1.0
    assert keyword_weight("(car)") == 1.1
    assert keyword_weight("((crimson umbrella))") == 1.21
    assert keyword_weight("[blurry]") == round(1 / 1.1, 4)
    assert keyword_weight("(car:1.3)") == 1.3
    assert keyword_weight("((car:1.3))") == 1.43
    assert keyword_weight("(a) and (b)") == 1.0


def test_weighted_prompt_is_compel_syntax() -> None:
    parsed = parse_prompt("((crimson umbrella)), wet street, (evening:1.5), [blurry], t-shirt+")
    assert parsed.weighted == "(crimson umbrella)1.21, wet street, (evening)1.5, (blurry)0.9091, t-shirt"
    assert (
        parsed.for_model("strip") == parsed.plain == "crimson umbrella, wet street, evening, blurry, t-shirt+"
    )
    assert parsed.for_model("weight") == parsed.weighted
    assert compel_fragment('say "hi" now-', 1.0) == "say hi now"  # compel syntax characters dropped


@pytest.mark.slow
def test_weighted_embeddings_differ_from_stripped_ones() -> None:
    pytest.importorskip("compel")
    import torch

    from synthvlm.models.sdxl import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    parsed = parse_prompt("((crimson umbrella)), wet street, evening")
    weighted = weighted_embeddings(pipe, [parsed.for_model("weight")])
    stripped = weighted_embeddings(pipe, [parsed.for_model("strip")])
    assert weighted["prompt_embeds"].shape == stripped["prompt_embeds"].shape
    assert not torch.allclose(weighted["prompt_embeds"], stripped["prompt_embeds"])
    # Weight 1 everywhere is the plain prompt: compel then gives the pipeline's own embeddings.
    own = pipe.encode_prompt(parsed.plain, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(stripped["prompt_embeds"], own[0], atol=1e-5)
    assert torch.allclose(stripped["pooled_prompt_embeds"], own[2], atol=1e-5)
    assert "negative_prompt_embeds" not in stripped  # SDXL keeps its zeroed negative conditioning
    image = pipe(**weighted, num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
