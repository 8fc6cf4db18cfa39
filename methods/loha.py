"""LoHa: ``ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, with an optional Tucker core per pair for k×k convs.

File keys (LyCORIS, spec §2.2): ``hada_w1_a``/``hada_w2_a (out, r)``, ``hada_w1_b``/``hada_w2_b (r, in·kh·kw)``
(2-D even for convs), ``alpha`` (0-dim), optional ``dora_scale``. Tucker (``hada_t1`` present): ``hada_t1``/``hada_t2
(r, r, kh, kw)``, and the a-matrices flip to ``(r, out)`` while the b-matrices become ``(r, in)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdapterModule,
    ConfigError,
    LowRankConfig,
    add_low_rank,
    apply_weight,
    check_fraction,
    flat_product,
    is_kxk_conv,
    is_pointwise,
    parameter_factory,
    read_alpha,
    scale_product,
)
from .dora import DoRAConfigMixin
from .registry import register


def validate_dropouts(config) -> None:
    """Shared by LoHa and LoKr: both dropouts in [0, 1), and neither with DoRA (its path never sees them)."""
    for key in ("dropout", "rank_dropout"):
        check_fraction(getattr(config, key), key)
    if config.dora and (config.dropout or config.rank_dropout):
        raise ConfigError("network.dropout and network.rank_dropout are not applied with dora = true; set them to 0")


def regularise_output(out: torch.Tensor, config, is_conv: bool) -> torch.Tensor:
    """Training-only dropouts on ``ΔW·x``, as LyCORIS defines them for LoHa/LoKr.

    ``rank_dropout`` drops whole output rows of ΔW (one mask per step, like LyCORIS's rebuild path), rescaled by
    ``1/(1-p)``; ``dropout`` is elementwise dropout on ``ΔW·x`` (LyCORIS's bypass path).
    """
    if config.rank_dropout:
        channels = out.shape[1] if is_conv else out.shape[-1]
        keep = (torch.rand(channels, device=out.device) >= config.rank_dropout).to(out.dtype)
        keep = keep / (1.0 - config.rank_dropout)
        out = out * (keep.view(-1, 1, 1) if is_conv else keep)
    if config.dropout:
        out = F.dropout(out, p=config.dropout)
    return out


@dataclasses.dataclass
class LoHaConfig(DoRAConfigMixin, LowRankConfig):
    use_tucker: bool = False  # k×k convs: each pair gets a (r, r, kh, kw) core; a/b become (r, out)/(r, in)
    dropout: float = 0.0  # training only: elementwise dropout on ΔW·x
    rank_dropout: float = 0.0  # training only: drops whole output rows of ΔW each step

    def validate(self) -> None:
        super().validate()
        validate_dropouts(self)


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``M[p, q, h, w] = Σ_ij wa[i, p] · t[i, j, h, w] · wb[j, q]`` with ``wa (r, out)``, ``wb (r, in)``."""
    return torch.einsum("i j h w, i p, j q -> p q h w", t, wa, wb)


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, shape: torch.Size,
               scale: float, t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """The pure ΔW of LoHa (Tucker when ``t1``/``t2`` are given), scaled once."""
    if t1 is not None:
        return (tucker_rebuild(t1, w1_a, w1_b) * tucker_rebuild(t2, w2_a, w2_b) * scale).reshape(shape)
    # The scale goes on the small (out × r) factor: one pass over an (out × in) matrix fewer, forward and backward.
    return ((w1_a * scale) @ w1_b.flatten(1) * (w2_a @ w2_b.flatten(1))).reshape(shape)


@register
class LoHaModule(AdapterModule):
    method = "loha"
    label = "LoHa"
    description = ("Hadamard product of two low-rank pairs: rank r² expressiveness for 2× LoRA's size; "
                   "A1111/Forge/ComfyUI, not diffusers.")
    config_class = LoHaConfig
    file_keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
    example_options = {"rank": 4, "alpha": 2.0}
    lycoris_algo = "loha"

    def __init__(self, name: str, base: nn.Module, config: LoHaConfig, *, tucker: bool | None = None):
        super().__init__(name, base, config)
        rank, alpha = config.rank_and_alpha_for(base)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.tucker = bool(config.use_tucker and is_kxk_conv(base)) if tucker is None else tucker
        factory = parameter_factory(base)
        out_dim = self.out_dim
        if self.tucker:
            kernel = tuple(self.weight_shape[2:])
            in_channels = self.weight_shape[1]
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *kernel, **factory))
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out_dim, **factory))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_channels, **factory))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *kernel, **factory))
            self.hada_w2_a = nn.Parameter(torch.zeros(rank, out_dim, **factory))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_channels, **factory))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank, **factory))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, self.in_dim, **factory))
            self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, rank, **factory))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, self.in_dim, **factory))
        # LyCORIS's init: w2_a = 0 so ΔW starts at 0 while w1 and w2_b get gradients from the first step.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    # ----- math ---------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        t1, t2 = (self.hada_t1, self.hada_t2) if self.tucker else (None, None)
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.weight_shape,
                          self.scale, t1, t2)

    def delta_apply(self, x: torch.Tensor, dropouts: bool = False) -> torch.Tensor:
        if self._takes_product(x):
            out = self._hadamard_apply(x)
        else:
            out = apply_weight(self.base, x, self.delta_weight().to(x.dtype))
        return regularise_output(out, self.config, self.is_conv) if dropouts else out

    def adapted_weight(self, strength: float) -> torch.Tensor:
        """``W + s·(A1B1)⊙(A2B2)`` as one fused pass over the weight (``addcmul``), the scales on ``A1``."""
        if self.tucker:
            return super().adapted_weight(strength)
        weight = self.base.weight
        first = (self.hada_w1_a * (self.scale * strength)) @ self.hada_w1_b
        second = self.hada_w2_a @ self.hada_w2_b
        return torch.addcmul(weight.flatten(1), first, second).to(weight.dtype).view(weight.shape)

    def factored_cost(self) -> int:
        full = self.in_dim * self.out_dim
        return min(self.rank * self.rank * (self.in_dim + self.out_dim), full) if self._pointwise() else full

    def build_cost(self) -> int:
        return 2 * self.rank

    def rebuild_is_cheaper(self, x: torch.Tensor) -> bool:
        """k×k convs build ΔW for any product; Linear and 1×1 layers lend ``W + ΔW`` unless the rank-r² product
        costs less (wide layers, few positions)."""
        if not self._pointwise():
            return True
        product, _, lent = self._path_costs(x)
        return lent <= product

    def _pointwise(self) -> bool:
        """Whether the rank-r² product applies: a pointwise layer (Linear, plain 1×1 conv) without Tucker cores."""
        return not self.tucker and is_pointwise(self.base)

    def _takes_product(self, x: torch.Tensor) -> bool:
        """Whether ``ΔW·x`` on the output path goes through the rank-r² product rather than a built ΔW."""
        if not self._pointwise():
            return False
        product, built, _ = self._path_costs(x)
        return product < built

    def _path_costs(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Multiply-adds of three ways to add ``ΔW·x`` for ``T`` positions, each counted three times with autograd
        (forward and two gradients) and once without: the rank-r² product (``T·r²·(in+out)``); building ΔW
        (``2·r·in·out``) and applying it (``T·in·out``); building ΔW and lending the layer ``W + ΔW``, whose
        product replaces the frozen one (only the product for W's gradient, ``T·in·out``, is extra)."""
        out_dim, in_dim = self.out_dim, self.in_dim
        positions = self.positions(x)
        grad = torch.is_grad_enabled()
        passes = 3 if grad else 1
        build = 2 * self.rank * in_dim * out_dim
        product = passes * positions * self.rank * self.rank * (in_dim + out_dim)
        built = passes * (build + positions * in_dim * out_dim)
        lent = passes * build + (positions * in_dim * out_dim if grad else 0)
        return product, built, lent

    def transform_output(self, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        """Linear layers on the rank-r² product: ``base + s·M(K·x)`` as one ``addmm`` (as LoRA); everything else
        through the generic path."""
        if self.is_conv or self.drops_delta_output() or not self._takes_product(x):
            return super().transform_output(x, base_out, strength)
        left_t, right = self._khatri_rao(x.dtype)
        return add_low_rank(base_out, flat_product(x, right), left_t.t(), strength * self.scale)

    def _khatri_rao(self, dtype: torch.dtype, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A1B1)⊙(A2B2) = M·K`` with ``M[o, pq] = A1[o, p]·A2[o, q]`` and ``K[pq, i] = B1[p, i]·B2[q, i]``: ΔW as
        a rank-r² product that never builds it. Returns ``(Mᵀ·scale, K)``, both ``r² × features`` so the broadcast
        products run along the long axis (faster than along r: bench/NOTES.md)."""
        first, second = self.hada_w1_a.t().contiguous(), self.hada_w2_a.t().contiguous()
        if scale != 1.0:
            second = second * scale
        left_t = (first[:, None, :] * second[None, :, :]).flatten(0, 1)
        right = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).flatten(0, 1)
        return left_t.to(dtype), right.to(dtype)

    def _hadamard_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW·x`` through the rank-r² product (:meth:`_khatri_rao`)."""
        left_t, right = self._khatri_rao(x.dtype, self.scale)
        if self.is_conv:
            n, _, height, width = x.shape
            return torch.matmul(left_t.t(), torch.matmul(right, x.flatten(2))).view(n, self.out_dim, height, width)
        return F.linear(F.linear(x, right), left_t.t())

    # ----- file layout -------------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """Every consumer reads both layouts (Tucker included), so ``portable`` changes nothing here."""
        tensors = {
            "hada_w1_a": self.hada_w1_a.detach(),
            "hada_w1_b": self.hada_w1_b.detach(),
            "hada_w2_a": self.hada_w2_a.detach(),
            "hada_w2_b": self.hada_w2_b.detach(),
        }
        if self.tucker:
            tensors["hada_t1"] = self.hada_t1.detach()
            tensors["hada_t2"] = self.hada_t2.detach()
        tensors["alpha"] = torch.tensor(float(self.alpha))
        return tensors

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoHaModule:
        missing = [k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if k not in tensors]
        tucker = "hada_t1" in tensors or "hada_t2" in tensors
        if tucker and not ("hada_t1" in tensors and "hada_t2" in tensors):
            missing.append("hada_t2" if "hada_t1" in tensors else "hada_t1")
        if missing:
            raise ValueError(f"{name}: LoHa module lacks {', '.join(missing)}")
        rank = tensors["hada_w1_b"].shape[0]  # as A1111, ComfyUI and LyCORIS read it
        if tensors["hada_w2_b"].shape[0] != rank:
            raise ValueError(f"{name}: hada_w1_b and hada_w2_b disagree on the rank "
                             f"({rank} vs {tensors['hada_w2_b'].shape[0]})")
        if tucker and not is_kxk_conv(base):
            raise ValueError(f"{name}: hada_t1/hada_t2 (Tucker LoHa) on a {type(base).__name__} that is not a k×k conv")
        alpha = read_alpha(tensors, rank)
        config = LoHaConfig(rank=rank, alpha=alpha, conv_rank=rank, conv_alpha=alpha)
        module = cls(name, base, config, tucker=tucker)
        keys = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + (["hada_t1", "hada_t2"] if tucker else [])
        module.copy_file_tensors({key: tensors[key] for key in keys})
        return module

    def scale_delta(self, ratio: float) -> None:
        """ΔW = (W1a·W1b) ⊙ (W2a·W2b) (with the Tucker cores): a product of all its factors."""
        scale_product(self, ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"], ratio)

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        return str(tensors["hada_w1_b"].shape[0])
