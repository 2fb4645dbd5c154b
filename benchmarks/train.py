"""LLaVA-1.5 stage-1 (pretrain) training throughput per GPU, with random weights.

A 7B-shaped LLaVA-1.5 (Vicuna-7B shape: hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab
32000 + <image>, padded to 32064; CLIP ViT-L/14 at 336 px; mlp2x_gelu projector) trains its projector
only, as synthvlm.train does in stage 1: frozen vision tower and LLM in bf16, fp32 projector under bf16
autocast, SDPA attention, AdamW on the projector. Each sample is 576 image tokens + 64 text tokens
(LLaVA-1.5 pretraining: a short caption). The timed step is forward + backward + optimizer step, the
data already on the GPU (the loader is not measured). Prints one JSON object.

    .venv/bin/python benchmarks/train.py [--batch-size 16 --steps 10 --gradient-checkpointing]
    .venv/bin/python benchmarks/train.py --smoke     # tiny model on CPU: checks the script runs

Model FLOPs per sample (the "mfu" numerator): the LLM and vision tower forward (2 x params x tokens +
attention scores), the LLM backward for activation gradients only (about one forward: frozen weights get
no gradients), nothing backward through the vision tower (nothing in it requires grad), and the
projector forward + backward (6 x params x 576). Peak = dense bf16 of the GPU (H100/H200 SXM 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from synthvlm.train.model import build_tiny_llava, llava_config, num_image_tokens, set_trainable

VICUNA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
}
VOCAB = 32064  # 32000 + <image>, padded to a multiple of 64 (llava-hf's layout)
IMAGE_TOKEN_ID = 32000
CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense, SXM where it differs


def build_7b(device: torch.device) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **VICUNA_7B)
    config = llava_config(CLIPVisionConfig(**CLIP_L14_336), text, IMAGE_TOKEN_ID)
    with torch.device(device):  # random init straight on the GPU, in bf16 (no 28 GB fp32 copy)
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model


def synthetic_batch(model, batch: int, text_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """bos + one image's placeholders + text tokens; labels on the text only (LLaVA's plain template)."""
    config = model.config
    n_image = num_image_tokens(config)
    vocab = config.text_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, min(vocab, 32000) - 1, (batch, text_tokens), generator=gen)
    text[text == config.image_token_index] = 3
    ids = torch.cat(
        [
            torch.ones(batch, 1, dtype=torch.long),
            torch.full((batch, n_image), config.image_token_index),
            text,
        ],
        1,
    )
    labels = ids.clone()
    labels[:, : 1 + n_image] = -100
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    dtype = next(model.model.vision_tower.parameters()).dtype
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def _params(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def flops_per_sample(model, text_tokens: int) -> float:
    config = model.config
    n_image = num_image_tokens(config)
    seq = 1 + n_image + text_tokens
    llm, vision = config.text_config, config.vision_config
    llm_matmul = _params(model.model.language_model, skip=("embed_tokens",)) + _params(model.lm_head)
    llm_fwd = 2 * llm_matmul * seq + 4 * llm.num_hidden_layers * seq * seq * llm.hidden_size
    vision_tokens = n_image + 1
    vision_fwd = 2 * _params(model.model.vision_tower) * vision_tokens
    vision_fwd += 4 * vision.num_hidden_layers * vision_tokens**2 * vision.hidden_size
    projector = 6 * _params(model.model.multi_modal_projector) * n_image
    return float(2 * llm_fwd + vision_fwd + projector)  # LLM: forward + activation-gradient backward


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        model, _ = build_tiny_llava()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        model = build_7b(device)
    set_trainable(model, "pretrain")
    model.model.multi_modal_projector.float()  # fp32 master weights for the trained part
    model.config.use_cache = False
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    batch = synthetic_batch(model, args.batch_size, args.text_tokens, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    samples_per_s = args.batch_size * args.steps / seconds
    seq = batch["input_ids"].shape[1]
    flops = flops_per_sample(model, args.text_tokens)
    peak = peak_tflops(device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "samples_per_s_per_gpu": round(samples_per_s, 3),
        "tokens_per_s_per_gpu": round(samples_per_s * seq, 1),
        "mfu": round(samples_per_s * flops / (peak * 1e12), 4) if peak else None,
        "settings": {
            "model": "tiny LLaVA (smoke)" if args.smoke else "LLaVA-1.5-7B shape, random weights",
            "stage": "pretrain (projector only)",
            "batch_size": args.batch_size,
            "sequence_tokens": seq,
            "image_tokens": num_image_tokens(model.config),
            "text_tokens": args.text_tokens,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precision": "bf16 frozen weights + fp32 projector under bf16 autocast"
            if device.type == "cuda"
            else "fp32",
            "attention": model.config.text_config._attn_implementation,
            "steps_timed": args.steps,
            "seconds": round(seconds, 3),
            "model_tflop_per_sample": round(flops / 1e12, 3),
            "peak_tflops_bf16": peak,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda"
            else None,
            "final_loss": round(float(loss), 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default 16; smoke 2)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (2 if args.smoke else 16)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible; use --smoke for the CPU check")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
