"""Small LLaVA datasets made with PIL in a test's tmp_path, and tiny training configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from synthvlm.train.config import TrainConfig

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def write_images(folder: Path) -> dict[str, str]:
    """One small non-square PNG per colour; returns name -> path relative to `folder`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        rel = f"images/{name}.png"
        Image.new("RGB", (24 + 8 * i, 16), rgb).save(folder / rel)
        paths[name] = rel
    return paths


def caption_samples(folder: Path) -> list[dict[str, Any]]:
    """Single-image, single-turn samples (the shape of LLaVA's pretraining JSON)."""
    return [
        {
            "id": f"cap-{name}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": f"A plain {name} square."},
            ],
        }
        for name, rel in write_images(folder).items()
    ]


def chat_samples(folder: Path) -> list[dict[str, Any]]:
    """Multi-turn, multi-image and text-only samples (the shapes of LLaVA-665K and StableLLaVA)."""
    paths = write_images(folder)
    return [
        {
            "id": "multi-turn",
            "image": paths["red"],
            "conversations": [
                {"from": "human", "value": "What colour is it?\n<image>"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Is it dark?"},
                {"from": "gpt", "value": "No, it is bright."},
            ],
        },
        {
            "id": "two-images",
            "image": [paths["green"], paths["blue"]],
            "conversations": [
                {"from": "human", "value": "<image> and <image>: what differs?"},
                {"from": "gpt", "value": "The first is green, the second blue."},
            ],
        },
        {
            "id": "text-only",
            "conversations": [
                {"from": "human", "value": "Name a colour."},
                {"from": "gpt", "value": "White."},
            ],
        },
        {
            "id": "single",
            "image": paths["white"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "A white square."},
            ],
        },
    ]


def text_samples(count: int) -> list[dict[str, Any]]:
    """Text-only samples of growing length (the ShareGPT part of LLaVA-665K)."""
    return [
        {
            "id": f"text-{i}",
            "conversations": [
                {"from": "human", "value": f"Say sheep {3 * (i + 1)} times."},
                {"from": "gpt", "value": " ".join(["sheep"] * 3 * (i + 1))},
            ],
        }
        for i in range(count)
    ]


def write_json(path: Path, samples: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples))
    return str(path)


def tiny_config(stage: str = "pretrain", **overrides: Any) -> TrainConfig:
    """A tiny CPU run: global batch 2 (2 x 1 accumulation), 2 epochs of 4 samples = 4 optimizer steps."""
    fields: dict[str, Any] = {
        "stage": stage,
        "tiny": True,
        "device": "cpu",
        "global_batch_size": 2,
        "per_device_batch_size": 1,
        "learning_rate": 1e-2,
        "num_train_epochs": 2,
        "save_steps": 2,
        "dataloader_num_workers": 0,
        "logging_steps": 1,
    }
    fields.update(overrides)
    return TrainConfig(**fields)
