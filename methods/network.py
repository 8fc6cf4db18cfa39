"""A set of adapters on a denoiser (UNet, or SD3/Flux transformer) and its text encoder(s): build, attach, merge,
export, and rebuild from a file.

SD3/Flux pipelines name their modules with :mod:`methods.dit_naming`; their parts share one
:class:`~methods.dit_naming.DiTNaming`, through which files in the diffusers and kohya layouts are read and written
(:func:`read_file_tensors`, :meth:`AdapterNetwork.export_state_dict`). Everything else is the same for every base.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import dit_naming, dit_targets, naming, targets
from .arch import UNET_PREFIX, denoiser_prefixes, get_architecture, part_prefix
from .base import WRAPPABLE, AdapterConfig, AdapterModule
from .embeddings import TriggerEmbeddings
from .naming import group_by_module
from .registry import file_module_class, get_method


@dataclasses.dataclass
class ModelPart:
    """One model of a pipeline that takes adapters, with the file prefix and naming of its modules."""

    prefix: str  # lora_unet, lycoris (SD3/Flux transformer), lora_te, lora_te1, lora_te2, lora_te3
    model: nn.Module
    targets_of: Callable[[nn.Module, str], dict[str, nn.Module]]
    file_name: Callable[[str], str]
    accepted_names: Callable[[str], list[str]]
    # SD3/Flux: the names of the whole pipeline (shared by its parts), for the diffusers and kohya file layouts.
    pipeline_names: dit_naming.DiTNaming | None = None

    @property
    def is_denoiser(self) -> bool:
        return self.prefix in denoiser_prefixes()

    is_unet = is_denoiser  # the earlier name


def detect_architecture(pipe_or_unet: Any) -> str:
    """sd1, sd2, sdxl, sd3 or flux, from the pipeline's components or the denoiser's config."""
    family = dit_naming.dit_family(getattr(pipe_or_unet, "transformer", pipe_or_unet))
    if family is not None:
        return family
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if getattr(pipe_or_unet, "text_encoder_2", None) is not None:
        return "sdxl"
    config = getattr(unet, "config", None)
    if config is not None and getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if config is not None and getattr(config, "use_linear_projection", False):
        return "sd2"
    return "sd1"


def model_parts(unet: nn.Module | None, text_encoders: list[nn.Module], arch: str) -> list[ModelPart]:
    """The parts of a pipeline: its denoiser (a UNet, or the SD3/Flux transformer) and text encoders in pipeline
    order (None for one that is absent)."""
    spec = get_architecture(arch)
    if spec.denoiser_prefix != UNET_PREFIX:
        return dit_parts(unet, text_encoders, arch)
    parts = []
    if unet is not None:
        unet_naming = naming.UNetNaming(unet, sgm_style=spec.sgm_unet_names)
        parts.append(ModelPart(UNET_PREFIX, unet, targets.unet_targets, unet_naming.file_name,
                               unet_naming.accepted_names))
    # The prefix follows the encoder's position, not how many are present: SDXL's OpenCLIP-bigG is lora_te2 even
    # when CLIP-L is missing (None).
    for index, encoder in enumerate(text_encoders):
        if encoder is None:
            continue
        if index >= len(spec.text_encoder_prefixes):
            raise ValueError(f"{arch} models have {len(spec.text_encoder_prefixes)} text encoder(s), not {index + 1}")
        prefix = spec.text_encoder_prefixes[index]
        # Other spellings some tools write (SDXL's CLIP-L as lora_te_, which ComfyUI reads) are read too.
        accepted_prefixes = spec.accepted_prefixes(prefix)
        parts.append(ModelPart(
            prefix, encoder, targets.text_encoder_targets,
            lambda path, p=prefix: naming.text_encoder_file_name(p, path),
            lambda path, ps=accepted_prefixes: naming.text_encoder_accepted_names(ps, path),
        ))
    return parts


def dit_parts(transformer: nn.Module | None, text_encoders: list[nn.Module | None], arch: str) -> list[ModelPart]:
    """SD3/Flux parts, named by one :class:`~methods.dit_naming.DiTNaming` (T5 gets T5 targets, CLIP the CLIP ones)."""
    if transformer is not None and dit_naming.dit_family(transformer) != arch:
        from .base import ConfigError

        raise ConfigError(f"a {type(transformer).__name__} is not the transformer of a {arch} model; check the "
                          "base model and the architecture given for it")
    names = dit_naming.DiTNaming(transformer, list(text_encoders), family=arch)
    parts = []
    for part in names.parts:
        targets_of = dit_targets.transformer_targets if part.is_transformer else dit_targets.dit_text_encoder_targets
        parts.append(ModelPart(part.prefix, part.model, targets_of, part.file_name, part.accepted_names, names))
    return parts


def pipeline_parts(pipe: Any, arch: str | None = None) -> tuple[list[ModelPart], str]:
    arch = arch or detect_architecture(pipe)
    encoders = [getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)]
    if get_architecture(arch).denoiser_prefix != UNET_PREFIX:
        encoders.append(getattr(pipe, "text_encoder_3", None))
        return model_parts(getattr(pipe, "transformer", None), encoders, arch), arch
    return model_parts(getattr(pipe, "unet", None), encoders, arch), arch


def parts_naming(parts: list[ModelPart]) -> dit_naming.DiTNaming | None:
    return next((part.pipeline_names for part in parts if part.pipeline_names is not None), None)


def parts_variant(parts: list[ModelPart]) -> str | None:
    """The released SD3/Flux model the parts' transformer is shaped like (None for UNets)."""
    names = parts_naming(parts)
    transformer = names.transformer_module if names is not None else None
    return dit_naming.dit_variant(transformer) if transformer is not None else None


def read_file_tensors(parts: list[ModelPart], state_dict: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A file's tensors under the names we write, and the keys that name no module of these parts.

    SD3/Flux files in the diffusers layout (PEFT keys) and kohya's native names (fused qkv split back) are read
    through the pipeline's naming; other files are returned as they are (their names are matched later).
    """
    names = parts_naming(parts)
    if names is None:
        return state_dict, []
    return dit_naming.import_lora(names, dit_naming.peft_to_file_names(state_dict))


class AdapterNetwork(nn.Module):
    """All adapters of one method on one pipeline, keyed by file module name (``lora_unet_..._to_q``)."""

    def __init__(self, adapters: dict[str, AdapterModule], arch: str, method: str, config: AdapterConfig | None,
                 target_config: targets.TargetConfig | None = None, models: list[nn.Module] | None = None,
                 naming: dit_naming.DiTNaming | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict(adapters)
        self.arch = arch
        self.variant: str | None = None  # the released model (sd3.5-large, flux-dev, …) where one is known
        # SD3/Flux: the pipeline's names, for writing the diffusers and kohya file layouts. Not a submodule.
        object.__setattr__(self, "naming", naming)
        self.method = method
        self.config = config
        self.target_config = target_config
        # The models the adapters sit in (UNet, text encoders): a plain list, so neither their parameters nor
        # their state dicts become the network's. attach() hooks them for methods with per-step shared work.
        self._models = list(models or [])
        self._model_hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Pivotal tuning's trigger vectors (methods.embeddings), when trained or loaded with the adapters: a
        # submodule, so they train, average, clip, EMA and resume with the adapters; not in the adapter file.
        self.embeddings: TriggerEmbeddings | None = None

    # ----- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, parts: list[ModelPart], arch: str, method: str, options: dict[str, Any] | None = None,
               target_config: targets.TargetConfig | None = None,
               module_config: Callable[[str, nn.Module], AdapterConfig | None] | None = None) -> AdapterNetwork:
        """Adapters of ``method`` on the targeted layers. ``module_config(file name, layer)`` may give a layer its
        own config (kohya's per-block ranks, :mod:`methods.blocks`) or None for no adapter there."""
        method_class = get_method(method)
        config = method_class.config_class.from_dict(options)
        target_config = target_config or targets.TargetConfig()
        target_config.validate()
        adapters: dict[str, AdapterModule] = {}
        for part in parts:
            preset = target_config.preset
            if not part.is_denoiser:
                preset = target_config.text_encoder_preset or preset
            chosen = targets.select(part.model, preset, part.targets_of, _safe(part.file_name), target_config)
            for path, module in chosen.items():
                if module_config is None and not config.wants(module):
                    continue
                name = part.file_name(path)
                own = module_config(name, module) if module_config is not None else config
                if own is None or not own.wants(module):
                    continue
                if name in adapters:
                    raise ValueError(f"two modules map to the same file name {name}")
                adapters[name] = method_class(name, module, own)
        network = cls(adapters, arch, method_class.method, config, target_config, [p.model for p in parts],
                      parts_naming(parts))
        network.variant = parts_variant(parts)
        return network

    @classmethod
    def from_state_dict(cls, parts: list[ModelPart], arch: str, state_dict: dict[str, torch.Tensor],
                        source: str = "file") -> tuple[AdapterNetwork, list[str]]:
        """Rebuild adapters from file tensors. Returns the network and the file modules that matched no layer."""
        lookup = name_lookup(parts)
        state_dict, foreign = read_file_tensors(parts, state_dict)
        grouped = group_by_module(state_dict)
        adapters: dict[str, AdapterModule] = {}
        unmatched: list[str] = list(dict.fromkeys(key.partition(".")[0] for key in foreign))
        methods: set[str] = set()
        for file_name, tensors in grouped.items():
            target = lookup.get(file_name)
            if target is None:
                unmatched.append(file_name)
                continue
            canonical, module = target
            try:
                method_class = file_module_class(tensors)
            except ValueError as error:
                raise ValueError(f"{source}: module {file_name} cannot be read: {error} (an adapter method this "
                                 "version does not support)") from error
            try:
                adapter = method_class.from_tensors(canonical, module, tensors)
            except (ValueError, KeyError, RuntimeError) as error:
                shape = tuple(module.weight.shape)
                raise ValueError(f"{source}: module {file_name} does not fit the {type(module).__name__} {shape} of "
                                 f"this model ({error}); is the file for another base model?") from error
            adapters[canonical] = adapter
            methods.add(adapter.method)
        method = methods.pop() if len(methods) == 1 else "+".join(sorted(methods)) or "none"
        network = cls(adapters, arch, method, None, models=[p.model for p in parts], naming=parts_naming(parts))
        network.variant = parts_variant(parts)
        return network, unmatched

    # ----- use ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[AdapterModule]:
        return iter(self.adapters.values())

    def __len__(self) -> int:
        return len(self.adapters)

    def attach(self) -> AdapterNetwork:
        for adapter in self:
            adapter.attach()
        if not self._model_hooks:
            self._hook_models()
        if self.embeddings is not None:
            self.embeddings.attach()
        return self

    def detach(self) -> None:
        for adapter in self:
            adapter.unmerge()
            adapter.detach_hook()
        for handle in self._model_hooks:
            handle.remove()
        self._model_hooks = []
        if self.embeddings is not None:
            self.embeddings.detach()

    def _hook_models(self) -> None:
        """Run each method's :meth:`~methods.base.AdapterModule.before_forward` / ``after_forward`` around every
        call of the model its adapters sit in, for the methods that share work across layers (OFT/BOFT: one
        Cayley solve for all layers instead of one per layer)."""
        for model in self._models:
            inside = {id(module) for module in model.modules()}
            by_class: dict[type[AdapterModule], list[AdapterModule]] = {}
            for adapter in self:
                if id(adapter.base) in inside and type(adapter).shares_work():
                    by_class.setdefault(type(adapter), []).append(adapter)
            for method_class, adapters in by_class.items():
                self._model_hooks.append(model.register_forward_pre_hook(
                    lambda module, args, c=method_class, a=adapters: c.before_forward(a)))
                self._model_hooks.append(model.register_forward_hook(
                    lambda module, args, output, c=method_class, a=adapters: c.after_forward(a), always_call=True))

    def set_multiplier(self, strength: float) -> None:
        for adapter in self:
            adapter.multiplier = float(strength)

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """Every adapter at multiplier 0 and the trigger vectors off (the base model's output) inside the block; each
        one's own state after."""
        strengths = [adapter.multiplier for adapter in self]
        vectors_on = self.embeddings is not None and self.embeddings.enabled
        self.set_multiplier(0.0)
        if self.embeddings is not None:
            self.embeddings.enabled = False
        try:
            yield
        finally:
            for adapter, strength in zip(self, strengths):
                adapter.multiplier = strength
            if self.embeddings is not None:
                self.embeddings.enabled = vectors_on

    def merge(self, strength: float | None = None, keep_original: bool = True) -> None:
        """Merge every adapter into its layer (see :meth:`AdapterModule.merge`)."""
        for adapter in self:
            adapter.merge(strength, keep_original)

    def unmerge(self) -> None:
        for adapter in self:
            adapter.unmerge()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by file prefix (lora_unet, lora_te, lora_te1, lora_te2), for per-part learning rates."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, adapter in self.adapters.items():
            prefix = part_prefix(name)
            groups.setdefault(prefix, []).extend(p for p in adapter.parameters() if p.requires_grad)
        return groups

    @torch.no_grad()
    def cap_norms(self, max_norm: float) -> tuple[int, float, float]:
        """sd-scripts' max-norm regularisation (``scale_weight_norms``): every module whose ‖ΔW‖ (Frobenius, at
        strength 1, before DoRA's rescaling) exceeds ``max_norm`` has ΔW scaled down to it. Returns (modules scaled,
        mean and max norm after scaling), what sd-scripts logs as keys_scaled, average_key_norm, max_key_norm."""
        adapters = list(self)
        if not adapters:
            return 0, 0.0, 0.0
        norms = torch.stack([adapter.delta_weight().float().norm().cpu() for adapter in adapters])
        floored = norms.clamp(min=max_norm / 2)  # as sd-scripts: no 0/0 for a zero ΔW, the ratio is 1 below the cap
        ratios = floored.clamp(max=max_norm) / floored
        scaled = 0
        for adapter, ratio in zip(adapters, ratios.tolist()):
            if ratio != 1.0:
                adapter.scale_delta(ratio)
                scaled += 1
        capped = norms * ratios
        return scaled, float(capped.mean()), float(capped.max())

    def trainable_parameter_count(self) -> int:
        return sum(adapter.trainable_parameter_count() for adapter in self)

    def counts(self) -> dict[str, int]:
        """Number of adapted modules per file prefix."""
        result: dict[str, int] = {}
        for name in self.adapters:
            prefix = part_prefix(name)
            result[prefix] = result.get(prefix, 0) + 1
        return result

    def export_state_dict(self, portable: bool = True, layout: str = "auto") -> dict[str, torch.Tensor]:
        """File keys → tensors (fp32, contiguous); ``portable`` picks the tensors every consumer reads.

        ``layout`` (SD3/Flux; see :func:`methods.dit_naming.write_layout`): ``auto`` writes networks of plain LoRA
        modules in the diffusers layout and any other in the lycoris layout; ``diffusers``, ``kohya``, ``lycoris``
        ask for one. SD1/SD2/SDXL files have the kohya layout only (``auto`` or ``kohya``).
        """
        state: dict[str, torch.Tensor] = {}
        for name, adapter in self.adapters.items():
            for suffix, tensor in adapter.export_tensors(portable=portable).items():
                state[f"{name}.{suffix}"] = tensor.detach().float().contiguous().cpu()
        if self.naming is not None:
            return dit_naming.write_layout(self.naming, state, layout)
        if layout not in ("auto", "kohya"):
            from .base import ConfigError

            raise ConfigError(f"file layout {layout!r} applies to SD3/Flux files only; {self.arch} files are written "
                              "in the kohya layout (output.file_layout = \"auto\")")
        return state

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """What each module adds to its base weight at strength 1 (for checks and conversions)."""
        with torch.no_grad():
            return {name: adapter.merged_delta().float() for name, adapter in self.adapters.items()}


def name_lookup(parts: list[ModelPart]) -> dict[str, tuple[str, nn.Module]]:
    """Every accepted file spelling of every wrappable layer → (the name we write, the layer)."""
    lookup: dict[str, tuple[str, nn.Module]] = {}
    for part in parts:
        for path, module in part.model.named_modules():
            if not isinstance(module, WRAPPABLE):
                continue
            try:
                canonical = part.file_name(path)
            except ValueError:
                canonical = naming.flat(part.prefix, path)
            for name in part.accepted_names(path):
                lookup.setdefault(name, (canonical, module))
    return lookup


def _safe(file_name: Callable[[str], str]) -> Callable[[str], str]:
    def name_or_empty(path: str) -> str:
        try:
            return file_name(path)
        except ValueError:
            return ""

    return name_or_empty
