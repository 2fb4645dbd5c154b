"""CLIP alignment scores of (image, caption) pairs: the model-level pieces every scoring step shares.

SynthVLM §3.1 defines CLIPScore as the cosine similarity of the CLIP image and caption embeddings;
Hessel et al. (2021) scale it as 2.5 * max(cos, 0); both forms are offered. Used by the clip_score stage
(files), generation's in-pod scoring (`TensorScorer`: decoded tensors, no JPEG round trip) and caption
curation (raw web images).
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator
from torchvision import transforms

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.devices import DeviceName, DtypeName, resolve_device, resolve_dtype
from synthvlm.errors import ConfigError
from synthvlm.models.clip import input_dtype, load_clip
from synthvlm.records import Record

ScoreForm = Literal["cosine", "clipscore"]


CLIPSCORE_WEIGHT = 2.5  # Hessel et al. 2021, CLIPScore w = 2.5


REJECT_NO_URI = "no image_uri"


REJECT_MISSING = "image missing"


REJECT_UNDECODABLE = "image not decodable"


REJECT_NON_FINITE = "non-finite score"


class ScoreConfig(StageConfig):
    """CLIP alignment scoring of (image, caption) pairs."""

    # our choice: ViT-L-14 is the CLIP of LLaVA-1.5's vision tower family and stronger than the
    # ViT-B/32 of the SynthVLM code; SynthVLM §3.2 only says "CLIPScore".
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"  # our choice: the original OpenAI CLIP weights (as CLIPScore used)
    batch_size: int = Field(64, ge=1)  # our choice: fits any GPU with ViT-L-14; raise for throughput
    device: DeviceName = "auto"  # our choice: CUDA when present
    # "auto" = float16 on GPU (not bfloat16: CLIP was trained in fp16, and 3 more mantissa bits keep
    # close scores apart for ranking), float32 on CPU.
    dtype: DtypeName = "auto"
    score_key: str = "clip"  # our choice: key in Record.scores that select reads
    form: ScoreForm = "cosine"  # SynthVLM §3.1 formula (cosine similarity)
    read_workers: int = Field(8, ge=1)  # our choice: parallel image reads/decodes (gs:// latency)
    # Our choice: on; select's near-duplicate removal reads them (ViT-L-14: 1.5 KB per image as float16).
    save_embeddings: bool = True

    @field_validator("score_key")
    @classmethod
    def _non_empty_key(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("score_key is empty")
        return value


def apply_form(cosine: float, form: ScoreForm) -> float:
    """Cosine similarity -> the configured score form."""
    if form == "clipscore":
        return CLIPSCORE_WEIGHT * max(cosine, 0.0)
    return cosine


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cosine_and_embeddings(
    model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], pixels: torch.Tensor, texts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine of each preprocessed image with its text, L2-normalised image embeddings), float32 on CPU."""
    device = _model_device(model)
    with torch.no_grad():
        image_features = model.encode_image(pixels.to(device=device, dtype=input_dtype(model)))
        text_features = model.encode_text(tokenizer(list(texts)).to(device))
        # Normalise in float32: fp16 features would round the cosine to ~3 digits.
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        return (image_features * text_features).sum(dim=-1).cpu(), image_features.cpu()


def cosine_batch(
    model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], pixels: torch.Tensor, texts: Sequence[str]
) -> torch.Tensor:
    """Cosine similarity of each preprocessed image with its text, as float32 on the CPU."""
    return cosine_and_embeddings(model, tokenizer, pixels, texts)[0]


def clip_scores(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    images: Sequence[Image.Image],
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    form: ScoreForm = "cosine",
) -> list[float]:
    """Score pairs (images[i], texts[i]) in batches. Captions longer than the model's context
    (77 tokens for CLIP) are truncated by its tokenizer."""
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts")
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(img.convert("RGB")) for img in images[start : start + batch_size]])
        cosines = cosine_batch(model, tokenizer, pixels, texts[start : start + batch_size])
        scores.extend(apply_form(c, form) for c in cosines.tolist())
    return scores


def _not_found_errors() -> tuple[type[BaseException], ...]:
    from google.api_core.exceptions import NotFound

    return (FileNotFoundError, NotFound)


def load_pixels(
    record: Record, preprocess: Callable[[Image.Image], torch.Tensor]
) -> tuple[torch.Tensor | None, str | None]:
    """(preprocessed image, None), or (None, reject reason) when the image is absent or unreadable.

    Other errors (permissions, network) propagate: they are not a property of the record.
    """
    if not record.image_uri:
        return None, REJECT_NO_URI
    try:
        data = storage.read_bytes(record.image_uri)
    except _not_found_errors():
        return None, REJECT_MISSING
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")  # forces a full decode, so truncated files fail here
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError):
        return None, REJECT_UNDECODABLE
    return preprocess(rgb), None


Loaded = tuple[list[Record], list[tuple[torch.Tensor | None, str | None]]]


def prefetched_batches(
    pool: ThreadPoolExecutor,
    records: Sequence[Record],
    batch_size: int,
    preprocess: Callable[[Image.Image], torch.Tensor],
) -> Iterator[Loaded]:
    """Yield (batch, loaded images) while the next batch is already being read."""
    pending: deque[tuple[list[Record], list[Future]]] = deque()
    for start in range(0, len(records), batch_size):
        batch = list(records[start : start + batch_size])
        pending.append((batch, [pool.submit(load_pixels, rec, preprocess) for rec in batch]))
        if len(pending) > 1:
            done_batch, futures = pending.popleft()
            yield done_batch, [f.result() for f in futures]
    while pending:
        done_batch, futures = pending.popleft()
        yield done_batch, [f.result() for f in futures]


def resolve_runtime(
    config: ScoreConfig, device: torch.device | None = None
) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of scoring: float16 on CUDA for "auto", else what the config asks for."""
    device = device or resolve_device(config.device)
    if config.dtype == "auto" and device.type == "cuda":
        return device, torch.float16
    return device, resolve_dtype(config.dtype, device)


_TENSOR_TRANSFORMS = (transforms.Resize, transforms.CenterCrop, transforms.Normalize)


_PIL_ONLY_STEPS = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "function")


def tensor_transform(preprocess: Callable[[Image.Image], torch.Tensor]) -> transforms.Compose:
    """The tensor-capable steps of an open_clip image transform (resize, crop, normalise), for batches of
    N x 3 x H x W floats in [0, 1]. PIL-only steps (RGB conversion, to-tensor) are what a tensor already is.
    """
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        raise ConfigError(f"cannot score tensors with the transform {preprocess!r}: not a Compose")
    kept = []
    for step in steps:
        if isinstance(step, _TENSOR_TRANSFORMS):
            kept.append(step)
        elif type(step).__name__ not in _PIL_ONLY_STEPS:
            raise ConfigError(f"cannot score tensors: transform step {step!r} has no tensor equivalent here")
    return transforms.Compose(kept)


class TensorScorer:
    """CLIP scores and image embeddings straight from decoded images (N x 3 x H x W in [0, 1]).

    The images stay on their device (the generation GPU): no JPEG encode/decode between generation
    and scoring. Scores differ from the file-based stage only by the 8-bit/JPEG rounding of the file.
    """

    def __init__(self, config: ScoreConfig, device: torch.device):
        self.config = config
        device, dtype = resolve_runtime(config, device)
        self.model, preprocess, self.tokenizer = load_clip(config.model, config.pretrained, device, dtype)
        self.transform = tensor_transform(preprocess)

    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[list[float], np.ndarray]:
        """(score in the configured form per image, L2-normalised image embeddings as float32)."""
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        pixels = self.transform(images.float().to(_model_device(self.model)))
        cosines, embeddings = cosine_and_embeddings(self.model, self.tokenizer, pixels, captions)
        return [apply_form(c, self.config.form) for c in cosines.tolist()], embeddings.numpy()


def with_score(record: Record, value: float, config: ScoreConfig) -> Record:
    """`record` with the score under config.score_key and the scorer in its provenance."""
    scorer = {"model": config.model, "pretrained": config.pretrained, "form": config.form}
    return record.model_copy(
        update={
            "scores": {**record.scores, config.score_key: value},
            "provenance": {**record.provenance, f"{config.score_key}_scorer": scorer},
        }
    )
