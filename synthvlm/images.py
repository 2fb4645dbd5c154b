"""Container image references for the stage families, from one place.

`image_for(family)` -> `{registry}/synthvlm-{family}:{tag}`. Precedence: `set_image_overrides` (what
`synthvlm compile --image-registry/--image-tag` sets) > the environment variables SYNTHVLM_IMAGE_REGISTRY
/ SYNTHVLM_IMAGE_TAG > the defaults below. Components call `image_for` when they are defined (at import),
so overrides must be set before the component modules are imported.

`python -m synthvlm.images [family ...]` prints the references (images/build.sh tags with them).
"""

from __future__ import annotations

import os
import re
import sys

from synthvlm import __version__
from synthvlm.errors import ConfigError

# cpu: light stages; diffusion: SDXL + CLIP; train: LLaVA training; eval: train + lmms-eval (evaluation).
FAMILIES = ("cpu", "diffusion", "train", "eval")
DEFAULT_REGISTRY = "ghcr.io/synthvlm"  # our choice: the project's public registry
# Docker's tag grammar; a PEP 440 local version ("0.1.0+abc") is not a valid tag.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_overrides: dict[str, str | None] = {"registry": None, "tag": None}


def set_image_overrides(registry: str | None, tag: str | None) -> None:
    """Override registry and/or tag for later `image_for` calls; None falls back to env/default."""
    _overrides["registry"], _overrides["tag"] = registry, tag


def image_registry() -> str:
    registry = _overrides["registry"] or os.environ.get("SYNTHVLM_IMAGE_REGISTRY") or DEFAULT_REGISTRY
    registry = registry.rstrip("/")
    if not registry or any(c.isspace() for c in registry):
        raise ConfigError(f"image registry {registry!r} is not a valid registry path")
    return registry


def image_tag() -> str:
    tag = _overrides["tag"] or os.environ.get("SYNTHVLM_IMAGE_TAG") or __version__
    if not _TAG.fullmatch(tag):
        raise ConfigError(f"image tag {tag!r} is not a valid Docker tag (letters, digits, '_', '.', '-')")
    return tag


def image_for(family: str) -> str:
    """The image reference for a stage family: one of FAMILIES."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown image family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return f"{image_registry()}/synthvlm-{family}:{image_tag()}"


if __name__ == "__main__":
    try:
        references = [image_for(name) for name in sys.argv[1:] or FAMILIES]
    except ConfigError as exc:
        sys.exit(f"synthvlm.images: {exc}")
    print("\n".join(references))
