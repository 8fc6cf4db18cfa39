"""BOFT (LyCORIS "boft"): butterfly orthogonal fine-tuning, ``m`` stages of block rotations with a butterfly
permutation of the output channels between them.

``oft_blocks (m, n_blocks, b, b)`` with ``b`` even, ``n_blocks`` a power of two, ``b·n_blocks = out`` and
``m ≤ log2(n_blocks) + 1``; each stage's rotation is the same Cayley map and global COFT constraint as OFT
(:mod:`methods.oft`). Rows of W (stage ``i``, ``k = 2ⁱ·b/2``)::

    x = W;  for i < m:  x = P_i⁻¹ · blockdiag(R_i) · P_i · x      (P_i: "(c g k) → (c k g)" with g = 2; R, not Rᵀ)
    W' = rescale ⊙ x;   ΔW = W' − W

Strength ``s`` is the linear blend ``W + s·ΔW`` (as A1111); LyCORIS and ComfyUI instead blend each stage
``s·R_i + (1−s)·I`` — the same at ``s = 1`` (and 0), different in between.
Files share the suffix ``oft_blocks`` with OFT; :class:`methods.oft.OFTModule` claims it and routes 4-D blocks here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import torch
from torch import nn

from .base import ConfigError
from .oft import (
    OFTConfig,
    OrthogonalModule,
    is_power_of_two,
    power2factorization,
    rotation_delta_weight,
)
from .registry import register


def max_stages(n_blocks: int) -> int:
    """``log2(n_blocks) + 1``: the most butterfly stages a power-of-two block count allows (LyCORIS's default)."""
    return int(n_blocks).bit_length()


@functools.lru_cache(maxsize=64)
def _butterfly_gathers(channels: int, size: int, stages: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Row gathers that carry channel-major activations from one stage's coordinates to the next.

    Stage ``i`` permutes channels ``(c g k) → (c k g)`` (``g = 2``, ``k = 2ⁱ·b/2``) so that its b-wide blocks are
    contiguous. Entry ``i`` takes the previous stage's coordinates (the original ones for ``i = 0``) to stage
    ``i``'s; the last entry takes the last stage's coordinates back to the original order.
    """
    half = size // 2
    order = torch.arange(channels)
    gathers, position = [], torch.arange(channels)  # position[c]: where original channel c sits now
    for i in range(stages):
        k = 2**i * half
        perm = order.view(-1, 2, k).transpose(-2, -1).flatten()  # stage coordinate j holds original perm[j]
        gathers.append(position[perm])
        position = torch.empty_like(perm)
        position[perm] = order
    gathers.append(position)
    return tuple(g.to(device) for g in gathers)


def butterfly_channel_delta(values: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``butterfly(v) − v`` on the last axis of ``values`` for the stages' ``R − I`` (``shifts (m, n_blocks, b, b)``),
    in ``values``' dtype.

    Runs channel-major — ``(channels, positions)`` — so each stage is one row gather (its permutation composed with
    the previous one's inverse) and one ``bmm`` over the b-wide blocks, with no copies around it. In fp32 the
    rotated activations are carried and ``v`` subtracted at the end; in half precision the difference is carried
    instead (``Δ += (R_i − I)·(v + Δ)``), so a small rotation is not rounded away.
    """
    stages, n_blocks, size, _ = shifts.shape
    channels = n_blocks * size
    lead = values.shape[:-1]
    gathers = _butterfly_gathers(channels, size, stages, values.device)
    columns = values.reshape(-1, channels).t()  # (channels, positions), a view

    def blockwise(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.bmm(matrix, rows.reshape(n_blocks, size, -1)).view(channels, -1)

    if values.dtype in (torch.float32, torch.float64):
        rotated = columns
        eye = torch.eye(size, device=shifts.device, dtype=shifts.dtype)
        for gather, rotation in zip(gathers, (shifts + eye).to(values.dtype).unbind(0)):
            rotated = blockwise(rotation, rotated.index_select(0, gather))
        delta = rotated.index_select(0, gathers[-1]) - columns
    else:
        delta, placed = None, None  # Δ in the current stage's coordinates; the gather that places v there
        for gather, shift in zip(gathers, shifts.to(values.dtype).unbind(0)):
            placed = gather if placed is None else placed[gather]
            current = columns.index_select(0, placed)
            if delta is not None:
                delta = delta.index_select(0, gather)
                current = current + delta
            step = blockwise(shift, current)
            delta = step if delta is None else delta + step
        delta = delta.index_select(0, gathers[-1])
    return delta.t().reshape(*lead, channels)


def boft_delta_weight(weight: torch.Tensor, blocks: torch.Tensor, threshold: float = 0.0,
                      rescale: torch.Tensor | None = None) -> torch.Tensor:
    """The pure ΔW of BOFT at strength 1, in fp32."""
    return rotation_delta_weight(butterfly_channel_delta, weight, blocks, threshold, rescale)


@dataclasses.dataclass
class BOFTConfig(OFTConfig):
    """BOFT options: the block size is LyCORIS's ``power2factorization`` of ``out`` (b even, out/b a power of two)."""

    default_block_size: ClassVar[int] = 16  # SD widths 320·2ᵏ need b a multiple of 10; 16 → b = 10
    min_block_size: ClassVar[int] = 2

    # Butterfly stages; None → log2(n_blocks) + 1 (LyCORIS), larger values are clamped. Fewer stages than that
    # make files LyCORIS's own loader rejects (its make_module_from_state_dict always allocates the maximum).
    boft_m: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.boft_m is not None and int(self.boft_m) < 1:
            raise ConfigError(f"network.boft_m must be a positive integer (or unset), got {self.boft_m!r}")

    def block_shape(self, out_dim: int) -> tuple[int, ...]:
        size, count = power2factorization(out_dim, self.block_factor(out_dim))
        if not count:
            raise ConfigError(
                f"BOFT cannot split {out_dim} channels into an even block size ≤ {self.block_factor(out_dim)} "
                "times a power of two; choose another block_size"
            )
        stages = max_stages(count) if self.boft_m is None else min(int(self.boft_m), max_stages(count))
        return (stages, count, size, size)

    def wants(self, base: nn.Module) -> bool:
        """Also skips layers whose width BOFT cannot factor (LyCORIS raises on them)."""
        if not super().wants(base):
            return False
        out = base.weight.shape[0]
        return power2factorization(out, self.block_factor(out))[1] > 0


@register(aliases=("butterfly-oft",))
class BOFTModule(OrthogonalModule):
    method = "boft"
    label = "BOFT"
    lycoris_algo = "boft"
    description = ("Butterfly OFT: chained block rotations mixing all output channels; denser than OFT "
                   "for the same block size (LyCORIS boft; not Forge or diffusers).")
    config_class = BOFTConfig
    # Never claimed by suffix: ``oft_blocks`` is OFT's, and ``OFTModule.file_class`` routes 4-D blocks here.
    file_keys = frozenset()

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        ok = len(shape) == 4 and shape[2] == shape[3] and shape[2] % 2 == 0 and is_power_of_two(shape[1])
        if not ok or shape[1] * shape[2] != self.out_dim or not 1 <= shape[0] <= max_stages(shape[1]):
            raise ValueError(f"{self.name}: oft_blocks {shape} are not a butterfly of {self.out_dim} channels "
                             "(m ≤ log2(n)+1 stages, n a power of two, even b, n·b = out)")

    @property
    def boft_m(self) -> int:
        return self.oft_blocks.shape[0]

    def channel_delta(self, values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return butterfly_channel_delta(values, shift)

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> BOFTModule:
        blocks = tensors["oft_blocks"]
        if blocks.dim() != 4:
            raise ValueError(f"{name}: BOFT oft_blocks must be 4-D (m, n, b, b), got {tuple(blocks.shape)}")
        config = BOFTConfig(block_size=blocks.shape[-1], boft_m=blocks.shape[0], **cls._config_from_tensors(tensors))
        return cls._load(name, base, tensors, config)
