"""GLoRA (LyCORIS "glora", generalised LoRA): ``ΔW = (alpha/r) · (W·A1·A2 + B1·B2)``.

A rank-r map of the input fed through the frozen weight (``W·A``), plus a LoRA (``B``): the layer computes
``W·x + s·(alpha/r)·(W·(A1·A2·x) + B1·B2·x)``. ΔW depends on the base weight, so converting a file needs its base.

File keys (LyCORIS 4 layout, spec §2.7; conv shapes in brackets): ``a1.weight (in, r[, 1, 1])``,
``a2.weight (r, in[, 1, 1])``, ``b1.weight (out, r[, 1, 1])``, ``b2.weight (r, in[, kh, kw])``, ``alpha``. For
convs ``W·A1·A2`` contracts the input-channel axis (A is a 1×1 map on the input), and ``b2`` carries the kernel.
ComfyUI/Forge read this layout (``rank = a2.shape[0]``) and the old one (``ΔW = B2·B1 + W·A2·A1``, ``rank =
a1.shape[0]``), telling them apart by shapes as :func:`current_layout` does; both are read here, the current one is
written. A1111 reads only the old layout. A Tucker ``bm.weight`` (never written by LyCORIS 4) is refused.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, LowRankConfig, apply_weight, parameter_factory, read_alpha, scale_product
from .registry import register

KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


@dataclasses.dataclass
class GLoRAConfig(LowRankConfig):
    """Rank and alpha (conv_rank/conv_alpha for k×k convs), as LoRA."""


def contract_input(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``W·M`` on W's input-channel axis: ``(out, in[, kh, kw]) × (in, k) → (out, k[, kh, kw])``."""
    if weight.dim() == 2:
        return weight @ matrix
    return (weight.movedim(1, -1) @ matrix).movedim(-1, 1)


def glora_delta(weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                scale: float) -> torch.Tensor:
    """The pure ΔW of GLoRA, ``scale·(W·A1·A2 + B1·B2)``, in the factors' dtype (W cast to it)."""
    through_weight = contract_input(contract_input(weight.to(a1.dtype), a1.flatten(1)), a2.flatten(1))
    low_rank = (b1.flatten(1) @ b2.flatten(1)).reshape(weight.shape)
    return (through_weight + low_rank) * scale


def current_layout(tensors: dict[str, torch.Tensor],
                   weight_shape: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The file's factors in the current layout, and the rank; old-layout files (``B2·B1 + W·A2·A1``) swapped.

    The layouts are told apart by shapes as ComfyUI does: the old one chains ``b2 (out, r)``, ``b1 (r, in)``,
    ``a1 (r, in)``, ``a2 (in, r)``; where the current one's shapes match too, the old one is taken only for a square
    base weight of side ``a2.shape[0]`` (without the weight: never).
    """
    a1, a2, b1, b2 = (tensors[key] for key in KEYS)  # unflattened, as ComfyUI compares them
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    current = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    square_of_side = weight_shape is not None and a2.shape[0] == weight_shape[0] == weight_shape[1]
    if current and not (old and square_of_side):
        return {key: tensors[key] for key in KEYS}, int(a2.shape[0])
    if old:
        swapped = {"a1.weight": tensors["a2.weight"], "a2.weight": tensors["a1.weight"],
                   "b1.weight": tensors["b2.weight"], "b2.weight": tensors["b1.weight"]}
        return swapped, int(a1.shape[0])
    shapes = ", ".join(f"{key} {tuple(tensors[key].shape)}" for key in KEYS)
    raise ValueError(f"GLoRA factors {shapes} form neither the current nor the old layout")


@register
class GLoRAModule(AdapterModule):
    method = "glora"
    label = "GLoRA"
    description = ("Generalised LoRA: a low-rank map of the input through the frozen weight plus a LoRA, "
                   "W·A + B; LyCORIS, ComfyUI/Forge, not A1111 or diffusers.")
    config_class = GLoRAConfig
    file_keys = frozenset({*KEYS, "bm.weight"})
    delta_uses_base = True
    example_options = {"rank": 4, "alpha": 2.0}
    lycoris_algo = "glora"

    def __init__(self, name: str, base: nn.Module, config: GLoRAConfig):
        super().__init__(name, base, config)
        rank, alpha = config.rank_and_alpha_for(base)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        factory = parameter_factory(base)
        weight = base.weight
        out_dim, in_channels, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        point = (1, 1) if kernel else ()
        self.a1 = nn.Parameter(torch.empty(in_channels, rank, *point, **factory))
        self.a2 = nn.Parameter(torch.zeros(rank, in_channels, *point, **factory))
        self.b1 = nn.Parameter(torch.empty(out_dim, rank, *point, **factory))
        self.b2 = nn.Parameter(torch.zeros(rank, in_channels, *kernel, **factory))
        # LyCORIS's init: a2 = b2 = 0 so ΔW starts at 0; a1 and b1 Kaiming, and get gradients once a2/b2 move.
        nn.init.kaiming_uniform_(self.a1, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.b1, a=math.sqrt(5))

    # ----- math ---------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return glora_delta(self.base.weight, self.a1, self.a2, self.b1, self.b2, self.scale)

    def delta_apply(self, x: torch.Tensor, dropouts: bool = False) -> torch.Tensor:
        """``scale·(W·(A1·A2·x) + B1·(B2·x))``: A is a 1×1 map on the input, B2 runs with the layer's window."""
        dtype = x.dtype
        if self.is_conv:
            mapped = F.conv2d(F.conv2d(x, self.a2.to(dtype)), self.a1.to(dtype))
            low_rank = F.conv2d(apply_weight(self.base, x, self.b2.to(dtype)), self.b1.to(dtype))
        else:
            mapped = F.linear(F.linear(x, self.a2.to(dtype)), self.a1.to(dtype))
            low_rank = F.linear(F.linear(x, self.b2.to(dtype)), self.b1.to(dtype))
        through_weight = apply_weight(self.base, mapped, self.base.weight.to(dtype))
        return torch.add(through_weight, low_rank).mul_(self.scale)

    def factored_cost(self) -> int:
        """One product with W (the whole point of GLoRA's A) plus the four rank-r maps."""
        in_channels = self.weight_shape[1]
        return self.in_dim * self.out_dim + self.rank * (2 * in_channels + self.in_dim + self.out_dim)

    def build_cost(self) -> int:
        return 3 * self.rank

    def rebuild_is_cheaper(self, x: torch.Tensor) -> bool:
        """The output path runs a second product with W on ``A·x``; lending ``W + s·ΔW`` replaces the frozen
        product instead, at the cost of building ΔW (three times with autograd) and the product for W's gradient:
        cheaper beyond a few positions per rank."""
        positions = self.positions(x)
        grad = torch.is_grad_enabled()
        passes = 3 if grad else 1
        weight_elements = self.in_dim * self.out_dim
        lent = passes * self.build_cost() * weight_elements + (positions * weight_elements if grad else 0)
        return lent < passes * positions * self.factored_cost()

    # ----- file layout -------------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """Every consumer that reads GLoRA reads this layout, so ``portable`` changes nothing."""
        tensors = {key: getattr(self, key.partition(".")[0]).detach() for key in KEYS}
        tensors["alpha"] = torch.tensor(float(self.alpha))
        return tensors

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> GLoRAModule:
        if "bm.weight" in tensors:
            raise ValueError(f"{name}: bm.weight (a Tucker GLoRA) is not read by ComfyUI or A1111 and not supported")
        missing = [key for key in KEYS if key not in tensors]
        if missing:
            raise ValueError(f"{name}: GLoRA module lacks {', '.join(missing)}")
        factors, rank = current_layout(tensors, tuple(base.weight.shape))
        alpha = read_alpha(tensors, rank)
        module = cls(name, base, GLoRAConfig(rank=rank, alpha=alpha, conv_rank=rank, conv_alpha=alpha))
        module.copy_file_tensors({key.partition(".")[0]: value for key, value in factors.items()})
        return module

    def scale_delta(self, ratio: float) -> None:
        """ΔW = W·A1·A2 + B1·B2: each term a product of two factors, scaled alike."""
        scale_product(self, ["a1", "a2"], ratio)
        scale_product(self, ["b1", "b2"], ratio)

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        return str(current_layout(tensors)[1])
