"""Stable Diffusion XL pipelines: the real ones from the hub or a local folder, and tiny offline ones.

The tiny pipeline has SDXL's structure (two CLIP text encoders whose hidden states are concatenated,
a pooled text embedding plus size/crop "time ids" as added conditioning, a KL autoencoder, Euler
sampling with SDXL's noise schedule) at ~3.5M parameters, mostly the 49408-token embeddings, with
random weights fixed by a seed. It lets every stage and test run the exact diffusers code path on a
CPU with no download. The tiny refiner mirrors SDXL's refiner: an img2img pipeline with the second text
encoder only, whose UNet is conditioned on an aesthetic score instead of the target size.

Other model names can be registered with a builder (`register_builder`): the GPU benchmark registers
the full-size SDXL architecture with random weights that way, so the generation stage runs it unchanged.

`model_revision` says which commit a loaded pipeline's weights are: the Hugging Face cache snapshot
folder diffusers loaded from (a hub id or a snapshot path), a `hf download --local-dir` folder's
metadata, or a git checkout's HEAD; a plain folder gets a content hash and the reason instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from synthvlm.models.tokenizer import CONTEXT_LENGTH, offline_clip_tokenizer_dir

log = logging.getLogger(__name__)

TINY_SDXL = "synthvlm/tiny-sdxl"
TINY_SDXL_REFINER = "synthvlm/tiny-sdxl-refiner"
SchedulerName = Literal["euler", "dpmpp_2m"]
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}

_TEXT_HIDDEN = 32  # per text encoder; the UNet cross-attends to both, concatenated
_TIME_EMBED = 8  # per SDXL time id (original size, crop offset, target size: 6 ids)
_REFINER_TIME_IDS = 5  # the refiner's time ids: original size, crop offset, aesthetic score
_REFINER_SEED = 1  # our choice: any fixed seed other than the base's, so the two UNets differ

# (dtype, device) -> pipeline, for model names that are built rather than loaded.
Builder = Callable[[torch.dtype, torch.device], StableDiffusionXLPipeline]
_P = TypeVar("_P", StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)


def _tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT_LENGTH,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=_TEXT_HIDDEN,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the first end-of-text token
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_unet(cross_attention_dim: int = 2 * _TEXT_HIDDEN, time_ids: int = 6) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        # SDXL's added conditioning: pooled text embedding of encoder 2 + embedded time ids.
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED + _TEXT_HIDDEN,
    )


def _tiny_vae() -> AutoencoderKL:
    # Three blocks: latents are 4x smaller than the image (SDXL: 8x with four blocks).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def _sdxl_euler_scheduler() -> EulerDiscreteScheduler:
    # The noise schedule of stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json).
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def _tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    tokenizer_dir = offline_clip_tokenizer_dir()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    # SDXL's second tokenizer pads with "!" (id 0) rather than end-of-text, as in the released model.
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    return tokenizer, tokenizer_2


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny random-weight SDXL pipeline; the same seed gives the same weights."""
    tokenizer, tokenizer_2 = _tiny_tokenizers()
    # Our own RNG stream: building the model neither depends on nor disturbs the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sdxl_euler_scheduler(),
        add_watermarker=False,
    )


def build_tiny_sdxl_refiner(
    base: StableDiffusionXLPipeline | None = None, seed: int = _REFINER_SEED
) -> StableDiffusionXLImg2ImgPipeline:
    """A tiny random-weight SDXL refiner: img2img with text encoder 2 only and aesthetic-score time ids.

    With `base`, it shares the base's second text encoder and VAE, as the diffusers SDXL docs load the
    released refiner; otherwise it builds its own (from the base seed) and only the UNet is its own.
    """
    if base is None:
        base = build_tiny_sdxl()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The refiner cross-attends to text encoder 2 only (SDXL refiner: 1280 wide, not 768 + 1280).
        unet = _tiny_unet(cross_attention_dim=_TEXT_HIDDEN, time_ids=_REFINER_TIME_IDS)
    if base.unet.dtype != unet.dtype:  # built in float32
        unet.to(dtype=base.unet.dtype)
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet.to(base.unet.device),
        scheduler=_sdxl_euler_scheduler(),
        # The released refiner's model_index.json: aesthetic-score conditioning, and an empty negative
        # prompt is encoded rather than zeroed.
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def _build_tiny(dtype: torch.dtype, device: torch.device) -> StableDiffusionXLPipeline:
    return build_tiny_sdxl()


_BUILDERS: dict[str, Builder] = {TINY_SDXL: _build_tiny}


def register_builder(name: str, builder: Builder) -> None:
    """Make `load_sdxl(name)` call `builder(dtype, device)` instead of loading from the hub or a folder."""
    _BUILDERS[name] = builder


def is_builtin(model: str) -> bool:
    """Whether `model` is built in code (tiny models, registered builders) rather than loaded."""
    return model in _BUILDERS or model == TINY_SDXL_REFINER


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")


def _finish(pipe: _P, scheduler: SchedulerName, device: torch.device | str) -> _P:
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)  # callers log their own progress per batch
    return pipe.to(device)


def load_sdxl(
    model: str,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scheduler: SchedulerName = "euler",
) -> StableDiffusionXLPipeline:
    """SDXL pipeline from a hub id or a local folder (`TINY_SDXL`: the tiny offline one), on `device`.

    `scheduler` swaps the sampler while keeping the model's noise schedule (its scheduler config).
    """
    _check_scheduler(scheduler)
    if model in _BUILDERS:
        pipe = _BUILDERS[model](dtype, torch.device(device))
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
    else:
        # dtype at load time, not via .to(): diffusers then keeps modules that need float32 in float32.
        pipe = StableDiffusionXLPipeline.from_pretrained(model, revision=revision, dtype=dtype)
    return _finish(pipe, scheduler, device)


def load_sdxl_refiner(
    model: str,
    base: StableDiffusionXLPipeline,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scheduler: SchedulerName = "euler",
) -> StableDiffusionXLImg2ImgPipeline:
    """SDXL refiner (`TINY_SDXL_REFINER`: the tiny one) sharing `base`'s second text encoder and VAE.

    Sharing is what the diffusers SDXL docs do with the released models (the refiner's copies are the
    same weights); it saves ~1.7 GB of GPU memory and a second VAE decode setup.
    """
    _check_scheduler(scheduler)
    if model == TINY_SDXL_REFINER:
        pipe = build_tiny_sdxl_refiner(base)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            model, revision=revision, dtype=dtype, text_encoder_2=base.text_encoder_2, vae=base.vae
        )
    return _finish(pipe, scheduler, device)


# --- which weights were loaded --------------------------------------------------------------------

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The HF cache layout: .../models--org--name/snapshots/<commit>/<subfolder>/...
_SNAPSHOT = re.compile(r"(?:^|/)snapshots/([0-9a-f]{40})(?:/|$)")
# `hf download --local-dir` keeps per-file metadata whose first line is the commit (huggingface_hub
# _local_folder.write_download_metadata).
_LOCAL_DIR_METADATA = Path(".cache", "huggingface", "download", "model_index.json.metadata")
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".yaml")  # hashed by content: configs and tokenizers
_SKIP_DIRS = {".git", ".cache"}


def _snapshot_commit(path: str) -> str | None:
    match = _SNAPSHOT.search(Path(path).as_posix())
    return match.group(1) if match else None


def _local_dir_commit(folder: Path) -> str | None:
    try:
        first = (folder / _LOCAL_DIR_METADATA).read_text().split("\n", 1)[0].strip()
    except OSError:
        return None
    return first if _COMMIT.match(first) else None


def _git_commit(folder: Path) -> str | None:
    """HEAD of a git checkout (e.g. `git clone https://huggingface.co/...`), without running git."""
    git = folder / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head.removeprefix("ref: ")
            if (git / ref).is_file():
                head = (git / ref).read_text().strip()
            else:  # packed refs: "<commit> <ref>" lines
                packed = (git / "packed-refs").read_text().splitlines()
                head = next((line.split()[0] for line in packed if line.endswith(f" {ref}")), "")
    except OSError:
        return None
    return head if _COMMIT.match(head) else None


def folder_content_hash(folder: str | Path) -> str:
    """sha256 over the folder's config/tokenizer file contents and the names and sizes of the other files.

    Weights are not read (gigabytes): a re-saved checkpoint with the same sizes hashes the same.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _SKIP_DIRS.intersection(rel.parts):
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        if path.suffix in _CONFIG_SUFFIXES:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(str(path.stat().st_size).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def model_revision(pipe: Any, model: str, requested: str | None = None) -> dict[str, Any]:
    """Which weights `pipe` (loaded by `load_sdxl(model, requested)`) has, for provenance.

    {"revision": commit or None, "revision_source": how it was found, "revision_requested": requested};
    without a commit also "revision_missing" (why) and, for a folder, "content_sha256".
    """
    info: dict[str, Any] = {"revision": None, "revision_requested": requested}
    if is_builtin(model):
        reason = "built in code (synthvlm.models.sdxl) from a fixed seed; no checkpoint"
        return {**info, "revision_source": "builtin", "revision_missing": reason}
    # diffusers records the folder each component was read from: the cache snapshot for a hub id.
    unet = getattr(pipe, "unet", None)
    loaded_from = str(getattr(getattr(unet, "config", None), "_name_or_path", "") or "")
    folder = Path(model) if os.path.isdir(model) else None
    commit = _snapshot_commit(loaded_from) or (folder and _snapshot_commit(os.path.realpath(folder)))
    if commit:
        return {**info, "revision": commit, "revision_source": "hf_cache"}
    if folder is None:
        reason = f"loaded from {loaded_from or 'an unknown place'}, not from a Hugging Face cache snapshot"
        return {**info, "revision_source": "unknown", "revision_missing": reason}
    for source, found in (("hf_local_dir", _local_dir_commit(folder)), ("git", _git_commit(folder))):
        if found:
            return {**info, "revision": found, "revision_source": source}
    return {
        **info,
        "revision_source": "local_folder",
        "revision_missing": "local folder with no commit (HF cache snapshot, hf download metadata, git)",
        "content_sha256": folder_content_hash(folder),
    }


def _hub_commit(model: str, revision: str | None) -> str | None:
    """The commit `revision` (default: main) of hub repo `model` names now: asked of the hub when online,
    else read from the local cache's refs (what an offline load would use)."""
    from huggingface_hub import HfApi, constants

    ref = revision or "main"
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(model, revision=ref).sha
        except Exception as exc:  # no network, no such repo, gated: the cache may still know
            log.info("cannot ask the hub for %s@%s (%s); looking in the local cache", model, ref, exc)
    refs = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / ref
    try:
        commit = refs.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None


def resolve_weights(model: str, revision: str | None) -> dict[str, Any]:
    """What `load_sdxl(model, revision)` would load, named before loading it, for a stage's fingerprint.

    A moved branch (revision None = the hub's main) names another commit, so images of two commits never
    share a fingerprint. {"commit": ...} or, for a plain folder, {"content_sha256": ...}; builtins and
    unresolvable names give {"unresolved": why}.
    """
    if is_builtin(model):
        return {"unresolved": "built in code from a fixed seed"}
    if revision and _COMMIT.match(revision):
        return {"commit": revision}
    if os.path.isdir(model):
        folder = Path(model)
        commit = (
            _snapshot_commit(os.path.realpath(folder)) or _local_dir_commit(folder) or _git_commit(folder)
        )
        return {"commit": commit} if commit else {"content_sha256": folder_content_hash(folder)}
    commit = _hub_commit(model, revision)
    if commit is None:
        return {"unresolved": f"{model}@{revision or 'main'}: not on the hub nor in the local cache"}
    return {"commit": commit}
