from __future__ import annotations

import open_clip
import pytest
import torch
from PIL import Image

from synthvlm.errors import ConfigError
from synthvlm.models.clip import TINY_CLIP, input_dtype, load_clip


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tiny_clip_loads_offline_in_eval_mode() -> None:
    model, preprocess, tokenizer = load_clip(TINY_CLIP, None, "cpu", torch.float32)

    assert TINY_CLIP in open_clip.list_models()
    assert not model.training
    pixels = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert pixels.shape == (3, 32, 32)
    tokens = tokenizer(["a red square"])
    assert tokens.shape == (1, 77)
    with torch.no_grad():
        assert model.encode_image(pixels[None]).shape == (1, 16)
        assert model.encode_text(tokens).shape == (1, 16)


def test_tiny_clip_tokenizer_is_open_clip_bpe() -> None:
    _, _, tokenizer = load_clip(TINY_CLIP, None, "cpu", torch.float32)
    texts = ["a photo of a cat", "two dogs on a sofa"]
    # open_clip.tokenize is the bundled BPE tokenizer of the OpenAI CLIP models.
    assert torch.equal(tokenizer(texts), open_clip.tokenize(texts))


def test_tiny_clip_weights_are_fixed_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _, _ = load_clip(TINY_CLIP, None, "cpu", torch.float32)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched

    second, _, _ = load_clip(TINY_CLIP, None, "cpu", torch.float32)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)


def test_tiny_clip_rejects_a_pretrained_tag() -> None:
    with pytest.raises(ConfigError, match="pretrained"):
        load_clip(TINY_CLIP, "openai", "cpu", torch.float32)


def test_low_precision_uses_matching_input_dtype() -> None:
    model, _, _ = load_clip(TINY_CLIP, None, "cpu", torch.bfloat16)
    assert input_dtype(model) == torch.bfloat16
    # open_clip's mixed precision keeps LayerNorms in float32.
    assert model.ln_final.weight.dtype == torch.float32


def test_unsupported_dtype_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not supported"):
        load_clip(TINY_CLIP, None, "cpu", torch.float64)
