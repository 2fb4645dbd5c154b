"""SynthVLM §3.1 caption curation: the candidate caption set that images are generated from.

Steps, in order. The per-caption filters come first (each sees only what the previous one kept; cheap
checks first, so the LLM and the image models see fewer captions), then the steps that compare captions
with each other; so the per-caption filters can run sharded over pods and give the same result
(synthvlm.curation.sharded):

1. heuristics: alphanumeric, character/word repetition, special-character and flagged-word ratios
   (synthvlm.curation.heuristics; thresholds of data-juicer's LLaVA caption recipe),
2. perplexity: per-token perplexity of the caption under a causal LM <= 5500 (curation.perplexity;
   SynthVLM's recipe, data-juicer perplexity_filter),
3. judge: an LLM answers "Is this caption detailed and coherent enough to guide a text-to-image model?
   Answer Yes or No." (§3.1 used GPT-3 to remove ads, repetitive and ungrammatical captions); through
   `synthvlm.llm.backend`, so the offline "template" backend answers by a deterministic rule instead,
4. itm: for records that carry their web image (`image_uri`), BLIP's image-text matching probability
   >= 0.8 (curation.image_text_matching; SynthVLM's recipe, data-juicer image_text_matching_filter),
5. clip: for records with `image_uri`, the cosine similarity of caption and raw image with CLIP (§3.1
   formula); in mode "threshold" those below it are dropped here; records without an image pass unscored,
6. dedup: exact (normalized text) and near duplicates (MinHash LSH + exact Jaccard; curation.dedup),
7. clip_rank: in mode "top_fraction", the top 40% (§3.1) of the scored captions that are left,
8. sample: a deterministic sample of `sample_size` captions (§3.1: 1,000K), the records with the smallest
   sha256(f"{sample_seed}:{id}"), so it does not depend on input order and a rerun picks the same ones.

Dedup after the judge costs LLM requests for near-duplicate captions (exact copies hit the LLM response
cache when `judge.llm.cache_dir` is set); it buys a per-caption phase that scales out with one global merge.

The output manifest keeps input order and holds captions only, as §3.1 ("by using only captions"): a
raw image's URI moves to `provenance["raw_image_uri"]` (its score stays in `scores["raw_clip"]`), so the
generation stage sees a caption manifest. Every dropped caption is a row of the rejects manifest (JSONL:
id, caption, stage, reason, details), and the done marker counts rejects per "stage.reason" and in/out
per step. Idempotent: a finished output (done marker) is returned as is. The LLM's response cache
(`judge.llm.cache_dir`) makes a rerun after a crash re-ask nothing already answered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.curation.dedup import DedupConfig, find_duplicates
from synthvlm.curation.heuristics import HeuristicFilter, HeuristicsConfig, words
from synthvlm.curation.image_text_matching import ITM_LOW, ImageTextMatchConfig
from synthvlm.curation.perplexity import PERPLEXITY_HIGH, PerplexityConfig
from synthvlm.errors import SynthVLMError
from synthvlm.llm.backend import Backend, BackendConfig, make_backend
from synthvlm.llm.client import LLMRequest
from synthvlm.llm.fingerprint import llm_runtime_fields
from synthvlm.llm.template_backend import register_template, request_text
from synthvlm.ranking import fraction_count
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.runner import LLM_CACHE_DIR, Stage, StageRun, run_stage
from synthvlm.scoring import ScoreConfig
from synthvlm.stage import StageStats

log = logging.getLogger(__name__)

STAGE = "curate"
STEPS = ("heuristics", "perplexity", "judge", "itm", "clip", "dedup", "clip_rank", "sample")
PER_CAPTION_STEPS = STEPS[:5]  # each caption on its own: these run sharded

JUDGE_TASK = "caption_judge"
CAPTION_MARKER = "Caption:"
# The brief's wording of SynthVLM §3.1's LLM filter as a yes/no question; the caption goes last, after
# CAPTION_MARKER, where the template backend finds it.
JUDGE_PROMPT = (
    "Is this caption detailed and coherent enough to guide a text-to-image model? Answer Yes or No.\n\n"
    f"{CAPTION_MARKER} {{caption}}"
)
_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


class JudgeLLMConfig(BackendConfig):
    """The judge's LLM: `BackendConfig` with defaults for a one-word classification."""

    temperature: float = Field(0.0, ge=0, le=2)  # our choice: a classifier, not a writer: greedy decoding
    max_tokens: int | None = Field(8, ge=1)  # our choice: "Yes"/"No" (+ punctuation) is 1-3 tokens


class JudgeConfig(StageConfig):
    """The LLM caption judge (SynthVLM §3.1: GPT-3 removes ads, repetitive and ungrammatical captions)."""

    enabled: bool = True  # SynthVLM §3.1
    llm: JudgeLLMConfig = Field(default_factory=JudgeLLMConfig)
    prompt: str = JUDGE_PROMPT  # must contain {caption}
    system: str | None = None  # our choice: no system message; the question says all
    chunk_size: int = Field(2000, ge=1)  # our choice: LLMClient holds one task per request of a chunk
    # our choice: more failed requests than this (after the client's retries) fail the stage instead of
    # silently dropping captions; rerun it (answers are cached with llm.cache_dir).
    max_failed_fraction: float = Field(0.05, ge=0, le=1)

    @field_validator("prompt")
    @classmethod
    def _has_caption_slot(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("prompt must contain '{caption}'")
        try:
            value.format(caption="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt is not a valid format string with only {{caption}}: {exc}") from None
        return value


class RawClipScoreConfig(ScoreConfig):
    """`ScoreConfig` for the raw web image: its own score key, so it never overwrites the generated-image
    CLIPScore (a subclass, so that a partial `score` section keeps this default)."""

    score_key: str = "raw_clip"  # our choice: "clip" is the generated-image score of stages.clip_score


class ClipFilterConfig(StageConfig):
    """CLIPScore of caption vs its raw web image (SynthVLM §3.1), for records with `image_uri`."""

    enabled: bool = True  # SynthVLM §3.1; records without image_uri pass unscored
    mode: Literal["top_fraction", "threshold"] = "top_fraction"  # SynthVLM §3.1: "top 40%"
    top_fraction: float = Field(0.4, gt=0, le=1)  # SynthVLM §3.1: top 40% of image-caption pairs
    # LAION-5B's English filter (cosine >= 0.28 with CLIP ViT-B/32); for mode "threshold".
    threshold: float = 0.28
    # The CLIP model and batch settings (stages.clip_score); the score is stored under score.score_key.
    score: RawClipScoreConfig = Field(default_factory=RawClipScoreConfig)


class CurateScaleConfig(StageConfig):
    """How the pipeline spreads curation over pods (synthvlm.curation.sharded). Left out of the
    fingerprint: the kept set does not depend on it (tests/curation/test_sharded.py)."""

    # our choice: ~5 KB of memory per caption in a filter pod (issue 13's measurement) -> ~1 GB of records
    # per pod besides the models; the number of filter shards (and dedup partitions) is pool / this.
    records_per_shard: int = Field(200_000, ge=1)
    max_shards: int = Field(1000, ge=1)  # our choice: a bound on the pods one run asks for


class CurateConfig(StageConfig):
    """SynthVLM §3.1 caption curation: heuristics -> perplexity -> LLM judge -> BLIP ITM -> raw-image
    CLIPScore -> dedup -> CLIP top fraction -> sample."""

    heuristics: HeuristicsConfig = Field(default_factory=HeuristicsConfig)
    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    itm: ImageTextMatchConfig = Field(default_factory=ImageTextMatchConfig)
    clip: ClipFilterConfig = Field(default_factory=ClipFilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    # SynthVLM §3.1: "we sampled a dataset of 1,000k captions"; None = keep all that pass.
    sample_size: int | None = Field(1_000_000, ge=1)
    sample_seed: int = 0  # our choice: any fixed seed; changes which captions a sample picks
    scale: CurateScaleConfig = Field(default_factory=CurateScaleConfig)


# ---- the judge: prompt, answer parsing, template rule ----------------------------------------------------

AD_MARKERS = frozenset({"buy", "sale", "discount", "shipping", "coupon", "promo", "subscribe", "click"})
TEMPLATE_MIN_WORDS = 5  # template rule: fewer words cannot guide a text-to-image model
TEMPLATE_MIN_DISTINCT = 0.5  # template rule: at least half of the words distinct (not repetitive)


def judge_request(record: Record, config: JudgeConfig) -> LLMRequest:
    prompt = config.prompt.format(caption=record.caption)
    return LLMRequest.from_prompt(record.id, prompt, system=config.system, task=JUDGE_TASK)


def parse_judge_answer(text: str | None) -> bool | None:
    """True for a reply starting with "Yes", False for "No" (any case, leading punctuation ignored)."""
    match = _ANSWER.match(text or "")
    return None if match is None else match.group(1).lower() == "yes"


def template_caption_verdict(caption: str) -> bool:
    """The template backend's deterministic stand-in for the LLM's judgement: at least 5 words, at least
    half of them distinct, and no advertising marker (buy, sale, shipping, ..., a URL)."""
    tokens = words(caption)
    if len(tokens) < TEMPLATE_MIN_WORDS or len(set(tokens)) < TEMPLATE_MIN_DISTINCT * len(tokens):
        return False
    lowered = caption.lower()
    return not (AD_MARKERS.intersection(tokens) or "http" in lowered or "www." in lowered)


def template_judge(request: LLMRequest) -> str:
    """Template for JUDGE_TASK: "Yes"/"No" by `template_caption_verdict` of the text after "Caption:"."""
    caption = request_text(request).rsplit(CAPTION_MARKER, 1)[-1].strip()
    return "Yes" if template_caption_verdict(caption) else "No"


register_template(JUDGE_TASK, template_judge)


# ---- rejects and step bookkeeping --------------------------------------------------------------------


@dataclass
class _Run:
    """What the steps share: the rejects rows and counts per step."""

    stats: StageStats
    rows: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reject(self, record: Record, step: str, reason: str, details: dict[str, Any] | None = None) -> None:
        self.rows.append(
            {
                "id": record.id,
                "caption": record.caption,
                "stage": step,
                "reason": reason,
                "details": details or {},
            }
        )
        self.stats.rejects[f"{step}.{reason}"] += 1

    def step(
        self, name: str, records: list[Record], run: Callable[[list[Record]], list[Record]]
    ) -> list[Record]:
        before = len(self.rows)
        kept = run(records)
        self.steps[name] = {"in": len(records), "out": len(kept), "rejected": len(self.rows) - before}
        log.info("curate %s: kept %d of %d", name, len(kept), len(records))
        return kept

    def rejects_jsonl(self) -> str:
        return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in self.rows)


# ---- the steps -------------------------------------------------------------------------------------------


def _heuristics(records: list[Record], config: HeuristicsConfig, run: _Run) -> list[Record]:
    check = HeuristicFilter(config)
    kept = []
    for record in records:
        measured, failed = check.check(record.caption)
        if failed:
            run.reject(record, "heuristics", failed[0], {"failed": failed, **measured.to_dict()})
        else:
            kept.append(record)
    return kept


PERPLEXITY_KEY = "perplexity"


def _perplexity(records: list[Record], config: PerplexityConfig, run: _Run, models: Models) -> list[Record]:
    if not records:
        return records
    values = models.perplexity(config).perplexities([r.caption for r in records])
    kept, limit = [], {"max_perplexity": config.max_perplexity}
    for record, value in zip(records, values, strict=True):
        if value is None:
            run.reject(record, "perplexity", "no_tokens", {})
        elif not value <= config.max_perplexity:
            run.reject(record, "perplexity", PERPLEXITY_HIGH, {PERPLEXITY_KEY: round(value, 3), **limit})
        else:
            scores = {**record.scores, PERPLEXITY_KEY: round(value, 3)}
            kept.append(record.model_copy(update={"scores": scores}))
    return kept


def _itm(records: list[Record], config: ImageTextMatchConfig, run: _Run, models: Models) -> list[Record]:
    from synthvlm.curation.image_text_matching import score_records

    with_image = [r for r in records if r.image_uri]
    run.stats.extra["itm_records_without_image"] = len(records) - len(with_image)
    if not with_image:
        return records
    scored = dict(zip((r.id for r in with_image), score_records(models.itm(config), with_image), strict=True))
    kept = []
    for record in records:
        if not record.image_uri:
            kept.append(record)
            continue
        value, reason = scored[record.id]
        if value is None:
            run.reject(
                record, "itm", (reason or "unscored").replace(" ", "_"), {"image_uri": record.image_uri}
            )
        elif value < config.min_score:
            run.reject(record, "itm", ITM_LOW, {config.score_key: value, "min_score": config.min_score})
        else:
            kept.append(record.model_copy(update={"scores": {**record.scores, config.score_key: value}}))
    return kept


def _judge(records: list[Record], config: JudgeConfig, backend: Backend, run: _Run) -> list[Record]:
    kept, failed = [], []
    provenance = {JUDGE_TASK: backend.describe()}
    for start in range(0, len(records), config.chunk_size):
        chunk = records[start : start + config.chunk_size]
        results = backend.run_many([judge_request(r, config) for r in chunk])
        for record, result in zip(chunk, results, strict=True):
            if not result.ok:
                failed.append((record, {"reject_kind": result.reject_kind, "error": result.reason}))
                continue
            verdict = parse_judge_answer(result.text)
            if verdict:
                kept.append(record.model_copy(update={"provenance": {**record.provenance, **provenance}}))
            else:
                reason = "answered_no" if verdict is False else "unclear_answer"
                run.reject(
                    record, "judge", reason, {"answer": (result.text or "")[:200], **backend.describe()}
                )
        log.info("curate judge: %d/%d captions judged", start + len(chunk), len(records))
    if records and len(failed) > config.max_failed_fraction * len(records):
        raise SynthVLMError(
            f"the caption judge failed for {len(failed)} of {len(records)} captions (more than "
            f"judge.max_failed_fraction={config.max_failed_fraction}); first error: {failed[0][1]['error']}. "
            "Nothing was published; rerun the stage (with judge.llm.cache_dir set, answered captions "
            "are not asked again)"
        )
    for record, details in failed:
        run.reject(record, "judge", "llm_failed", {**details, **backend.describe()})
    return kept


def _score_raw_images(
    records: Sequence[Record], config: ScoreConfig
) -> list[tuple[float | None, str | None]]:
    """(cosine, None) per record, or (None, reason) when its image is missing or unreadable."""
    import torch

    from synthvlm.devices import resolve_device, resolve_dtype
    from synthvlm.models.clip import load_clip
    from synthvlm.scoring import apply_form, cosine_batch, load_pixels

    device = resolve_device(config.device)
    # as stages.clip_score: float16 on GPU for "auto" (CLIP's training precision), else the named dtype
    dtype = (
        torch.float16
        if config.dtype == "auto" and device.type == "cuda"
        else resolve_dtype(config.dtype, device)
    )
    model, preprocess, tokenizer = load_clip(config.model, config.pretrained, device, dtype)
    out: list[tuple[float | None, str | None]] = []
    with ThreadPoolExecutor(max_workers=config.read_workers) as pool:
        for start in range(0, len(records), config.batch_size):
            batch = records[start : start + config.batch_size]
            loaded = list(pool.map(lambda r: load_pixels(r, preprocess), batch))
            good = [i for i, (pixels, _) in enumerate(loaded) if pixels is not None]
            scores: dict[int, float] = {}
            if good:
                pixels = torch.stack([loaded[i][0] for i in good])
                captions = [batch[i].caption for i in good]
                cosines = cosine_batch(model, tokenizer, pixels, captions, config.long_captions).tolist()
                scores = {i: apply_form(c, config.form) for i, c in zip(good, cosines, strict=True)}
            for i, (_, reason) in enumerate(loaded):
                value = scores.get(i)
                if value is not None and not math.isfinite(value):
                    value, reason = None, "non-finite score"
                out.append((value, reason))
            log.info("curate clip: scored %d/%d raw images", len(out), len(records))
    return out


def _clip(records: list[Record], config: ClipFilterConfig, run: _Run) -> list[Record]:
    """Score the records with a raw image; in mode "threshold", drop those below it."""
    with_image = [r for r in records if r.image_uri]
    run.stats.extra["clip_records_without_image"] = len(records) - len(with_image)
    if not with_image:
        return records
    key = config.score.score_key
    scorer = {"model": config.score.model, "pretrained": config.score.pretrained, "form": config.score.form}
    scored: dict[str, float | None] = {}
    for record, (value, reason) in zip(with_image, _score_raw_images(with_image, config.score), strict=True):
        scored[record.id] = value
        if value is None:
            reason = (reason or "unscored").replace(" ", "_")
            run.reject(record, "clip", reason, {"image_uri": record.image_uri})
    kept = []
    for record in records:
        value = scored.get(record.id)
        if not record.image_uri:
            kept.append(record)
        elif value is None:
            continue
        elif config.mode == "threshold" and value < config.threshold:
            run.reject(record, "clip", "below_threshold", {key: value, "threshold": config.threshold})
        else:
            update = {
                "scores": {**record.scores, key: value},
                "provenance": {**record.provenance, f"{key}_scorer": scorer},
            }
            kept.append(record.model_copy(update=update))
    return kept


def top_fraction_ids(scored: dict[str, float], fraction: float) -> set[str]:
    """The ids of the best `fraction` of the scores (ceil), ties by id (as stages.select)."""
    ranked = sorted(scored, key=lambda rid: (-scored[rid], rid))
    return set(ranked[: fraction_count(len(ranked), fraction)])


def _clip_rank(records: list[Record], config: ClipFilterConfig, run: _Run) -> list[Record]:
    """Mode "top_fraction": keep the best `top_fraction` of the scored records left (unscored pass)."""
    key = config.score.score_key
    scored = {r.id: r.scores[key] for r in records if r.image_uri and key in r.scores}
    chosen = top_fraction_ids(scored, config.top_fraction)
    kept = []
    for record in records:
        if record.id in scored and record.id not in chosen:
            run.reject(
                record,
                "clip",
                "not_in_top_fraction",
                {key: scored[record.id], "top_fraction": config.top_fraction},
            )
        else:
            kept.append(record)
    _clip_summary(run.stats, key, list(scored.values()), [scored[rid] for rid in chosen])
    return kept


def _clip_summary(stats: StageStats, key: str, scored: list[float], kept: list[float]) -> None:
    if scored:
        stats.extra[f"{key}_mean_in"] = sum(scored) / len(scored)
        stats.extra[f"{key}_min_kept"] = min(kept, default=None)


def _dedup(records: list[Record], config: DedupConfig, run: _Run) -> list[Record]:
    kept = []
    for record, duplicate in zip(records, find_duplicates([r.caption for r in records], config), strict=True):
        if duplicate is None:
            kept.append(record)
            continue
        details = {"duplicate_of": records[duplicate.of_index].id, "jaccard": round(duplicate.jaccard, 4)}
        run.reject(record, "dedup", f"{duplicate.kind}_duplicate", details)
    return kept


def sample_key(record_id: str, seed: int) -> str:
    """The sampling order: records with the smallest keys are sampled."""
    return hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()


def _sample(records: list[Record], size: int | None, seed: int, run: _Run) -> list[Record]:
    if size is None or len(records) <= size:
        return records
    chosen = set(sorted((r.id for r in records), key=lambda rid: sample_key(rid, seed))[:size])
    for record in records:
        if record.id not in chosen:
            run.reject(record, "sample", "not_sampled", {"sample_size": size, "sample_seed": seed})
    return [r for r in records if r.id in chosen]


# ---- the stage -------------------------------------------------------------------------------------------


class Models:
    """The filters' models, each loaded once per process on first use."""

    def __init__(self) -> None:
        self._loaded: dict[str, Any] = {}

    def perplexity(self, config: PerplexityConfig):
        from synthvlm.curation.perplexity import PerplexityScorer

        key = f"ppl:{config.model_dump_json()}"
        if key not in self._loaded:
            self._loaded[key] = PerplexityScorer(config)
        return self._loaded[key]

    def itm(self, config: ImageTextMatchConfig):
        from synthvlm.curation.image_text_matching import ImageTextMatcher

        key = f"itm:{config.model_dump_json()}"
        if key not in self._loaded:
            self._loaded[key] = ImageTextMatcher(config)
        return self._loaded[key]


def make_judge_backend(config: CurateConfig, data_root: str) -> Backend | None:
    """The judge's backend, created first so that a missing API key fails before any work is done."""
    if not config.judge.enabled:
        return None
    return make_backend(config.judge.llm, default_cache_dir=storage.join(data_root, LLM_CACHE_DIR))


def filter_records(
    records: list[Record], config: CurateConfig, backend: Backend | None, steps: _Run, models: Models
) -> list[Record]:
    """The per-caption steps (PER_CAPTION_STEPS): each caption's fate depends on that caption alone."""
    kept = records
    if config.heuristics.enabled:
        kept = steps.step("heuristics", kept, lambda rs: _heuristics(rs, config.heuristics, steps))
    if config.perplexity.enabled:
        kept = steps.step("perplexity", kept, lambda rs: _perplexity(rs, config.perplexity, steps, models))
    if backend is not None:
        kept = steps.step("judge", kept, lambda rs: _judge(rs, config.judge, backend, steps))
    if config.itm.enabled:
        kept = steps.step("itm", kept, lambda rs: _itm(rs, config.itm, steps, models))
    if config.clip.enabled:
        kept = steps.step("clip", kept, lambda rs: _clip(rs, config.clip, steps))
    return kept


def _process(config: CurateConfig, run: StageRun) -> StageStats:
    stats = StageStats(STAGE)
    backend = make_judge_backend(config, run.data_root)
    records = read_manifest(run.inputs["captions"])
    stats.count_in = len(records)
    steps = _Run(stats)
    kept = filter_records(records, config, backend, steps, Models())
    if config.dedup.exact or config.dedup.near:
        kept = steps.step("dedup", kept, lambda rs: _dedup(rs, config.dedup, steps))
    if config.clip.enabled and config.clip.mode == "top_fraction":
        kept = steps.step("clip_rank", kept, lambda rs: _clip_rank(rs, config.clip, steps))
    kept = steps.step("sample", kept, lambda rs: _sample(rs, config.sample_size, config.sample_seed, steps))

    rejects_manifest = storage.join(run.dir, run.context["rejects_name"])
    storage.write_text(rejects_manifest, steps.rejects_jsonl(), content_type="application/jsonl")
    stats.count_out = write_manifest(run.output, [_caption_only(r) for r in kept])
    stats.extra.update(_summary(steps, backend, rejects_manifest, stats))
    log.info("curate: kept %d of %d captions", stats.count_out, stats.count_in)
    return stats


def model_params(config: CurateConfig) -> dict[str, Any]:
    """The filters' weights, resolved to a commit (or a folder's content hash) before loading: part of the
    fingerprint, so a hub branch that moved between two runs is not taken for the same output."""
    from synthvlm.curation.perplexity import is_builtin_lm
    from synthvlm.models.sdxl import resolve_weights

    weights: dict[str, Any] = {}
    if config.perplexity.enabled:
        ppl = config.perplexity
        weights["perplexity"] = (
            {"unresolved": "built in code from a fixed seed"}
            if is_builtin_lm(ppl.model)
            else resolve_weights(ppl.model, ppl.revision)
        )
    if config.itm.enabled:
        weights["itm"] = resolve_weights(config.itm.model, config.itm.revision)
    return {"weights": weights} if weights else {}


EXCLUDED = {
    **llm_runtime_fields("judge.llm"),
    "judge.chunk_size": "requests per batch sent to the LLM, each answered on its own",
    "clip.score.batch_size": "each image and caption is encoded on its own",
    "clip.score.read_workers": "parallel reads of the same images",
    "perplexity.batch_size": "each caption is scored on its own (padding is masked out)",
    "itm.batch_size": "each image and caption is scored on its own",
    "itm.read_workers": "parallel reads of the same images",
    "scale": "how the pipeline spreads the work over pods; the kept set does not depend on it",
}


CURATE = Stage(
    name=STAGE,
    process=_process,
    excluded=EXCLUDED,
    sidecars=("{rejects}",),
    version=2,  # 2: perplexity and ITM filters; per-caption steps before dedup
)


def curate(
    config: CurateConfig,
    input_manifest: str,
    output_manifest: str,
    rejects_manifest: str | None = None,
    *,
    data_root: str | None = None,
) -> str:
    """Curate the captions of `input_manifest`; every dropped caption goes to the rejects manifest (JSONL,
    next to the output; default `rejects.jsonl`) with its step and reason. Returns the versioned output
    (a copy is published at `output_manifest`, the rejects beside it). The judge's answers are cached under
    `data_root` (default: the output's folder), whatever the fingerprint."""
    rejects_name = (rejects_manifest or "rejects.jsonl").rstrip("/").rpartition("/")[2]
    return run_stage(
        CURATE,
        config,
        {"captions": input_manifest},
        output_manifest,
        params=model_params(config),
        context={"rejects_name": rejects_name},
        names={"rejects": rejects_name},
        data_root=data_root,
    )


def _caption_only(record: Record) -> Record:
    if not record.image_uri:
        return record
    provenance = {**record.provenance, "raw_image_uri": record.image_uri}
    return record.model_copy(update={"image_uri": None, "provenance": provenance})


def _summary(run: _Run, backend: Backend | None, rejects_manifest: str, stats: StageStats) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "steps": run.steps,
        "kept_fraction": stats.count_out / stats.count_in if stats.count_in else None,
        "rejects_manifest": rejects_manifest,
        "rejected_by_step": dict(Counter(row["stage"] for row in run.rows)),
    }
    if backend is not None:
        summary["llm_backend"] = backend.name
        summary["llm_model"] = backend.model
        summary.update(backend.metrics())
    return summary
