"""Helpers shared by the training tests: tiny models written to disk, tiny image folders, configs, runs.

Everything is built locally from ``trainer.architectures`` (no downloads). Images are 16×16 by default, so the
tiny VAE (one downsampling) gives 8×8 latents and a training step takes a few tens of milliseconds on one CPU
thread.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.architectures import build_tiny_pipeline
from trainer.config import TrainerConfig

RESOLUTION = 16


def build_model(root: Path, arch: str, tokenizer_dir: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny pipeline of ``arch`` saved as a diffusers folder and as a single-file checkpoint."""
    from trainer.models import save_single_file

    pipe = build_tiny_pipeline(arch, tokenizer_dir, seed=seed)
    folder = root / f"{arch}-diffusers"
    pipe.save_pretrained(str(folder))
    single = save_single_file(pipe, root / f"{arch}.safetensors")
    return {"folder": folder, "single": single, "tokenizer": tokenizer_dir}


def smooth_image(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth random picture (``size`` = (width, height)): low-frequency colour blobs, like a photo at 16 px."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return image.convert(mode)


def write_images(folder: Path, count: int, size: tuple[int, int] = (RESOLUTION, RESOLUTION), seed: int = 0,
                 caption: str | None = "a photo of zq", start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"{index:03d}.png"
        smooth_image(size, seed * 1000 + index).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
        paths.append(path)
    return paths


def write_trigger_data(root: Path, folder: str = "1_zq") -> Path:
    """Four images of concept ``zq``: two captioned in prose, two as tags."""
    write_images(root / folder, 2, caption="a photo of zq")
    write_images(root / folder, 2, caption="zq, a red ball", start=2, seed=1)
    return root


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_update(result[key], value)
        else:
            result[key] = value
    return result


def config_dict(base: Path | str, data: Path | str, out: Path | str, tokenizer: Path | str | None = None,
                **sections: dict[str, Any]) -> dict[str, Any]:
    """A small, fast run: 16 px, fp32 files, 2 steps; ``sections`` override per [section]."""
    data_dict = {
        "model": {"base": str(base), **({"tokenizer": str(tokenizer)} if tokenizer else {})},
        "dataset": {"dir": str(data), "resolution": RESOLUTION, "min_bucket_side": 8, "max_bucket_side": 64,
                    "bucket_step": 8},
        "network": {"method": "lora"},
        "train": {"max_steps": 2, "batch_size": 1, "learning_rate": 1e-3},
        "output": {"dir": str(out), "name": "adapter", "save_dtype": "fp32", "tensorboard": False},
    }
    return deep_update(data_dict, sections)


def make_config(*args: Any, **kwargs: Any) -> TrainerConfig:
    return TrainerConfig.from_dict(config_dict(*args, **kwargs))


def run(config: TrainerConfig, **kwargs: Any):
    """``train(config)`` → (result, events)."""
    from trainer.loop import train

    events: list[dict[str, Any]] = []
    result = train(config, on_event=events.append, **kwargs)
    return result, events


def of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["event"] == kind]


def read_event_log(folder: Path) -> list[dict[str, Any]]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def unet_output(pipe: Any, seed: int = 0) -> torch.Tensor:
    """The UNet's output on fixed inputs (SDXL gets its pooled embedding and time ids)."""
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                      "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), hidden, **extra).sample
