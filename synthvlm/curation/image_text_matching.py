"""BLIP image-text matching of a caption against its raw web image (data-juicer `image_text_matching_filter`).

SynthVLM's caption recipe (issue 13) keeps a caption whose raw image BLIP judges to match it with
probability >= 0.8. The score is that of BLIP's ITM head (Li et al. 2022, BLIP §3.2): the text encoder
cross-attends to the image, a linear head gives two logits (no match, match), and

    itm(caption, image) = softmax(logits)[match]

in [0, 1], as data-juicer computes it with transformers' `BlipForImageTextRetrieval(use_itm_head=True)`.
For records with an `image_uri` only (a caption without its web image passes unscored, as for the raw
CLIPScore); a missing or undecodable image is a reject, as there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from synthvlm.config import StageConfig

log = logging.getLogger(__name__)

ITM_LOW = "itm_below_threshold"


class ImageTextMatchConfig(StageConfig):
    """BLIP ITM filter: keep a caption when P(match | caption, raw image) >= `min_score`."""

    # SynthVLM's caption recipe (issue 13: data-juicer image_text_matching_filter): on in `--preset paper`.
    # Off by default because it loads BLIP from the hub; records without image_uri pass it anyway.
    enabled: bool = False
    min_score: float = Field(0.8, ge=0, le=1)  # issue 13: SynthVLM keeps BLIP ITM >= 0.8
    # data-juicer's default ITM model (BLIP base, fine-tuned on COCO retrieval); any BLIP ITM checkpoint.
    model: str = "Salesforce/blip-itm-base-coco"
    revision: str | None = None  # hub branch, tag or commit; resolved to a commit for the fingerprint
    batch_size: int = Field(32, ge=1)  # our choice: fits any GPU with BLIP base; raise for throughput
    device: Literal["auto", "cpu", "cuda"] = "auto"  # our choice: CUDA when present
    # "auto" = float16 on GPU, float32 on CPU (a probability thresholded at 0.8 needs no more)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    read_workers: int = Field(8, ge=1)  # our choice: parallel image reads (GCS/S3 latency)
    score_key: str = "itm"  # our choice: scores[score_key] of a kept record


class ImageTextMatcher:
    """BLIP ITM model and processor loaded once; `scores(images, captions)` in batches."""

    def __init__(self, config: ImageTextMatchConfig):
        import torch
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        from synthvlm.devices import resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        if config.dtype == "auto":
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, config.dtype)
        log.info("loading BLIP ITM %s (revision %s) on %s", config.model, config.revision, self.device)
        self.processor = BlipProcessor.from_pretrained(config.model, revision=config.revision)
        self.model = BlipForImageTextRetrieval.from_pretrained(
            config.model, revision=config.revision, dtype=self.dtype
        )
        self.model.to(self.device).eval()

    def scores(self, images: Sequence[Any], captions: Sequence[str]) -> list[float]:
        """P(match) of each (PIL image, caption) pair, one batch."""
        import torch

        inputs = self.processor(
            images=list(images), text=list(captions), return_tensors="pt", padding=True, truncation=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            logits = self.model(**inputs, use_itm_head=True).itm_score.float()
        return torch.softmax(logits, dim=-1)[:, 1].tolist()


def _as_is(image: Any) -> Any:
    return image


def score_records(matcher: ImageTextMatcher, records: Sequence[Any]) -> list[tuple[float | None, str | None]]:
    """(score, None) per record with an image, or (None, reason) when its image is missing or unreadable."""
    from synthvlm.scoring import load_pixels

    config = matcher.config
    out: list[tuple[float | None, str | None]] = []
    with ThreadPoolExecutor(max_workers=config.read_workers) as pool:
        for start in range(0, len(records), config.batch_size):
            batch = records[start : start + config.batch_size]
            loaded = list(pool.map(lambda r: load_pixels(r, _as_is), batch))
            good = [i for i, (image, _) in enumerate(loaded) if image is not None]
            values: dict[int, float] = {}
            if good:
                scored = matcher.scores([loaded[i][0] for i in good], [batch[i].caption for i in good])
                values = dict(zip(good, scored, strict=True))
            for i, (_, reason) in enumerate(loaded):
                out.append((values.get(i), None if i in values else reason))
            log.info("curate itm: scored %d/%d raw images", len(out), len(records))
    return out
