from __future__ import annotations

from typing import Any

import pytest
import torch

from synthvlm import safety
from synthvlm.config import validate
from synthvlm.errors import ConfigError
from synthvlm.safety import (
    DiffusersSafetyChecker,
    PromptBlocklist,
    SafetyConfig,
    build_tiny_sd_safety_checker,
    check_images,
    load_image_checker,
    read_blocklist_file,
    register_image_checker,
    validate_safety,
)

CPU = torch.device("cpu")


def test_blocklist_matches_whole_words_and_phrases_ignoring_case() -> None:
    blocklist = PromptBlocklist(["gore", "Red  Car", "c++", "  "])
    assert blocklist.terms == ["c++", "gore", "red car"]
    assert blocklist.match("A RED car on a bridge") == "red car"
    assert blocklist.match("a red\tcar") == "red car"
    assert blocklist.match("Gore.") == "gore"
    assert blocklist.match("I write c++ code") == "c++"
    for fine in ("a gorey story", "Algore", "redcar", "a red carpet", "a red bus"):
        assert blocklist.match(fine) is None, fine


def test_empty_blocklist_matches_nothing() -> None:
    blocklist = PromptBlocklist([])
    assert not blocklist and blocklist.match("anything at all") is None


def test_blocklist_file_and_config_terms_combine(tmp_path) -> None:
    path = tmp_path / "blocklist.txt"
    path.write_text("# comment line\nweapon  # trailing comment\n\n  blood \n")
    assert read_blocklist_file(str(path)) == ["weapon", "blood"]
    blocklist = PromptBlocklist.from_config(SafetyConfig(blocklist=["gun"], blocklist_file=str(path)))
    assert blocklist.terms == ["blood", "gun", "weapon"]
    assert blocklist.match("a bloody knife") is None and blocklist.match("Blood on snow") == "blood"


def test_blocklist_file_on_gcs(gcs_emulator: str) -> None:
    from synthvlm import storage

    uri = f"{gcs_emulator}/safety/blocklist.txt"
    storage.write_text(uri, "spider\n")
    blocklist = PromptBlocklist.from_config(SafetyConfig(blocklist_file=uri))
    assert blocklist.match("a big Spider") == "spider"


@pytest.fixture(scope="module")
def tiny_checker() -> DiffusersSafetyChecker:
    return build_tiny_sd_safety_checker()


def test_tiny_sd_safety_checker_flags_by_concept_thresholds(tiny_checker: DiffusersSafetyChecker) -> None:
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kept = images.clone()
    assert tiny_checker(images) == [False, False, False]  # fresh thresholds: nothing reaches them
    weights = tiny_checker.checker.concept_embeds_weights
    original = weights.clone()
    try:
        weights.fill_(-2.0)  # below any cosine: every image is over the threshold
        assert tiny_checker(images) == [True, True, True]
    finally:
        weights.copy_(original)
    assert torch.equal(images, kept)  # the checker's in-place blackout never touches our images


def test_checker_input_is_the_processed_tensor(tiny_checker: DiffusersSafetyChecker, monkeypatch) -> None:
    seen = []
    real_forward = tiny_checker.checker.forward

    def spy(clip_input: torch.Tensor, images: Any) -> Any:
        seen.append(clip_input)
        return real_forward(clip_input=clip_input, images=images)

    monkeypatch.setattr(tiny_checker.checker, "forward", spy)
    tiny_checker(torch.full((2, 3, 48, 64), 0.5))
    (pixels,) = seen
    assert pixels.shape == (2, 3, 32, 32)  # shortest side 32, centre crop 32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, ((0.5 - mean) / std).expand(2, 3, 32, 32), atol=1e-4, rtol=0)


def test_load_image_checker_by_name() -> None:
    assert load_image_checker(SafetyConfig(), CPU, torch.float32) is None
    builtin = load_image_checker(SafetyConfig(image_checker="tiny_sd_safety_checker"), CPU, torch.float32)
    by_path = load_image_checker(
        SafetyConfig(image_checker="synthvlm.safety:tiny_sd_safety_checker"), CPU, torch.float32
    )
    images = torch.rand(2, 3, 32, 32)
    assert builtin is not None and by_path is not None
    assert builtin(images) == by_path(images) == [False, False]


def test_registered_checker_gets_config_device_and_dtype(monkeypatch) -> None:
    monkeypatch.setattr(safety, "_FACTORIES", dict(safety._FACTORIES))
    calls = []

    def factory(config: SafetyConfig, device: torch.device, dtype: torch.dtype) -> Any:
        calls.append((config.image_checker_model, device, dtype))
        return lambda images: [False] * len(images)

    register_image_checker("mine", factory)
    config = SafetyConfig(image_checker="mine", image_checker_model="some/model")
    checker = load_image_checker(config, CPU, torch.bfloat16)
    assert calls == [("some/model", CPU, torch.bfloat16)]
    assert checker is not None and check_images(checker, torch.zeros(2, 3, 8, 8)) == [False, False]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_checker", "unknown checker 'no_such_checker'.*sd_safety_checker"),
        ("synthvlm.no_such_module:f", "cannot load 'synthvlm.no_such_module:f'"),
        ("synthvlm.safety:no_such_function", "cannot load"),
        ("synthvlm.safety:REJECT_UNSAFE_IMAGE", "'synthvlm.safety:REJECT_UNSAFE_IMAGE' is not callable"),
    ],
)
def test_bad_checker_names_are_config_errors(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"safety.image_checker': {message}"):
        load_image_checker(SafetyConfig(image_checker=name), CPU, torch.float32)


def test_checker_must_answer_once_per_image() -> None:
    with pytest.raises(RuntimeError, match="1 flags for 2 images"):
        check_images(lambda images: [True], torch.zeros(2, 3, 8, 8))


def test_config_defaults_are_off_and_unknown_keys_rejected() -> None:
    config = SafetyConfig()
    assert (config.blocklist, config.blocklist_file, config.image_checker) == ([], None, None)
    with pytest.raises(ConfigError, match="config field 'block_list'"):
        validate(SafetyConfig, {"block_list": ["x"]})


def test_validate_safety_fails_early_without_loading_models(tmp_path) -> None:
    validate_safety(SafetyConfig())
    validate_safety(SafetyConfig(image_checker="sd_safety_checker"))  # resolved, not downloaded
    with pytest.raises(ConfigError, match="safety.blocklist_file': cannot read .*missing.txt"):
        validate_safety(SafetyConfig(blocklist_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="unknown checker 'nsfw'"):
        validate_safety(SafetyConfig(image_checker="nsfw"))
