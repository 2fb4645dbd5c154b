"""Device and dtype choice shared by the GPU stages ("auto" = CUDA when present, else CPU)."""

from __future__ import annotations

from typing import Literal

import torch

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


def resolve_device(name: DeviceName = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible")
    return torch.device(name)


def resolve_dtype(name: DtypeName, device: torch.device) -> torch.dtype:
    """'auto' = bfloat16 on GPU (no fp16 overflow in the SDXL VAE), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
