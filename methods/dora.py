"""DoRA (weight-decomposed adaptation) on top of any additive method: ``W' = m ⊙ (W + ΔW)/‖W + ΔW‖`` per output row.

A method offers DoRA by mixing :class:`DoRAConfigMixin` into its config (LoRA, LoHa, LoKr do); the wrapper
(:class:`methods.base.AdapterModule`) then holds the magnitude ``dora_scale`` (initialised to ‖W‖ per row) and
routes the output path, the lent weight, merging and the file's ``dora_scale`` through the functions here, so the
method's own code never sees DoRA.

The norm is detached, as in the DoRA paper §4.3 and PEFT: the magnitude learns scale, ΔW learns direction.
Strength ``s`` blends the weights, ``W + s·(W' − W)``. File key (LyCORIS, PEFT ``wd_on_out``): ``dora_scale
(out, 1[, 1, 1])``; the input-axis layout of old LyCORIS/A1111 files is refused.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import AdapterModule

FILE_KEY = "dora_scale"

# The cost of one elementwise pass over one element, in multiply-adds of a product: what the lent-weight choice
# (rebuild_is_cheaper) weighs DoRA's extra passes with. How it was fitted: bench/NOTES.md.
PASS_COST = 128


@dataclasses.dataclass
class DoRAConfigMixin:
    """The option a method's config mixes in to offer DoRA."""

    dora: bool = False  # weight-decomposed: learn each output row's magnitude apart from its direction (DoRA)


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖·‖ over everything but the output axis, shaped like ``dora_scale`` in files: (out, 1[, 1, 1])."""
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
    return norm.view(weight.shape[0], *([1] * (weight.dim() - 1)))


def _channel_view(t: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast against the base layer's output."""
    return t.view(-1, 1, 1) if isinstance(base, nn.Conv2d) else t


def init(adapter: AdapterModule) -> None:
    """A new DoRA adapter's magnitude: the base weight's row norms (so it starts as the base layer)."""
    adapter.dora_scale = nn.Parameter(row_norm(adapter.base.weight.detach().float()))


def adapted_output(adapter: AdapterModule, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
    """The output path: ΔW is built without autograd only for the norm; the activations go through the method's
    ``delta_apply`` (its factored product where it has one) instead of a second full-width product with ΔW."""
    base = adapter.base
    weight = base.weight
    with torch.no_grad():
        delta = adapter.delta_weight()
        norm = row_norm(weight.to(delta.dtype) + delta)
    ratio = (adapter.dora_scale.to(delta.dtype) / norm).flatten()
    bias = base.bias
    frozen = base_out if bias is None else base_out - _channel_view(bias, base).to(base_out.dtype)
    adapted_out = frozen + adapter.delta_apply(x)
    adapted_out = adapted_out * _channel_view(ratio, base).to(x.dtype)
    return base_out + (adapted_out - frozen) * strength


def adapted_weight(adapter: AdapterModule, strength: float) -> torch.Tensor:
    """``W + s·(m ⊙ (W + ΔW)/‖W + ΔW‖ − W)``, the norm detached: what :func:`adapted_output` computes, as a weight."""
    weight = adapter.base.weight
    delta = adapter.delta_weight()
    adapted = weight.to(delta.dtype) + delta
    with torch.no_grad():
        norm = row_norm(adapted)
    target = adapted * (adapter.dora_scale.to(delta.dtype) / norm)
    return torch.lerp(weight.to(delta.dtype), target, strength).to(weight.dtype)


def merged_delta(adapter: AdapterModule, delta: torch.Tensor) -> torch.Tensor:
    """What merging at strength 1 adds to the base weight: ``W' − W``."""
    weight = adapter.base.weight.to(delta.dtype)
    adapted = weight + delta
    return adapted * (adapter.dora_scale.to(delta.dtype) / row_norm(adapted)) - weight


def rebuild_is_cheaper(adapter: AdapterModule, x: torch.Tensor) -> bool:
    """Whether DoRA's lent weight beats its output path. The output path builds ΔW without autograd (for the norm),
    applies the method's product and makes ~10 passes over the (positions × out) activations; the lent weight
    builds ΔW with autograd, makes ~5 passes over (in × out) and adds the product for W's gradient."""
    positions = adapter.positions(x)
    weight_side = adapter.in_dim * adapter.out_dim * (2 * adapter.build_cost() + 5 * PASS_COST + positions)
    output_side = positions * (3 * adapter.factored_cost() + 10 * PASS_COST * adapter.out_dim)
    return weight_side < output_side


def load(adapter: AdapterModule, scale: torch.Tensor) -> None:
    """Turn DoRA on for a module read from a file, with the file's ``dora_scale``."""
    expected = row_norm(adapter.base.weight).shape
    if scale.shape[0] != adapter.out_dim or scale.numel() != adapter.out_dim:
        raise ValueError(
            f"{adapter.name}: {FILE_KEY} {tuple(scale.shape)} does not fit the output-axis layout "
            f"{tuple(expected)}; input-axis files (1, in[, 1, 1]) from old LyCORIS/A1111 are not supported"
        )
    adapter.use_dora = True
    scale = scale.detach().to(device=adapter.base.weight.device, dtype=torch.float32)
    adapter.dora_scale = nn.Parameter(scale.reshape(expected).clone())
