"""LoKr: ``ΔW = scale · kron(W1, W2)`` with ``W1 (a, c)`` small and ``W2 (b, d[, kh, kw])`` large, optionally low-rank.

``out = a·b`` and ``in = c·d`` come from :func:`methods.base.factorization`. File keys (LyCORIS, spec §2.3),
exactly one of each:

- ``lokr_w1 (a, c)``, or ``lokr_w1_a (a, r)`` + ``lokr_w1_b (r, c)`` (``decompose_both`` and ``r < max(a, c)/2``);
- ``lokr_w2 (b, d)`` / conv ``(b, d, kh, kw)`` ("full matrix": ``r ≥ max(b, d)/2`` or ``full_matrix``), or
  ``lokr_w2_a (b, r)`` + ``lokr_w2_b (r, d·kh·kw)`` (always 2-D), or Tucker ``lokr_t2 (r, r, kh, kw)`` +
  ``lokr_w2_a (r, b)`` + ``lokr_w2_b (r, d)``;
- ``alpha`` (0-dim), optional ``dora_scale``.

``scale = alpha/r`` when either side is factorised (``r`` from ``lokr_w2_b``, else ``lokr_w1_b``), else 1: with both
sides full every consumer ignores ``alpha``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    AdapterModule,
    ConfigError,
    LowRankConfig,
    apply_weight,
    factorization,
    is_kxk_conv,
    is_pointwise,
    parameter_factory,
    read_alpha,
    scale_product,
)
from .dora import DoRAConfigMixin
from .loha import regularise_output, tucker_rebuild, validate_dropouts
from .registry import register


@dataclasses.dataclass
class LoKrConfig(DoRAConfigMixin, LowRankConfig):
    factor: int = -1  # split out/in as (a·b, c·d) near this factor; -1 → as balanced as possible
    decompose_both: bool = False  # also store W1 as a rank-r pair (when r < max(a, c)/2)
    full_matrix: bool = False  # store W2 full even when the rank would factorise it (alpha is then ignored)
    use_tucker: bool = False  # k×k convs with a low-rank W2: (r, r, kh, kw) core; some consumers cannot read it
    dropout: float = 0.0  # training only: elementwise dropout on ΔW·x
    rank_dropout: float = 0.0  # training only: drops whole output rows of ΔW each step

    def validate(self) -> None:
        super().validate()
        if int(self.factor) != self.factor or not (self.factor == -1 or self.factor >= 1):
            raise ConfigError(f"network.factor must be -1 (balanced) or a positive integer, got {self.factor!r}")
        validate_dropouts(self)


@dataclasses.dataclass(frozen=True)
class KronLayout:
    """Which tensors a LoKr module holds: ``out = a·b``, ``in = c·d``; a rank of 0 means that side is stored full."""

    a: int
    b: int
    c: int
    d: int
    w1_rank: int = 0
    w2_rank: int = 0
    tucker: bool = False

    @property
    def scale_rank(self) -> int:
        """The rank ``alpha`` is divided by (0: neither side factorised, scale 1)."""
        return self.w2_rank or self.w1_rank


def plan_layout(base: nn.Module, rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False, use_tucker: bool = False) -> KronLayout:
    """LyCORIS's choice of tensors (``LokrModule.__init__``) for one base layer."""
    out_dim, in_dim = base.weight.shape[0], base.weight.shape[1]
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    w1_rank = rank if decompose_both and not full_matrix and rank < max(a, c) / 2 else 0
    w2_full = full_matrix or rank >= max(b, d) / 2
    return KronLayout(a, b, c, d, w1_rank, 0 if w2_full else rank, bool(use_tucker and is_kxk_conv(base)
                                                                         and not w2_full))


def lokr_delta(shape: torch.Size, scale: float, *, w1: torch.Tensor | None = None, w1_a: torch.Tensor | None = None,
               w1_b: torch.Tensor | None = None, w2: torch.Tensor | None = None, w2_a: torch.Tensor | None = None,
               w2_b: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """The pure ΔW of LoKr: ``scale · reshape(kron(W1, W2), shape)``, W1/W2 rebuilt from whichever tensors exist."""
    left = w1 if w1 is not None else w1_a @ w1_b
    if w2 is not None:
        right = w2
    elif t2 is not None:
        right = tucker_rebuild(t2, w2_a, w2_b)
    else:
        right = w2_a @ w2_b.flatten(1)  # (b, d·kh·kw): its kron reshapes to the 4-D kron exactly
    left = left * scale  # the small factor: one multiply of a·c numbers instead of out·in
    if right.dim() == 4:
        left = left[:, :, None, None]
    return torch.kron(left, right.contiguous()).reshape(shape)


@register
class LoKrModule(AdapterModule):
    method = "lokr"
    label = "LoKr"
    description = ("Kronecker product of a small and a large (low-rank) factor: the smallest files, "
                   "A1111/Forge/ComfyUI, not diffusers.")
    config_class = LoKrConfig
    file_keys = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1",
                           "lokr_t2"})
    # rank 2 stays below max(b, d)/2 on small layers, so W2 is factorised and alpha counts
    example_options = {"rank": 2, "alpha": 1.0}
    lycoris_algo = "lokr"

    def __init__(self, name: str, base: nn.Module, config: LoKrConfig, *, layout: KronLayout | None = None):
        super().__init__(name, base, config)
        rank, alpha = config.rank_and_alpha_for(base)
        if layout is None:
            layout = plan_layout(base, rank, int(config.factor), config.decompose_both, config.full_matrix,
                                 config.use_tucker)
        if layout.a * layout.b != self.out_dim or layout.c * layout.d != self.weight_shape[1]:
            raise ValueError(f"{name}: LoKr factors ({layout.a}·{layout.b}, {layout.c}·{layout.d}) do not match "
                             f"the weight {tuple(self.weight_shape)}")
        self.layout = layout
        self.tucker = layout.tucker
        self.rank = layout.scale_rank or rank
        # Both sides full: alpha is ignored everywhere (LyCORIS forces alpha = rank), so write alpha = rank.
        self.alpha = alpha if layout.scale_rank else float(self.rank)
        self.scale = self.alpha / self.rank
        factory = parameter_factory(base)
        kernel = tuple(self.weight_shape[2:])
        a, b, c, d = layout.a, layout.b, layout.c, layout.d
        if layout.w1_rank:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, layout.w1_rank, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(layout.w1_rank, c, **factory))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c, **factory))
        r2 = layout.w2_rank
        if not r2:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel, **factory))
        elif layout.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(r2, r2, *kernel, **factory))
            self.lokr_w2_a = nn.Parameter(torch.empty(r2, b, **factory))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r2, d, **factory))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r2, **factory))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r2, d * math.prod(kernel), **factory))
        # LyCORIS's init: W2's last factor (or the full W2) is zero so ΔW starts at 0; everything else Kaiming.
        for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t2"):
            if hasattr(self, key):
                nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))
        if r2:
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    # ----- math ---------------------------------------------------------------------------------------------
    def _factors(self) -> dict[str, torch.Tensor]:
        keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return {key[len("lokr_"):]: getattr(self, key) for key in keys if hasattr(self, key)}

    def delta_weight(self) -> torch.Tensor:
        return lokr_delta(self.weight_shape, self.scale, **self._factors())

    def factored_cost(self) -> int:
        if not is_pointwise(self.base):
            return self.in_dim * self.out_dim
        a, b, c, d, rank = (self.layout.a, self.layout.b, self.layout.c, self.layout.d, self.layout.w2_rank)
        return c * d * rank + a * c * rank + a * rank * b if rank else c * d * b + a * c * b

    def rebuild_is_cheaper(self, x: torch.Tensor) -> bool:
        """k×k convs build ΔW for the product anyway; Linear and 1×1 layers keep the cheaper Kronecker product."""
        return not is_pointwise(self.base)

    def delta_apply(self, x: torch.Tensor, dropouts: bool = False) -> torch.Tensor:
        """Linear and 1×1 layers: the Kronecker identity ``kron(W1, W2)·vec(X) = vec(W1·X·W2ᵀ)`` applies without
        building ΔW (:meth:`_kron_apply`); k×k convs build it."""
        if is_pointwise(self.base):
            out = self._kron_apply(x)
        else:
            out = apply_weight(self.base, x, self.delta_weight().to(x.dtype))
        return regularise_output(out, self.config, self.is_conv) if dropouts else out

    def _kron_apply(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW·x`` without building ΔW: ``kron(W1, W2)·vec(X) = vec(W1·X·W2ᵀ)`` on ``X = x`` split into ``(c, d)``.

        ``c·d·r + a·c·r + a·r·b`` multiply-adds per position (``c·d·b + a·c·b`` with a full W2) instead of
        ``a·b·c·d`` (measured against building ΔW: bench/NOTES.md).
        """
        dtype = x.dtype
        layout = self.layout
        w1 = self.lokr_w1 if layout.w1_rank == 0 else self.lokr_w1_a @ self.lokr_w1_b
        w1 = (w1 * self.scale if self.scale != 1.0 else w1).to(dtype)  # alpha = rank: no multiply, no its backward
        if self.is_conv:
            # Channels first, as the conv stores them: (N, c, d, H·W); W2 then W1 act on axes 1 and 2.
            n, _, height, width = x.shape
            h = x.reshape(n, layout.c, layout.d, height * width)
            if layout.w2_rank:
                h = torch.matmul(self.lokr_w2_b.to(dtype), h)  # (N, c, r, P)
                h = torch.matmul(w1, h.flatten(2))  # (N, a, r·P)
                h = torch.matmul(self.lokr_w2_a.to(dtype), h.view(n, layout.a, layout.w2_rank, -1))  # (N, a, b, P)
            else:
                h = torch.matmul(self.lokr_w2.flatten(1).to(dtype), h)  # (N, c, b, P)
                h = torch.matmul(w1, h.flatten(2))  # (N, a, b·P)
            return h.reshape(n, self.out_dim, height, width)
        h = x.reshape(*x.shape[:-1], layout.c, layout.d)
        if layout.w2_rank:
            h = F.linear(h, self.lokr_w2_b.to(dtype))  # (…, c, r)
            h = F.linear(torch.matmul(w1, h), self.lokr_w2_a.to(dtype))  # (…, a, r) → (…, a, b)
        else:
            h = torch.matmul(w1, F.linear(h, self.lokr_w2.flatten(1).to(dtype)))  # (…, c, b) → (…, a, b)
        return h.reshape(*x.shape[:-1], self.out_dim)

    # ----- file layout -------------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """``portable`` writes the layout every consumer reads (spec §7): ``lokr_w1_a/b`` multiplied out into
        ``lokr_w1`` and a Tucker ``lokr_t2`` folded into a 2-D ``lokr_w2_b``; ΔW is unchanged up to rounding."""
        factors = {key: value.detach() for key, value in self._factors().items()}
        alpha = self.alpha
        if portable and "w1_a" in factors:
            factors["w1"] = factors.pop("w1_a") @ factors.pop("w1_b")
            if "w2" in factors:  # neither side factorised any more: scale 1 everywhere, so bake the scale in
                factors["w1"] = factors["w1"] * self.scale
                alpha = float(self.rank)
        if portable and "t2" in factors:
            # W2[p, q, h, w] = Σ_i w2_a[i, p] · (Σ_j t2[i, j, h, w] · w2_b[j, q]) → (b, r) @ (r, d·kh·kw)
            t2, w2_a, w2_b = factors.pop("t2"), factors.pop("w2_a"), factors.pop("w2_b")
            factors["w2_b"] = torch.einsum("i j h w, j q -> i q h w", t2, w2_b).flatten(1)
            factors["w2_a"] = w2_a.t()
        tensors = {f"lokr_{key}": value.contiguous() for key, value in factors.items()}
        tensors["alpha"] = torch.tensor(float(alpha))
        return tensors

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> LoKrModule:
        """Reads every layout LyCORIS writes, including ``lokr_w1_a/b``, ``lokr_t2`` and a 4-D ``lokr_w2_b``."""
        if "lokr_t1" in tensors:
            raise ValueError(f"{name}: lokr_t1 is not a LoKr layout any consumer defines")
        weight = base.weight
        out_dim, in_dim, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        area = math.prod(kernel)

        def need(*keys: str) -> list[torch.Tensor]:
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise ValueError(f"{name}: LoKr module lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")
            return [tensors[k] for k in keys]

        values: dict[str, torch.Tensor] = {}
        if "lokr_w1" in tensors:
            (w1,) = need("lokr_w1")
            (a, c), w1_rank = w1.shape, 0
            values["lokr_w1"] = w1
        else:
            w1_a, w1_b = need("lokr_w1_a", "lokr_w1_b")
            a, w1_rank, c = w1_a.shape[0], w1_b.shape[0], w1_b.shape[1]
            values.update(lokr_w1_a=w1_a, lokr_w1_b=w1_b)
        tucker = "lokr_t2" in tensors
        if "lokr_w2" in tensors:
            (w2,) = need("lokr_w2")
            b, w2_rank = w2.shape[0], 0
            d = w2.numel() // (b * area)
            values["lokr_w2"] = w2
        elif tucker:
            t2, w2_a, w2_b = need("lokr_t2", "lokr_w2_a", "lokr_w2_b")
            w2_rank, b, d = w2_b.shape[0], w2_a.shape[1], w2_b.shape[1]
            if not kernel or tuple(t2.shape[2:]) != kernel:
                raise ValueError(f"{name}: lokr_t2 {tuple(t2.shape)} does not fit the weight {tuple(weight.shape)}")
            values.update(lokr_t2=t2, lokr_w2_a=w2_a, lokr_w2_b=w2_b)
        else:
            w2_a, w2_b = need("lokr_w2_a", "lokr_w2_b")
            b, w2_rank = w2_a.shape[0], w2_b.shape[0]
            d = w2_b.numel() // (w2_rank * area)  # 2-D (r, d·kh·kw), or the 4-D (r, d, kh, kw) of weight_gen
            values.update(lokr_w2_a=w2_a, lokr_w2_b=w2_b)
        if a * b != out_dim or c * d != in_dim:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in values.items())
            raise ValueError(f"{name}: LoKr factors {shapes} do not make a {tuple(weight.shape)} weight")
        layout = KronLayout(a, b, c, d, w1_rank, w2_rank, tucker)
        rank = layout.scale_rank
        alpha = read_alpha(tensors, rank) if rank else 0.0
        if not rank:  # both sides full: alpha is ignored; keep an integral file alpha as the nominal rank
            file_alpha = read_alpha(tensors, 1)
            rank = int(file_alpha) if file_alpha >= 1 and file_alpha == int(file_alpha) else 1
        config = LoKrConfig(rank=rank, alpha=alpha, conv_rank=rank, conv_alpha=alpha)
        module = cls(name, base, config, layout=layout)
        module.copy_file_tensors(values)
        return module

    def scale_delta(self, ratio: float) -> None:
        """ΔW = kron(W1, W2), each side a product of its factors: a product of all of them."""
        scale_product(self, ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
                      ratio)

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        """The rank ``alpha`` divides by: ``lokr_w2_b``'s, else ``lokr_w1_b``'s; both sides full: ``full``."""
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in tensors:
                return str(tensors[key].shape[0])
        return "full"
