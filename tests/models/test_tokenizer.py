from __future__ import annotations

import open_clip
import pytest
from transformers import CLIPTokenizer

from synthvlm.models.tokenizer import CONTEXT_LENGTH, offline_clip_tokenizer_dir

SENTENCES = [
    "A photo of a cat sitting on a red sofa.",
    "Two   dogs; running!! 123 über CAFÉ",
    "it's the USA's best-known landmark, isn't it? <3",
]


@pytest.fixture(scope="module")
def hf_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(offline_clip_tokenizer_dir())


@pytest.mark.parametrize("text", SENTENCES)
def test_ids_equal_open_clip(hf_tokenizer: CLIPTokenizer, text: str) -> None:
    expected = open_clip.tokenize([text], context_length=CONTEXT_LENGTH)[0]
    expected = expected[expected != 0].tolist()  # open_clip pads with 0
    assert hf_tokenizer(text).input_ids == expected
    assert len(expected) > 5


def test_special_tokens_and_padding(hf_tokenizer: CLIPTokenizer) -> None:
    assert len(hf_tokenizer) == 49408
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (49406, 49407)
    assert hf_tokenizer.model_max_length == CONTEXT_LENGTH
    ids = hf_tokenizer("a cat", padding="max_length", truncation=True, max_length=CONTEXT_LENGTH).input_ids
    assert len(ids) == CONTEXT_LENGTH


def test_folder_is_cached_and_rebuilt_when_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHVLM_CACHE_DIR", str(tmp_path))
    offline_clip_tokenizer_dir.cache_clear()
    try:
        first = offline_clip_tokenizer_dir()
        assert first.startswith(str(tmp_path))
        offline_clip_tokenizer_dir.cache_clear()
        assert offline_clip_tokenizer_dir() == first  # same content hash, same folder
        assert sorted(p.name for p in tmp_path.iterdir()) == [first.rsplit("/", 1)[1]]  # no staging left
        assert CLIPTokenizer.from_pretrained(first)("a cat").input_ids == [49406, 320, 2368, 49407]
    finally:
        offline_clip_tokenizer_dir.cache_clear()
