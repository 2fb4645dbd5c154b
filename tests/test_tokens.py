from __future__ import annotations

import pytest

from synthvlm.tokens import chunk_text, dropped, dropped_token_counts, hf_dropped, open_clip_counter


def word_counter(text: str) -> int:
    return len(text.split())


def test_a_text_that_fits_is_one_chunk_as_is() -> None:
    text = "A red car.  On a bridge."
    assert chunk_text(text, word_counter, 10) == [text]


def test_sentences_are_packed_and_long_sentences_split_between_words() -> None:
    text = "one two three. four five six. " + " ".join(f"w{i}" for i in range(9)) + "."
    chunks = chunk_text(text, word_counter, 6)
    assert chunks == ["one two three. four five six.", "w0 w1 w2 w3 w4 w5", "w6 w7 w8."]
    assert all(word_counter(chunk) <= 6 for chunk in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost, nothing reordered


def test_a_word_longer_than_the_limit_is_its_own_chunk_and_counted_as_dropped() -> None:
    chars = len  # one "token" per character
    chunks = chunk_text("ab " + "x" * 12 + " cd", chars, 5)
    assert chunks == ["ab", "x" * 12, "cd"]
    assert [dropped(chars, 5, c) for c in chunks] == [0, 7, 0]


def test_open_clip_and_sdxl_tokenizers_count_the_same_caption_alike() -> None:
    import open_clip
    from transformers import CLIPTokenizer

    from synthvlm.models.tokenizer import offline_clip_tokenizer_dir

    caption = " ".join(["cat"] * 80)  # 80 one-token words
    count, limit = open_clip_counter(open_clip.get_tokenizer("ViT-B-32"))
    assert (count(caption), limit, dropped(count, limit, caption)) == (80, 75, 5)
    sdxl_tokenizer = CLIPTokenizer.from_pretrained(offline_clip_tokenizer_dir())
    assert hf_dropped(sdxl_tokenizer, [caption, "a cat"]) == [5, 0]  # 80 + start + end - 77


def test_dropped_token_counts_per_encoder() -> None:
    provenances = [
        {
            "generation": {"dropped_tokens": {"text_encoder": 3, "text_encoder_2": 3}},
            "clip_scorer": {"dropped_tokens": 2},
        },
        {
            "generation": {"dropped_tokens": {"text_encoder": 0, "text_encoder_2": 0}},
            "clip_scorer": {"dropped_tokens": 0},
        },
        {"generation": {"steps": 60}, "raw_clip_scorer": {"model": "x"}},  # made before the counts existed
    ]
    assert dropped_token_counts(provenances) == {"text_encoder": 1, "text_encoder_2": 1, "clip_scorer": 1}


@pytest.mark.parametrize("limit", [0, -1])
def test_open_clip_counter_needs_a_context(limit: int) -> None:
    class NoContext:
        context_length = limit

    with pytest.raises(ValueError, match="context_length"):
        open_clip_counter(NoContext())
