"""Fill a model cache once: download every model a run config names into HF_HOME (for example the
model-cache PVC that `synthvlm compile --model-cache-pvc` mounts in every model-loading task), so that
eight generation pods do not each download SDXL (~7 GB) from the hub when they start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "hub" (a Hugging Face repo: diffusers, transformers) or "open_clip" (model + pretrained tag)
    name: str
    revision: str | None = None  # hub: branch/tag/commit; open_clip: the pretrained tag
    used_by: str = ""


def _walk(config: BaseModel, path: str = ""):
    """Every config node but switched-off parts (`enabled: false`; curation when the run skips it)."""
    if getattr(config, "enabled", True) is False:
        return
    yield path, config
    for name in type(config).model_fields:
        value = getattr(config, name)
        if name == "curate" and getattr(config, "curate_captions", True) is False:
            continue
        if isinstance(value, BaseModel):
            yield from _walk(value, f"{path}.{name}" if path else name)


def models_of(config: BaseModel) -> list[ModelRef]:
    """Every downloadable model the config names (built-in tiny models and local folders left out)."""
    import os

    from synthvlm.curation.image_text_matching import ImageTextMatchConfig
    from synthvlm.curation.perplexity import TINY_LM, PerplexityConfig
    from synthvlm.models.clip import TINY_CLIP
    from synthvlm.models.sdxl import is_builtin
    from synthvlm.scoring import ScoreConfig
    from synthvlm.stages.generate import GenerateConfig
    from synthvlm.train.config import TrainConfig

    def downloadable(name: str | None) -> bool:
        return bool(name) and not is_builtin(name) and not os.path.isdir(name) and "://" not in name

    refs: list[ModelRef] = []
    for path, node in _walk(config):
        if isinstance(node, GenerateConfig):
            for name, revision in ((node.model, node.revision), (node.refiner_model, node.refiner_revision)):
                if downloadable(name):
                    refs.append(ModelRef("hub", name, revision, path))
        elif isinstance(node, ScoreConfig) and node.model != TINY_CLIP and node.pretrained:
            refs.append(ModelRef("open_clip", node.model, node.pretrained, path))
        elif isinstance(node, PerplexityConfig | ImageTextMatchConfig) and downloadable(node.model):
            if not (isinstance(node, PerplexityConfig) and node.model == TINY_LM):
                refs.append(ModelRef("hub", node.model, node.revision, path))
        elif isinstance(node, TrainConfig) and not node.tiny:
            for name in (node.vision_tower, node.llm):
                if downloadable(name):
                    refs.append(ModelRef("hub", name, None, path))
    unique: dict[tuple[str, str, str | None], ModelRef] = {}
    for ref in refs:
        unique.setdefault((ref.kind, ref.name, ref.revision), ref)
    return list(unique.values())


def prefetch(refs: list[ModelRef]) -> list[dict[str, Any]]:
    """Download each model into the caches (HF_HOME); returns what went where."""
    done = []
    for ref in refs:
        if ref.kind == "hub":
            from huggingface_hub import snapshot_download

            log.info("downloading %s@%s (for %s)", ref.name, ref.revision or "main", ref.used_by)
            where = snapshot_download(ref.name, revision=ref.revision)
        else:
            from open_clip.pretrained import download_pretrained, get_pretrained_cfg

            cfg = get_pretrained_cfg(ref.name, ref.revision or "")
            if not cfg:
                from synthvlm.errors import ConfigError

                raise ConfigError(
                    f"{ref.used_by}: open_clip has no pretrained tag {ref.revision!r} for {ref.name}"
                )
            log.info("downloading open_clip %s/%s (for %s)", ref.name, ref.revision, ref.used_by)
            where = download_pretrained(cfg)
        done.append({"model": ref.name, "revision": ref.revision, "used_by": ref.used_by, "path": where})
    return done
