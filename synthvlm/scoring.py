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
from dataclasses import dataclass
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
from synthvlm.tokens import chunk_text, dropped, open_clip_counter

ScoreForm = Literal["cosine", "clipscore"]
LongCaptions = Literal["truncate", "chunk_mean"]


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
    # Captions longer than the text context (CLIP: 75 caption tokens of 77). "truncate": the encoder sees
    # the first 75 tokens only, as in CLIPScore (Hessel et al.) and the papers' code; two captions that
    # differ only later score the same. "chunk_mean": the caption is split into sentence (else word) chunks
    # that each fit, every chunk is embedded and L2-normalised, their mean is renormalised and compared
    # with the image: every token counts, and captions that fit score exactly as with "truncate"; but a
    # mean of chunk embeddings is not what CLIP was trained on, so long captions' scores are on a
    # somewhat different scale (typically pulled towards the caption's average chunk) and no longer
    # comparable with published CLIPScores or thresholds. open_clip 3.3 has no long-context CLIP (every
    # model's context is <= 77 tokens; Long-CLIP is not in it), so no model setting can do this instead.
    # Our choice: "truncate", for comparability with the papers (SynthVLM's top-k by CLIPScore,
    # StableLLaVA's gamma = 0.25 were measured on truncated text); every record says how many tokens its
    # caption lost (provenance `<score_key>_scorer.dropped_tokens`) and the report counts them.
    long_captions: LongCaptions = "truncate"

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


@dataclass(frozen=True)
class EncodedTexts:
    """L2-normalised text embeddings (float32, CPU) and, per text, what the encoder saw of it."""

    features: torch.Tensor
    dropped_tokens: list[int]  # caption tokens the encoder never saw (0 for a caption that fits)
    chunks: list[int]  # pieces each text was embedded in (1 with "truncate")


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    texts: Sequence[str],
    long_captions: LongCaptions = "truncate",
) -> EncodedTexts:
    """Text embeddings under the long-caption mode (see ScoreConfig.long_captions), normalised in float32."""
    count, limit = open_clip_counter(tokenizer)
    pieces = [chunk_text(text, count, limit) if long_captions == "chunk_mean" else [text] for text in texts]
    flat = [piece for chunks in pieces for piece in chunks]
    with torch.no_grad():
        # Normalise in float32: fp16 features would round the cosine to ~3 digits.
        features = F.normalize(model.encode_text(tokenizer(flat).to(_model_device(model))).float(), dim=-1)
    rows, start = [], 0
    for chunks in pieces:
        block = features[start : start + len(chunks)]
        # One chunk: its own embedding, so a caption that fits scores exactly as with "truncate".
        rows.append(block[0] if len(chunks) == 1 else F.normalize(block.mean(dim=0), dim=-1))
        start += len(chunks)
    lost = [sum(dropped(count, limit, piece) for piece in chunks) for chunks in pieces]
    stacked = torch.stack(rows) if rows else features  # no texts: an empty (0, width) tensor
    return EncodedTexts(stacked.cpu(), lost, [len(chunks) for chunks in pieces])


def score_pixels(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    pixels: torch.Tensor,
    texts: Sequence[str],
    long_captions: LongCaptions = "truncate",
) -> tuple[torch.Tensor, torch.Tensor, EncodedTexts]:
    """(cosine of each preprocessed image with its text, L2-normalised image embeddings, the encoded texts),
    tensors float32 on CPU."""
    device = _model_device(model)
    with torch.no_grad():
        image_features = model.encode_image(pixels.to(device=device, dtype=input_dtype(model)))
        image_features = F.normalize(image_features.float(), dim=-1).cpu()
    texts_out = encode_texts(model, tokenizer, texts, long_captions)
    return (image_features * texts_out.features).sum(dim=-1), image_features, texts_out


def cosine_and_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    pixels: torch.Tensor,
    texts: Sequence[str],
    long_captions: LongCaptions = "truncate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine of each preprocessed image with its text, L2-normalised image embeddings), float32 on CPU."""
    cosines, image_features, _ = score_pixels(model, tokenizer, pixels, texts, long_captions)
    return cosines, image_features


def cosine_batch(
    model: torch.nn.Module,
    tokenizer: Callable[..., torch.Tensor],
    pixels: torch.Tensor,
    texts: Sequence[str],
    long_captions: LongCaptions = "truncate",
) -> torch.Tensor:
    """Cosine similarity of each preprocessed image with its text, as float32 on the CPU."""
    return cosine_and_embeddings(model, tokenizer, pixels, texts, long_captions)[0]


def clip_scores(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    images: Sequence[Image.Image],
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    form: ScoreForm = "cosine",
    long_captions: LongCaptions = "truncate",
) -> list[float]:
    """Score pairs (images[i], texts[i]) in batches. Captions longer than the model's context
    (77 tokens for CLIP) are truncated by its tokenizer, or embedded in chunks (`long_captions`)."""
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts")
    scores: list[float] = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(img.convert("RGB")) for img in images[start : start + batch_size]])
        cosines = cosine_batch(model, tokenizer, pixels, texts[start : start + batch_size], long_captions)
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
        scores, embeddings, _ = self.score(images, captions)
        return scores, embeddings

    def score(
        self, images: torch.Tensor, captions: Sequence[str]
    ) -> tuple[list[float], np.ndarray, EncodedTexts]:
        """As `__call__`, plus what the text encoder saw of each caption (dropped tokens, chunks)."""
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        pixels = self.transform(images.float().to(_model_device(self.model)))
        cosines, embeddings, texts = score_pixels(
            self.model, self.tokenizer, pixels, captions, self.config.long_captions
        )
        return [apply_form(c, self.config.form) for c in cosines.tolist()], embeddings.numpy(), texts


def with_score(
    record: Record, value: float, config: ScoreConfig, texts: EncodedTexts | None = None, row: int = 0
) -> Record:
    """`record` with the score under config.score_key and the scorer in its provenance: model, form, the
    long-caption mode and, given the encoded `texts` (this record's at `row`), how many caption tokens the
    text encoder never saw (`dropped_tokens`) and, with "chunk_mean", in how many chunks it was embedded."""
    scorer: dict[str, object] = {"model": config.model, "pretrained": config.pretrained, "form": config.form}
    scorer["long_captions"] = config.long_captions
    if texts is not None:
        scorer["dropped_tokens"] = texts.dropped_tokens[row]
        if config.long_captions == "chunk_mean":
            scorer["chunks"] = texts.chunks[row]
    return record.model_copy(
        update={
            "scores": {**record.scores, config.score_key: value},
            "provenance": {**record.provenance, f"{config.score_key}_scorer": scorer},
        }
    )
