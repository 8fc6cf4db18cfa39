"""What every adapter method shares: its config, the wrapper around one frozen Linear/Conv2d, and shape helpers.

A method file subclasses :class:`AdapterConfig` (its options) and :class:`AdapterModule` (its wrapper; the class
docstring lists what a method must and may define) and decorates the wrapper with
:func:`methods.registry.register`. The wrapper never replaces the base layer: it attaches forward hooks to it, so
the base keeps its name and state-dict keys, several adapters can be stacked on one layer, and removing an adapter
is removing its hooks. Per call an adapter either adds its part to the frozen output (the post-hook), or, where the
method's cost model says so (:meth:`AdapterModule.rebuilds_weight`), runs the layer once with ``W + s·ΔW`` (the
pre-hook lends the layer that weight for the duration of the call; ``base.forward`` called directly still gives the
frozen layer). DoRA (:mod:`methods.dora`) wraps any method whose config mixes in its option.

Shapes follow torch: Linear ``W (out, in)``, Conv2d ``W (out, in/groups, kh, kw)``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import weakref
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import dora

WRAPPABLE = (nn.Linear, nn.Conv2d)
# A base layer's own weight Parameter while an adapter has lent it ``W + s·ΔW`` for one call (see
# AdapterModule._pre_hook). One entry per layer however many adapters stack on it, so the first post-hook to run
# restores the Parameter whatever order the hooks run in.
_LENT_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, nn.Parameter] = weakref.WeakKeyDictionary()


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and what is allowed."""


def coerce_value(key: str, hint: Any, value: Any) -> Any:
    """Check (and gently convert, e.g. 1 → 1.0) a value against its annotated type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):  # only None itself passes here (handled above), never any other value
                continue
            try:
                return coerce_value(key, option, value)
            except ConfigError:
                continue
        expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
        leave_out = ", or leave the key out for the default" if type(None) in options else ""
        raise ConfigError(f"{key} = {value!r} is not a {expected}; give a {expected}{leave_out}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [coerce_value(f"{key}[{index}]", item, element) for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):  # a typed table (e.g. dataset.subsets[0])
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of keys, got {value!r}")
        names = [field.name for field in dataclasses.fields(hint)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        hints = typing.get_type_hints(hint)
        return hint(**{name: coerce_value(f"{key}.{name}", hints[name], item) for name, item in value.items()})
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        try:
            value = float(value) if hint is float else int(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass
class AdapterConfig:
    """Options every method understands. Method files add their own fields in a subclass."""

    module_dropout: float = 0.0  # training only: probability of skipping the whole adapter for a step

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None, *, where: str = "network") -> AdapterConfig:
        """Build from TOML/UI values, naming any unknown key and the allowed ones."""
        options = dict(options or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)} for this method; allowed: {', '.join(sorted(fields))}"
            )
        hints = typing.get_type_hints(cls)
        config = cls(**{key: coerce_value(f"{where}.{key}", hints[key], value) for key, value in options.items()})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        check_fraction(self.module_dropout, "module_dropout")

    def wants(self, base: nn.Module) -> bool:
        """Whether this config puts an adapter on ``base`` (grouped convs never: no consumer handles them)."""
        return isinstance(base, nn.Linear) or (isinstance(base, nn.Conv2d) and base.groups == 1)


@dataclasses.dataclass
class LowRankConfig(AdapterConfig):
    """Rank and alpha, with the kohya split between Linear/1×1 conv (rank) and k×k conv (conv_rank)."""

    rank: int = 16
    alpha: float | None = None  # None or 0 → alpha = rank (scale 1), as kohya and LyCORIS read it
    conv_rank: int | None = None  # rank for k×k convs; None → rank; 0 → k×k convs get no adapter
    conv_alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        if not _is_whole(self.rank) or int(self.rank) < 1:
            raise ConfigError(f"network.rank must be a positive integer, got {self.rank!r}")
        if self.conv_rank is not None and (not _is_whole(self.conv_rank) or int(self.conv_rank) < 0):
            raise ConfigError(f"network.conv_rank must be ≥ 0 (0 disables k×k convs), got {self.conv_rank!r}")

    def rank_and_alpha_for(self, base: nn.Module) -> tuple[int, float]:
        """Rank and effective alpha for one base layer: k×k convs use conv_rank/conv_alpha."""
        if is_kxk_conv(base) and self.conv_rank is not None:
            rank = int(self.conv_rank)
            alpha = self.conv_alpha if self.conv_alpha is not None else self.alpha
        else:
            rank, alpha = int(self.rank), self.alpha
        if rank == 0:
            return 0, 0.0
        return rank, float(alpha) if alpha else float(rank)

    def wants(self, base: nn.Module) -> bool:
        return super().wants(base) and self.rank_and_alpha_for(base)[0] > 0


def check_fraction(value: Any, key: str) -> float:
    """A probability option (dropouts): a number in [0, 1), else a ConfigError naming ``network.<key>``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise ConfigError(f"network.{key} must be a number in [0, 1), got {value!r}")
    return number


def _is_whole(value: Any) -> bool:
    """An integer, or a float/string holding one (UI number fields give 16.0); not a bool."""
    try:
        return not isinstance(value, bool) and float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def parameter_factory(base: nn.Module) -> dict[str, Any]:
    """Device and dtype for a new adapter's parameters: the base's device, fp32 when the base is stored in less
    (half precision, or fp8 for ``train.fp8_base``)."""
    weight = base.weight
    dtype = torch.float32 if weight.dtype.itemsize < 4 else weight.dtype
    return {"device": weight.device, "dtype": dtype}


def is_kxk_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def is_pointwise(module: nn.Module) -> bool:
    """Linear, or a plain 1×1 conv (stride 1, no padding, one group): ``ΔW·x`` is a per-position map on channels,
    so a factored product can replace building ΔW."""
    if isinstance(module, nn.Linear):
        return True
    return (tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and tuple(module.padding) == (0, 0) and module.groups == 1)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = m·n`` with ``m ≤ n``; LyCORIS's rule (``lycoris.functional.general.factorization``).

    A positive ``factor`` that divides ``dimension`` is used as is. Otherwise walk the divisors upward from 1,
    never taking one above ``factor`` (``factor < 0``: no bound), and stop at the first that reaches ``√dimension``:
    ``-1`` gives the most balanced split (128 → 8·16, 1024 → 32·32, a prime p → 1·p). LoKr splits ``out``/``in``
    with it; OFT takes ``m`` as its block size and ``n`` as the block count.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def conv_kwargs(base: nn.Module) -> dict[str, Any]:
    """The stride/padding/dilation/groups of a conv base, so a bypass conv sees the same windows."""
    if not isinstance(base, nn.Conv2d):
        return {}
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation, "groups": base.groups}


def apply_weight(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Run ``x`` through ``base``'s operation with another weight (and no bias unless given)."""
    if isinstance(base, nn.Conv2d):
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return F.conv2d(x, weight, bias, base.stride, 0, base.dilation, base.groups)
        return F.conv2d(x, weight, bias, **conv_kwargs(base))
    return F.linear(x, weight, bias)


def add_low_rank(base_out: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """``base_out + alpha·hidden·upᵀ`` for a linear layer's ``(..., out)`` output and ``(..., r)`` hidden activations
    (or ``(positions, r)``: :func:`flat_product`), as one ``addmm``: no separate scale, strength and add passes over
    the output, forward or backward."""
    if hidden.dim() != 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
    flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden, up.t(), alpha=alpha)
    return flat.view(base_out.shape)


def flat_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x·weightᵀ`` for a linear layer's ``(..., in)`` input, as ``(positions, rows)``: one view and a product,
    where ``F.linear`` on ``(..., in)`` adds a fold and an unfold (forward and backward) that
    :func:`add_low_rank` would only undo."""
    return F.linear(x.reshape(-1, x.shape[-1]), weight)


class AdapterModule(nn.Module):
    """One adapter on one frozen base layer, and the contract every method implements.

    **What a method is** (class attributes, read by the registry, files, UI, CLI and bench):

    - ``method`` (registry name), ``label`` (as people write it), ``description`` (one sentence for the UI);
    - ``config_class``: its options (:class:`AdapterConfig` subclass; mix in :class:`methods.dora.DoRAConfigMixin`
      to offer DoRA);
    - ``file_keys``: tensor suffixes that identify its modules in a file (``lora_up.weight``, ``hada_w1_a``, …);
    - ``delta_uses_base``: ΔW depends on the base weight (OFT rotates it, GLoRA multiplies it), so converting
      such a file needs the base model, and the result holds for that base only;
    - ``example_options``: options of a small working network (tests, bench); ``lycoris_algo``: LyCORIS's name
      for it (bench, tests), or ``""``; ``kohya_native``: kohya's ``networks.lora`` writes it too.

    **Must define**: ``__init__(name, base, config)`` (its parameters for one layer), :meth:`delta_weight` (ΔW),
    :meth:`own_tensors` / :meth:`from_own_tensors` (its file layout, both ways) and :meth:`file_rank` (what
    ``inspect`` shows as its rank). Nothing else is needed for a correct method: ``ΔW·x`` is then a product with the
    built ΔW, and merging, strength, export, DoRA and the hooks come from this class.

    **May define, for speed**: :meth:`delta_apply` (``ΔW·x`` by a factored product, with the method's training
    dropouts), :meth:`transform_output` (the output path, e.g. one fused ``addmm``, or OFT's output rotation),
    :meth:`rebuild_is_cheaper` (when to lend the layer ``W + s·ΔW`` instead), :meth:`adapted_weight` (a fused
    ``W + s·ΔW``), :meth:`factored_cost` / :meth:`build_cost` (what DoRA's cost model weighs),
    :meth:`before_forward` / :meth:`after_forward` (work shared by all layers of one model call) and
    :meth:`layer_from_tensors` (a stand-in layer from a file's tensors alone, so ``convert`` needs no base model).
    A variant that shares another method's file keys is routed to by that method's :meth:`file_class` (BOFT).

    DoRA is dispatched here: with it on, the hooks call :mod:`methods.dora`, which uses the method's
    ``delta_weight``, ``delta_apply`` (without dropouts) and costs; ``transform_output``, ``rebuild_is_cheaper`` and
    ``adapted_weight`` are then not asked, so they never handle DoRA.
    """

    method: ClassVar[str] = ""
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    file_keys: ClassVar[frozenset[str]] = frozenset()
    delta_uses_base: ClassVar[bool] = False
    example_options: ClassVar[dict[str, Any]] = {}
    lycoris_algo: ClassVar[str] = ""
    kohya_native: ClassVar[bool] = False

    def __init__(self, name: str, base: nn.Module, config: AdapterConfig):
        super().__init__()
        if not isinstance(base, WRAPPABLE):
            raise TypeError(f"{name}: {type(base).__name__} cannot take an adapter (only Linear and Conv2d)")
        self.name = name
        self.config = config
        # Not a submodule: the base belongs to the model, and must not appear in the adapter's state dict.
        object.__setattr__(self, "base", base)
        self.multiplier = 1.0
        self._hook: tuple[torch.utils.hooks.RemovableHandle, ...] | None = None  # (pre-hook, post-hook)
        self._merged: tuple[float, torch.Tensor | None] | None = None
        self._mode: str | None = None  # this call's path, from the pre-hook to the post-hook
        self.use_dora = bool(getattr(config, "dora", False))
        if self.use_dora:
            dora.init(self)

    # ----- shapes ---------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> torch.Size:
        return self.base.weight.shape

    @property
    def out_dim(self) -> int:
        return self.base.weight.shape[0]

    @property
    def in_dim(self) -> int:
        """Input width of the flattened weight (``in·kh·kw`` for convs)."""
        return self.base.weight[0].numel()

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def positions(self, x: torch.Tensor) -> int:
        """Output positions of a call on ``x`` (tokens × batch; a conv's output pixels): the rows of ``ΔW·x``."""
        positions = x.numel() // x.shape[1 if self.is_conv else -1]
        if self.is_conv:
            positions //= self.base.stride[0] * self.base.stride[1]
        return positions

    # ----- the method's math (override points) -----------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW at strength 1 with the method's own scale applied once, shaped like the base weight (fp32 or the
        parameters' dtype), differentiable in the adapter's parameters."""
        raise NotImplementedError

    def delta_apply(self, x: torch.Tensor, dropouts: bool = False) -> torch.Tensor:
        """``ΔW·x`` (no bias); with ``dropouts`` the method's training-time dropouts act on it. The default builds
        ΔW (and has no dropouts); methods with a cheaper factored product override it."""
        return apply_weight(self.base, x, self.delta_weight().to(x.dtype))

    def transform_output(self, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        """The layer's adapted output given its frozen output (without DoRA). Additive methods add
        ``strength·ΔW·x``."""
        out = self.bypass(x)
        return base_out + (out if strength == 1.0 else out * strength)

    def rebuild_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether this call should run the layer once with ``W + s·ΔW`` rather than the output path.

        Worth it wherever the method builds ΔW anyway: the frozen product and the one with ΔW become one product
        forward and one backward, leaving only the product for ΔW's gradient. The default says no (the output
        path); methods with a factored product weigh the two.
        """
        return False

    def adapted_weight(self, strength: float) -> torch.Tensor:
        """``W + s·ΔW`` (without DoRA) in the base weight's dtype, differentiable in the adapter's parameters."""
        weight = self.base.weight
        return torch.add(weight, self.delta_weight().to(weight.dtype), alpha=strength)

    def factored_cost(self) -> int:
        """Multiply-adds per position of :meth:`delta_apply` (default: a product with the built ΔW)."""
        return self.in_dim * self.out_dim

    def build_cost(self) -> int:
        """Multiply-adds per element of ΔW to build it."""
        return 1

    def scale_delta(self, ratio: float) -> None:
        """Multiply ΔW by ``ratio`` in place (max-norm regularisation, :meth:`AdapterNetwork.cap_norms`). Methods
        whose ΔW is a product of their parameters define it (:func:`scale_product`); rotations (OFT/BOFT) have no
        such scale."""
        raise NotImplementedError

    @classmethod
    def can_scale_delta(cls) -> bool:
        return cls.scale_delta is not AdapterModule.scale_delta

    @classmethod
    def before_forward(cls, adapters: list[AdapterModule]) -> None:
        """Called with this method's adapters inside one model (UNet or text encoder) right before it runs."""

    @classmethod
    def after_forward(cls, adapters: list[AdapterModule]) -> None:
        """Called with the same adapters when that model's call ends (also when it raises)."""

    @classmethod
    def shares_work(cls) -> bool:
        """Whether the method defines :meth:`before_forward` (then the network hooks the models for it)."""
        return cls.before_forward.__func__ is not AdapterModule.before_forward.__func__

    # ----- the layer's output, DoRA included (not overridden) ---------------------------------------------
    def bypass(self, x: torch.Tensor) -> torch.Tensor:
        """``ΔW·x``, with the method's dropouts while training (DoRA's path never takes them)."""
        return self.delta_apply(x, dropouts=self.training and not self.use_dora)

    def drops_delta_output(self) -> bool:
        """Training with dropouts on ``ΔW·x`` or its rank, which no lent weight can express."""
        config = self.config
        return self.training and bool(getattr(config, "dropout", 0) or getattr(config, "rank_dropout", 0))

    def rebuilds_weight(self, x: torch.Tensor) -> bool:
        """Whether this call lends the layer ``W + s·ΔW`` (see :meth:`rebuild_is_cheaper`): never with dropouts on
        ``ΔW·x``; with DoRA as its own cost model says."""
        if self.drops_delta_output() or self.base.weight.dtype.itemsize == 1:
            return False  # fp8 storage (train.fp8_base) has no arithmetic; its layer upcasts inside its own call
        if self.use_dora:
            return dora.rebuild_is_cheaper(self, x)
        return self.rebuild_is_cheaper(x)

    def lent_weight(self, strength: float) -> torch.Tensor:
        """The weight lent to the layer for one call: ``W + s·ΔW``, or DoRA's ``W + s·(W'' − W)``."""
        return dora.adapted_weight(self, strength) if self.use_dora else self.adapted_weight(strength)

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        """The layer's adapted output given its frozen output, DoRA included."""
        if self.use_dora:
            return dora.adapted_output(self, x, base_out, strength)
        return self.transform_output(x, base_out, strength)

    def merged_delta(self) -> torch.Tensor:
        """What merging at strength 1 adds to the base weight (ΔW, or the DoRA-rescaled difference)."""
        delta = self.delta_weight()
        return dora.merged_delta(self, delta) if self.use_dora else delta

    # ----- file layout -----------------------------------------------------------------------------------
    def own_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """The method's tensors, stored under ``<name>.<suffix>``, ``alpha`` included (DoRA's are added here).

        ``portable`` picks the layout every consumer reads (Tucker cores folded, OFT constraint baked in);
        ``False`` keeps the trainable layout, for resuming with another tool.
        """
        raise NotImplementedError

    @classmethod
    def from_own_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> AdapterModule:
        """Rebuild a module from a file module's tensors (suffix → tensor), inferring rank and variant from shapes;
        a clear ``ValueError`` naming the module for tensors that do not fit ``base``."""
        raise NotImplementedError

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> str:
        """The rank (or block layout) of one file module, as consumers read it from the tensor shapes."""
        raise NotImplementedError

    @classmethod
    def file_class(cls, tensors: dict[str, torch.Tensor]) -> type[AdapterModule]:
        """The class that reads a file module this method claims: itself, unless a variant shares its file keys
        and is told apart by shapes (OFT's 3-D ``oft_blocks``, BOFT's 4-D)."""
        return cls

    @classmethod
    def layer_from_tensors(cls, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
        """A layer (on the meta device) of the shape a file module adapts, when its tensors alone tell; else None."""
        return None

    def export_tensors(self, portable: bool = True) -> dict[str, torch.Tensor]:
        """Everything stored for this module: :meth:`own_tensors` plus DoRA's ``dora_scale``."""
        tensors = self.own_tensors(portable)
        if self.use_dora:
            tensors[dora.FILE_KEY] = self.dora_scale.detach()
        return tensors

    @classmethod
    def from_tensors(cls, name: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> AdapterModule:
        """Rebuild from a file module's tensors (:meth:`from_own_tensors` of :meth:`file_class`), with DoRA where the
        file has it."""
        reader = cls.file_class(tensors)
        if reader is not cls:
            return reader.from_tensors(name, base, tensors)
        tensors = dict(tensors)
        scale = tensors.pop(dora.FILE_KEY, None)
        if scale is not None and not issubclass(cls.config_class, dora.DoRAConfigMixin):
            raise ValueError(f"{name}: {dora.FILE_KEY} (DoRA) on a {cls.label or cls.method} module, which this "
                             "version reads without DoRA only")
        module = cls.from_own_tensors(name, base, tensors)
        if scale is not None:
            dora.load(module, scale)
        return module

    @classmethod
    def needs_base_for(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a file module's ΔW depends on the base weight (the method's, or DoRA's rescaling)."""
        return cls.delta_uses_base or dora.FILE_KEY in tensors

    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        """Whether a file module with these tensor suffixes is written in this method's layout."""
        return bool(cls.file_keys & suffixes)

    @torch.no_grad()
    def copy_file_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """Copy file tensors into same-named parameters, reshaping only where the element count and the leading
        axis agree (2-D vs 4-D conv layouts); anything else is a clear error naming the module and shapes."""
        for key, value in values.items():
            param = getattr(self, key)
            if value.numel() != param.numel() or value.shape[0] != param.shape[0]:
                raise ValueError(f"{self.name}: {key} {tuple(value.shape)} does not fit a "
                                 f"{tuple(self.weight_shape)} weight (expected {tuple(param.shape)})")
            param.copy_(value.reshape(param.shape))

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ----- attach / merge ----------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._hook is None:
            # always_call: the post-hook also runs when the layer raises, so a lent weight is always returned.
            self._hook = (self.base.register_forward_pre_hook(self._pre_hook),
                          self.base.register_forward_hook(self._forward_hook, always_call=True))

    def detach_hook(self) -> None:
        if self._hook is not None:
            for handle in self._hook:
                handle.remove()
            self._hook = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def _call_mode(self, x: torch.Tensor) -> str:
        """``base`` (nothing to add: strength 0, merged, or dropped this step), ``rebuild`` or ``output``."""
        if float(self.multiplier) == 0.0 or self._merged is not None:
            return "base"
        if self.training and self.config.module_dropout and torch.rand(()) < self.config.module_dropout:
            return "base"
        return "rebuild" if self.rebuilds_weight(x) else "output"

    def _pre_hook(self, base: nn.Module, args: tuple) -> None:
        self._mode = self._call_mode(args[0])
        if self._mode == "rebuild":
            _LENT_WEIGHTS.setdefault(base, base._parameters["weight"])
            # Not a Parameter, so it cannot go through setattr; the post-hook puts the Parameter back.
            base._parameters["weight"] = self.lent_weight(float(self.multiplier))

    def _forward_hook(self, base: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        own_weight = _LENT_WEIGHTS.pop(base, None)
        if own_weight is not None:
            base._parameters["weight"] = own_weight
        mode, self._mode = self._mode, None
        if mode != "output":
            return output
        return self.adapted_output(args[0], output, float(self.multiplier))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer as a standalone function (base output plus adapter), for tests and tools."""
        # Exactly what the attached hooks do: nothing when merged (the base weight already holds it) or at
        # strength 0, module dropout in training; one product with W + s·ΔW where the method rebuilds.
        mode = self._call_mode(x)
        if mode == "rebuild":
            return apply_weight(self.base, x, self.lent_weight(float(self.multiplier)), self.base.bias)
        base_out = self.base.forward(x)  # .forward, not __call__: skips the hooks, including this adapter's
        return base_out if mode == "base" else self.adapted_output(x, base_out, float(self.multiplier))

    @torch.no_grad()
    def merge(self, strength: float | None = None, keep_original: bool = True) -> None:
        """Add ``strength·merged_delta`` into the base weight; :meth:`unmerge` restores the exact original.

        ``keep_original=False`` bakes it in for good (no copy of the weight is kept; ``trainer merge``).
        """
        if self._merged is not None:
            raise RuntimeError(f"{self.name} is already merged")
        strength = float(self.multiplier if strength is None else strength)
        weight = self.base.weight
        original = weight.detach().clone() if keep_original else None
        delta = self.merged_delta().float()
        weight.copy_((weight.float() + strength * delta).to(weight.dtype))
        self._merged = (strength, original)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        original = self._merged[1]
        if original is None:
            raise RuntimeError(f"{self.name} was merged for good (keep_original=False); it cannot be undone")
        self.base.weight.copy_(original)
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None


@torch.no_grad()
def scale_product(module: nn.Module, names: list[str], ratio: float) -> None:
    """Scale a product of the named parameters by ``ratio``: each factor by ``ratio^(1/len(names))`` (sd-scripts
    scales LoRA's up and down by √ratio)."""
    present = [getattr(module, name) for name in names if hasattr(module, name)]
    factor = ratio ** (1 / len(present))
    for param in present:
        param.mul_(factor)


def read_alpha(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """Effective alpha from a file: missing or 0 means alpha = rank, as kohya/LyCORIS read it."""
    alpha = tensors.get("alpha")
    value = float(alpha.item()) if alpha is not None else 0.0
    return value if value and math.isfinite(value) else float(rank)
