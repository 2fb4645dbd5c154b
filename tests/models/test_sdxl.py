from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from synthvlm.models.sdxl import TINY_SDXL, build_tiny_sdxl, load_sdxl


@pytest.fixture(scope="module")
def tiny() -> StableDiffusionXLPipeline:
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(
    pipe: StableDiffusionXLPipeline, prompts: list[str], seeds: list[int], size: int = 64
) -> np.ndarray:
    return pipe(
        prompt=prompts,
        height=size,
        width=size,
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images


def test_tiny_sdxl_shape_and_determinism(tiny: StableDiffusionXLPipeline) -> None:
    first = _images(tiny, ["a red car", "a cat"], [1, 2])
    assert first.shape == (2, 64, 64, 3)
    assert np.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(_images(tiny, ["a red car", "a cat"], [1, 2]), first)
    assert np.abs(_images(tiny, ["a red car"], [3])[0] - first[0]).mean() > 1e-3  # other seed, other image
    assert _images(tiny, ["a cat"], [1], size=128).shape == (1, 128, 128, 3)


def test_tiny_sdxl_weights_follow_the_seed_only() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_tiny_sdxl(0), build_tiny_sdxl(0), build_tiny_sdxl(1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is untouched
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        params_a = torch.nn.utils.parameters_to_vector(getattr(a, name).parameters())
        assert torch.equal(params_a, torch.nn.utils.parameters_to_vector(getattr(b, name).parameters()))
        assert not torch.equal(params_a, torch.nn.utils.parameters_to_vector(getattr(c, name).parameters()))


def test_tiny_sdxl_has_sdxl_structure(tiny: StableDiffusionXLPipeline) -> None:
    assert tiny.unet.config.addition_embed_type == "text_time"
    hidden = tiny.text_encoder.config.hidden_size + tiny.text_encoder_2.config.hidden_size
    assert tiny.unet.config.cross_attention_dim == hidden
    assert tiny.tokenizer.model_max_length == tiny.tokenizer_2.model_max_length == 77
    assert isinstance(tiny.scheduler, EulerDiscreteScheduler)


@pytest.mark.parametrize(
    ("name", "cls"), [("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)]
)
def test_load_tiny_with_scheduler(name: str, cls: type) -> None:
    pipe = load_sdxl(TINY_SDXL, scheduler=name)
    assert isinstance(pipe.scheduler, cls)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # the model's noise schedule is kept
    assert _images(pipe, ["a cat"], [0]).shape == (1, 64, 64, 3)


def test_load_rejects_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'ddim'"):
        load_sdxl(TINY_SDXL, scheduler="ddim")  # type: ignore[arg-type]


def test_load_from_local_folder(tmp_path, tiny: StableDiffusionXLPipeline) -> None:
    tiny.save_pretrained(tmp_path / "sdxl")
    loaded = load_sdxl(str(tmp_path / "sdxl"), dtype=torch.float32, device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert loaded.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids
    assert loaded.tokenizer_2.pad_token == "!"
    np.testing.assert_allclose(_images(loaded, ["a cat"], [5]), _images(tiny, ["a cat"], [5]), atol=1e-5)
    assert load_sdxl(str(tmp_path / "sdxl"), dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_load_casts_to_dtype() -> None:
    pipe = load_sdxl(TINY_SDXL, dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
