"""CLIP models through open_clip: real checkpoints by name + pretrained tag, or a tiny offline test model.

`TINY_CLIP` is a small ViT CLIP with random weights built under a fixed seed, registered with
open_clip as a model config so it goes through the same factory, transforms and (bundled BPE)
tokenizer as a real model. It needs no download and exists for tests and local smoke runs.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch

from synthvlm.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_CLIP = "synthvlm-tiny-clip"
TINY_CLIP_SEED = 0  # our choice: any fixed seed; the same weights in every process

# Small enough to build in ~0.1 s on CPU; the full 49408-token vocabulary and 77-token context keep
# open_clip's bundled BPE tokenizer usable as is.
_TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def register_tiny_clip() -> None:
    """Make `TINY_CLIP` known to open_clip's model registry (idempotent)."""
    if TINY_CLIP in open_clip.list_models():
        return
    # add_model_config reads a JSON file whose stem is the model name; the registry keeps the parsed
    # config, so the file itself is not needed afterwards.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(_TINY_CLIP_CONFIG))
        open_clip.add_model_config(path)


def _precision(dtype: torch.dtype) -> str:
    try:
        return _PRECISION[dtype]
    except KeyError:
        raise ConfigError(f"CLIP dtype {dtype} is not supported; use one of {list(_PRECISION)}") from None


def load_clip(
    model_name: str,
    pretrained: str | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """Return (model in eval mode, image preprocess transform, tokenizer).

    `pretrained` is an open_clip tag (e.g. "openai") or a checkpoint file; None means random weights
    (useful for benchmarks of an architecture). fp16/bf16 use open_clip's mixed precision (LayerNorms
    stay in float32), as the OpenAI CLIP models were run.
    """
    precision = _precision(dtype)
    if model_name == TINY_CLIP:
        if pretrained is not None:
            raise ConfigError(
                f"{TINY_CLIP} has random weights only; set pretrained to null (got {pretrained!r})"
            )
        register_tiny_clip()
        # fork_rng: fixed weights without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_CLIP_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=None, precision=precision, device=device
            )
    else:
        logger.info("loading CLIP %s (pretrained=%s) on %s as %s", model_name, pretrained, device, precision)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, precision=precision, device=device
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, preprocess, tokenizer


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype image batches must have: that of the vision tower's first conv (patch embedding)."""
    for module in model.visual.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.weight.dtype
    return next(model.visual.parameters()).dtype
