"""Each pipeline's whole run as one validated config, with presets `paper` (the defaults) and `demo`.

Pipeline parameters are a run config flattened one level: scalar run settings stay scalars, and each
stage's config travels as one JSON parameter (`generate_config`, ...), so the KFP UI shows every
stage's defaults and a new stage field never needs pipeline code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field, field_validator

from synthvlm.config import StageConfig, validate
from synthvlm.errors import ConfigError
from synthvlm.stages.captions import DEMO_CAPTIONS, CaptionsConfig
from synthvlm.stages.clip_score import ScoreConfig
from synthvlm.stages.curate import CurateConfig
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

SECTION_SUFFIX = "_config"


class RunConfig(StageConfig):
    """What every pipeline run needs: where data goes, how generation fans out, where GPU pods run."""

    data_root: str = Field(
        "",
        description="where images, manifests and the exported dataset go (local folder or gs://bucket/prefix)",
    )
    # SynthVLM §3.1 generated on 8 A100: 8 shards, one GPU pod each.
    num_shards: int = Field(8, ge=1, le=100_000, description="generation shards (one GPU pod each)")
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
            raise ConfigError("config field 'data_root': required (a local folder or gs://bucket/prefix)")


class SynthVLMRunConfig(RunConfig):
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


class StableLLaVARunConfig(RunConfig):
    """StableLLaVA: keywords -> SD prompts -> images -> dialogues -> CLIP check (gamma) -> LLaVA SFT data."""

    keywords: KeywordsConfig = Field(default_factory=KeywordsConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    dialogues: DialoguesConfig = Field(default_factory=DialoguesConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    # StableLLaVA v2 §4.4: keep image-prompt pairs whose CLIP score >= gamma = 0.25.
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(mode="threshold", threshold=0.25))
    export: StableLLaVAExportConfig = Field(default_factory=StableLLaVAExportConfig)


RUN_CONFIGS: dict[str, type[RunConfig]] = {"synthvlm": SynthVLMRunConfig, "stablellava": StableLLaVARunConfig}


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
        "curate": {"judge": {"llm": {"backend": "template"}}, "sample_size": None},
        "select": {"mode": "top_k", "k": 8},
        "report": {"max_images": 16},
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


# paper = the defaults, from the papers (SDXL base 1.0, 60 steps, 1024^2, CLIP ViT-L-14, top-k 100K, gamma).
PRESETS: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
    "synthvlm": {"paper": dict, "demo": _synthvlm_demo},
    "stablellava": {"paper": dict, "demo": _stablellava_demo},
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


def to_pipeline_arguments(config: RunConfig) -> dict[str, Any]:
    """Flatten for a KFP pipeline: scalars as they are, each stage section as `<section>_config` JSON."""
    data = config.model_dump(mode="json")
    sections = _sections(type(config))
    args = {k: v for k, v in data.items() if k not in sections}
    for section in sections:
        args[f"{section}{SECTION_SUFFIX}"] = json.dumps(data[section], sort_keys=True)
    return args


def from_pipeline_arguments(args: dict[str, Any], cls: type[RunConfig] = SynthVLMRunConfig) -> RunConfig:
    """Inverse of to_pipeline_arguments; errors name the pipeline parameter and field."""
    sections = _sections(cls)
    data: dict[str, Any] = {}
    for key, value in args.items():
        section = key.removesuffix(SECTION_SUFFIX)
        if key.endswith(SECTION_SUFFIX) and section in sections:
            try:
                data[section] = json.loads(value) if value else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(f"pipeline parameter '{key}': not valid JSON: {exc}") from None
        else:
            data[key] = value
    return validate(cls, data, source="pipeline parameters")
