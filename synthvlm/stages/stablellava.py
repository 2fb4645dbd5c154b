"""StableLLaVA stages (papers/stablellava_v2.txt, templates in stablellava_v1_with_templates.txt).

    keywords -> prompts (+ filters) -> [shared] generate -> clip_score -> select(threshold 0.25)
                        \\-> dialogues ------------------------------------------------/-> export

- `generate_keywords`: an LLM lists keywords per ability (v2 §4.3) -> keywords.json.
- `generate_prompts`: SD prompts per ability with the Fig. 4 template and a refreshed in-context pool, paired
  prompts for multi-image data (v2 Fig. 7), all filtered (filters.py); a record manifest whose `caption`
  is the plain prompt diffusers gets, with ability / keywords / bracketed prompt / split in provenance, so
  the shared generate and clip_score stages run on it unchanged.
- `generate_dialogues`: dialogues from the same prompts (dialogues.py) -> dialogues.jsonl. It needs only
  the prompt manifest, so it can run while the images are generated.
- `export_stablellava`: joins the dialogues with the records that passed the CLIP alignment check (v2 §4.4,
  gamma = 0.25, the shared select stage in threshold mode), drops training items that match an eval item
  by keywords (v1 §5.2), and writes LLaVA pretraining / SFT JSON and the eval JSONL.

Every stage runs through synthvlm.runner: a rerun with the same settings and inputs returns at once, any
change recomputes into a new fingerprint folder. Within a stage, the LLM's response cache (on by default,
`<data root>/llm-cache`, or `llm.cache_dir`) makes a rerun after a
crash re-ask nothing already answered. Every dropped item goes to `<output>.rejects.jsonl` with a reason.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pydantic import BaseModel, Field, ValidationError, field_validator

import synthvlm.stablellava.templates  # noqa: F401  (registers the offline template generators)
from synthvlm import storage
from synthvlm.config import StageConfig
from synthvlm.dataset_card import CardConfig, CardData, write_card
from synthvlm.dataset_card import Subset as CardSubset
from synthvlm.errors import InputError
from synthvlm.llava_format import relative_image_path
from synthvlm.llm import LLMRequest, LLMResult
from synthvlm.llm.backend import Backend, BackendConfig, make_backend
from synthvlm.llm.fingerprint import llm_runtime_fields
from synthvlm.records import Record, read_manifest, write_manifest
from synthvlm.runner import LLM_CACHE_DIR, Stage, StageRun, run_stage
from synthvlm.stablellava.abilities import Ability, load_registry, select_abilities
from synthvlm.stablellava.dialogues import (
    Dialogue,
    interleaved_dialogues,
    job_request,
    plan_jobs,
    raw_prompt,
    stable_index,
    to_dialogue,
)
from synthvlm.stablellava.emphasis import EmphasisMode, ParsedPrompt, parse_prompt
from synthvlm.stablellava.export import (
    ALLOWED_METRICS,
    EVAL_METRICS,
    LMMS_TASK,
    LMMS_UTILS,
    LMMS_YAML,
    EvalMetric,
    absolute_uri,
    eval_row,
    file_guide,
    fits_llava15,
    image_token_problem,
    interleaved_sample,
    llava15_sample,
    lmms_task_files,
)
from synthvlm.stablellava.filters import (
    DEFAULT_NONVISUAL_WORDS,
    OVERLAPS_EVAL,
    FilterConfig,
    LengthLimit,
    RepetitionTracker,
    Verdict,
    check_image_prompt,
    check_prompt,
    find_eval_overlaps,
    length_problem,
)
from synthvlm.stablellava.interleaved import (
    ABILITY as INTERLEAVED_ABILITY,
)
from synthvlm.stablellava.interleaved import (
    InterleavedConfig,
    InterleavedReply,
    interleaved_request,
    parse_reply,
    phrases_for,
)
from synthvlm.stablellava.keywords import (
    KeywordReply,
    clean_keyword,
    keyword_request,
    merge_keywords,
    read_banks,
    write_banks,
)
from synthvlm.stablellava.prompts import (
    RELATIONS,
    ExamplePool,
    PairReply,
    PromptReply,
    pair_request,
    prompt_request,
    sample_keywords,
)
from synthvlm.stage import StageStats
from synthvlm.webdataset_export import EXCLUDED as WDS_EXCLUDED
from synthvlm.webdataset_export import INDEX_NAME as WDS_INDEX
from synthvlm.webdataset_export import SHARD_DIR as WDS_DIR
from synthvlm.webdataset_export import SHARD_GLOB as WDS_SHARDS
from synthvlm.webdataset_export import Sample as WdsSample
from synthvlm.webdataset_export import ShardSet, WebDatasetConfig, write_index, write_shards

log = logging.getLogger(__name__)

Relation = Literal["similarity", "difference", "logical"]
LLM_REJECTED = "llm rejected"
NOT_SELECTED = "image not selected"
PAIR_MEMBER_REJECTED = "pair member rejected"
PRETRAIN_JSON = "stablellava_pretrain.json"
SFT_JSON = "stablellava_sft.json"  # LLaVA-1.5-compatible: one image per sample
INTERLEAVED_JSON = "stablellava_sft_interleaved.json"  # LLaVA-NeXT / OneVision: image lists, every sample
EVAL_JSONL = "stablellava_eval.jsonl"
EXPORTS_JSON = "exports.json"
README_MD = "README.md"
NOT_LLAVA15 = "multi-image: not in the LLaVA-1.5 file"
IMAGE_TOKEN_MISMATCH = "image markers do not match images"
MANIFEST_NAME = "manifest.jsonl"
REJECTS_NAME = "export.rejects.jsonl"
_LLM_CHUNK = 2000  # LLMClient: "pass chunks of a few thousand requests"


class Reject(BaseModel):
    """One dropped item, as written to a rejects file."""

    id: str
    stage: str
    reason: str
    detail: str = ""
    ability: str | None = None
    text: str | None = None

    @classmethod
    def of(
        cls, verdict: Verdict, *, id: str, stage: str, ability: str | None, text: str | None = None
    ) -> Reject:
        return cls(
            id=id, stage=stage, reason=verdict.reason, detail=verdict.detail, ability=ability, text=text
        )


def rejects_uri(output_uri: str) -> str:
    """'.../prompts.jsonl' -> '.../prompts.rejects.jsonl'."""
    stem = output_uri.removesuffix(".jsonl").removesuffix(".json")
    return f"{stem}.rejects.jsonl"


_LLM_RUNTIME = llm_runtime_fields("llm")
_REJECTS = "{rejects}"


def _llm_cache(run: StageRun) -> str:
    """Answers are cached under the data root, whatever the fingerprint: an unchanged request is never
    asked twice, a changed one is (the cache key is the request)."""
    return storage.join(run.data_root, LLM_CACHE_DIR)


def _rejects_name(output_uri: str) -> dict[str, str]:
    """The rejects sidecar's file name for the runner's sidecar pattern."""
    return {"rejects": rejects_uri(output_uri).rpartition("/")[2]}


def _write_jsonl(uri: str, rows: Sequence[BaseModel | dict[str, Any]]) -> None:
    lines = [
        row.model_dump_json() if isinstance(row, BaseModel) else json.dumps(row, ensure_ascii=False)
        for row in rows
    ]
    storage.write_text(uri, "".join(line + "\n" for line in lines), content_type="application/jsonl")


def _run(backend: Backend, requests: list[LLMRequest]) -> list[LLMResult]:
    results: list[LLMResult] = []
    for start in range(0, len(requests), _LLM_CHUNK):
        results.extend(backend.run_many(requests[start : start + _LLM_CHUNK]))
    return results


def _llm_verdict(result: LLMResult) -> Verdict:
    return Verdict(LLM_REJECTED, f"{result.reject_kind}: {result.reason}")


# ---- keywords ---------------------------------------------------------------------------------------------


class KeywordsConfig(StageConfig):
    """LLM keyword banks per ability (v2 §4.3)."""

    abilities: list[str] | None = None  # v1 §5.1: all 13 abilities (None = every ability in the registry)
    abilities_dir: str | None = None  # our choice: None = the bundled data files (synthvlm/data/abilities)
    requests_per_ability: int = Field(4, ge=0)  # our choice: independent requests spread the keywords out
    keywords_per_request: int = Field(25, ge=1)  # our choice: a list an LLM writes reliably in one reply
    include_seed_bank: bool = True  # our choice: the data file's seed keywords belong to the bank too
    nonvisual_words: list[str] = Field(default_factory=lambda: list(DEFAULT_NONVISUAL_WORDS))  # v2 §4.1
    seed: int = 0  # our choice: any fixed value; it decides which seed keywords each request shows
    llm: BackendConfig = Field(default_factory=BackendConfig)


def _keywords(config: KeywordsConfig, run: StageRun) -> StageStats:
    output_uri = run.output
    stats = StageStats("stablellava_keywords")
    abilities = select_abilities(load_registry(config.abilities_dir), config.abilities, "keywords config")
    requests = [
        keyword_request(ability, config.keywords_per_request, index, config.seed)
        for ability in abilities
        for index in range(config.requests_per_ability)
    ]
    # No requests (requests_per_ability=0): the seed banks alone, and no LLM (nor key) needed.
    backend = make_backend(
        config.llm if requests else BackendConfig(backend="template"), default_cache_dir=_llm_cache(run)
    )
    results = _run(backend, requests)
    from_llm: dict[str, list[str]] = {a.name: [] for a in abilities}
    rejects: list[Reject] = []
    asked = [a for a in abilities for _ in range(config.requests_per_ability)]
    for ability, result in zip(asked, results, strict=True):
        if not result.ok or result.parsed is None:
            verdict = _llm_verdict(result)
            rejects.append(Reject.of(verdict, id=result.id, stage="keywords", ability=ability.name))
            continue
        for raw in cast(KeywordReply, result.parsed).keywords:
            keyword, verdict = clean_keyword(raw, config.nonvisual_words)
            if keyword is None:
                rejects.append(
                    Reject.of(verdict, id=result.id, stage="keywords", ability=ability.name, text=raw)
                )
            else:
                from_llm[ability.name].append(keyword)
    banks = {
        a.name: merge_keywords(a.keyword_bank if config.include_seed_bank else [], from_llm[a.name])
        for a in abilities
    }
    stats.count_in = len(requests)
    stats.count_out = sum(map(len, banks.values()))
    stats.rejects.update(r.reason for r in rejects)
    stats.extra.update(
        {f"keywords_{name}": len(words) for name, words in banks.items()},
        **backend.metrics(),
        llm=backend.describe(),
    )
    _write_jsonl(rejects_uri(output_uri), rejects)
    write_banks(output_uri, banks, {"llm": backend.describe(), "seed": config.seed})
    log.info("keywords: %d keywords for %d abilities", stats.count_out, len(banks))
    return stats


KEYWORDS = Stage(name="stablellava_keywords", process=_keywords, excluded=_LLM_RUNTIME, sidecars=(_REJECTS,))


def generate_keywords(config: KeywordsConfig, output_uri: str, *, data_root: str | None = None) -> str:
    """Write `{ability: [keywords]}` (JSON); rejected keywords to its rejects file. Returns the versioned
    output (a copy is published at `output_uri`)."""
    return run_stage(KEYWORDS, config, {}, output_uri, names=_rejects_name(output_uri), data_root=data_root)


# ---- prompts ----------------------------------------------------------------------------------------------


class PromptsConfig(StageConfig):
    """SD prompt generation (v1 Fig. 4, v2 Fig. 7) and the prompt filters (v2 §4.1, §4.4)."""

    abilities: list[str] | None = None  # v1 §5.1: all 13 abilities (None = every ability in the registry)
    abilities_dir: str | None = None  # our choice: None = the bundled data files
    # v2 §5.1: 38K single-image pairs for training over 13 abilities, about 3K each.
    prompts_per_ability: int = Field(3000, ge=0)
    eval_per_ability: int = Field(50, ge=0)  # v1 §5.2: 50 synthesized evaluation pairs per ability
    # v2 §5.1: 3K multi-image instances (similarity, difference, logical relations); our split: 1K each.
    pairs_per_relation: int = Field(1000, ge=0)
    relations: list[Relation] = Field(default_factory=lambda: list(RELATIONS))  # v2 §4.2
    examples_shown: int = Field(5, ge=1)  # v1 §4.3: "we present five examples"
    pool_size: int = Field(20, ge=1)  # v1 §4.3: "a set of 20 high-quality, diverse outputs"
    # v2 §4.3: "periodically substituting a portion of the original in-context examples"; our choice: 25%
    # of the pool after every round.
    replace_fraction: float = Field(0.25, ge=0, le=1)
    round_size: int = Field(50, ge=1)  # our choice: requests per ability between two pool refreshes
    keywords_shown: int = Field(20, ge=1)  # our choice: bank keywords offered per request (Fig. 4)
    # our choice: stop asking for an ability after this many times its target in requests (a run must end
    # even when a model keeps failing a filter); the shortfall is reported in the stats.
    max_request_factor: float = Field(3.0, ge=1)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    # v1 §4.1 / v2 §4.1: the key keyword is double-bracketed "for additional emphasis", the A1111 web UI's
    # attention weighting. "weight" (the paper): records carry `weighted_prompt`, the prompt in compel's
    # syntax with A1111 weights ((x)) = 1.21 (emphasis.py), for generation with prompt weighting;
    # "strip": the plain prompt only (brackets dropped, the key keyword first). The caption is the plain
    # prompt either way (the CLIP check scores it).
    emphasis: EmphasisMode = "weight"
    # v2 §4.2 / App. C Fig. 8: interleaved multi-turn, multi-image dialogues (interleaved.py).
    interleaved: InterleavedConfig = Field(default_factory=InterleavedConfig)
    seed: int = 0  # our choice: any fixed value; decides sampled keywords/examples, eval split, LLM seeds
    llm: BackendConfig = Field(default_factory=BackendConfig)


@dataclass
class _Candidate:
    ability: Ability
    parsed: ParsedPrompt
    request_id: str
    round: int


@dataclass
class _Progress:
    """Per-target bookkeeping of the generate-filter rounds."""

    target: int
    budget: int
    sent: int = 0
    accepted: list[Any] = field(default_factory=list)

    def next_count(self, round_size: int) -> int:
        return max(0, min(round_size, self.target - len(self.accepted), self.budget - self.sent))


class _PromptRun:
    """State shared by the single-prompt and pair rounds: backend, filters, rejects."""

    def __init__(self, config: PromptsConfig, banks: dict[str, list[str]], backend: Backend):
        self.config = config
        self.banks = banks
        self.backend = backend
        self.tracker = RepetitionTracker(config.filters)
        self.rejects: list[Reject] = []
        self.requests = 0
        self.pool_changes = 0

    def reject(self, item_id: str, verdict: Verdict, ability: Ability, text: str | None) -> None:
        self.rejects.append(Reject.of(verdict, id=item_id, stage="prompts", ability=ability.name, text=text))

    def verdict(self, parsed: ParsedPrompt, ability: Ability) -> Verdict | None:
        return check_prompt(
            parsed, ability, self.banks[ability.name], self.config.filters
        ) or self.tracker.check(parsed)

    def ask(self, requests: list[LLMRequest]) -> list[LLMResult]:
        self.requests += len(requests)
        return _run(self.backend, requests)

    def singles(self, abilities: list[Ability]) -> dict[str, list[_Candidate]]:
        """Rounds of prompt requests per ability; the in-context pool is refreshed after each round."""
        cfg = self.config
        target = cfg.prompts_per_ability + cfg.eval_per_ability
        progress = {a.name: _Progress(target, math.ceil(cfg.max_request_factor * target)) for a in abilities}
        pools = {a.name: ExamplePool(a.prompt_examples, cfg.pool_size) for a in abilities}
        round_no = 0
        while True:
            batch: list[tuple[Ability, LLMRequest]] = []
            for ability in abilities:
                state = progress[ability.name]
                rng = random.Random(f"{cfg.seed}/prompts/{ability.name}/{round_no}")
                for index in range(state.next_count(cfg.round_size)):
                    request = prompt_request(
                        f"prompt-{ability.name}-r{round_no:04d}-{index:03d}",
                        ability,
                        sample_keywords(self.banks[ability.name], cfg.keywords_shown, rng),
                        pools[ability.name].sample(cfg.examples_shown, rng),
                        cfg.filters.max_keywords,
                        seed=rng.getrandbits(31),
                    )
                    batch.append((ability, request))
                    state.sent += 1
            if not batch:
                return {name: state.accepted for name, state in progress.items()}
            fresh: dict[str, list[str]] = {a.name: [] for a in abilities}
            for (ability, request), result in zip(batch, self.ask([r for _, r in batch]), strict=True):
                candidate = self._single(ability, request, result, round_no)
                if candidate is not None:
                    progress[ability.name].accepted.append(candidate)
                    fresh[ability.name].append(candidate.parsed.raw)
            for ability in abilities:
                rng = random.Random(f"{cfg.seed}/pool/{ability.name}/{round_no}")
                self.pool_changes += pools[ability.name].refresh(
                    fresh[ability.name], cfg.replace_fraction, rng
                )
            log.info(
                "prompts round %d: %d requests, %d accepted",
                round_no,
                len(batch),
                sum(map(len, fresh.values())),
            )
            round_no += 1

    def _single(
        self, ability: Ability, request: LLMRequest, result: LLMResult, round_no: int
    ) -> _Candidate | None:
        if not result.ok or result.parsed is None:
            self.reject(request.id, _llm_verdict(result), ability, result.text)
            return None
        parsed = parse_prompt(cast(PromptReply, result.parsed).prompt)
        verdict = self.verdict(parsed, ability)
        if verdict is not None:
            self.reject(request.id, verdict, ability, parsed.raw)
            return None
        self.tracker.add(request.id, parsed)
        return _Candidate(ability, parsed, request.id, round_no)

    def pairs(self, abilities: list[Ability], relation: str) -> list[tuple[_Candidate, _Candidate]]:
        """Paired prompts for one relation; the abilities take turns as the pair's theme."""
        cfg = self.config
        target = cfg.pairs_per_relation
        state = _Progress(target, math.ceil(cfg.max_request_factor * target))
        round_no = 0
        while count := state.next_count(cfg.round_size * len(abilities)):
            rng = random.Random(f"{cfg.seed}/pairs/{relation}/{round_no}")
            batch: list[tuple[Ability, LLMRequest]] = []
            for index in range(count):
                ability = abilities[(state.sent + index) % len(abilities)]
                keywords = sample_keywords(self.banks[ability.name], cfg.keywords_shown, rng)
                request_id = f"pair-{relation}-r{round_no:04d}-{index:04d}"
                request = pair_request(
                    request_id, ability, relation, keywords, cfg.filters.max_keywords, rng.getrandbits(31)
                )
                batch.append((ability, request))
            state.sent += count
            for (ability, request), result in zip(batch, self.ask([r for _, r in batch]), strict=True):
                pair = self._pair(ability, request, result, round_no)
                if pair is not None:
                    state.accepted.append(pair)
            round_no += 1
        return state.accepted

    def _pair(
        self, ability: Ability, request: LLMRequest, result: LLMResult, round_no: int
    ) -> tuple[_Candidate, _Candidate] | None:
        if not result.ok or result.parsed is None:
            self.reject(request.id, _llm_verdict(result), ability, result.text)
            return None
        reply = cast(PairReply, result.parsed)
        members = [parse_prompt(reply.prompt_1), parse_prompt(reply.prompt_2)]
        # Each member is checked against the dataset, not against the other: a pair is meant to be alike.
        for number, parsed in enumerate(members, start=1):
            verdict = self.verdict(parsed, ability)
            if verdict is not None:
                detail = f"prompt {number}: {verdict.reason}: {verdict.detail}"
                self.reject(request.id, Verdict(verdict.reason, detail), ability, parsed.raw)
                return None
        for number, parsed in enumerate(members, start=1):
            self.tracker.add(f"{request.id}/{number}", parsed)
        return _Candidate(ability, members[0], request.id, round_no), _Candidate(
            ability, members[1], request.id, round_no
        )


def _image_record(
    record_id: str, parsed: ParsedPrompt, ability: str, emphasis: EmphasisMode, **provenance: Any
) -> Record:
    weighted = {"weighted_prompt": parsed.weighted} if emphasis == "weight" else {}
    return Record(
        id=record_id,
        caption=parsed.plain,  # brackets stripped, key keyword first: what CLIP scores (emphasis.py)
        provenance={
            "recipe": "stablellava",
            "ability": ability,
            "raw_prompt": parsed.raw,
            **weighted,
            "emphasis": emphasis,
            "keywords": list(parsed.normalized),
            "emphasized": list(parsed.emphasized),
            **provenance,
        },
    )


def _prompt_record(
    record_id: str, candidate: _Candidate, llm: dict[str, str], emphasis: EmphasisMode, **extra: Any
) -> Record:
    return _image_record(
        record_id,
        candidate.parsed,
        candidate.ability.name,
        emphasis,
        request_id=candidate.request_id,
        round=candidate.round,
        llm=llm,
        **extra,
    )


def _interleaved(config: PromptsConfig, run: _PromptRun, llm: dict[str, str]) -> tuple[list[Record], int]:
    """Interleaved dialogues (v2 App. C): one request per phrase; each checked dialogue's pictures become
    image records, the first of which carries the dialogue. Returns (records, dialogues kept)."""
    inter = config.interleaved
    count = inter.dialogues if inter.dialogues is not None else config.pairs_per_relation
    phrases = phrases_for(inter, count, config.seed)
    ids = [f"interleaved-{n:05d}" for n in range(len(phrases))]
    requests = [
        interleaved_request(
            dialogue_id,
            phrase,
            inter,
            config.filters.max_keywords,
            seed=stable_index(2**31, config.seed, dialogue_id),
        )
        for dialogue_id, phrase in zip(ids, phrases, strict=True)
    ]
    records: list[Record] = []
    kept = 0

    def reject(dialogue_id: str, verdict: Verdict, text: str | None) -> None:
        run.rejects.append(
            Reject.of(verdict, id=dialogue_id, stage="prompts", ability=INTERLEAVED_ABILITY, text=text)
        )

    for dialogue_id, phrase, result in zip(ids, phrases, run.ask(requests) if requests else [], strict=True):
        if not result.ok or result.parsed is None:
            reject(dialogue_id, _llm_verdict(result), result.text)
            continue
        parsed = parse_reply(cast(InterleavedReply, result.parsed), inter)
        verdict = parsed if isinstance(parsed, Verdict) else length_problem(parsed.turns, inter.length)
        if verdict is not None or isinstance(parsed, Verdict):
            reject(dialogue_id, cast(Verdict, verdict), result.text)
            continue
        prompts = [parse_prompt(p) for p in parsed.pictures]
        bad = [(n, v) for n, v in enumerate(check_image_prompt(p, config.filters) for p in prompts) if v]
        if bad:
            number, problem = bad[0]
            detail = f"picture {number + 1}: {problem.detail}"
            reject(dialogue_id, Verdict(problem.reason, detail), prompts[number].raw)
            continue
        kept += 1
        turns = [{"question": q, "answer": a} for q, a in parsed.turns]
        for index, prompt in enumerate(prompts):
            records.append(
                _image_record(
                    f"{dialogue_id}-{index + 1}",
                    prompt,
                    INTERLEAVED_ABILITY,
                    config.emphasis,
                    request_id=result.id,
                    round=0,
                    llm=llm,
                    kind="interleaved",
                    split="train",
                    dialogue_id=dialogue_id,
                    phrase=phrase,
                    image_index=index,
                    images=len(prompts),
                    turn=parsed.picture_turns[index],
                    **({"turns": turns} if index == 0 else {}),
                )
            )
    return records, kept


def _eval_ids(ids: list[str], count: int, seed: int, ability: str) -> set[str]:
    """v1 §5.2: the eval prompts come from the same pipeline; which ones is a seeded random choice."""
    rng = random.Random(f"{seed}/eval/{ability}")
    return set(rng.sample(ids, min(count, len(ids))))


def _prompts(config: PromptsConfig, run_: StageRun) -> StageStats:
    keywords_uri, output_manifest = run_.inputs["keywords"], run_.output
    stats = StageStats("stablellava_prompts")
    abilities = select_abilities(load_registry(config.abilities_dir), config.abilities, "prompts config")
    banks = read_banks(keywords_uri)
    for ability in abilities:
        if not banks.get(ability.name):
            raise InputError(keywords_uri, "no keywords for this ability", field=f"abilities.{ability.name}")
    backend = make_backend(config.llm, default_cache_dir=_llm_cache(run_))
    llm = backend.describe()
    run = _PromptRun(config, banks, backend)
    records: list[Record] = []
    for name, candidates in run.singles(abilities).items():
        ids = [f"{name}-{n:06d}" for n in range(len(candidates))]
        eval_ids = _eval_ids(ids, config.eval_per_ability, config.seed, name)
        for record_id, candidate in zip(ids, candidates, strict=True):
            split = "eval" if record_id in eval_ids else "train"
            records.append(
                _prompt_record(record_id, candidate, llm, config.emphasis, kind="single", split=split)
            )
        short = config.prompts_per_ability + config.eval_per_ability - len(candidates)
        if short > 0:
            stats.extra[f"short_{name}"] = short
            log.warning("prompts: %s is %d prompts short of its target", name, short)
    for relation in config.relations:
        pairs = run.pairs(abilities, relation)
        for n, pair in enumerate(pairs):
            pair_id = f"pair-{relation}-{n:05d}"
            for member, candidate in enumerate(pair):
                records.append(
                    _prompt_record(
                        f"{pair_id}-{member + 1}",
                        candidate,
                        llm,
                        config.emphasis,
                        kind="pair",
                        split="train",
                        pair_id=pair_id,
                        relation=relation,
                        member=member,
                    )
                )
        if len(pairs) < config.pairs_per_relation:
            stats.extra[f"short_pairs_{relation}"] = config.pairs_per_relation - len(pairs)
    interleaved_records, interleaved_kept = _interleaved(config, run, llm)
    records.extend(interleaved_records)
    wanted = (
        config.interleaved.dialogues
        if config.interleaved.dialogues is not None
        else config.pairs_per_relation
    )
    stats.extra["interleaved_dialogues"] = interleaved_kept
    if interleaved_kept < wanted:
        stats.extra["short_interleaved"] = wanted - interleaved_kept
    stats.count_in = run.requests
    stats.count_out = len(records)
    stats.rejects.update(r.reason for r in run.rejects)
    splits = Counter(str(r.provenance["split"]) for r in records)
    stats.extra.update(
        eval_records=splits["eval"],
        train_records=splits["train"],
        dataset_keyword_repetition_rate=round(run.tracker.dataset_repetition_rate(), 4),
        pool_changes=run.pool_changes,
        **backend.metrics(),
        llm=llm,
    )
    _write_jsonl(rejects_uri(output_manifest), run.rejects)
    write_manifest(output_manifest, records)
    log.info("prompts: %d records (%d requests)", len(records), run.requests)
    return stats


PROMPTS = Stage(name="stablellava_prompts", process=_prompts, excluded=_LLM_RUNTIME, sidecars=(_REJECTS,))


def generate_prompts(
    config: PromptsConfig, keywords_uri: str, output_manifest: str, *, data_root: str | None = None
) -> str:
    """Write the prompt manifest (singles, eval singles, pair members) and its rejects file. Returns the
    versioned manifest (a copy is published at `output_manifest`)."""
    inputs = {"keywords": keywords_uri}
    names = _rejects_name(output_manifest)
    return run_stage(PROMPTS, config, inputs, output_manifest, names=names, data_root=data_root)


# ---- dialogues --------------------------------------------------------------------------------------------


class DialoguesConfig(StageConfig):
    """Dialogue generation from the prompts (v2 §4.2, v1 Fig. 4 / Fig. 5, v2 Fig. 7)."""

    abilities_dir: str | None = None  # our choice: None = the bundled data files
    # our choice: the share of training images that also get a multi-turn dialogue (v2 §5.1 puts
    # multi-turn data with the 3K second-stage instances, i.e. a small share of the whole).
    multi_turn_fraction: float = Field(0.1, ge=0, le=1)
    turns: int = Field(3, ge=2)  # our choice: rounds per multi-turn dialogue
    # v2 §4.4: "we also limit dialogues to 500 characters": per dialogue by default (filters.LengthLimit;
    # `per: answer` limits each answer instead).
    length: LengthLimit = Field(default_factory=LengthLimit)
    seed: int = 0  # our choice: decides question types, predefined questions and LLM seeds
    llm: BackendConfig = Field(default_factory=BackendConfig)


def _dialogues(config: DialoguesConfig, run: StageRun) -> StageStats:
    prompts_manifest, output_uri = run.inputs["prompts"], run.output
    stats = StageStats("stablellava_dialogues")
    records = read_manifest(prompts_manifest)
    registry = load_registry(config.abilities_dir)
    jobs = plan_jobs(records, config.multi_turn_fraction, config.seed)
    for job in jobs:
        if job.ability not in registry:
            raise InputError(
                prompts_manifest,
                f"record {job.records[0].id!r} names unknown ability {job.ability!r}",
                field="provenance.ability",
            )
    backend = make_backend(config.llm, default_cache_dir=_llm_cache(run))
    requests = [job_request(job, registry, config.length, config.turns, config.seed) for job in jobs]
    results = _run(backend, requests)
    provenance = {"llm": backend.describe()}
    dialogues: list[Dialogue] = []
    rejects: list[Reject] = []
    for job, result in zip(jobs, results, strict=True):
        outcome = to_dialogue(job, result, config.length, provenance)
        if isinstance(outcome, Dialogue):
            dialogues.append(outcome)
        else:
            rejects.append(
                Reject.of(outcome, id=job.id, stage="dialogues", ability=job.ability, text=result.text)
            )
    interleaved = interleaved_dialogues(records, config.length, {})
    for dialogue_id, made in interleaved:
        if isinstance(made, Dialogue):
            dialogues.append(made)
        else:
            rejects.append(Reject.of(made, id=dialogue_id, stage="dialogues", ability=INTERLEAVED_ABILITY))
    stats.count_in = len(jobs) + len(interleaved)
    stats.count_out = len(dialogues)
    stats.rejects.update(r.reason for r in rejects)
    kinds = Counter(d.kind for d in dialogues)
    stats.extra.update(
        {f"dialogues_{k}": n for k, n in sorted(kinds.items())}, **backend.metrics(), **provenance
    )
    _write_jsonl(rejects_uri(output_uri), rejects)
    _write_jsonl(output_uri, dialogues)
    log.info("dialogues: %d of %d", len(dialogues), len(jobs))
    return stats


DIALOGUES = Stage(
    name="stablellava_dialogues", process=_dialogues, excluded=_LLM_RUNTIME, sidecars=(_REJECTS,)
)


def generate_dialogues(
    config: DialoguesConfig, prompts_manifest: str, output_uri: str, *, data_root: str | None = None
) -> str:
    """Write one JSON line per dialogue (dialogues.Dialogue), drops to its rejects file. Returns the
    versioned output (a copy is published at `output_uri`)."""
    inputs = {"prompts": prompts_manifest}
    names = _rejects_name(output_uri)
    return run_stage(DIALOGUES, config, inputs, output_uri, names=names, data_root=data_root)


def read_dialogues(uri: str) -> list[Dialogue]:
    """Read a dialogues file; errors name the file, line and field."""
    dialogues: list[Dialogue] = []
    for lineno, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            dialogues.append(Dialogue.model_validate_json(line))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise InputError(uri, err["msg"], line=lineno, field=field) from None
    return dialogues


# ---- export -----------------------------------------------------------------------------------------------


class StableLLaVAExportConfig(StageConfig):
    """LLaVA JSON (LLaVA-1.5 and LLaVA-NeXT/OneVision interleaved) + eval JSONL export of StableLLaVA
    dialogues, WebDataset shards and the dataset card."""

    # v1 §5.2 keyword matching between eval and training data; our definition (filters.find_eval_overlaps):
    # same key subject and keyword-set Jaccard >= this value, the same threshold as near-duplicate prompts.
    overlap_jaccard: float = Field(0.7, gt=0, le=1)
    # How each eval question kind is scored by `synthvlm evaluate`: v1 §5.2 matches "answers in the form
    # of keywords" (wh-questions: keyword); yes/no and either-or questions have one right answer among
    # two, scored exactly (yes_no, multiple_choice). "judge" asks the LLM judge with the full reference
    # answer (v2 §5.2 GPT-4 score); evaluate's `also_judge` adds the judge's score to any type instead.
    eval_metrics: dict[str, EvalMetric] = Field(default_factory=lambda: dict(EVAL_METRICS))

    @field_validator("eval_metrics")
    @classmethod
    def _known_metrics(cls, value: dict[str, EvalMetric]) -> dict[str, EvalMetric]:
        for kind, metric in value.items():
            if kind not in ALLOWED_METRICS:
                raise ValueError(f"unknown question kind {kind!r}; kinds: {', '.join(ALLOWED_METRICS)}")
            if metric not in ALLOWED_METRICS[kind]:
                allowed = ", ".join(ALLOWED_METRICS[kind])
                raise ValueError(f"{kind} questions cannot be scored as {metric!r}; use one of: {allowed}")
        return {**EVAL_METRICS, **value}

    # WebDataset tar shards, one set per subset and image count (on by default, our choice; shard size
    # there): pretrain (captions), sft (the interleaved file's samples), eval (split "test").
    webdataset: WebDatasetConfig = Field(default_factory=WebDatasetConfig)
    # The dataset card, README.md with the file guide in it (on by default, our choice; off: README.md is
    # the file guide alone).
    card: CardConfig = Field(default_factory=CardConfig)


def _image_paths(records: dict[str, Record], data_root: str, source: str) -> dict[str, str]:
    paths: dict[str, str] = {}
    bad: list[str] = []
    for record_id, record in records.items():
        rel = relative_image_path(record.image_uri, data_root) if record.image_uri else None
        if rel is None:
            bad.append(record_id)
        else:
            paths[record_id] = rel
    if bad:
        raise InputError(
            source,
            f"{len(bad)} record(s) have no image_uri under data_root {data_root!r}: {bad[:5]}",
            field="image_uri",
        )
    return paths


def _export(config: StableLLaVAExportConfig, run: StageRun) -> StageStats:
    selected_manifest, dialogues_uri = run.inputs["selected"], run.inputs["dialogues"]
    data_root, output_dir, sft_uri = run.context["data_root"], run.dir, run.output
    stats = StageStats("stablellava_export")
    selected = {r.id: r for r in read_manifest(selected_manifest)}
    paths = _image_paths(selected, data_root, selected_manifest)
    dialogues = read_dialogues(dialogues_uri)
    stats.count_in = len(dialogues)
    rejects: list[Reject] = []

    def drop(dialogue: Dialogue, reason: str, detail: str) -> None:
        rejects.append(
            Reject(id=dialogue.id, stage="export", reason=reason, detail=detail, ability=dialogue.ability)
        )

    kept: list[Dialogue] = []
    for dialogue in dialogues:
        missing = [rid for rid in dialogue.record_ids if rid not in selected]
        if missing:
            drop(
                dialogue, NOT_SELECTED, f"not in the selected manifest (CLIP check or generation): {missing}"
            )
        else:
            kept.append(dialogue)
    evals = [d for d in kept if d.kind == "eval"]
    train = [d for d in kept if d.kind != "eval"]
    parsed = {rid: parse_prompt(raw_prompt(selected[rid])) for d in kept for rid in d.record_ids}
    overlaps = find_eval_overlaps(
        {d.record_ids[0]: parsed[d.record_ids[0]] for d in evals},
        {rid: parsed[rid] for d in train for rid in d.record_ids},
        config.overlap_jaccard,
    )
    clean_train: list[Dialogue] = []
    for dialogue in train:
        hits = [rid for rid in dialogue.record_ids if rid in overlaps]
        if hits:
            drop(
                dialogue,
                OVERLAPS_EVAL,
                f"record {hits[0]} matches eval record {overlaps[hits[0]]} by keywords",
            )
        else:
            clean_train.append(dialogue)

    pretrain = [
        llava15_sample(d, [paths[r] for r in d.record_ids]) for d in clean_train if d.kind == "caption"
    ]
    sft: list[dict[str, Any]] = []
    interleaved: list[dict[str, Any]] = []
    for dialogue in (d for d in clean_train if d.kind != "caption"):
        images = [paths[r] for r in dialogue.record_ids]
        sample = interleaved_sample(dialogue, images)
        problem = image_token_problem(sample)
        if problem:  # Dialogue validates its markers; this guards the files against any other path
            drop(dialogue, IMAGE_TOKEN_MISMATCH, problem)
            continue
        interleaved.append(sample)
        if fits_llava15(dialogue):
            sft.append(llava15_sample(dialogue, images))
    eval_rows = [
        eval_row(d, absolute_uri(str(selected[d.record_ids[0]].image_uri)), config.eval_metrics)
        for d in evals
    ]
    used = dict.fromkeys(rid for d in [*clean_train, *evals] for rid in d.record_ids)
    write_manifest(storage.join(output_dir, MANIFEST_NAME), [selected[rid] for rid in used])
    _write_jsonl(storage.join(output_dir, REJECTS_NAME), rejects)
    _write_jsonl(storage.join(output_dir, EVAL_JSONL), eval_rows)
    for name, rows in ((PRETRAIN_JSON, pretrain), (INTERLEAVED_JSON, interleaved)):
        storage.write_text(
            storage.join(output_dir, name), json.dumps(rows, ensure_ascii=False), "application/json"
        )
    storage.write_text(sft_uri, json.dumps(sft, ensure_ascii=False), content_type="application/json")
    eval_uri = storage.join(output_dir, EVAL_JSONL)
    for rel, text in lmms_task_files(eval_uri).items():
        storage.write_text(storage.join(output_dir, rel), text, content_type="text/plain")
    guide = _file_guide(len(pretrain), len(sft), len(interleaved), len(eval_rows), data_root)
    storage.write_text(
        storage.join(output_dir, EXPORTS_JSON),
        json.dumps({"files": guide}, indent=2) + "\n",
        "application/json",
    )
    kinds = Counter(d.kind for d in [*clean_train, *evals])
    multi_image = len(interleaved) - len(sft)
    captions = [d for d in clean_train if d.kind == "caption"]
    sft_dialogues = [d for d in clean_train if d.kind != "caption" and d.id in {s["id"] for s in interleaved}]
    groups = {"pretrain": captions, "sft": sft_dialogues, "eval": evals}
    shard_sets: dict[str, ShardSet] = {}
    if config.webdataset.enabled:
        metrics = {row["id"]: row for row in eval_rows}
        shard_sets = _write_webdataset(
            config.webdataset, run, groups, selected, paths, metrics, selected_manifest
        )
        stats.extra.update(
            webdataset_shards=sum(len(s.shards) for s in shard_sets.values()),
            webdataset_bytes=sum(s.bytes for s in shard_sets.values()),
        )
    if config.card.enabled:
        counts = {
            "LLaVA-1.5 SFT samples (one image)": len(sft),
            "multi-image SFT samples": multi_image,
            "eval items": len(eval_rows),
            "dropped at export": len(rejects),
        }
        card = _card_data(groups, shard_sets, [selected[rid] for rid in used], counts, guide, run.inputs)
        write_card(storage.join(output_dir, README_MD), config.card, card, ("generation", "*_scorer", "llm"))
    else:
        storage.write_text(
            storage.join(output_dir, README_MD), file_guide(guide), content_type="text/markdown"
        )
    stats.count_out = len(pretrain) + len(interleaved) + len(eval_rows)
    stats.rejects.update(r.reason for r in rejects)
    stats.extra.update(
        {f"samples_{k}": n for k, n in sorted(kinds.items())},
        pretrain_samples=len(pretrain),
        sft_samples=len(sft),
        interleaved_samples=len(interleaved),
        multi_image_samples=multi_image,
        eval_items=len(eval_rows),
        data_root=data_root,
    )
    log.info(
        "export: %d pretrain, %d LLaVA-1.5 SFT, %d interleaved SFT (%d multi-image), %d eval samples",
        len(pretrain),
        len(sft),
        len(interleaved),
        multi_image,
        len(eval_rows),
    )
    return stats


def _file_guide(
    pretrain: int, sft: int, interleaved: int, evals: int, data_root: str
) -> dict[str, dict[str, Any]]:
    """exports.json / README.md: each file, its format and the trainers or evaluators it fits."""
    ours = "synthvlm train (synthvlm.train)"
    hf = "HF transformers LlavaForConditionalGeneration + LlavaProcessor"
    return {
        PRETRAIN_JSON: {
            "format": "LLaVA-1.5 pretraining (caption) JSON",
            "samples": pretrain,
            "image_folder": data_root,
            "fits": ["LLaVA-1.5 pretrain (haotian-liu/LLaVA, plain template)", f"{ours}, stage pretrain"],
        },
        SFT_JSON: {
            "format": "LLaVA-1.5 instruction JSON, one image per sample (`image` a string)",
            "samples": sft,
            "image_folder": data_root,
            "fits": ["LLaVA-1.5 finetune (haotian-liu/LLaVA LazySupervisedDataset)", ours, hf],
            "notes": "multi-image samples are left out: LLaVA-1.5 opens one image per sample; "
            f"they are in {INTERLEAVED_JSON}",
        },
        INTERLEAVED_JSON: {
            "format": "LLaVA-NeXT / OneVision interleaved JSON (`image` a list, one <image> per image "
            "at the place it appears), every SFT sample",
            "samples": interleaved,
            "image_folder": data_root,
            "fits": ["LLaVA-NeXT / LLaVA-OneVision (LLaVA-VL/LLaVA-NeXT train.py)", ours, hf],
            "notes": "not for the original LLaVA-1.5 code (a list of images fails there)",
        },
        EVAL_JSONL: {
            "format": "synthvlm benchmark JSONL (absolute image paths; `type` = metric)",
            "samples": evals,
            "fits": [
                "synthvlm evaluate",
                f"lmms-eval: --include_path <this folder>/{LMMS_YAML.rpartition('/')[0]} --tasks {LMMS_TASK}",
            ],
            "notes": f"the lmms-eval task is {LMMS_YAML} with {LMMS_UTILS} (scores with synthvlm's metrics)",
        },
    }


def _subset_name(group: str, images: int) -> str:
    return group if images == 1 else f"{group}_{images}images"


def _write_webdataset(
    config: WebDatasetConfig,
    run: StageRun,
    groups: dict[str, list[Dialogue]],
    selected: dict[str, Record],
    paths: dict[str, str],
    eval_rows: dict[str, dict[str, Any]],
    source: str,
) -> dict[str, ShardSet]:
    """One shard set per group and image count (HF `datasets` needs one schema per set):
    `{prefix}-{subset}-{index:06d}.tar` with `{key}.jpg` (or `{key}.0.jpg`, ...) + `{key}.json`."""
    prefix = config.prefix or "stablellava"
    used = {rid for dialogues in groups.values() for d in dialogues for rid in d.record_ids}
    # Scores every used record has: a key some lack would change the JSON's schema between samples.
    common = sorted(set.intersection(*(set(selected[rid].scores) for rid in used))) if used else []
    sets: dict[str, ShardSet] = {}
    for group, dialogues in groups.items():
        for images in sorted({len(d.record_ids) for d in dialogues}):
            name = _subset_name(group, images)
            shard_set = ShardSet(
                prefix=f"{prefix}-{name}",
                folder=run.path(WDS_DIR),
                relative=WDS_DIR,
                split="test" if group == "eval" else "train",
            )
            members = [d for d in dialogues if len(d.record_ids) == images]
            samples = (_wds_sample(d, selected, paths, eval_rows.get(d.id), common) for d in members)
            sets[name] = write_shards(samples, shard_set, config, source=source)
    write_index(run.path(WDS_INDEX), sets)
    return sets


def _wds_sample(
    dialogue: Dialogue,
    selected: dict[str, Record],
    paths: dict[str, str],
    eval_row: dict[str, Any] | None,
    score_keys: list[str],
) -> WdsSample:
    records = [selected[rid] for rid in dialogue.record_ids]
    generation = records[0].provenance.get("generation") or {}
    meta: dict[str, Any] = {
        "id": dialogue.id,
        "kind": dialogue.kind,
        "ability": dialogue.ability,
        "question_type": dialogue.question_type or "",
        "relation": dialogue.relation or "",
        "conversations": interleaved_sample(dialogue, [paths[r.id] for r in records])["conversations"],
        "images": [paths[r.id] for r in records],
        "record_ids": list(dialogue.record_ids),
        "prompts": [r.caption for r in records],
        "seeds": [r.seed for r in records],
        "scores": {key: [float(r.scores[key]) for r in records] for key in score_keys},
        "model": str(generation.get("model") or "") if isinstance(generation, dict) else "",
        "manifest_records": [r.model_dump_json() for r in records],
        "dialogue_provenance": json.dumps(dialogue.provenance, ensure_ascii=False, sort_keys=True),
    }
    if eval_row is not None:
        meta["metric"] = eval_row["type"]
        meta["answers"] = [eval_row["answer"]] if "answer" in eval_row else list(eval_row["answers"])
        meta["choices"] = list(eval_row.get("choices") or [])
    return WdsSample(id=dialogue.id, image_uris=[str(r.image_uri) for r in records], meta=meta)


def _card_data(
    groups: dict[str, list[Dialogue]],
    shard_sets: dict[str, ShardSet],
    records: list[Record],
    counts: dict[str, Any],
    guide: dict[str, dict[str, Any]],
    inputs: Any,
) -> CardData:
    descriptions = {
        "pretrain": f"caption dialogues (as {PRETRAIN_JSON})",
        "sft": f"instruction dialogues (as {INTERLEAVED_JSON})",
        "eval": f"evaluation items with references (as {EVAL_JSONL})",
    }
    subsets = []
    for group, dialogues in groups.items():
        for images in sorted({len(d.record_ids) for d in dialogues}):
            name = _subset_name(group, images)
            shard_set = shard_sets.get(name)
            subsets.append(
                CardSubset(
                    name=name,
                    samples=sum(1 for d in dialogues if len(d.record_ids) == images),
                    data_files=shard_set.pattern if shard_set and shard_set.shards else None,
                    shards=len(shard_set.shards) if shard_set else 0,
                    split="test" if group == "eval" else "train",
                    description=descriptions[group] + (f", {images} images each" if images > 1 else ""),
                )
            )
    scores: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.scores.items():
            scores.setdefault(key, []).append(float(value))
    dialogues = [d for group in groups.values() for d in group]
    guide_text = file_guide(guide).split("\n", 2)[2]  # without its title
    return CardData(
        recipe="StableLLaVA",
        summary=(
            "Synthetic visual instruction data made with the StableLLaVA recipe (Li et al., *StableLLaVA: "
            "Enhanced Visual Instruction Tuning with Synthesized Image-Dialogue Data*): an LLM wrote Stable "
            "Diffusion prompts per ability, a text-to-image model drew them, the same LLM wrote dialogues "
            "about each prompt, and a CLIP alignment check kept the images that match. Made by synthvlm."
        ),
        how_made=[
            "An LLM lists keywords per ability (colour, animal, plant, vehicle, food, clothes, furniture, "
            "hair, profession, scene, action, art style, abnormal/joke).",
            "The LLM writes Stable Diffusion prompts from the keywords and in-context examples; filters drop "
            "repetitive, over-long and off-task prompts.",
            "One image per prompt with the text-to-image model (settings below).",
            "The LLM writes dialogues from the same prompts: captions, Q&A, multi-turn, multi-image "
            "(difference, similarity, logic), interleaved, and evaluation Q&A.",
            "CLIP alignment check: images whose score is under the threshold (the paper: 0.25) are dropped, "
            "with their dialogues; training items that match an eval item by keywords are dropped.",
            "Export: LLaVA JSON files, the eval JSONL, the manifest, WebDataset shards and this card.",
        ],
        task_categories=["visual-question-answering", "image-text-to-text"],
        subsets=subsets,
        samples=sum(len(d) for name, d in groups.items() if name != "eval"),
        images=len(records),
        scores=scores,
        provenance=[r.provenance for r in records] + [d.provenance for d in dialogues],
        upstream=[inputs["selected"], inputs["dialogues"]],
        counts=counts,
        files=guide_text,
        text_source="the LLM that wrote the prompts and dialogues (its provider's terms)",
    )


# Every setting changes the files; the data root is a param (image paths are relative to it).
# Version 2: the shards are published too, and the index names them by relative paths.
EXPORT = Stage(
    name="stablellava_export",
    process=_export,
    excluded={f"webdataset.{key}": why for key, why in WDS_EXCLUDED.items()},
    sidecars=(
        MANIFEST_NAME,
        REJECTS_NAME,
        EVAL_JSONL,
        PRETRAIN_JSON,
        INTERLEAVED_JSON,
        EXPORTS_JSON,
        README_MD,
        LMMS_YAML,
        LMMS_UTILS,
        WDS_INDEX,
        WDS_SHARDS,
    ),
    version=2,
)


def export_stablellava(
    config: StableLLaVAExportConfig,
    selected_manifest: str,
    dialogues_uri: str,
    data_root: str,
    output_dir: str,
) -> str:
    """Write pretraining JSON (captions), the LLaVA-1.5 SFT JSON (one image per sample), the interleaved SFT
    JSON (every sample, image lists), the eval JSONL with its lmms-eval task, exports.json + README.md
    (which file fits which trainer; with `card` on, inside the dataset card), the manifest of the records
    used, the export rejects and (with `webdataset` on) WebDataset shards under `webdataset/` with their
    index `webdataset.json`; returns the versioned LLaVA-1.5 SFT JSON's URI (all of them are published under
    `output_dir`, the shards by hard link or server-side copy)."""
    return run_stage(
        EXPORT,
        config,
        {"selected": selected_manifest, "dialogues": dialogues_uri},
        storage.join(output_dir, SFT_JSON),
        params={"data_root": data_root},
        context={"data_root": data_root},
    )


def training_inputs(
    exported: str,
    data_root: str,
    pretrain_datasets: str,
    sft_datasets: str,
    benchmarks: Sequence[str],
    *,
    pretrain_on_synthetic: bool,
    sft_on_synthetic: bool,
    synthetic_ratio: float,
) -> dict[str, Any]:
    """StableLLaVA v2 §5's training inputs from an export (`exported`: the versioned SFT JSON the export
    returns; its sibling files are read): the stage-1 and SFT mixtures as JSON dataset lists, your datasets
    first, and the benchmarks with the synthesized eval set first. The SFT mixture uses the interleaved
    file (every sample, image lists), which our trainer reads."""
    import posixpath

    folder = posixpath.dirname(exported)

    def mixture(user: str, synthetic: dict[str, Any] | None) -> str:
        items = json.loads(user) if user.strip() else []
        if isinstance(items, dict | str):
            items = [items]
        return json.dumps([*items, *([synthetic] if synthetic else [])])

    pretrain = {"uri": storage.join(folder, PRETRAIN_JSON), "image_folder": data_root, "name": "stablellava"}
    sft = {
        "uri": storage.join(folder, INTERLEAVED_JSON),
        "image_folder": data_root,
        "ratio": synthetic_ratio,
        "name": "stablellava",
    }
    return {
        "pretrain_datasets": mixture(pretrain_datasets, pretrain if pretrain_on_synthetic else None),
        "sft_datasets": mixture(sft_datasets, sft if sft_on_synthetic else None),
        "benchmarks": [storage.join(folder, EVAL_JSONL), *benchmarks],
    }
