"""Image generation throughput on one GPU: plain diffusers (as the papers' code) vs our generation stage.

Both run the full SDXL base architecture with random weights (throughput does not depend on weight
values), built from `benchmarks/sdxl_base_architecture.json` (a copy of the design's reference file,
kept here because only the repository travels to a GPU machine), at 1024x1024, 60 Euler steps,
guidance 7.5, each including VAE decode and JPEG encoding (and, for our stage, writing the images and
manifests to a local folder):

(a) plain: StableDiffusionXLPipeline in float16, one prompt per call, the VAE upcast to float32 for the
    decode (diffusers' default), PIL image -> JPEG file: what the papers' generation code does;
(b) ours: `synthvlm.stages.generate.generate` with its best settings (bfloat16, batch 8, torch.compile
    of the UNet, fused QKV projections, channels-last, no VAE upcast, encode/upload on threads). Its
    warm-up (compilation) is timed separately and left out of s/image.

Prints one JSON object: device, plain_s_per_image, ours_s_per_image, speedup, ours_tflops,
fraction_of_flop_bound (822 TFLOP per image, design.md, against the device's dense bf16 peak) and the
settings.

    .venv/bin/python benchmarks/generation.py                 # on a CUDA GPU, ~5 minutes
    .venv/bin/python benchmarks/generation.py --smoke         # CPU, tiny model, 64x64, 2 steps
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from synthvlm.models.sdxl import TINY_SDXL, build_tiny_sdxl, register_builder
from synthvlm.models.tokenizer import offline_clip_tokenizer_dir
from synthvlm.records import Record, write_manifest
from synthvlm.stages.generate import GenerateConfig, Painter, generate

log = logging.getLogger("benchmarks.generation")

ARCHITECTURE = Path(__file__).with_name("sdxl_base_architecture.json")
RANDOM_SDXL = "benchmark/sdxl-base-random"
TFLOP_PER_IMAGE = 822  # design.md: SDXL base, 1024^2, 60 steps with classifier-free guidance
# Dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets), by a substring of the device name.
DENSE_BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756,
    "H100 NVL": 835,
    "H100": 989,
    "H200": 989,
    "GH200": 989,
    "B200": 2250,
    "A100": 312,
    "L40S": 362,
    "L4": 121,
}
PROMPTS = [
    "a red car parked on a bridge at sunset",
    "a cat sleeping on a blue sofa",
    "two dogs running through fresh snow",
    "a bowl of tomato soup on a wooden table",
    "a lighthouse on a rocky coast under storm clouds",
    "a bicycle leaning against a brick wall",
    "a plate of sushi next to chopsticks",
    "an old man reading a newspaper in a park",
]


def _text_encoder_config(spec: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    fields = {key: value for key, value in spec.items() if key != "kind"}
    return CLIPTextConfig(
        **fields,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at the first end-of-text token
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random_sdxl(
    dtype: torch.dtype, device: torch.device, architecture: Path = ARCHITECTURE, seed: int = 0
) -> StableDiffusionXLPipeline:
    """The full SDXL base architecture with random weights, built directly on `device` (fast on a GPU)."""
    spec = json.loads(architecture.read_text())
    tokenizer_dir = offline_clip_tokenizer_dir()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")  # as SDXL's second tokenizer
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(_text_encoder_config(spec["text_encoder"], tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_encoder_config(spec["text_encoder_2"], tokenizer_2)
        )
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in spec["scheduler"].items() if k != "kind"})
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(
    pipe: StableDiffusionXLPipeline, prompts: list[str], settings: dict[str, Any], out_dir: Path
) -> float:
    """Seconds per image of the papers' way: one prompt per call, PIL image, JPEG file. One warm-up call."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(i: int, prompt: str) -> None:
        image = pipe(
            prompt=prompt,
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings["height"],
            width=settings["width"],
            generator=torch.Generator("cpu").manual_seed(i),
        ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        (out_dir / f"{i}.jpg").write_bytes(buf.getvalue())

    one(-1, prompts[0])  # warm-up: cuDNN/cuBLAS algorithm choice, allocator
    _synchronize(pipe.device)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        one(i, prompt)
    _synchronize(pipe.device)
    return (time.perf_counter() - started) / len(prompts)


def _manifest(path: Path, count: int, prefix: str) -> str:
    records = [Record(id=f"{prefix}-{i:04d}", caption=PROMPTS[i % len(PROMPTS)]) for i in range(count)]
    write_manifest(str(path), records)
    return str(path)


def time_ours(config: GenerateConfig, images: int, work: Path) -> dict[str, Any]:
    """Seconds per image of the generation stage, after a warm-up run of one batch (compilation)."""
    started = time.perf_counter()
    painter = Painter(config)
    warm_manifest = _manifest(work / "warm.jsonl", config.batch_size, "warm")
    generate(config, warm_manifest, str(work / "warm"), painter=painter)
    warmup_s = time.perf_counter() - started
    manifest = _manifest(work / "timed.jsonl", images, "img")
    _synchronize(painter.device)
    started = time.perf_counter()
    shard = generate(config, manifest, str(work / "timed"), painter=painter)
    seconds = time.perf_counter() - started
    stats = json.loads(Path(shard + ".done").read_text())
    return {
        "s_per_image": seconds / images,
        "warmup_s": round(warmup_s, 1),
        "speed_settings": painter.speed_settings,
        "retried": stats["retried"],
        "rejects": stats["rejects"],
    }


def peak_tflops(device_name: str) -> float | None:
    for key, value in DENSE_BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in device_name:
            return value
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU, or use --smoke for the CPU check")
    settings = {
        "steps": 2 if smoke else args.steps,
        "guidance_scale": 7.5,
        "height": 64 if smoke else 1024,
        "width": 64 if smoke else 1024,
    }
    model = TINY_SDXL if smoke else RANDOM_SDXL
    if not smoke:
        register_builder(RANDOM_SDXL, lambda dtype, dev: build_random_sdxl(dtype, dev))
    plain_dtype = torch.float32 if smoke else torch.float16  # fp16 convolutions are CPU-hostile
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain_pipe = build_tiny_sdxl().to(device) if smoke else build_random_sdxl(plain_dtype, device)
        plain_pipe.set_progress_bar_config(disable=True)
        plain_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.plain_images)]
        plain_s = time_plain(plain_pipe, plain_prompts, settings, work / "plain")
        del plain_pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
        config = GenerateConfig(
            model=model,
            **settings,
            batch_size=args.batch_size,
            dtype="bfloat16",
            device=device.type,
            compile=args.compile_mode != "off",
            compile_mode="default" if args.compile_mode == "off" else args.compile_mode,
            fuse_qkv=not args.no_fuse_qkv,
            channels_last=not args.no_channels_last,
            vae_upcast=False,
            image_format="jpeg",
            quality=95,
        )
        ours = time_ours(config, args.images, work / "ours")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (None if smoke else peak_tflops(device_name))
    ours_s = ours["s_per_image"]
    ours_tflops = None if smoke else TFLOP_PER_IMAGE / ours_s
    return {
        "device": device_name,
        "plain_s_per_image": round(plain_s, 4),
        "ours_s_per_image": round(ours_s, 4),
        "speedup": round(plain_s / ours_s, 3),
        "ours_tflops": None if ours_tflops is None else round(ours_tflops, 1),
        "fraction_of_flop_bound": None if ours_tflops is None or not peak else round(ours_tflops / peak, 3),
        "peak_dense_bf16_tflops": peak,
        "settings": {
            "smoke": smoke,
            "model": "tiny random SDXL" if smoke else "SDXL base architecture, random weights",
            **settings,
            "plain": {"dtype": str(plain_dtype).removeprefix("torch."), "batch_size": 1, "vae_upcast": True},
            "ours": {
                "dtype": "float32 (CPU)" if smoke else "bfloat16",
                "batch_size": args.batch_size,
                "compile_mode": args.compile_mode,
                "fuse_qkv": config.fuse_qkv,
                "channels_last": config.channels_last,
                "vae_upcast": False,
                "applied": ours["speed_settings"],
                "warmup_s": ours["warmup_s"],
                "retried": ours["retried"],
                "rejects": ours["rejects"],
            },
            "images": {"plain": args.plain_images, "ours": args.images},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 64x64, 2 steps")
    parser.add_argument("--steps", type=int, default=60, help="SynthVLM §3.1: 60")
    parser.add_argument("--images", type=int, default=16, help="images timed for our stage")
    parser.add_argument("--plain-images", type=int, default=4, help="images timed for plain diffusers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    parser.add_argument("--no-fuse-qkv", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak if not in the table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
