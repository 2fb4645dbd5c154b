"""The whole SynthVLM run as one validated config, and the presets `demo` and `paper`.

Pipeline parameters are this config flattened one level: scalar run settings stay scalars, and each
stage's config travels as one JSON parameter (`generate_config`, ...), so the KFP UI shows every
stage's defaults and a new stage field never needs pipeline code.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, field_validator

from synthvlm.config import StageConfig, validate
from synthvlm.stages.captions import DEMO_CAPTIONS, CaptionsConfig
from synthvlm.stages.clip_score import ScoreConfig
from synthvlm.stages.curate import CurateConfig
from synthvlm.stages.export_llava import ExportConfig
from synthvlm.stages.generate import GenerateConfig
from synthvlm.stages.report import ReportConfig
from synthvlm.stages.select import SelectConfig

STAGE_SECTIONS = ("curate", "generate", "score", "select", "export", "report")


class SynthVLMRunConfig(StageConfig):
    """SynthVLM (paper §3): captions -> SDXL images -> CLIPScore -> top-k -> LLaVA pretraining JSON."""

    captions: str = Field(
        DEMO_CAPTIONS, description="captions file/URI (.jsonl, .csv, .parquet; id + caption)"
    )
    max_captions: int = Field(0, ge=0, description="use only the first N captions; 0 = all")
    # SynthVLM §3.1 curates captions before generation; off by default because it needs an LLM endpoint.
    curate_captions: bool = Field(False, description="run caption curation (SynthVLM §3.1) first")
    llm_secret: str = Field(
        "synthvlm-llm", description="Kubernetes Secret holding the LLM API key (key OPENAI_API_KEY)"
    )
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
    curate: CurateConfig = Field(default_factory=CurateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @field_validator("data_root")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/") if value not in ("", "/") else value

    def captions_config(self) -> CaptionsConfig:
        return CaptionsConfig(captions=self.captions, max_records=self.max_captions or None)

    def require_data_root(self) -> None:
        if not self.data_root:
            from synthvlm.errors import ConfigError

            raise ConfigError("config field 'data_root': required (a local folder or gs://bucket/prefix)")


def _demo_preset() -> dict[str, Any]:
    from synthvlm.models.clip import TINY_CLIP
    from synthvlm.models.sdxl import TINY_SDXL

    # Random-weight tiny models built from configs: the demo exercises every stage offline on a CPU in
    # minutes; its images and scores are noise, not data.
    return {
        "captions": DEMO_CAPTIONS,
        "num_shards": 2,
        # curation with the offline template judge and the tiny CLIP (demo captions have no raw images)
        "curate_captions": True,
        "curate": {"judge": {"llm": {"backend": "template"}}, "sample_size": None},
        "generate": {
            "model": TINY_SDXL,
            "steps": 4,
            "height": 128,
            "width": 128,
            "batch_size": 4,
            "device": "cpu",
        },
        "score": {"model": TINY_CLIP, "pretrained": None, "batch_size": 16, "device": "cpu"},
        "select": {"mode": "top_k", "k": 8},
        "report": {"max_images": 16},
    }


# paper = the defaults, from the papers (SDXL base 1.0, 60 steps, 1024^2, CLIP ViT-L-14, top-k 100K).
PRESETS: dict[str, Any] = {"paper": dict, "demo": _demo_preset}


def preset(name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    if name not in PRESETS:
        from synthvlm.errors import ConfigError

        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def to_pipeline_arguments(config: SynthVLMRunConfig) -> dict[str, Any]:
    """Flatten for the KFP pipeline: scalars as they are, each stage section as `<section>_config` JSON."""
    data = config.model_dump(mode="json")
    args = {k: v for k, v in data.items() if k not in STAGE_SECTIONS}
    for section in STAGE_SECTIONS:
        args[f"{section}_config"] = json.dumps(data[section], sort_keys=True)
    return args


def from_pipeline_arguments(args: dict[str, Any]) -> SynthVLMRunConfig:
    """Inverse of to_pipeline_arguments; errors name the pipeline parameter and field."""
    data: dict[str, Any] = {}
    for key, value in args.items():
        section = key.removesuffix("_config")
        if key.endswith("_config") and section in STAGE_SECTIONS:
            try:
                data[section] = json.loads(value) if value else {}
            except json.JSONDecodeError as exc:
                from synthvlm.errors import ConfigError

                raise ConfigError(f"pipeline parameter '{key}': not valid JSON: {exc}") from None
        else:
            data[key] = value
    return validate(SynthVLMRunConfig, data, source="pipeline parameters")
