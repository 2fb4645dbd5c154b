"""Each pipeline's whole run as one validated config, with presets `paper` (the papers' settings) and `demo`.

Pipeline parameters are a run config flattened one level: scalar run settings stay scalars, and each
stage's config travels as one JSON parameter (`generate_config`, ...), so the KFP UI shows every
stage's defaults and a new stage field never needs pipeline code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from synthvlm.config import StageConfig, validate
from synthvlm.curation.perplexity import TINY_LM
from synthvlm.errors import ConfigError
from synthvlm.scoring import ScoreConfig
from synthvlm.stages.captions import DEMO_CAPTIONS, CaptionsConfig
from synthvlm.stages.curate import CurateConfig
from synthvlm.stages.evaluate import EvalConfig
from synthvlm.stages.export_llava import ExportConfig
from synthvlm.stages.generate import GenerateConfig
from synthvlm.stages.report import ReportConfig
from synthvlm.stages.select import SelectConfig
from synthvlm.stages.stablellava import (
    DialoguesConfig,
    KeywordsConfig,
    PromptsConfig,
    StableLLaVAExportConfig,
)
from synthvlm.stages.stablellava_report import StableLLaVAReportConfig
from synthvlm.train.config import TrainConfig, parse_datasets

SECTION_SUFFIX = "_config"


class RunConfig(StageConfig):
    """What every pipeline run needs: where data goes, how generation fans out, where GPU pods run."""

    data_root: str = Field(
        "",
        description="where images, manifests and the exported dataset go (local folder, gs:// or s3://bucket/prefix)",
    )
    # Where GPU pods go (ignored by local runs): each requests one nvidia.com/gpu, and the node selector
    # picks the GPU model (GKE: cloud.google.com/gke-accelerator). Default A100 (SynthVLM §3.1 used 8 A100).
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
        description="node selector for GPU pods (picks the GPU model)",
    )
    gpu_tolerations: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        description="tolerations for GPU pods (GKE taints GPU nodes with nvidia.com/gpu)",
    )
    llm_secret: str = Field(
        "synthvlm-llm", description="Kubernetes Secret holding the LLM API key (key OPENAI_API_KEY)"
    )

    @field_validator("data_root")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/") if value not in ("", "/") else value

    def require_data_root(self) -> None:
        if not self.data_root:
            raise ConfigError(
                "config field 'data_root': required (a local folder, gs:// or s3://bucket/prefix)"
            )


class GenerationRunConfig(RunConfig):
    """A run that generates images, sharded over GPU pods."""

    # SynthVLM §3.1 generated on 8 A100: 8 shards, one GPU pod each.
    num_shards: int = Field(8, ge=1, le=100_000, description="generation shards (one GPU pod each)")


class SynthVLMRunConfig(GenerationRunConfig):
    """SynthVLM (paper §3): captions -> SDXL images -> CLIPScore -> top-k -> LLaVA pretraining JSON."""

    captions: str = Field(
        DEMO_CAPTIONS, description="captions file/URI (.jsonl, .csv, .parquet: id, caption)"
    )
    max_captions: int = Field(0, ge=0, description="use only the first N captions; 0 = all")
    # SynthVLM §3.1 curates captions before generation; off by default because it needs an LLM endpoint.
    curate_captions: bool = Field(False, description="run caption curation (SynthVLM §3.1) first")
    curate: CurateConfig = Field(default_factory=CurateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def captions_config(self) -> CaptionsConfig:
        return CaptionsConfig(captions=self.captions, max_records=self.max_captions or None)


class StableLLaVARunConfig(GenerationRunConfig):
    """StableLLaVA: keywords -> SD prompts -> images -> dialogues -> CLIP check (gamma) -> LLaVA SFT data."""

    keywords: KeywordsConfig = Field(default_factory=KeywordsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    dialogues: DialoguesConfig = Field(default_factory=DialoguesConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    # StableLLaVA v2 §4.4: keep image-prompt pairs whose CLIP score >= gamma = 0.25.
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(mode="threshold", threshold=0.25))
    export: StableLLaVAExportConfig = Field(default_factory=StableLLaVAExportConfig)
    report: StableLLaVAReportConfig = Field(
        default_factory=lambda: StableLLaVAReportConfig(pipeline="stablellava")
    )


# The benchmarks of SynthVLM Table 4, run through lmms-eval (it must be in the eval image).
PAPER_BENCHMARKS = [
    f"lmms_eval:{task}"
    for task in (
        "vqav2",
        "gqa",
        "vizwiz_vqa",
        "scienceqa_img",
        "textvqa",
        "pope",
        "mme",
        "mmbench_en",
        "mmvet",
    )
]


class TrainFields(RunConfig):
    """LLaVA-1.5 pretrain -> SFT -> eval (SynthVLM §3.4, §4.1)."""

    # LLaVA-1.5 trained on one node of 8 A100; more nodes go through a Kubeflow TrainJob (or PyTorchJob).
    gpus_per_node: int = Field(8, ge=1, le=16, description="GPUs per training pod")
    num_nodes: int = Field(1, ge=1, description="training nodes (> 1: a Kubeflow TrainJob or PyTorchJob)")
    pretrain_datasets: str = Field(
        "[]", description="JSON list of LLaVA datasets ({uri, image_folder, ratio}) for stage 1"
    )
    # SynthVLM §4.1: SFT on LLaVA-665K (not shipped: point this at your copy).
    sft_datasets: str = Field("[]", description="JSON list of LLaVA datasets for stage 2 (LLaVA-665K)")
    benchmarks: list[str] = Field(
        default_factory=lambda: list(PAPER_BENCHMARKS), description="eval benchmarks"
    )
    pretrain: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="pretrain"))
    sft: TrainConfig = Field(default_factory=lambda: TrainConfig(stage="sft"))
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("pretrain_datasets", "sft_datasets", mode="before")
    @classmethod
    def _datasets_as_json(cls, value: Any) -> Any:
        # `--set sft_datasets=[{uri: ..., ratio: 1}]` and YAML lists arrive as lists: kept as the JSON
        # string the pipeline parameter carries.
        return json.dumps(value) if isinstance(value, list) else value

    @field_validator("pretrain_datasets", "sft_datasets")
    @classmethod
    def _datasets(cls, value: str) -> str:
        if value.strip() not in ("", "[]"):
            parse_datasets(value)  # raises a ConfigError naming the bad entry
        return value

    def require_benchmarks(self) -> bool:
        return True

    @model_validator(mode="after")
    def _needs_data(self) -> TrainFields:
        if self.sft_datasets.strip() in ("", "[]") and not getattr(self, "sft_on_synthetic", False):
            raise ValueError(
                "sft_datasets is empty: set it to LLaVA-665K (SynthVLM §4.1), a JSON list of datasets"
            )
        if not self.benchmarks and self.require_benchmarks():
            raise ValueError("benchmarks is empty: name at least one benchmark JSONL or lmms_eval:<task>")
        return self


class TrainRunConfig(TrainFields):
    """Train LLaVA-1.5 on given datasets: pretrain (projector) -> SFT -> eval."""

    @model_validator(mode="after")
    def _needs_pretrain_data(self) -> TrainRunConfig:
        if self.pretrain_datasets.strip() in ("", "[]"):
            raise ValueError("pretrain_datasets is empty: a JSON list of LLaVA datasets for stage 1")
        return self


class EndToEndRunConfig(SynthVLMRunConfig, TrainFields):
    """SynthVLM data -> LLaVA-1.5 pretrain on it (+ pretrain_datasets) -> SFT -> eval."""

    # SynthVLM §4.1 fine-tunes on LLaVA-665K only; the demo also fine-tunes on the synthetic data.
    sft_on_synthetic: bool = Field(False, description="also fine-tune on the synthetic data")


# StableLLaVA v2 §5 evaluates on VizWiz, MM-Vet, MME and MMBench (plus its own real-image benchmark, not
# public); the synthesized eval set is always evaluated besides these.
STABLELLAVA_BENCHMARKS = [f"lmms_eval:{task}" for task in ("vizwiz_vqa", "mmvet", "mme", "mmbench_en")]


class StableLLaVAEndToEndRunConfig(StableLLaVARunConfig, TrainFields):
    """StableLLaVA data -> LLaVA-1.5 SFT on a mixture (synthetic + your datasets) -> evaluation on the
    synthesized eval set and named benchmarks -> comparison table (StableLLaVA v2 §5)."""

    benchmarks: list[str] = Field(
        default_factory=lambda: list(STABLELLAVA_BENCHMARKS),
        description="benchmarks besides the synthesized eval set",
    )
    # v2 §5: "we integrate our synthesized data with its original dataset" (LLaVA-665K) for SFT.
    sft_on_synthetic: bool = Field(True, description="fine-tune on the synthetic SFT data too")
    synthetic_ratio: float = Field(
        1.0, gt=0, description="mixing ratio of the synthetic SFT data (samples per epoch / its size)"
    )
    # v2 §5 keeps LLaVA-1.5's stage 1 (its own data); the demo pretrains on the synthetic captions.
    pretrain_on_synthetic: bool = Field(False, description="pretrain the projector on the synthetic data too")

    @model_validator(mode="after")
    def _needs_pretrain_data(self) -> StableLLaVAEndToEndRunConfig:
        if self.pretrain_datasets.strip() in ("", "[]") and not self.pretrain_on_synthetic:
            raise ValueError(
                "pretrain_datasets is empty: a JSON list of LLaVA datasets for stage 1 (LLaVA-1.5: LCS-558K) "
                "or set pretrain_on_synthetic"
            )
        return self

    def require_benchmarks(self) -> bool:
        return False  # the synthesized eval set is always evaluated


RUN_CONFIGS: dict[str, type[RunConfig]] = {
    "synthvlm": SynthVLMRunConfig,
    "stablellava": StableLLaVARunConfig,
    "train": TrainRunConfig,
    "end-to-end": EndToEndRunConfig,
    "stablellava-end-to-end": StableLLaVAEndToEndRunConfig,
}


def _tiny_models() -> dict[str, Any]:
    from synthvlm.models.clip import TINY_CLIP
    from synthvlm.models.sdxl import TINY_SDXL

    # Random-weight tiny models built from configs: the demo exercises every stage offline on a CPU in
    # minutes; its images are noise and its scores meaningless.
    return {
        "num_shards": 2,
        "generate": {"model": TINY_SDXL, "steps": 4, "height": 128, "width": 128, "batch_size": 4},
        # (device "auto" stays: a GPU is used when there is one)
        "score": {"model": TINY_CLIP, "pretrained": None, "batch_size": 16},
    }


def _synthvlm_demo() -> dict[str, Any]:
    return {
        **_tiny_models(),
        "captions": DEMO_CAPTIONS,
        # curation with the offline template judge (the demo captions have no raw images to CLIP-score)
        "curate_captions": True,
        # (the perplexity filter with the built-in tiny random LM: ~257 for any text, all kept)
        "curate": {
            "judge": {"llm": {"backend": "template"}},
            "perplexity": {"enabled": True, "model": TINY_LM},
            "sample_size": None,
        },
        "select": {"mode": "top_k", "k": 8},
        "report": {"max_images": 16},
    }


def _synthvlm_paper() -> dict[str, Any]:
    # SynthVLM §3.1 curates its captions before generating (heuristics, dedup, LLM judge, raw-image CLIPScore
    # top 40%), and its caption recipe (issue 13) adds the perplexity (<= 5500) and BLIP ITM (>= 0.8) filters.
    # Only this preset turns them on: the plain defaults run without an LLM endpoint or those models.
    return {
        "curate_captions": True,
        "curate": {"perplexity": {"enabled": True}, "itm": {"enabled": True}},
    }


def _stablellava_demo() -> dict[str, Any]:
    template = {"llm": {"backend": "template"}}
    abilities = ["colour", "animal", "abnormal"]
    return {
        **_tiny_models(),
        "keywords": {**template, "abilities": abilities, "requests_per_ability": 1},
        "prompts": {
            **template,
            "abilities": abilities,
            "prompts_per_ability": 4,
            "eval_per_ability": 1,
            "pairs_per_relation": 1,
        },
        "dialogues": template,
        # The tiny random CLIP scores noise around 0, so gamma = 0.25 would keep nothing: the demo keeps all.
        "select": {"mode": "threshold", "threshold": -1.0},
    }


def _train_demo() -> dict[str, Any]:
    # The tiny random-weight LLaVA built from configs; a few steps on CPU, eval on the bundled fixture.
    tiny = {"tiny": True, "max_steps": 2, "global_batch_size": 2, "per_device_batch_size": 2,
            "dataloader_num_workers": 0, "save_steps": 1}  # fmt: skip
    return {
        "gpus_per_node": 1,
        "pretrain": {"stage": "pretrain", **tiny},
        "sft": {"stage": "sft", **tiny},
        "benchmarks": ["bundled:eval_fixtures/colors.jsonl"],
        "eval": {"max_new_tokens": 8},
    }


def _end_to_end_demo() -> dict[str, Any]:
    return {**_synthvlm_demo(), **_train_demo(), "sft_on_synthetic": True}


def _stablellava_end_to_end_demo() -> dict[str, Any]:
    return {**_stablellava_demo(), **_train_demo(), "pretrain_on_synthetic": True}


# paper = the defaults, from the papers (SDXL base 1.0, 60 steps, 1024^2, CLIP ViT-L-14, top-k 100K, gamma),
# plus, for SynthVLM, caption curation with every filter of its recipe (_synthvlm_paper).
PRESETS: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
    "synthvlm": {"paper": _synthvlm_paper, "demo": _synthvlm_demo},
    "stablellava": {"paper": dict, "demo": _stablellava_demo},
    "train": {"paper": dict, "demo": _train_demo},
    "end-to-end": {"paper": _synthvlm_paper, "demo": _end_to_end_demo},
    "stablellava-end-to-end": {"paper": dict, "demo": _stablellava_end_to_end_demo},
}


def run_config_class(pipeline: str) -> type[RunConfig]:
    if pipeline not in RUN_CONFIGS:
        raise ConfigError(f"unknown pipeline {pipeline!r}; available: {', '.join(sorted(RUN_CONFIGS))}")
    return RUN_CONFIGS[pipeline]


def preset(name: str | None, pipeline: str = "synthvlm") -> dict[str, Any]:
    if name is None:
        return {}
    run_config_class(pipeline)  # an unknown pipeline is a clear error
    presets = PRESETS[pipeline]
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(sorted(presets))}")
    return presets[name]()


def _sections(cls: type[RunConfig]) -> list[str]:
    return [
        name
        for name, field in cls.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]


@dataclass(frozen=True)
class FormField:
    """A setting users change most, promoted from its stage's JSON to a typed pipeline parameter.

    `paths` are the dotted run-config fields it sets (one LLM endpoint serves every LLM stage). A path also
    set inside its stage's JSON parameter keeps that value: experts can still set one stage apart."""

    name: str
    paths: tuple[str, ...]
    description: str
    none_as: Any = None  # the parameter value that stands for a field's None ("" or []); None: never None


def _form(*fields: FormField) -> list[FormField]:
    return list(fields)


_GENERATION_FORM = _form(
    FormField("generation_model", ("generate.model",),
              "Diffusers text-to-image model (hub id or path). SDXL base 1.0: SynthVLM §3.1."),
    FormField("steps", ("generate.steps",), "Denoising steps per image. 60: SynthVLM §3.1."),
    FormField("guidance_scale", ("generate.guidance_scale",),
              "Classifier-free guidance scale. 7.5: diffusers' Stable Diffusion default."),
    FormField("resolution", ("generate.height", "generate.width"),
              "Image height and width in pixels (multiple of 8). 1024: SynthVLM §3.1."),
    FormField("clip_model", ("score.model",), "open_clip model for CLIPScore. ViT-L-14: SynthVLM §3.2."),
    FormField("clip_pretrained", ("score.pretrained",),
              "open_clip pretrained tag (openai = the original CLIP weights); empty = random weights.", ""),
)  # fmt: skip


def _select_form(gamma: bool) -> list[FormField]:
    threshold = (
        "CLIP check gamma: keep pairs scoring above it (select_mode threshold). 0.25: StableLLaVA v2 §4.4."
        if gamma
        else "Keep pairs scoring at least this (select_mode threshold)."
    )
    return _form(
        FormField("select_mode", ("select.mode",), "How pairs are kept: top_k, top_fraction or threshold."),
        FormField("select_k", ("select.k",), "Pairs kept by top_k. 100000 of 1M: SynthVLM §3.2."),
        FormField("select_fraction", ("select.fraction",), "Share kept by top_fraction. 0.1: SynthVLM §3.2."),
        FormField("select_threshold", ("select.threshold",), threshold),
    )


def _llm_form(stages: str, *paths: str) -> list[FormField]:
    return _form(
        FormField("llm_base_url", tuple(f"{p}.base_url" for p in paths),
                  f"OpenAI-compatible endpoint of the LLM ({stages}); empty = api.openai.com.", ""),
        FormField("llm_model", tuple(f"{p}.model" for p in paths), f"LLM model name ({stages})."),
    )  # fmt: skip


# The run form (KFP "Create run"): typed parameters for what users change most; the rest stays in each
# stage's JSON parameter.
FORM_FIELDS: dict[str, list[FormField]] = {
    "synthvlm": _GENERATION_FORM + _select_form(gamma=False) + _llm_form("caption judge", "curate.judge.llm"),
    "stablellava": _form(
        FormField(
            "abilities",
            ("keywords.abilities", "prompts.abilities"),
            "Abilities to synthesize (StableLLaVA v1 §5.1); empty list = all 13.",
            [],
        ),
        FormField(
            "prompts_per_ability",
            ("prompts.prompts_per_ability",),
            "Stable Diffusion prompts (images) per ability.",
        ),
    )  # fmt: skip
    + _GENERATION_FORM
    + _select_form(gamma=True)
    + _llm_form("keywords, prompts and dialogues", "keywords.llm", "prompts.llm", "dialogues.llm"),
    "train": [],
}
FORM_FIELDS["end-to-end"] = FORM_FIELDS["synthvlm"]
FORM_FIELDS["stablellava-end-to-end"] = FORM_FIELDS["stablellava"]


def form_fields(cls: type[RunConfig]) -> list[FormField]:
    return FORM_FIELDS[next(name for name, known in RUN_CONFIGS.items() if known is cls)]


def _get(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def _pop(data: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.get(part)
        if not isinstance(data, dict):
            return
    data.pop(last, None)


def _has(data: dict[str, Any], path: str) -> bool:
    *parents, last = path.split(".")
    for part in parents:
        data = data.get(part)
        if not isinstance(data, dict):
            return False
    return last in data


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def to_pipeline_arguments(config: RunConfig) -> dict[str, Any]:
    """Flatten for a KFP pipeline: scalars as they are, the form fields typed, and each stage section as
    `<section>_config` JSON without the form fields (unless a stage holds a value of its own)."""
    data = config.model_dump(mode="json")
    sections = _sections(type(config))
    args = {k: v for k, v in data.items() if k not in sections}
    for field in form_fields(type(config)):
        value = _get(data, field.paths[0])
        args[field.name] = field.none_as if value is None else value
        for path in field.paths:
            if _get(data, path) == value:
                _pop(data, path)
    for section in sections:
        args[f"{section}{SECTION_SUFFIX}"] = json.dumps(data[section], sort_keys=True)
    return args


def from_pipeline_arguments(args: dict[str, Any], cls: type[RunConfig] = SynthVLMRunConfig) -> RunConfig:
    """Inverse of to_pipeline_arguments; errors name the pipeline parameter and field."""
    sections = _sections(cls)
    form = {field.name: field for field in form_fields(cls)}
    data: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    for key, value in args.items():
        section = key.removesuffix(SECTION_SUFFIX)
        if key.endswith(SECTION_SUFFIX) and section in sections:
            try:
                data[section] = json.loads(value) if value else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"pipeline parameter '{key}': not valid JSON: {exc}") from None
            if not isinstance(data[section], dict):
                raise ConfigError(f"pipeline parameter '{key}': must be a JSON object")
        elif key in form:
            typed[key] = value
        else:
            data[key] = value
    for name, value in typed.items():
        field = form[name]
        value = None if field.none_as is not None and value == field.none_as else value
        for path in field.paths:
            if not _has(data, path):  # a stage's own value (expert setting) wins
                _put(data, path, value)
    return validate(cls, data, source="pipeline parameters")


def validated_stage_configs(parameters: dict[str, Any], pipeline: str) -> dict[str, str]:
    """The validation task of each pipeline: the run config from its parameters, checked as far as can be
    before any GPU pod starts; returns `<section>_config` -> the stage's effective config as JSON."""
    from synthvlm.kfp_support import setup_logging

    setup_logging()
    config = from_pipeline_arguments(parameters, run_config_class(pipeline))
    config.require_data_root()
    generate = getattr(config, "generate", None)
    if generate is not None:
        from synthvlm.safety import validate_safety

        validate_safety(generate.safety)  # blocklist file readable, checker known: before any GPU pod
    return {
        f"{section}{SECTION_SUFFIX}": getattr(config, section).model_dump_json()
        for section in _sections(type(config))
    }
