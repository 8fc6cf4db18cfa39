"""LoRA / LoCon: ``ΔW = (alpha/r) · up @ down``, with an optional Tucker core for k×k convs.

File keys (kohya/LyCORIS): ``lora_down.weight (r, in[, kh, kw])``, ``lora_up.weight (out, r[, 1, 1])``,
``alpha`` (0-dim), Tucker ``lora_mid.weight (r, r, kh, kw)`` with a 1×1 down; optional ``dora_scale``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdapterModule,
    LowRankConfig,
    add_low_rank,
    check_fraction,
    conv_kwargs,
    flat_product,
    is_kxk_conv,
    parameter_factory,
    read_alpha,
    scale_product,
)
from .dora import DoRAConfigMixin
from .registry import register


@dataclasses.dataclass
class LoRAConfig(DoRAConfigMixin, LowRankConfig):
    use_tucker: bool = False  # k×k convs: 1×1 down, (r, r, kh, kw) mid, 1×1 up
    dropout: float = 0.0  # dropout on the rank-r activations (kohya "network_dropout")
    rank_dropout: float = 0.0  # drops whole rank channels per sample

    def validate(self) -> None:
        super().validate()
        for key in ("dropout", "rank_dropout"):
            check_fraction(getattr(self, key), key)


def lora_delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size, scale: float,
               mid: torch.Tensor | None = None) -> torch.Tensor:
    """The pure ΔW of LoRA/LoCon (Tucker when ``mid`` is given)."""
    if mid is None:
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    return torch.einsum("m n h w, i m, n j -> i j h w", mid, up.flatten(1), down.flatten(1)) * scale


def fold_tucker_down(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold ``lora_mid`` into ``lora_down``: ``down'[m, j] = Σ_n mid[m, n] · down[n, j]`` (ΔW unchanged)."""
    return torch.einsum("m n h w, n j -> m j h w", mid, down.flatten(1))


@register(aliases=("locon",))
class LoRAModule(AdapterModule):
    method = "lora"
    label = "LoRA"
    description = "Low-rank update up·down; the standard, smallest files, loads everywhere including diffusers."
    config_class = LoRAConfig
    file_keys = frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"})
    example_options = {"rank": 4, "alpha": 2.0}
    lycoris_algo = "lora"
    kohya_native = True

    def __init__(self, name: str, base: nn.Module, config: LoRAConfig, *, tucker: bool | None = None):
        super().__init__(name, base, config)
        rank, alpha = config.rank_and_alpha_for(base)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.tucker = config.use_tucker and is_kxk_conv(base) if tucker is None else tucker
        factory = parameter_factory(base)
        if isinstance(base, nn.Conv2d):
            kernel = tuple(base.kernel_size)
            down_kernel = (1, 1) if self.tucker else kernel
            self.lora_down = nn.Parameter(torch.empty(rank, base.in_channels, *down_kernel, **factory))
            if self.tucker:
                self.lora_mid = nn.Parameter(torch.empty(rank, rank, *kernel, **factory))
            self.lora_up = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1, **factory))
        else:
            self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, **factory))
            self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid, a=math.sqrt(5))

    # ----- math ---------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_up, self.lora_down, self.weight_shape, self.scale,
                          self.lora_mid if self.tucker else None)

    def factored_cost(self) -> int:
        return self.rank * (self.in_dim + self.out_dim)

    def build_cost(self) -> int:
        return self.rank

    # rebuild_is_cheaper: never (the default): the factored product always beats building ΔW.

    def transform_output(self, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        """Linear layers: ``base + (s·scale)·up(down(x))`` as one ``addmm`` (no separate scale, strength and add
        ops, forward or backward); convs through the generic path."""
        if self.is_conv:
            return super().transform_output(x, base_out, strength)
        if self.drops_delta_output():  # per-sample rank dropout needs the sample axis
            hidden = self._regularise(F.linear(x, self.lora_down.to(x.dtype)))
        else:
            hidden = flat_product(x, self.lora_down.to(x.dtype))
        return add_low_rank(base_out, hidden, self.lora_up.to(x.dtype), self.scale * strength)

    def delta_apply(self, x: torch.Tensor, dropouts: bool = False) -> torch.Tensor:
        """``scale·up(down(x))`` (Tucker: down, mid, up); the dropouts act on the rank-r hidden activations."""
        dtype = x.dtype
        if self.is_conv:
            window = conv_kwargs(self.base)
            if self.base.padding_mode != "zeros":  # pad as the base does (reflect/replicate/circular), then none
                x = F.pad(x, self.base._reversed_padding_repeated_twice, mode=self.base.padding_mode)
                window["padding"] = 0
            if self.tucker:  # the 1×1 down is pointwise, so padding before it equals padding after it
                hidden = F.conv2d(x, self.lora_down.to(dtype))
                hidden = F.conv2d(hidden, self.lora_mid.to(dtype), **window)
            else:
                hidden = F.conv2d(x, self.lora_down.to(dtype), **window)
        else:
            hidden = F.linear(x, self.lora_down.to(dtype))
        if dropouts:
            hidden = self._regularise(hidden)
        up = self.lora_up.to(dtype)
        if self.scale != 1.0:  # alpha = rank (the default): no multiply, forward or backward
            up = up * self.scale
        return F.conv2d(hidden, up) if self.is_conv else F.linear(hidden, up)

    def _regularise(self, hidden: torch.Tensor) -> torch.Tensor:
        config: LoRAConfig = self.config
        if config.dropout:
            hidden = F.dropout(hidden, p=config.dropout)
        if config.rank_dropout:
            rank_axis = 1 if self.is_conv else -1
            mask_shape = [hidden.shape[0]] + [1] * (hidden.dim() - 1)
            mask_shape[rank_axis] = self.rank
            keep = (torch.rand(mask_shape, device=hidden.device) >= config.rank_dropout).to(hidden.dtype)
            hidden = hidden * keep / (1.0 - config.rank_dropout)
        return hidden

    # ----- file layout -------------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """``portable`` folds the Tucker core into ``lora_down`` so diffusers can load the file (ΔW unchanged)."""
        down, up = self.lora_down.detach(), self.lora_up.detach()
        tensors = {}
        if self.tucker and portable:
            down = fold_tucker_down(self.lora_mid.detach(), down)
        elif self.tucker:
            tensors["lora_mid.weight"] = self.lora_mid.detach()
        tensors.update({"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(self.alpha)})
        return tensors

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoRAModule:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        alpha = read_alpha(tensors, rank)
        config = LoRAConfig(rank=rank, alpha=alpha, conv_rank=rank, conv_alpha=alpha)
        module = cls(name, base, config, tucker=mid is not None)
        with torch.no_grad():
            module.lora_down.copy_(down.reshape(module.lora_down.shape))
            module.lora_up.copy_(up.reshape(module.lora_up.shape))
            if mid is not None:
                module.lora_mid.copy_(mid)
        return module

    def scale_delta(self, ratio: float) -> None:
        scale_product(self, ["lora_up", "lora_down", "lora_mid"], ratio)

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        return str(tensors["lora_down.weight"].shape[0])

    @classmethod
    def layer_from_tensors(cls, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """down is ``(r, in[, kh, kw])`` (Tucker: 1×1, the kernel on ``mid``) and up ``(out, r[, 1, 1])``."""
        down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
        if down.dim() == 4:
            kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
            return nn.Conv2d(down.shape[1], up.shape[0], kernel, bias=False, device="meta")
        return nn.Linear(down.shape[1], up.shape[0], bias=False, device="meta")


def lora_tensors(down: torch.Tensor, up: torch.Tensor) -> dict[str, torch.Tensor]:
    """A plain LoRA module's file tensors from its factors, with ``alpha = rank`` (scale 1: ΔW = up·down as
    written)."""
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}
