"""Tiny SD3/SD3.5/Flux pipelines and real-size meta-device models for the DiT tests (the recipe of
../shared/dit-formats.md, built by trainer/dit_architectures.py; nothing is downloaded).

Test modules use :func:`tiny_pipeline_factory` from a fixture of their own; the real-size models are cached for
the session and must not be modified. :func:`native_checkpoint` writes a transformer in the original (sgm / BFL)
layout with our native names, for diffusers' single-file converters to check.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from methods.dit_naming import TransformerNaming, swap_halves
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


# Parameters that are no Linear/Conv2d (QK-norm scales, the positional table), native spelling per family.
_SD3_EXTRA = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_FLUX_DOUBLE_EXTRA = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                      "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_FLUX_SINGLE_EXTRA = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def native_checkpoint(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The original-layout state dict, written with our names only (plus the non-Linear table above)."""
    naming = TransformerNaming(transformer)
    state = transformer.state_dict()
    native: dict[str, torch.Tensor] = {}
    for paths in naming.native_layers().values():
        path = naming.native[paths[0]].path
        for kind in ("weight", "bias"):
            tensors = [state[f"{p}.{kind}"] for p in paths if f"{p}.{kind}" in state]
            if not tensors:
                continue
            tensor = torch.cat(tensors) if len(paths) > 1 else tensors[0]
            native[f"{path}.{kind}"] = swap_halves(tensor) if naming.native[paths[0]].swap_halves else tensor
    for key, tensor in state.items():
        match = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.weight$", key)
        if match and naming.family == "sd3" and match[3] in _SD3_EXTRA:
            native[f"joint_blocks.{match[2]}.{_SD3_EXTRA[match[3]]}.weight"] = tensor
        elif match and naming.family == "flux":
            table = _FLUX_DOUBLE_EXTRA if match[1] == "transformer_blocks" else _FLUX_SINGLE_EXTRA
            block = "double_blocks" if match[1] == "transformer_blocks" else "single_blocks"
            if match[3] in table:
                native[f"{block}.{match[2]}.{table[match[3]]}.scale"] = tensor
    if "pos_embed.pos_embed" in state:
        native["pos_embed"] = state["pos_embed.pos_embed"]
    return native
