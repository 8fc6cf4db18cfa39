"""Tiny SD3/SD3.5/Flux pipelines and real-size meta-device models for the DiT tests (the recipe of
../shared/dit-formats.md, built by trainer/dit_architectures.py; nothing is downloaded).

Test modules use :func:`tiny_pipeline_factory` from a fixture of their own; the real-size models are cached for
the session and must not be modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.dit_architectures import VARIANTS, build_text_encoders, build_tiny_pipeline, build_transformer

VARIANT_NAMES = tuple(VARIANTS)
SD3_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.family == "sd3")
FLUX_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.family == "flux")
T5_TOKENS = 16  # a short T5 sequence keeps the tiny pipelines fast


def tiny_pipeline_factory(tokenizer_dir: Path) -> Callable[..., Any]:
    """``make(name, seed=0)`` → a fresh tiny pipeline in eval mode with frozen weights, progress bars off."""

    def make(name: str, seed: int = 0):
        pipe = build_tiny_pipeline(name, tokenizer_dir, seed=seed)
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval().requires_grad_(False)
        return pipe

    return make


@functools.cache
def real_transformer(name: str) -> torch.nn.Module:
    return build_transformer(name, meta=True)


@functools.cache
def real_text_encoders(name: str) -> tuple[torch.nn.Module, ...]:
    return tuple(build_text_encoders(name, meta=True))


def generation_kwargs(name: str, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """A 32×32, two-step generation, deterministic."""
    values = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": T5_TOKENS,
              "output_type": "np", "generator": torch.Generator().manual_seed(seed)}
    values.update(overrides)
    return values
