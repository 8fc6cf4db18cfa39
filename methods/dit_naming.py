"""Names of SD3/SD3.5 (MMDiT) and FLUX.1 modules in adapter files, both ways, and LoRA tensors on fused layers.

Every adapter sits on one diffusers module (``transformer_blocks.0.attn.to_q``); a file may spell that module in
one of three layouts, chosen per file:

``lycoris`` (any method; what we name modules by)
    ``lycoris_<diffusers path, '.'→'_'>`` plus the method's own suffixes (``lora_down.weight``, ``hada_w1_a``,
    ``lokr_w1``, ``oft_blocks``…). LyCORIS itself names a diffusers transformer's modules so (prefix ``lycoris``),
    and ComfyUI's ``model_lora_keys_unet`` maps ``lycoris_<path>`` (SimpleTuner) and ``lora_transformer_<path>``
    (OneTrainer) onto the native weights for both ``model_base.SD3`` (via ``comfy.utils.mmdit_to_diffusers``) and
    ``model_base.Flux`` (``flux_to_diffusers``), slicing q/k/v out of the fused native ``qkv`` / ``linear1`` with
    its ``(dim, offset, size)`` narrowing, which ``calculate_weight`` applies to every patch type (LoRA, LoHa, LoKr,
    GLoRA, DoRA's ``dora_scale``). We read both spellings.

``diffusers`` (LoRA; the default for LoRA files)
    PEFT keys ``transformer.<path>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder[_2].text_model.<path>``,
    without ``alpha`` (diffusers' SD3 loader passes no alphas, so ``alpha/rank`` is baked into the two factors, as
    ai-toolkit does). ``load_lora_weights`` of ``StableDiffusion3Pipeline`` and ``FluxPipeline`` reads them;
    ComfyUI maps ``transformer.<path>`` (both families) and reads ``.lora_B.weight``/``.lora_A.weight``
    ("diffusers2" in ``comfy/lora.py:load_lora``), ``text_encoder.text_model.encoder.layers.N.*`` (CLIP-L) and
    ``text_encoder_2.…`` (CLIP-G). T5 has no diffusers loader and ComfyUI knows it only as ``lora_te3_``, so T5
    modules keep that name (with the ``lora_A``/``lora_B`` suffixes) in this layout too. ``text_model.`` is
    written even where transformers 5 dropped that level (Flux's ``CLIPTextModel``): diffusers maps it back (tested),
    while the bare form fails on SD3's ``CLIPTextModelWithProjection`` (IndexError in diffusers 0.42).

``kohya`` (LoRA only, exact)
    ``lora_unet_<native path>`` with the original module names: BFL's for Flux (``double_blocks_0_img_attn_qkv``,
    ``single_blocks_0_linear1``…), MMDiT's for SD3 (``joint_blocks_0_x_block_attn_qkv``…); ``alpha`` kept. The
    native layers that fuse several diffusers modules (Flux ``img_attn.qkv`` = to_q|to_k|to_v, ``txt_attn.qkv`` =
    add_q|add_k|add_v, ``linear1`` = to_q|to_k|to_v|proj_mlp; SD3 ``x_block.attn.qkv``, ``context_block.attn.qkv``,
    ``x_block.attn2.qkv``) get ONE LoRA: ``lora_down`` the stacked per-slice downs (Σr, in) and ``lora_up`` the
    block-diagonal ups (Σout, Σr), ``alpha = scale·Σr`` — exactly ΔW of the separate adapters. A slice no adapter
    covers gets a zero block of the common rank, so that diffusers' ``_convert_kohya_flux_lora_to_diffusers``
    recognises the block-diagonal ("sparse") form and splits it back into rank-r LoRAs. The modulation layers that
    diffusers stores as (scale, shift) but the originals as (shift, scale) — ``norm_out.linear`` and SD3's pre-only
    last ``norm1_context.linear`` (``AdaLayerNormContinuous``) — get their ``lora_up`` halves swapped (ComfyUI's and
    diffusers' ``swap_scale_shift``). sd-scripts, Forge and ComfyUI read these files for both families; diffusers
    reads the Flux ones at real size (its converter hard-codes 19/38 blocks and 3072/12288 widths) and no SD3 ones.
    Other methods have no exact fused form (a LoKr of a fused qkv is not three LoKrs), so they use ``lycoris``.

Text encoders: CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_`` (SD3), T5-XXL ``lora_te3_`` in both families (sd-scripts;
ComfyUI reads Flux's T5 as ``lora_te2_`` or ``lora_te3_``); CLIP paths with ``text_model_``, T5 paths as they are
(``lora_te3_encoder_block_0_layer_0_SelfAttention_q``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .base import WRAPPABLE, ConfigError
from .naming import flat, group_by_module, text_encoder_path

LAYOUTS = ("lycoris", "diffusers", "kohya")
FILE_LAYOUTS = ("auto", *LAYOUTS)  # auto: diffusers for networks of plain LoRA modules, else lycoris
PLAIN_LORA = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
TRANSFORMER_PREFIX = "lycoris"
ONETRAINER_PREFIX = "lora_transformer"
KOHYA_PREFIX = "lora_unet"
T5_PREFIX = "lora_te3"
PEFT_TRANSFORMER = "transformer"
PEFT_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# diffusers' component names → our prefixes, as far as they tell without the pipeline (SD3's text_encoder_2 is
# CLIP-G; Flux's is T5, for which diffusers writes no LoRA).
PEFT_COMPONENTS = {PEFT_TRANSFORMER: TRANSFORMER_PREFIX, "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

# diffusers path inside a block → native path inside the block; a tuple (native, index) is slice ``index`` of a
# fused native layer. The fused members are listed in their order in the native weight.
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": "linear2", "norm.linear": "modulation.lin",
}
_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SD3_JOINT = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1), "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCKS = {
    "flux": {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE), "single_transformer_blocks":
             ("single_blocks", _FLUX_SINGLE)},
    "sd3": {"transformer_blocks": ("joint_blocks", _SD3_JOINT)},
}
_TOP = {"flux": _FLUX_TOP, "sd3": _SD3_TOP}
# diffusers' _convert_kohya_flux_lora_to_diffusers copies these layers' factors without their alpha ("TODO:
# alphas"), so the kohya layout writes them with the scale folded in and alpha = rank, which every reader agrees on.
_ALPHA_IGNORED = ("final_layer.",)
# diffusers' AdaLayerNormContinuous splits its projection as (scale, shift); the original models as (shift, scale).
_SWAPPED_NORMS = ("AdaLayerNormContinuous",)


@dataclasses.dataclass(frozen=True)
class NativeName:
    """Where a diffusers module lives in the original (BFL / MMDiT) model."""

    path: str  # native module path (double_blocks.0.img_attn.qkv)
    slice_index: int | None = None  # position among the fused members; None for a 1:1 module
    swap_halves: bool = False  # output halves stored in the other order (shift/scale)

    @property
    def kohya_name(self) -> str:
        return flat(KOHYA_PREFIX, self.path)


@dataclasses.dataclass(frozen=True)
class FusedGroup:
    """A native layer whose output rows are the concatenated outputs of several diffusers modules."""

    kohya_name: str
    members: tuple[str, ...]  # diffusers paths in row order
    out_features: tuple[int, ...]

    def rows(self, index: int) -> slice:
        start = sum(self.out_features[:index])
        return slice(start, start + self.out_features[index])


def dit_family(transformer: nn.Module) -> str | None:
    """sd3 or flux from a transformer's config keys (None for anything else, a UNet say)."""
    keys = set(dict(getattr(transformer, "config", None) or {}))
    if {"num_single_layers", "guidance_embeds"} <= keys:
        return "flux"
    if {"caption_projection_dim", "pos_embed_max_size", "joint_attention_dim"} <= keys:
        return "sd3"
    return None


def dit_variant(transformer: nn.Module) -> str | None:
    """Which released model a transformer's config is shaped like (the names of :mod:`methods.arch`'s variants),
    by the rules of diffusers' ``infer_diffusers_model_type`` and sd-scripts' ``analyze_state_dict_state``: Flux
    ``guidance_embeds`` → dev, else schnell; SD3 ``dual_attention_layers`` → 3.5 medium, else ``qk_norm`` → 3.5
    large, else SD3 medium. None for anything else."""
    family = dit_family(transformer)
    config = dict(getattr(transformer, "config", None) or {})
    if family == "flux":
        return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"
    if family == "sd3":
        if tuple(config.get("dual_attention_layers") or ()):
            return "sd3.5-medium"
        return "sd3.5-large" if config.get("qk_norm") else "sd3-medium"
    return None


def native_name(family: str, path: str, swapped: bool = False) -> NativeName | None:
    """The native name of a diffusers module path (None where the original model has no such module)."""
    match = re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", path)
    if match:
        blocks = _BLOCKS[family].get(match[1])
        if blocks is None:
            return None
        native_blocks, table = blocks
        target = table.get(match[3])
        if target is None:
            return None
        native, index = target if isinstance(target, tuple) else (target, None)
        return NativeName(f"{native_blocks}.{match[2]}.{native}", index, swapped)
    target = _TOP[family].get(path)
    return NativeName(target, None, swapped) if target is not None else None


class TransformerNaming:
    """Names of one SD3/Flux transformer's Linear/Conv2d modules in every layout, and the way back."""

    def __init__(self, transformer: nn.Module):
        family = dit_family(transformer)
        if family is None:
            raise ValueError(f"{type(transformer).__name__} is neither an SD3 (MMDiT) nor a Flux transformer")
        self.family = family
        self.modules: dict[str, nn.Module] = {path: module for path, module in transformer.named_modules()
                                              if isinstance(module, WRAPPABLE)}
        swapped = {path for path, module in transformer.named_modules() if type(module).__name__ in _SWAPPED_NORMS}
        self.native: dict[str, NativeName] = {}
        for path in self.modules:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            name = native_name(self.family, path, swapped=parent in swapped and path.endswith(".linear"))
            if name is not None:
                self.native[path] = name
        groups: dict[str, list[tuple[int, str]]] = {}
        for path, name in self.native.items():
            if name.slice_index is not None:
                groups.setdefault(name.kohya_name, []).append((name.slice_index, path))
        self.groups: dict[str, FusedGroup] = {}
        for kohya, members in groups.items():
            members.sort()
            paths = tuple(path for _, path in members)
            self.groups[kohya] = FusedGroup(kohya, paths, tuple(self.modules[p].weight.shape[0] for p in paths))
        self._by_name: dict[str, str] = {}
        for path in self.modules:
            for name in self.accepted_names(path):
                self._by_name.setdefault(name, path)

    # ----- path → names
    def file_name(self, path: str) -> str:
        return flat(TRANSFORMER_PREFIX, path)

    def peft_name(self, path: str) -> str:
        return f"{PEFT_TRANSFORMER}.{path}"

    def accepted_names(self, path: str) -> list[str]:
        """Dot-free spellings that name this module alone with unchanged tensors (fused and swapped native
        layers need :func:`split_lora` / :func:`swap_halves` and are not listed)."""
        names = [self.file_name(path), flat(ONETRAINER_PREFIX, path)]
        native = self.native.get(path)
        if native is not None and native.slice_index is None and not native.swap_halves:
            names.append(native.kohya_name)
        return names

    # ----- names → path
    def path_of(self, name: str) -> str | None:
        """The module a dot-free file name or a PEFT module key (``transformer.<path>``) stands for."""
        if name.startswith(PEFT_TRANSFORMER + "."):
            path = name[len(PEFT_TRANSFORMER) + 1:]
            return path if path in self.modules else None
        return self._by_name.get(name)

    def native_layers(self) -> dict[str, list[str]]:
        """kohya name → diffusers paths it covers (one for 1:1 layers, the members in row order for fused)."""
        layers: dict[str, list[str]] = {}
        for path, native in self.native.items():
            if native.slice_index is None:
                layers[native.kohya_name] = [path]
        for kohya, group in self.groups.items():
            layers[kohya] = list(group.members)
        return layers


@dataclasses.dataclass(frozen=True)
class TextEncoderNaming:
    """Names of one text encoder's modules: ``prefix`` (lora_te1/2/3) and the diffusers PEFT component (None for
    T5, which no diffusers loader reads)."""

    prefix: str
    peft_component: str | None
    is_clip: bool

    def path(self, path: str) -> str:
        return text_encoder_path(path) if self.is_clip else path

    def file_name(self, path: str) -> str:
        return flat(self.prefix, self.path(path))

    def peft_name(self, path: str) -> str:
        if self.peft_component is None:
            return self.file_name(path)
        return f"{self.peft_component}.{self.path(path)}"

    def accepted_names(self, path: str) -> list[str]:
        names = [self.file_name(path)]
        if self.is_clip:
            stripped = path[len("text_model."):] if path.startswith("text_model.") else path
            names.append(flat(self.prefix, stripped))
            if self.prefix == "lora_te1":  # ComfyUI and some trainers write CLIP-L as lora_te_
                names.append(flat("lora_te", self.path(path)))
        return list(dict.fromkeys(names))


def text_encoder_namings(family: str) -> list[TextEncoderNaming]:
    """In pipeline order: SD3 text_encoder (CLIP-L), text_encoder_2 (CLIP-G), text_encoder_3 (T5); Flux
    text_encoder (CLIP-L), text_encoder_2 (T5)."""
    if family == "sd3":
        return [TextEncoderNaming("lora_te1", "text_encoder", True),
                TextEncoderNaming("lora_te2", "text_encoder_2", True), TextEncoderNaming(T5_PREFIX, None, False)]
    return [TextEncoderNaming("lora_te1", "text_encoder", True), TextEncoderNaming(T5_PREFIX, None, False)]


# ----- LoRA tensors on fused and swapped layers -------------------------------------------------------------------
@dataclasses.dataclass
class LoRAFactors:
    """ΔW = scale · up @ down with scale = alpha / rank (kohya's convention)."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.flatten(1) @ self.down.flatten(1))


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """(shift, scale) ↔ (scale, shift) along the output rows; its own inverse."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def fuse_lora(parts: list[LoRAFactors | None], out_features: Iterable[int]) -> LoRAFactors:
    """One LoRA on a fused layer from LoRAs on its slices (None: slice without adapter), exact.

    ``down`` stacks the slices' downs, ``up`` is block-diagonal; a missing slice gets zero blocks of the common rank
    so every slice has the same rank (the form diffusers detects as "sparse"). With equal scales ``alpha`` keeps
    ``scale·Σrank``; unequal scales are baked into the up blocks (``alpha = Σrank``).
    """
    out_features = list(out_features)
    present = [p for p in parts if p is not None]
    if not present or len(parts) != len(out_features):
        raise ValueError(f"fuse_lora needs one entry per slice ({len(out_features)}) and at least one LoRA")
    rank = present[0].rank
    reference = present[0].down
    same_scale = all(abs(p.scale - present[0].scale) <= 1e-12 * max(1.0, abs(p.scale)) for p in present)
    downs, ups = [], []
    for part, rows in zip(parts, out_features):
        if part is None:
            downs.append(reference.new_zeros((rank, *reference.shape[1:])))
            ups.append(reference.new_zeros((rows, rank)))
            continue
        downs.append(part.down)
        ups.append(part.up.flatten(1) * (1.0 if same_scale else part.scale))
    total_rank = sum(d.shape[0] for d in downs)
    up = torch.block_diag(*ups)
    if present[0].up.dim() == 4:
        up = up[:, :, None, None]
    alpha = present[0].scale * total_rank if same_scale else float(total_rank)
    return LoRAFactors(torch.cat(downs, dim=0), up, float(alpha))


def split_lora(fused: LoRAFactors, out_features: Iterable[int]) -> list[LoRAFactors | None]:
    """The per-slice LoRAs of a fused-layer LoRA, exact (inverse of :func:`fuse_lora`; reads any kohya file).

    A block-diagonal ``up`` whose rank divides evenly splits into rank/n LoRAs; otherwise every slice keeps the
    whole ``down`` and its rows of ``up``. Slices whose ΔW is zero come back as None.
    """
    out_features = list(out_features)
    count, rank = len(out_features), fused.rank
    up = fused.up.flatten(1)
    bounds = [sum(out_features[:i]) for i in range(count + 1)]
    if up.shape[0] != bounds[-1]:
        raise ValueError(f"lora_up has {up.shape[0]} rows, the fused layer {bounds[-1]}")
    sub_rank = rank // count if rank % count == 0 else 0
    block_diagonal = sub_rank > 0 and all(
        not up[bounds[i]:bounds[i + 1], j * sub_rank:(j + 1) * sub_rank].any()
        for i in range(count) for j in range(count) if i != j)
    parts: list[LoRAFactors | None] = []
    for i in range(count):
        rows = up[bounds[i]:bounds[i + 1]]
        if block_diagonal:
            columns = slice(i * sub_rank, (i + 1) * sub_rank)
            part = LoRAFactors(fused.down[columns], rows[:, columns], fused.alpha / count)
        else:
            part = LoRAFactors(fused.down, rows, fused.alpha)
        if not part.up.any() or not part.down.any():
            parts.append(None)
            continue
        if fused.up.dim() == 4:
            part.up = part.up[:, :, None, None]
        parts.append(part)
    return parts


def to_kohya(naming: TransformerNaming, loras: dict[str, LoRAFactors]) -> dict[str, LoRAFactors]:
    """diffusers path → LoRA  ⇒  kohya (native) name → LoRA, fusing and swapping where the native layer needs it."""
    result: dict[str, LoRAFactors] = {}
    for path, lora in loras.items():
        native = naming.native.get(path)
        if native is None:
            raise ValueError(f"transformer module {path} has no native (kohya) name; write this file in the "
                             "diffusers or lycoris layout")
        if native.slice_index is None:
            up = swap_halves(lora.up) if native.swap_halves else lora.up
            lora = LoRAFactors(lora.down, up, lora.alpha)
            if native.path.startswith(_ALPHA_IGNORED):
                down, up = bake_alpha(lora)
                lora = LoRAFactors(down, up, float(lora.rank))
            result[native.kohya_name] = lora
    for kohya, group in naming.groups.items():
        parts = [loras.get(path) for path in group.members]
        if any(part is not None for part in parts):
            result[kohya] = fuse_lora(parts, group.out_features)
    return result


def from_kohya(naming: TransformerNaming, loras: dict[str, LoRAFactors]) -> tuple[dict[str, LoRAFactors], list[str]]:
    """kohya name → LoRA  ⇒  diffusers path → LoRA; also returns the names that match no layer."""
    layers = naming.native_layers()
    result: dict[str, LoRAFactors] = {}
    unmatched: list[str] = []
    for name, lora in loras.items():
        paths = layers.get(name)
        if paths is None:
            unmatched.append(name)
            continue
        if name in naming.groups:
            group = naming.groups[name]
            for path, part in zip(group.members, split_lora(lora, group.out_features)):
                if part is not None:
                    result[path] = part
            continue
        native = naming.native[paths[0]]
        up = swap_halves(lora.up) if native.swap_halves else lora.up
        result[paths[0]] = LoRAFactors(lora.down, up, lora.alpha)
    return result, unmatched


def bake_alpha(lora: LoRAFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) with ``alpha/rank`` folded in (√scale into each, so neither factor over/underflows in fp16)."""
    root = abs(lora.scale) ** 0.5
    sign = 1.0 if lora.scale >= 0 else -1.0
    return lora.down * root, lora.up * (root * sign)


def peft_key_split(key: str) -> tuple[str, str] | None:
    """``transformer.x.attn.to_q.lora_A.weight`` → (``transformer.x.attn.to_q``, ``lora_A.weight``); None for
    anything that is not a PEFT LoRA key."""
    for suffix in PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


# ----- a whole pipeline -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DiTPart:
    """One model of an SD3/Flux pipeline that takes adapters, with its names."""

    prefix: str  # lycoris (transformer), lora_te1, lora_te2, lora_te3
    model: nn.Module
    file_name: Callable[[str], str]
    accepted_names: Callable[[str], list[str]]
    peft_name: Callable[[str], str]

    @property
    def is_transformer(self) -> bool:
        return self.prefix == TRANSFORMER_PREFIX


class DiTNaming:
    """The transformer and text encoders of one pipeline: every spelling of every wrappable layer, both ways."""

    def __init__(self, transformer: nn.Module | None, text_encoders: list[nn.Module | None], family: str | None = None):
        self.transformer = TransformerNaming(transformer) if transformer is not None else None
        self.transformer_module = transformer
        self.family = family or (self.transformer.family if self.transformer else None)
        if self.family is None:
            raise ValueError("DiTNaming needs the transformer or the family (sd3 or flux)")
        self.parts: list[DiTPart] = []
        if self.transformer is not None:
            t = self.transformer
            self.parts.append(DiTPart(TRANSFORMER_PREFIX, transformer, t.file_name, t.accepted_names, t.peft_name))
        for naming, encoder in zip(text_encoder_namings(self.family), text_encoders):
            if encoder is not None:
                self.parts.append(DiTPart(naming.prefix, encoder, naming.file_name, naming.accepted_names,
                                          naming.peft_name))
        self._lookup: dict[str, tuple[DiTPart, str]] = {}
        for part in self.parts:
            for path, module in part.model.named_modules():
                if isinstance(module, WRAPPABLE):
                    for name in [part.file_name(path), part.peft_name(path), *part.accepted_names(path)]:
                        self._lookup.setdefault(name, (part, path))

    @classmethod
    def of_pipeline(cls, pipe) -> DiTNaming:
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        return cls(pipe.transformer, encoders)

    def lookup(self, name: str) -> tuple[DiTPart, str] | None:
        """(part, module path) for any accepted dot-free name, PEFT module key or our own file name."""
        return self._lookup.get(name)

    def file_name(self, name: str) -> str | None:
        """Our (lycoris layout) name for any accepted spelling."""
        found = self.lookup(name)
        return found[0].file_name(found[1]) if found else None


def export_lora(naming: DiTNaming, loras: dict[str, LoRAFactors], layout: str) -> dict[str, torch.Tensor]:
    """LoRAs keyed by our file names → the tensors of a file in ``layout`` (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    state: dict[str, torch.Tensor] = {}

    def kohya_tensors(name: str, lora: LoRAFactors) -> None:
        state[f"{name}.lora_down.weight"] = lora.down
        state[f"{name}.lora_up.weight"] = lora.up
        state[f"{name}.alpha"] = torch.tensor(float(lora.alpha))

    transformer_loras: dict[str, LoRAFactors] = {}
    for name, lora in loras.items():
        found = naming.lookup(name)
        if found is None:
            raise ValueError(f"{name} is no module of this pipeline")
        part, path = found
        if layout == "kohya" and part.is_transformer:
            transformer_loras[path] = lora
        elif layout == "diffusers":
            down, up = bake_alpha(lora)
            state[f"{part.peft_name(path)}.lora_A.weight"] = down
            state[f"{part.peft_name(path)}.lora_B.weight"] = up
        else:
            kohya_tensors(part.file_name(path), lora)
    if transformer_loras:
        for name, lora in to_kohya(naming.transformer, transformer_loras).items():
            kohya_tensors(name, lora)
    return state


def import_lora(naming: DiTNaming, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Any layout's tensors → ours (``<file name>.<suffix>``; LoRAs as lora_down/lora_up/alpha), and the keys that
    name no module of this pipeline.

    PEFT keys become kohya LoRAs with ``alpha = rank``; kohya names of fused or swapped native layers are split or
    swapped back (LoRA only: another method on a fused layer has no exact per-module form, so it is reported);
    every other accepted spelling is renamed with its tensors untouched, whatever the method.
    """
    result: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    peft: dict[str, dict[str, torch.Tensor]] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        split = peft_key_split(key)
        if split is None and key.endswith(".alpha") and "." in key[: -len(".alpha")]:
            split = (key[: -len(".alpha")], "alpha")  # a PEFT module's alpha (diffusers' network_alphas)
        if split is not None:
            peft.setdefault(split[0], {})[split[1]] = tensor
            continue
        module, _, suffix = key.partition(".")
        grouped.setdefault(module, {})[suffix] = tensor
    for module, tensors in peft.items():
        found = naming.lookup(module)
        if found is None or not set(PEFT_SUFFIXES) <= set(tensors) <= {*PEFT_SUFFIXES, "alpha"}:
            unmatched.extend(f"{module}.{suffix}" for suffix in tensors)
            continue
        name = found[0].file_name(found[1])
        down = tensors["lora_A.weight"]
        result[f"{name}.lora_down.weight"] = down
        result[f"{name}.lora_up.weight"] = tensors["lora_B.weight"]
        result[f"{name}.alpha"] = torch.tensor(float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0]))
    native: dict[str, LoRAFactors] = {}
    layers = naming.transformer.native_layers() if naming.transformer else {}
    for module, tensors in grouped.items():
        found = naming.lookup(module)
        if found is not None:
            name = found[0].file_name(found[1])
            result.update({f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()})
        elif module in layers and {"lora_down.weight", "lora_up.weight"} <= set(tensors) <= {
                "lora_down.weight", "lora_up.weight", "alpha"}:
            down = tensors["lora_down.weight"]
            alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
            native[module] = LoRAFactors(down, tensors["lora_up.weight"], alpha)
        else:
            unmatched.extend(f"{module}.{suffix}" if suffix else module for suffix in tensors)
    if native:
        per_path, rest = from_kohya(naming.transformer, native)
        unmatched.extend(rest)
        for path, lora in per_path.items():
            name = naming.transformer.file_name(path)
            result[f"{name}.lora_down.weight"] = lora.down
            result[f"{name}.lora_up.weight"] = lora.up
            result[f"{name}.alpha"] = torch.tensor(float(lora.alpha))
    return result, unmatched


# ----- file layouts of a whole network ----------------------------------------------------------------------------
def write_layout(naming: DiTNaming, state: dict[str, torch.Tensor], layout: str = "auto") -> dict[str, torch.Tensor]:
    """A network's tensors under our (lycoris) names → the file in ``layout``.

    Only a module stored as a plain LoRA (exactly ``lora_down``/``lora_up``/``alpha``) has a diffusers and a kohya
    form, so ``auto`` writes the diffusers layout when every module is one and the lycoris layout otherwise (LoHa,
    LoKr, OFT, GLoRA, a Tucker LoRA kept unfolded, DoRA's ``dora_scale``, which diffusers would drop); asking for
    ``diffusers`` or ``kohya`` with other modules is an error naming one of them.
    """
    if layout not in FILE_LAYOUTS:
        raise ConfigError(f"file layout {layout!r} is not one of {', '.join(FILE_LAYOUTS)}")
    modules = group_by_module(state)
    other = next((name for name, tensors in modules.items() if set(tensors) != PLAIN_LORA), None)
    if layout == "auto":
        layout = "lycoris" if other is not None else "diffusers"
    if layout == "lycoris":
        return state
    if other is not None:
        raise ConfigError(f"the {layout} file layout holds plain LoRA modules only (lora_down, lora_up, alpha), but "
                          f"{other} stores {', '.join(sorted(modules[other]))}; write it in the lycoris layout "
                          "(output.file_layout = \"lycoris\" or \"auto\")")
    loras = {name: LoRAFactors(t["lora_down.weight"], t["lora_up.weight"], float(t["alpha"]))
             for name, t in modules.items()}
    return export_lora(naming, loras, layout)


def peft_to_file_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys (the diffusers layout: ``transformer.<path>.lora_A.weight``, ``text_encoder.…``, our T5
    ``lora_te3_….lora_A.weight``) → our file names with kohya's suffixes and ``alpha`` (= rank where the file has
    none); every other key as it is. Needs no pipeline, so tools can read such a file on its own."""
    result: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        split = peft_key_split(key)
        if split is None and key.endswith(".alpha") and "." in key[: -len(".alpha")]:
            split = (key[: -len(".alpha")], "alpha")
        name = None
        if split is not None:
            component, _, path = split[0].partition(".")
            if component in PEFT_COMPONENTS and path:
                prefix = PEFT_COMPONENTS[component]
                name = flat(prefix, path if prefix == TRANSFORMER_PREFIX else text_encoder_path(path))
            elif not path:
                name = component
        if name is None:
            result[key] = tensor
            continue
        modules.setdefault(name, {})[split[1]] = tensor
    for name, tensors in modules.items():
        if not set(PEFT_SUFFIXES) <= set(tensors):  # half a LoRA: leave it for the caller to report
            result.update({f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()})
            continue
        down = tensors["lora_A.weight"]
        result[f"{name}.lora_down.weight"] = down
        result[f"{name}.lora_up.weight"] = tensors["lora_B.weight"]
        alpha = tensors.get("alpha")
        result[f"{name}.alpha"] = torch.tensor(float(alpha) if alpha is not None else float(down.shape[0]))
    return result


def file_layout(keys: Iterable[str]) -> str:
    """Which layout a file's keys are in: diffusers (PEFT keys), kohya (native fused names), lycoris, or other."""
    keys = list(keys)
    if any(peft_key_split(key) and key.partition(".")[0] in PEFT_COMPONENTS for key in keys):
        return "diffusers"
    names = {key.partition(".")[0] for key in keys}
    if any(re.match(r"lora_unet_(double_blocks|single_blocks|joint_blocks)_", name) for name in names):
        return "kohya"
    if any(name.startswith((TRANSFORMER_PREFIX + "_", ONETRAINER_PREFIX + "_")) for name in names):
        return "lycoris"
    return "other"
