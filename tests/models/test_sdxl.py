from __future__ import annotations

from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from synthvlm.models import sdxl
from synthvlm.models.sdxl import (
    TINY_SDXL,
    TINY_SDXL_REFINER,
    build_tiny_sdxl,
    build_tiny_sdxl_refiner,
    folder_content_hash,
    load_sdxl,
    load_sdxl_refiner,
    model_revision,
    register_builder,
)


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


def test_tiny_refiner_has_the_sdxl_refiner_structure(tiny: StableDiffusionXLPipeline) -> None:
    refiner = build_tiny_sdxl_refiner(tiny)
    assert isinstance(refiner, StableDiffusionXLImg2ImgPipeline)
    assert refiner.text_encoder is None and refiner.tokenizer is None  # text encoder 2 only
    assert refiner.text_encoder_2 is tiny.text_encoder_2 and refiner.vae is tiny.vae  # shared
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt
    assert refiner.unet.config.cross_attention_dim == tiny.text_encoder_2.config.hidden_size
    # Time ids: original size (2), crop offset (2), aesthetic score (1) instead of the target size.
    time_ids = (
        refiner.unet.config.projection_class_embeddings_input_dim - tiny.text_encoder_2.config.projection_dim
    )
    assert time_ids == 5 * refiner.unet.config.addition_time_embed_dim
    base_unet = torch.nn.utils.parameters_to_vector(tiny.unet.parameters())
    assert base_unet.numel() != torch.nn.utils.parameters_to_vector(refiner.unet.parameters()).numel()


def test_base_latents_refined_from_denoising_start(tiny: StableDiffusionXLPipeline) -> None:
    refiner = load_sdxl_refiner(TINY_SDXL_REFINER, tiny, scheduler="dpmpp_2m")
    assert isinstance(refiner.scheduler, DPMSolverMultistepScheduler)

    def refined(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        common = dict(prompt=["a cat"], num_inference_steps=4, generator=generator)
        latents = tiny(**common, height=64, width=64, denoising_end=0.75, output_type="latent").images
        return refiner(**common, image=latents, denoising_start=0.75, output_type="np").images

    first = refined(0)
    assert first.shape == (1, 64, 64, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(refined(0), first)
    base_only = _images(tiny, ["a cat"], [0])
    assert np.abs(first - base_only).mean() > 1e-3  # the refiner changed the image


def test_registered_builder_is_used_by_load_sdxl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdxl, "_BUILDERS", dict(sdxl._BUILDERS))
    calls = []

    def builder(dtype: torch.dtype, device: torch.device) -> StableDiffusionXLPipeline:
        calls.append((dtype, device))
        return build_tiny_sdxl(seed=7)

    register_builder("test/random-sdxl", builder)
    pipe = load_sdxl("test/random-sdxl", dtype=torch.bfloat16, scheduler="dpmpp_2m")
    assert calls == [(torch.bfloat16, torch.device("cpu"))]
    assert pipe.unet.dtype == torch.bfloat16 and isinstance(pipe.scheduler, DPMSolverMultistepScheduler)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny: StableDiffusionXLPipeline) -> Path:
    """A Hugging Face cache holding repo test-org/tiny-sdxl at COMMIT, branch main pointing to it."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--test-org--tiny-sdxl"
    tiny.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_revision_of_a_hub_id_is_the_cached_snapshot_commit(hub_cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = load_sdxl("test-org/tiny-sdxl", revision="main")
    assert model_revision(pipe, "test-org/tiny-sdxl", "main") == {
        "revision": COMMIT,
        "revision_requested": "main",
        "revision_source": "hf_cache",
    }


def test_revision_of_a_local_snapshot_folder(hub_cache: Path) -> None:
    snapshot = str(hub_cache / "models--test-org--tiny-sdxl" / "snapshots" / COMMIT)
    info = model_revision(load_sdxl(snapshot), snapshot)
    assert (info["revision"], info["revision_source"]) == (COMMIT, "hf_cache")


def test_revision_of_hf_download_and_git_folders(tmp_path) -> None:
    local = tmp_path / "local"
    (local / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (local / ".cache" / "huggingface" / "download" / "model_index.json.metadata").write_text(
        f'{COMMIT}\n"etag"\n1700000000.0\n'
    )
    assert model_revision(None, str(local))["revision"] == COMMIT
    assert model_revision(None, str(local))["revision_source"] == "hf_local_dir"
    clone = tmp_path / "clone"
    (clone / ".git" / "refs" / "heads").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / ".git" / "refs" / "heads" / "main").write_text(COMMIT + "\n")
    assert model_revision(None, str(clone))["revision"] == COMMIT
    (clone / ".git" / "refs" / "heads" / "main").unlink()  # after `git gc`: packed refs
    (clone / ".git" / "packed-refs").write_text(f"# pack-refs\n{COMMIT} refs/heads/main\n")
    assert model_revision(None, str(clone)) == {
        "revision": COMMIT,
        "revision_requested": None,
        "revision_source": "git",
    }


def test_plain_folder_gets_a_content_hash_and_a_reason(tmp_path, tiny: StableDiffusionXLPipeline) -> None:
    tiny.save_pretrained(tmp_path / "sdxl")
    folder = str(tmp_path / "sdxl")
    info = model_revision(load_sdxl(folder), folder)
    assert info["revision"] is None and info["revision_source"] == "local_folder"
    assert "no commit" in info["revision_missing"]
    assert info["content_sha256"] == folder_content_hash(folder)
    config = tmp_path / "sdxl" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("scaled_linear", "linear"))
    assert folder_content_hash(folder) != info["content_sha256"]  # a changed config is noticed


def test_builtin_models_say_they_have_no_revision() -> None:
    info = model_revision(load_sdxl(TINY_SDXL), TINY_SDXL)
    assert info["revision"] is None and info["revision_source"] == "builtin"


def test_weights_are_resolved_before_loading_and_follow_a_moved_branch(tmp_path, monkeypatch) -> None:
    """The generate stage's fingerprint names the commit a branch points to, before anything loads."""
    from synthvlm.models.sdxl import resolve_weights

    cache = tmp_path / "hub"
    refs = cache / "models--test-org--tiny-sdxl" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_weights("test-org/tiny-sdxl", None) == {"commit": COMMIT}
    moved = "fedcba9876543210fedcba9876543210fedcba98"
    (refs / "main").write_text(moved)
    assert resolve_weights("test-org/tiny-sdxl", None) == {"commit": moved}
    assert resolve_weights("test-org/tiny-sdxl", COMMIT) == {"commit": COMMIT}  # pinned: as given
    assert "unresolved" in resolve_weights("test-org/not-cached", None)
    assert "unresolved" in resolve_weights(TINY_SDXL, None)
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    first = resolve_weights(str(folder), None)
    (folder / "model_index.json").write_text('{"changed": true}')
    assert set(first) == {"content_sha256"} and resolve_weights(str(folder), None) != first
