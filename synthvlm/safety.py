"""Optional safety step of image generation: a prompt blocklist before, an image checker after.

The blocklist drops prompts that contain a listed word or phrase (whole words, case-insensitive)
before any GPU time is spent on them. The image checker is any callable that takes a batch of decoded
images (N x 3 x H x W floats in [0, 1], on the generation device) and says which ones to drop. It is
loaded by name: a built-in name (`sd_safety_checker`: the diffusers Stable Diffusion safety checker;
`tiny_sd_safety_checker`: the same model class with tiny random weights, for tests), a name
registered with `register_image_checker`, or "package.module:factory". A factory takes
(SafetyConfig, device, dtype) and returns the checker. The generation stage records every dropped
item with its reason in its rejects.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterable

import torch
from pydantic import Field

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.errors import ConfigError

log = logging.getLogger(__name__)

REJECT_BLOCKED_PROMPT = "blocked_prompt"
REJECT_UNSAFE_IMAGE = "unsafe_image"
SD_SAFETY_CHECKER = "sd_safety_checker"
TINY_SD_SAFETY_CHECKER = "tiny_sd_safety_checker"
# The checker released with Stable Diffusion (the model behind diffusers' StableDiffusionSafetyChecker).
DEFAULT_SD_SAFETY_MODEL = "CompVis/stable-diffusion-safety-checker"

ImageChecker = Callable[[torch.Tensor], list[bool]]


class SafetyConfig(StageConfig):
    """Prompt blocklist and image safety check of the generation stage (all off by default)."""

    # Our choice: empty; words or phrases, matched as whole words, case-insensitive.
    blocklist: list[str] = Field(default_factory=list)
    # Our choice: none; a text file (local or gs://) with one word or phrase per line, '#' comments.
    blocklist_file: str | None = None
    # Our choice: none (the papers filter no images); a built-in name, a registered name or "module:factory".
    image_checker: str | None = None
    # Model id or folder of the checker; None = the checker's default (sd_safety_checker: CompVis's).
    image_checker_model: str | None = None
    # Our choice: the hub's default branch; pin a commit hash for a reproducible dataset.
    image_checker_revision: str | None = None


def read_blocklist_file(uri: str) -> list[str]:
    """Words/phrases of a blocklist file: one per line; blank lines and '#' comments are skipped."""
    terms = []
    for line in storage.read_text(uri).splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(term)
    return terms


class PromptBlocklist:
    """Matches prompts containing any listed word or phrase (whole words, case-insensitive).

    Whitespace inside a phrase matches any run of whitespace, so "red  car" in a prompt is found by the
    phrase "red car".
    """

    def __init__(self, terms: Iterable[str]):
        self.terms = sorted({" ".join(term.split()).casefold() for term in terms if term.strip()})
        alternatives = "|".join(r"\s+".join(map(re.escape, term.split())) for term in self.terms)
        # \w-boundaries, not \b: a term may start or end with a non-word character ("c++").
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.terms else None

    @classmethod
    def from_config(cls, config: SafetyConfig) -> PromptBlocklist:
        terms = list(config.blocklist)
        if config.blocklist_file:
            terms += read_blocklist_file(config.blocklist_file)
        return cls(terms)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def match(self, prompt: str) -> str | None:
        """The first blocked term found in `prompt` (normalised to lower case), or None."""
        if self._pattern is None:
            return None
        found = self._pattern.search(prompt)
        return " ".join(found.group(0).split()).casefold() if found else None


class DiffusersSafetyChecker:
    """diffusers' StableDiffusionSafetyChecker (CLIP image embedding vs concept embeddings) on tensors.

    The CLIP image processor (torchvision backend in transformers 5) works on the decoded tensors
    directly, so no PIL round trip is needed.
    """

    def __init__(self, checker: torch.nn.Module, processor: Callable[..., object]):
        self.checker, self.processor = checker.eval(), processor
        self.device = next(checker.parameters()).device
        self.dtype = next(checker.parameters()).dtype

    def __call__(self, images: torch.Tensor) -> list[bool]:
        pixels = self.processor(images=images.float(), return_tensors="pt", do_rescale=False).pixel_values
        # The checker blacks out flagged entries of `images` in place: hand it a placeholder instead.
        placeholder = torch.zeros(len(images), 1)
        with torch.no_grad():
            _, flagged = self.checker(clip_input=pixels.to(self.device, self.dtype), images=placeholder)
        return [bool(flag) for flag in flagged]


def sd_safety_checker(config: SafetyConfig, device: torch.device, dtype: torch.dtype) -> ImageChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    model = config.image_checker_model or DEFAULT_SD_SAFETY_MODEL
    revision = config.image_checker_revision
    log.info("loading image safety checker %s (revision %s)", model, revision)
    checker = StableDiffusionSafetyChecker.from_pretrained(model, revision=revision, dtype=dtype)
    processor = CLIPImageProcessor.from_pretrained(model, revision=revision)
    return DiffusersSafetyChecker(checker.to(device), processor)


def build_tiny_sd_safety_checker(seed: int = 0) -> DiffusersSafetyChecker:
    """StableDiffusionSafetyChecker with a tiny random CLIP vision tower (32x32 input), fixed by `seed`.

    Its concept thresholds are those of a fresh diffusers checker (1.0: no random image reaches them),
    so it flags nothing unless a test lowers `checker.checker.concept_embeds_weights`.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config=small,
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker = StableDiffusionSafetyChecker(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return DiffusersSafetyChecker(checker, processor)


def tiny_sd_safety_checker(config: SafetyConfig, device: torch.device, dtype: torch.dtype) -> ImageChecker:
    checker = build_tiny_sd_safety_checker()
    checker.checker.to(device=device, dtype=dtype)
    checker.device, checker.dtype = device, dtype
    return checker


CheckerFactory = Callable[[SafetyConfig, torch.device, torch.dtype], ImageChecker]
_FACTORIES: dict[str, CheckerFactory] = {
    SD_SAFETY_CHECKER: sd_safety_checker,
    TINY_SD_SAFETY_CHECKER: tiny_sd_safety_checker,
}


def register_image_checker(name: str, factory: CheckerFactory) -> None:
    """Make `name` usable as `SafetyConfig.image_checker`."""
    _FACTORIES[name] = factory


def _factory(name: str) -> CheckerFactory:
    if name in _FACTORIES:
        return _FACTORIES[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(_FACTORIES))
        raise ConfigError(
            f"config field 'safety.image_checker': unknown checker {name!r}; use one of {known} "
            "or 'package.module:factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"config field 'safety.image_checker': cannot load {name!r}: {exc}") from None
    if not callable(factory):
        raise ConfigError(f"config field 'safety.image_checker': {name!r} is not callable")
    return factory


def validate_safety(config: SafetyConfig) -> None:
    """Fail early (before any GPU pod starts) on an unreadable blocklist file or an unknown checker name.

    Resolves the checker's factory without loading its model.
    """
    uri = config.blocklist_file
    if uri:
        field = "config field 'safety.blocklist_file'"
        if not storage.exists(uri):
            raise ConfigError(f"{field}: cannot read {uri}: it does not exist")
        try:
            read_blocklist_file(uri)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{field}: cannot read {uri}: {exc}") from None
    if config.image_checker is not None:
        _factory(config.image_checker)


def load_image_checker(config: SafetyConfig, device: torch.device, dtype: torch.dtype) -> ImageChecker | None:
    """The configured image checker on `device`, or None when none is configured."""
    if config.image_checker is None:
        return None
    return _factory(config.image_checker)(config, device, dtype)


def check_images(checker: ImageChecker, images: torch.Tensor) -> list[bool]:
    """Run `checker` and make sure it answered once per image."""
    flagged = checker(images)
    if len(flagged) != len(images):
        raise RuntimeError(f"image checker answered {len(flagged)} flags for {len(images)} images")
    return [bool(flag) for flag in flagged]
