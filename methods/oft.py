"""OFT (LyCORIS "diag-oft"): a block-diagonal Cayley rotation of the base layer's output channels.

``Q = B − Bᵀ`` per block (COFT: ``Q ← Q·c·out/‖Q‖_F`` when ``‖Q‖_F > c·out``, norm over all blocks),
``R = (I + Q)(I − Q)⁻¹`` (inverse in fp32), ``W' = rescale ⊙ blockdiag(R)ᵀ·W`` on the output rows, ``ΔW = W' − W``.
Strength ``s`` blends linearly: ``W + s·ΔW`` (LyCORIS and A1111).

File keys (LyCORIS): ``oft_blocks (n_blocks, b, b)`` with ``n_blocks·b = out``, ``alpha`` (0-dim, the COFT constraint
``c``; 0 = none, *not* a LoRA alpha), optional ``rescale (out, 1[, 1, 1])``. BOFT (:mod:`methods.boft`) stores 4-D
``oft_blocks`` under the same suffix; a file's suffixes cannot tell them apart, so this module claims ``oft_blocks``
and :meth:`OFTModule.file_class` hands 4-D blocks to :class:`methods.boft.BOFTModule`.

The forward rotates whichever is smaller: the frozen layer's output (:meth:`OrthogonalModule.transform_output`,
bias removed first and added back after, ``O(out·b)`` per token, ``W'`` never built), or, with many more tokens
than input features, the weight's rows, lending the layer ``W'`` for the call (:meth:`OrthogonalModule.rotates_weight`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar

import torch
from torch import nn

from .base import AdapterConfig, AdapterModule, ConfigError, factorization, is_kxk_conv, parameter_factory
from .registry import register

COFT_EPS = 1e-8  # LyCORIS adds this to ‖Q‖ before comparing and dividing (functional/diag_oft.py get_r)
# Where the rotation runs: "auto" (the cost model in OrthogonalModule.rotates_weight), or forced "output" / "weight",
# for benchmarks comparing the two paths.
ROTATION_SIDE = os.environ.get("RANKWRIGHT_ROTATION_SIDE", "auto")


# ----- factorisations (same results as lycoris.functional.general; factorization: methods.base) ---------
def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def power2factorization(dimension: int, factor: int = -1) -> tuple[int | None, int]:
    """BOFT's ``(block_size, n_blocks)``: the largest even ``b ≤ factor`` dividing ``dimension`` with
    ``dimension/b`` a power of two (``factor == -1`` means no limit); ``(None, 0)`` when there is none."""
    limit = dimension if factor == -1 else factor
    best = 0
    for size in range(2, min(limit, dimension) + 1, 2):
        if dimension % size == 0 and is_power_of_two(dimension // size):
            best = size
    return (best, dimension // best) if best else (None, 0)


# ----- the pure math ---------------------------------------------------------------------------------------------
def skew(blocks: torch.Tensor) -> torch.Tensor:
    """``Q = B − Bᵀ`` over the last two axes."""
    return blocks - blocks.transpose(-1, -2)


def constraint_scale(blocks: torch.Tensor, threshold: float) -> torch.Tensor | float:
    """The factor COFT applies to ``Q``: ``threshold/(‖Q‖_F + 1e-8)`` when that norm exceeds ``threshold``, else 1.

    ``threshold`` is absolute (``c·out``); the norm runs over every block (and every BOFT stage) at once.
    """
    if not threshold or threshold <= 0:
        return 1.0
    norm = torch.linalg.vector_norm(skew(blocks).float()) + COFT_EPS
    return torch.where(norm > threshold, threshold / norm, torch.ones_like(norm))


# The Cayley map on the CPU: LAPACK factorises small blocks one at a time, far slower than a block product (figures:
# bench/NOTES.md), and solves again in the backward pass. The series below takes 2 products per doubling and
# converges in 1–3 doublings for the rotations training produces; past SERIES_DOUBLINGS (‖Q²‖ ≳ 0.37) the LU runs.
SERIES_DOUBLINGS = 4  # terms up to Q³¹


def _doubled_shift_by_series(doubled: torch.Tensor) -> torch.Tensor | None:
    """``2((I − Q)⁻¹ − I) = 2(Q + Q² + Q³ + …)`` from ``doubled = 2Q`` (skew, ``(n, b, b)``), or ``None``.

    After ``k`` doublings the sum holds the terms below ``N = 2^(k+1)`` and misses ``Qᴺ·(I − Q)⁻¹``, whose norm is at
    most ``‖Qᴺ‖_F`` since ``‖(I − Q)⁻¹‖₂ ≤ 1`` for skew ``Q``: it stops once that is below ``eps·‖Q‖_F`` in every
    block, which is fp32 rounding of the result. ``None`` when that takes more than :data:`SERIES_DOUBLINGS`.
    """
    eps = torch.finfo(doubled.dtype).eps
    tolerance = torch.linalg.vector_norm(doubled, dim=(-2, -1)) * (eps / 2)
    power = torch.baddbmm(doubled, doubled, doubled, beta=0, alpha=0.25)  # Q²
    norms = torch.linalg.vector_norm(power, dim=(-2, -1))
    if not bool((norms <= eps ** (1 / 2**SERIES_DOUBLINGS)).all()):  # NaN or inf: not converging either
        return None
    total = doubled
    for _ in range(SERIES_DOUBLINGS):
        if bool((norms <= tolerance).all()):
            return total
        total = torch.baddbmm(torch.add(total, power, alpha=2), total, power)  # 2(Y + P + Y·P)
        if bool((norms.square() <= tolerance).all()):  # ‖P²‖ ≤ ‖P‖²: the next power need not be formed
            return total
        power = torch.bmm(power, power)
        norms = torch.linalg.vector_norm(power, dim=(-2, -1))
    return total if bool((norms <= tolerance).all()) else None


class _CayleyShift(torch.autograd.Function):
    """``S = R − I = 2((I − Q)⁻¹ − I)`` for ``Q = c·(B − Bᵀ)``, ``B (n, b, b)`` fp32, ``c`` the COFT factor or None.

    Formed without the cancellation of ``R − I`` (a small rotation keeps its digits). Backward:
    ``dS = 2X·dQ·X`` with ``X = (I − Q)⁻¹ = I + S/2``: two block products instead of a second LU solve.
    """

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        # fp32 throughout: under autocast the series' products would run in half precision and never converge.
        with torch.autocast(blocks.device.type, enabled=False):
            doubled = torch.sub(blocks, blocks.mT).mul_(2 if scale is None else 2 * scale)
            # Inside a compiled graph (train.compile: a layer outside the shared solve) the series' data-dependent
            # stops cannot be traced; the solve can.
            series = blocks.device.type == "cpu" and not torch.compiler.is_compiling()
            shift = _doubled_shift_by_series(doubled) if series else None
            if shift is None:
                # On CUDA the batched LU is a few kernels, where the series would wait for the GPU at each doubling.
                # I − Q is never singular (skew Q has imaginary eigenvalues), so the solver's check is skipped.
                eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
                shift = torch.linalg.solve_ex(torch.add(eye, doubled, alpha=-0.5), doubled,
                                              check_errors=False).result
        ctx.save_for_backward(shift, blocks, scale)
        return shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        shift, blocks, scale = ctx.saved_tensors
        with torch.autocast(shift.device.type, enabled=False):
            inverse_t = torch.eye(shift.shape[-1], device=shift.device, dtype=shift.dtype).add(shift.mT, alpha=0.5)
            outer = torch.bmm(torch.bmm(inverse_t, grad.to(shift.dtype)), inverse_t)  # ½ ∂L/∂Q
            skewed = torch.sub(outer, outer.mT)
            grad_scale = 2 * (skewed * blocks).sum() if ctx.needs_input_grad[1] else None
            return skewed.mul_(2 if scale is None else 2 * scale), grad_scale


def cayley_shift(blocks: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``R − I`` for the per-block rotations ``R = (I + Q)(I − Q)⁻¹`` of ``blocks (..., b, b)``, constrained by
    ``threshold``, in fp32."""
    scale = constraint_scale(blocks, threshold)
    size = blocks.shape[-1]
    flat = blocks.float().reshape(-1, size, size)
    return _CayleyShift.apply(flat, scale if isinstance(scale, torch.Tensor) else None).view(blocks.shape)


def cayley(blocks: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Per-block rotations ``R = (I + Q)(I − Q)⁻¹`` of ``blocks (..., b, b)``, constrained by ``threshold``, in fp32."""
    shift = cayley_shift(blocks, threshold)
    return shift + torch.eye(shift.shape[-1], device=shift.device, dtype=shift.dtype)


def oft_channel_delta(values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(Rᵀ − I)·v`` per block on the last axis of ``values`` (``..., n_blocks·b``) from ``shift = R − I`` (fp32),
    in ``values``' dtype: small rotations survive a half-precision activation."""
    return block_product(values, shift.to(values.dtype))


def block_product(values: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``v_k · M_k`` for each b-wide block ``k`` of the last axis of ``values`` (``..., n·b``), ``blocks (n, b, b)``.

    One ``bmm`` over a strided view (the blocks as the batch axis, no copy going in), faster than the equivalent
    einsum forward and backward (bench/NOTES.md).
    """
    n_blocks, size, _ = blocks.shape
    lead = values.shape[:-1]
    rows = values.reshape(-1, n_blocks, size).transpose(0, 1)  # (n, positions, b)
    return torch.bmm(rows, blocks).transpose(0, 1).reshape(*lead, n_blocks * size)


def rows_as_channels(weight: torch.Tensor) -> torch.Tensor:
    """``W (out, ...)`` as ``(in·kh·kw, out)``: the rows become the last (channel) axis, a view."""
    return weight.flatten(1).transpose(0, 1)


def rescaled_delta(delta: torch.Tensor, values: torch.Tensor, rescale: torch.Tensor | None) -> torch.Tensor:
    """``rescale ⊙ (v + Δ) − v`` from the rotation's ``Δ`` (channels on the last axis)."""
    if rescale is None:
        return delta
    gain = rescale.flatten().to(values.dtype)
    return gain * delta + (gain - 1) * values


def rotation_delta_weight(channel_delta, weight: torch.Tensor, blocks: torch.Tensor, threshold: float = 0.0,
                          rescale: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW of a rotation of the output rows, given how the rotation acts on channels (OFT or BOFT), in fp32."""
    values = rows_as_channels(weight.float())
    delta = rescaled_delta(channel_delta(values, cayley_shift(blocks, threshold)), values, rescale)
    return delta.transpose(0, 1).reshape(weight.shape)


def oft_delta_weight(weight: torch.Tensor, blocks: torch.Tensor, threshold: float = 0.0,
                     rescale: torch.Tensor | None = None) -> torch.Tensor:
    """The pure ΔW of diag-OFT: ``rescale ⊙ blockdiag(R)ᵀ·W − W`` on the output rows, in fp32."""
    return rotation_delta_weight(oft_channel_delta, weight, blocks, threshold, rescale)


# ----- config ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OFTConfig(AdapterConfig):
    """Diag-OFT options. Give ``block_size`` or ``block_count`` (not both); neither → ``default_block_size``."""

    default_block_size: ClassVar[int] = 32  # OneTrainer's OFT default; SD widths 320·2ᵏ → b = 10, 20 or 32
    min_block_size: ClassVar[int] = 1

    block_size: int | None = None  # requested b; LyCORIS factorisation keeps b ≤ n_blocks (see block_factor)
    block_count: int | None = None  # requested number of blocks; same as block_size = out // block_count
    constraint: float = 0.0  # COFT: ‖Q‖_F ≤ constraint·out; 0 = unconstrained
    rescale: bool = False  # learn a per-output-channel gain (stored as `rescale`; ComfyUI ignores it for OFT)
    include_conv: bool = True  # k×k convs get adapters too (1×1 convs always do)

    def validate(self) -> None:
        super().validate()
        if self.block_size is not None and self.block_count is not None:
            raise ConfigError("network: give either block_size or block_count, not both")
        if self.block_size is not None and int(self.block_size) < self.min_block_size:
            raise ConfigError(f"network.block_size must be ≥ {self.min_block_size}, got {self.block_size!r}")
        if self.block_count is not None and int(self.block_count) < 1:
            raise ConfigError(f"network.block_count must be a positive integer, got {self.block_count!r}")
        if not (math.isfinite(float(self.constraint)) and float(self.constraint) >= 0.0):
            raise ConfigError(f"network.constraint must be ≥ 0 (0 disables COFT), got {self.constraint!r}")

    def block_factor(self, out_dim: int) -> int:
        """The ``lora_dim`` LyCORIS would be given: the requested block size."""
        if self.block_size is not None:
            return int(self.block_size)
        if self.block_count is not None:
            return out_dim // int(self.block_count)
        return self.default_block_size

    def block_shape(self, out_dim: int) -> tuple[int, ...]:
        """``(n_blocks, b, b)`` for one layer, as ``DiagOFTModule`` factors ``out``."""
        size, count = factorization(out_dim, self.block_factor(out_dim))
        return (count, size, size)

    def wants(self, base: nn.Module) -> bool:
        return super().wants(base) and (self.include_conv or not is_kxk_conv(base))


def _chunks(adapters: list, limit: int) -> list[list]:
    """Consecutive runs of adapters whose blocks together hold at most ``limit`` elements (a larger one alone)."""
    chunks, current, held = [], [], 0
    for adapter in adapters:
        size = adapter.oft_blocks.numel()
        if current and held + size > limit:
            chunks.append(current)
            current, held = [], 0
        current.append(adapter)
        held += size
    if current:
        chunks.append(current)
    return chunks


# ----- the shared wrapper ------------------------------------------------------------------------------------------
class OrthogonalModule(AdapterModule):
    """What OFT and BOFT share: blocks, COFT constraint, rescale, output rotation, export. Not registered."""

    delta_uses_base = True
    config_class = OFTConfig
    file_keys = frozenset({"oft_blocks"})
    example_options = {"block_size": 4}

    def __init__(self, name: str, base: nn.Module, config: OFTConfig, *, block_shape: tuple[int, ...] | None = None):
        super().__init__(name, base, config)
        out = self.out_dim
        shape = tuple(block_shape) if block_shape is not None else config.block_shape(out)
        self._check_shape(shape)
        self.constraint = float(config.constraint)
        factory = parameter_factory(base)
        self.oft_blocks = nn.Parameter(torch.zeros(*shape, **factory))  # B = 0 → R = I, like LyCORIS
        self._shared_shift: tuple[torch.Tensor, int] | None = None  # see before_forward
        self._in_model_call = False
        self.rescaled = bool(config.rescale)
        if self.rescaled:
            self.rescale = nn.Parameter(torch.ones(out, *([1] * (base.weight.dim() - 1)), **factory))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        """The absolute COFT bound on ``‖Q‖_F``: ``constraint·out`` (LyCORIS, A1111, kohya)."""
        return self.constraint * self.out_dim

    @property
    def block_size(self) -> int:
        return self.oft_blocks.shape[-1]

    @property
    def block_count(self) -> int:
        return self.oft_blocks.shape[-3]

    # Block elements per shared solve. On a GPU one solve for many layers saves kernels; on the CPU the Cayley
    # series' passes over the blocks should stay in cache (the sizes chosen: bench/NOTES.md).
    SHARED_SOLVE_ELEMENTS = {"cpu": 2**18, "cuda": 2**22}

    @classmethod
    def before_forward(cls, adapters: list[OrthogonalModule]) -> None:
        """One Cayley solve for every unconstrained layer of the same block size (one model call, one autograd
        graph): a few kernels for the whole UNet instead of a dozen per layer, which is what a GPU step waits on.

        Each layer keeps its slice with the blocks' version for the call and for the backward pass after it
        (gradient checkpointing recomputes layers there and must see the same tensors); an optimizer step, or any
        use outside the call and its backward pass, solves anew.
        """
        if not torch.is_grad_enabled():
            return  # without autograd the per-layer cache in rotation_shift() serves
        groups: dict[tuple, list[OrthogonalModule]] = {}
        for adapter in adapters:
            blocks = adapter.oft_blocks
            if adapter.threshold == 0 and adapter.attached and float(adapter.multiplier) != 0.0:
                groups.setdefault((blocks.shape[-1], blocks.device, blocks.dtype), []).append(adapter)
        for (size, device, _), group in groups.items():
            limit = cls.SHARED_SOLVE_ELEMENTS.get(device.type, cls.SHARED_SOLVE_ELEMENTS["cuda"])
            for chunk in _chunks(group, limit):
                if len(chunk) < 2:
                    continue
                blocks = torch.cat([adapter.oft_blocks.reshape(-1, size, size) for adapter in chunk])
                counts = [adapter.oft_blocks.numel() // (size * size) for adapter in chunk]
                for adapter, shift in zip(chunk, cayley_shift(blocks).split(counts)):
                    adapter._shared_shift = (shift.view(adapter.oft_blocks.shape), adapter.oft_blocks._version)
                    adapter._in_model_call = True

    @classmethod
    def after_forward(cls, adapters: list[OrthogonalModule]) -> None:
        for adapter in adapters:
            adapter._in_model_call = False

    def detach_hook(self) -> None:
        super().detach_hook()
        self._shared_shift, self._in_model_call = None, False

    def _shared_shift_or_none(self) -> torch.Tensor | None:
        shared = self._shared_shift
        if shared is None:
            return None
        # During the call (no optimizer step can come between before_forward and this layer), or while autograd
        # runs a backward pass (checkpointing's recomputation of this call) of unchanged blocks. Inside the call
        # neither the version nor the autograd state is asked: a compiled model call (train.compile) traces neither.
        if self._in_model_call:
            return shared[0]
        in_backward = torch._C._current_graph_task_id() != -1
        return shared[0] if in_backward and shared[1] == self.oft_blocks._version else None

    def rotation_shift(self) -> torch.Tensor:
        """``R − I`` for the constrained per-block rotations, fp32.

        During a model call the rotations solved for all layers at once (:meth:`before_forward`) are used. Without
        autograd (sampling, applying a file) they are cached until the blocks change: the Cayley map per block
        and layer would otherwise dominate every denoising step.
        """
        if torch.is_grad_enabled():
            shared = self._shared_shift_or_none()
            return shared if shared is not None else cayley_shift(self.oft_blocks, self.threshold)
        blocks = self.oft_blocks
        key = (blocks._version, blocks.data_ptr(), blocks.device, self.threshold)
        cached = getattr(self, "_shift_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, cayley_shift(blocks, self.threshold))
            self._shift_cache = cached
        return cached[1]

    def rotation(self) -> torch.Tensor:
        """The constrained per-block rotations ``R``, fp32."""
        shift = self.rotation_shift()
        return shift + torch.eye(shift.shape[-1], device=shift.device, dtype=shift.dtype)

    def channel_delta(self, values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``rotated(v) − v`` on the last axis, before rescale, from the blocks' ``R − I``."""
        raise NotImplementedError

    def _rescale_or_none(self) -> torch.Tensor | None:
        return self.rescale if self.rescaled else None

    # ----- math ---------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        values = rows_as_channels(self.base.weight.float())
        delta = self.channel_delta(values, self.rotation_shift())
        delta = rescaled_delta(delta, values, self._rescale_or_none())
        return delta.transpose(0, 1).reshape(self.weight_shape)

    # A multiply-add of the product for W's gradient against one element's pass through one rotation stage (whose
    # block products and copies cost about the same whatever b). How it was fitted: bench/NOTES.md.
    PRODUCT_COST = 1.2e-3

    def rotates_weight(self, positions: int) -> bool:
        """Whether lending the layer ``W + s·ΔW`` (rotating the weight's rows) beats rotating its output.

        Each stage turns ``positions`` rows (tokens × batch) on the output side but ``in·kh·kw`` rows on the weight
        side, which then adds one product, for W's gradient (``positions·in·out``). So the weight wins when
        ``stages·(positions − in) > k·positions·in``: for BOFT's 5–10 stages as soon as positions clearly outnumber
        input features (its output side keeps one (positions × out) activation per stage); for OFT's one stage only
        on narrow layers with several times more positions.
        """
        if ROTATION_SIDE != "auto":
            return ROTATION_SIDE == "weight"
        stages = self.oft_blocks.shape[0] if self.oft_blocks.dim() == 4 else 1
        return stages * (positions - self.in_dim) > self.PRODUCT_COST * positions * self.in_dim

    def rebuild_is_cheaper(self, x: torch.Tensor) -> bool:
        """Rotate the weight's rows and lend the layer ``W + s·ΔW`` where that beats rotating the output."""
        return self.rotates_weight(self.positions(x))

    def transform_output(self, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        """``base + s·(rotated − base)``: rotate the bias-free output channels; ``W'`` is never built."""
        if strength == 0.0:
            return base_out
        bias = self.base.bias
        channels = base_out.movedim(1, -1) if self.is_conv else base_out
        if bias is not None:
            channels = channels - bias.to(channels.dtype)
        delta = self.channel_delta(channels, self.rotation_shift())
        delta = rescaled_delta(delta, channels, self._rescale_or_none())
        if self.is_conv:
            delta = delta.movedim(-1, 1)
        return torch.add(base_out, delta, alpha=strength)

    # ----- file layout -----------------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """``portable`` bakes COFT into the blocks and writes ``alpha = 0`` (every consumer then agrees, ComfyUI
        included, which compares ‖Q‖ with the raw alpha); otherwise the raw blocks and ``alpha = constraint``
        (LyCORIS's own layout, which training can resume from)."""
        blocks = self.oft_blocks.detach()
        alpha = self.constraint
        if portable and self.constraint > 0:
            blocks = blocks * constraint_scale(blocks, self.threshold)
            alpha = 0.0
        tensors = {"oft_blocks": blocks.to(self.oft_blocks.dtype), "alpha": torch.tensor(alpha)}
        if self.rescaled:
            tensors["rescale"] = self.rescale.detach()
        return tensors

    @classmethod
    def _config_from_tensors(cls, tensors: dict[str, torch.Tensor]) -> dict:
        alpha = tensors.get("alpha")
        constraint = float(alpha.float().item()) if alpha is not None else 0.0
        if not math.isfinite(constraint) or constraint < 0:
            constraint = 0.0
        return {"constraint": constraint, "rescale": tensors.get("rescale") is not None, "include_conv": True}

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        """OFT: ``n blocks of b``; BOFT (4-D blocks): ``m×n blocks of b`` (m butterfly stages)."""
        blocks = tensors["oft_blocks"]
        if blocks.dim() == 4:
            return f"{blocks.shape[0]}x{blocks.shape[1]} blocks of {blocks.shape[2]}"
        return f"{blocks.shape[0]} blocks of {blocks.shape[1]}"

    @classmethod
    def _load(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor], config: OFTConfig):
        blocks = tensors["oft_blocks"]
        module = cls(name, base, config, block_shape=tuple(blocks.shape))
        with torch.no_grad():
            module.oft_blocks.copy_(blocks)
            if module.rescaled:
                module.rescale.copy_(tensors["rescale"].reshape(module.rescale.shape))
        return module


@register(aliases=("diag-oft", "diag_oft"))
class OFTModule(OrthogonalModule):
    method = "oft"
    label = "OFT"
    lycoris_algo = "diag-oft"
    description = ("Orthogonal fine-tuning: rotates output channels in blocks; keeps the base's geometry, "
                   "small files (LyCORIS diag-oft; not Forge or diffusers).")
    config_class = OFTConfig

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[1] != shape[2] or shape[0] * shape[1] != self.out_dim:
            raise ValueError(f"{self.name}: oft_blocks {shape} do not tile {self.out_dim} output channels")

    def channel_delta(self, values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return oft_channel_delta(values, shift)

    @classmethod
    def file_class(cls, tensors: dict[str, torch.Tensor]) -> type[OrthogonalModule]:
        """3-D ``oft_blocks`` → OFT; 4-D → BOFT (both use the suffix ``oft_blocks``; only the rank differs)."""
        if tensors["oft_blocks"].dim() == 4:
            from .boft import BOFTModule

            return BOFTModule
        return cls

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> OrthogonalModule:
        blocks = tensors["oft_blocks"]
        if blocks.dim() != 3:
            raise ValueError(f"{name}: oft_blocks must be 3-D (OFT) or 4-D (BOFT), got {tuple(blocks.shape)}")
        config = OFTConfig(block_size=blocks.shape[-1], **cls._config_from_tensors(tensors))
        return cls._load(name, base, tensors, config)
