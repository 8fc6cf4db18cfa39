"""What adapter files say about base architectures: one :class:`Architecture` entry per base model family.

Each entry holds what a file names or records about its base: the file prefixes of its model parts, whether its
UNet modules use sgm names, the kohya ``ss_base_model_version`` and ModelSpec ids, the default resolution and the
cross-attention width (which tells a file's base from a key's shape when metadata is missing). A new base family is
one more :func:`register_architecture` call here; the model configurations themselves live in
``trainer/architectures.py`` (SD3/Flux: ``trainer/dit_architectures.py``).

The diffusion transformers (SD3/SD3.5, FLUX.1) are entries too: their denoiser is a transformer whose modules are
named ``lycoris_<diffusers path>`` (:mod:`methods.dit_naming`, which also writes the diffusers and kohya layouts),
each released model is a named variant with its own ids, and a file's family shows in its key names
(``key_markers``) or in the width of its attention layers (``hidden_widths``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch

UNET_PREFIX = "lora_unet"
TRANSFORMER_PREFIX = "lycoris"  # SD3/Flux transformer modules, as LyCORIS names a diffusers transformer's
PART_LABELS = {UNET_PREFIX: "unet", TRANSFORMER_PREFIX: "transformer"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """The ids written for one prediction type of an architecture (SD2's 768-v model differs from its 512 base)."""

    kohya_version: str  # ss_base_model_version
    modelspec_id: str  # modelspec.architecture, without the "/lora" suffix
    resolution: int  # the native training resolution, written when a run gives none


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # sd1, sd2, sdxl: what configs and the CLI call it
    kohya_family: str  # ss_base_model_version values of this family start with it
    modelspec_family: str  # modelspec.architecture values of this family start with it
    epsilon: Variant
    context_width: int  # the UNet's cross-attention width: attn2.to_k's input features (DiT: the T5 width)
    text_encoder_prefixes: tuple[str, ...]  # file prefix of each text encoder, by its position in the pipeline
    sgm_unet_names: bool = False  # UNet modules named by their sgm/ldm path (input_blocks_…) as kohya writes SDXL
    v_prediction: Variant | None = None  # the ids of the v-prediction model, where they differ
    # Other spellings of a text-encoder prefix that files in the wild use (SDXL's CLIP-L as lora_te).
    prefix_aliases: tuple[tuple[str, str], ...] = ()
    implementation: str = "diffusers"  # modelspec.implementation
    kohya_v2: bool = False  # kohya's ss_v2 flag (SD2's OpenCLIP text encoder)
    denoiser_prefix: str = UNET_PREFIX  # file prefix of the denoiser's modules (UNet or transformer)
    # Released models of the family by our id (sd3.5-large, flux-dev, …), each with its own ids; ``epsilon`` is the
    # one written when a network does not say which.
    named_variants: tuple[tuple[str, Variant], ...] = ()
    # Module-name patterns only files of this family have (searched in the file's module names).
    key_markers: tuple[str, ...] = ()
    # Widths of the transformer's attention projections: an input-side factor of ``…attn_to_q`` has one of them.
    hidden_widths: tuple[int, ...] = ()
    writes_prediction_type: bool = True  # modelspec.prediction_type (sd-scripts writes none for Flux)

    def variant(self, prediction_type: str = "epsilon", name: str | None = None) -> Variant:
        """The ids to write: the named variant ``name`` (SD3/Flux), else by prediction type (SD2's 768-v)."""
        if name:
            for variant_name, variant in self.named_variants:
                if variant_name == name:
                    return variant
            from .base import ConfigError

            allowed = ", ".join(n for n, _ in self.named_variants) or "none"
            raise ConfigError(f"{self.name} has no variant {name!r}; variants: {allowed}")
        if prediction_type == "v_prediction" and self.v_prediction is not None:
            return self.v_prediction
        return self.epsilon

    @property
    def kohya_versions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v.kohya_version for v in (self.epsilon, self.v_prediction,
                                                                 *(v for _, v in self.named_variants)) if v))

    def accepted_prefixes(self, prefix: str) -> tuple[str, ...]:
        return (prefix, *(alias for name, alias in self.prefix_aliases if name == prefix))


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(spec: Architecture) -> Architecture:
    ARCHITECTURES[spec.name] = spec
    return spec


register_architecture(Architecture(
    name="sd1", kohya_family="sd_v1", modelspec_family="stable-diffusion-v1",
    epsilon=Variant("sd_v1", "stable-diffusion-v1", 512), context_width=768, text_encoder_prefixes=("lora_te",)))
register_architecture(Architecture(
    name="sd2", kohya_family="sd_v2", modelspec_family="stable-diffusion-v2",
    epsilon=Variant("sd_v2", "stable-diffusion-v2-512", 512),
    v_prediction=Variant("sd_v2_v", "stable-diffusion-v2-768-v", 768), context_width=1024,
    text_encoder_prefixes=("lora_te",), kohya_v2=True))
register_architecture(Architecture(
    name="sdxl", kohya_family="sdxl", modelspec_family="stable-diffusion-xl",
    epsilon=Variant("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", 1024), context_width=2048,
    text_encoder_prefixes=("lora_te1", "lora_te2"), sgm_unet_names=True, prefix_aliases=(("lora_te1", "lora_te"),),
    implementation="https://github.com/Stability-AI/generative-models"))

# SD3/SD3.5 and FLUX.1: ids as sd-scripts writes them (ss_base_model_version, modelspec.architecture); the model
# configurations are in trainer/dit_architectures.py under the same variant names.
_SD3_MEDIUM = Variant("medium", "stable-diffusion-3-medium", 1024)
register_architecture(Architecture(
    name="sd3", kohya_family="sd3", modelspec_family="stable-diffusion-3", epsilon=_SD3_MEDIUM,
    context_width=4096, text_encoder_prefixes=("lora_te1", "lora_te2", "lora_te3"),
    prefix_aliases=(("lora_te1", "lora_te"),), denoiser_prefix=TRANSFORMER_PREFIX,
    named_variants=(("sd3-medium", _SD3_MEDIUM),
                    ("sd3.5-medium", Variant("5-medium", "stable-diffusion-3-5-medium", 1024)),
                    ("sd3.5-large", Variant("5-large", "stable-diffusion-3-5-large", 1024))),
    key_markers=(r"^lora_unet_joint_blocks_", r"^(lycoris|lora_transformer)_pos_embed_",
                 r"^(lycoris|lora_transformer)_transformer_blocks_\d+_attn2_"),
    hidden_widths=(1536, 2432)))
_FLUX_DEV = Variant("flux1", "flux-1-dev", 1024)
register_architecture(Architecture(
    name="flux", kohya_family="flux", modelspec_family="flux-1", epsilon=_FLUX_DEV, context_width=4096,
    text_encoder_prefixes=("lora_te1", "lora_te3"), prefix_aliases=(("lora_te1", "lora_te"),),
    implementation="https://github.com/black-forest-labs/flux", denoiser_prefix=TRANSFORMER_PREFIX,
    named_variants=(("flux-dev", _FLUX_DEV), ("flux-schnell", Variant("flux1", "flux-1-schnell", 1024))),
    key_markers=(r"^lora_unet_(double|single)_blocks_", r"^(lycoris|lora_transformer)_single_transformer_blocks_",
                 r"^(lycoris|lora_transformer)_(x_embedder|time_text_embed_guidance_embedder)"),
    hidden_widths=(3072,), writes_prediction_type=False))


def get_architecture(name: str) -> Architecture:
    from .base import ConfigError

    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def part_prefixes() -> tuple[str, ...]:
    """Every file prefix of a model part (``lora_unet``, ``lycoris``, ``lora_te``, ``lora_te1``, …), in display
    order."""
    prefixes = list(denoiser_prefixes())
    for spec in ARCHITECTURES.values():
        prefixes += [p for p in spec.text_encoder_prefixes if p not in prefixes]
    return tuple(prefixes)


def denoiser_prefixes() -> tuple[str, ...]:
    """The file prefixes of denoiser modules (UNet, diffusion transformer)."""
    return tuple(dict.fromkeys([UNET_PREFIX, *(spec.denoiser_prefix for spec in ARCHITECTURES.values())]))


def part_prefix(file_name: str) -> str:
    """The model part of a file module name (``lora_te1_text_model_…`` → ``lora_te1``)."""
    for prefix in sorted(part_prefixes(), key=len, reverse=True):
        if file_name.startswith(prefix + "_"):
            return prefix
    return file_name.split("_", 2)[0]


def part_label(prefix: str) -> str:
    """``lora_unet`` → ``unet``, ``lycoris`` → ``transformer``, ``lora_te1`` → ``te1``: how tools print a part."""
    return PART_LABELS.get(prefix, prefix.removeprefix("lora_"))


def part_counts(names: Iterable[str]) -> dict[str, int]:
    """Modules per model part, in :func:`part_prefixes` order (unknown prefixes last)."""
    counts: dict[str, int] = {}
    for name in names:
        prefix = part_prefix(name)
        counts[prefix] = counts.get(prefix, 0) + 1
    order = {prefix: index for index, prefix in enumerate(part_prefixes())}
    return dict(sorted(counts.items(), key=lambda item: order.get(item[0], len(order))))


def architecture_from_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    """(architecture, the metadata key and value it was read from), from kohya's or ModelSpec's id; else None."""
    version = metadata.get("ss_base_model_version", "")
    if version:
        for spec in ARCHITECTURES.values():
            if version.startswith(spec.kohya_family) or version in spec.kohya_versions:
                return spec.name, f"metadata ss_base_model_version={version}"
    modelspec = metadata.get("modelspec.architecture", "")
    for spec in ARCHITECTURES.values():
        if modelspec.startswith(spec.modelspec_family):
            return spec.name, f"metadata modelspec.architecture={modelspec}"
    return None


def architecture_from_keys(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(architecture, what told it) from module names and shapes alone; None when they do not tell."""
    names = {key.partition(".")[0] for key in tensors}
    for spec in ARCHITECTURES.values():
        for marker in spec.key_markers:
            found = next((name for name in names if re.search(marker, name)), None)
            if found is not None:
                return spec.name, f"key names ({found})"
    parts = {part_prefix(name) for name in names}
    transformer_file = bool(parts & {TRANSFORMER_PREFIX, "lora_te3"})
    for spec in ARCHITECTURES.values():
        if transformer_file != (spec.denoiser_prefix == TRANSFORMER_PREFIX):
            continue
        if transformer_file and "lora_te2" in parts and "lora_te2" in spec.text_encoder_prefixes:
            return spec.name, "key names (CLIP-G and T5 text encoders)"
        others = {p for other in ARCHITECTURES.values() if other is not spec
                  and other.denoiser_prefix == spec.denoiser_prefix for p in other.text_encoder_prefixes}
        if parts & (set(spec.text_encoder_prefixes) - others):
            return spec.name, f"key names ({'/'.join(spec.text_encoder_prefixes)})"
        if spec.sgm_unet_names and any(n.startswith(f"{UNET_PREFIX}_{block}") for n in names
                                       for block in ("input_blocks", "output_blocks", "middle_block")):
            return spec.name, "key names (sgm-style UNet names)"
    widths = {spec.context_width: spec.name for spec in ARCHITECTURES.values() if spec.denoiser_prefix == UNET_PREFIX}
    for key, tensor in tensors.items():
        # The cross-attention key projection reads the text encoder's width: the factors on its input side (LoRA's
        # down, LoHa's b, GLoRA's a2/b2) have it as their last axis, which no rank or output width equals.
        if "attn2_to_k." in key and tensor.dim() == 2 and tensor.shape[1] in widths:
            width = int(tensor.shape[1])
            return widths[width], f"cross-attention width {width}"
    hidden = {width: spec.name for spec in ARCHITECTURES.values() for width in spec.hidden_widths}
    for key, tensor in tensors.items():
        if re.search(r"_transformer_blocks_\d+_attn_to_q\.", key) and tensor.dim() == 2 and tensor.shape[1] in hidden:
            width = int(tensor.shape[1])
            return hidden[width], f"attention width {width}"
    return None


def file_architecture(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str | None, str]:
    """(architecture or None, where it was read) of an adapter file: metadata first, then its keys."""
    return architecture_from_metadata(metadata) or architecture_from_keys(tensors) or (None, "unknown")
