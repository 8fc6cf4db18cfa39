"""Module names in Civitai-style files (format spec §1).

``lora_name = prefix + "_" + module_path.replace(".", "_")`` with prefix ``lora_unet`` / ``lora_te`` /
``lora_te1`` / ``lora_te2``. SD1/SD2 UNets keep diffusers paths; SDXL UNets use the original sgm/ldm paths
(``input_blocks_4_1_...``) as kohya writes them. Text-encoder paths always carry ``text_model.`` even where
transformers 5 removed that level from ``CLIPTextModel``.
"""

from __future__ import annotations

import re
from typing import Any

from .arch import UNET_PREFIX

_RESNET_SUFFIXES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def group_by_module(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"name.suffix": t}`` → ``{"name": {"suffix": t}}``; names never contain a dot (spec §0)."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = tensor
    return grouped


def flat(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


# Children of transformers' CLIPTextTransformer: in transformers 4 they sit below ``text_model.`` in both
# CLIPTextModel and CLIPTextModelWithProjection; transformers 5's CLIPTextModel dropped that level. Anything else
# (``text_projection`` of CLIPTextModelWithProjection) is a sibling of ``text_model`` and keeps its path.
_CLIP_TRANSFORMER_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def text_encoder_path(path: str) -> str:
    """The transformers-4 path of a CLIP text-encoder module (``text_model.encoder.layers.0...``)."""
    if path.split(".", 1)[0] in _CLIP_TRANSFORMER_CHILDREN:
        return f"text_model.{path}"
    return path


def unet_sgm_path(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """Map a diffusers UNet module path to the sgm/ldm path kohya's SDXL UNet uses (None if it has none).

    The index arithmetic is that of ``convert_diffusers_name_to_compvis`` / ``make_unet_conversion_map``:
    each down block holds ``layers_per_block`` resnet(+attention) slots plus one downsampler slot, each up
    block ``layers_per_block + 1`` slots whose last one also holds the upsampler.
    """
    for diffusers_name, sgm_name in _TOP_LEVEL.items():
        if path == diffusers_name:
            return sgm_name
    stride_down = layers_per_block + 1
    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        block, kind, slot, rest = int(match[1]), match[2], int(match[3]), match[4]
        head = f"input_blocks.{1 + block * stride_down + slot}"
        return _inner(head, kind, rest)
    match = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if match:
        return f"input_blocks.{(int(match[1]) + 1) * stride_down}.0.op"
    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        block, kind, slot, rest = int(match[1]), match[2], int(match[3]), match[4]
        head = f"output_blocks.{block * stride_down + slot}"
        return _inner(head, kind, rest)
    match = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if match:
        block = int(match[1])
        position = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * stride_down + layers_per_block}.{position}.conv"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        kind, slot, rest = match[1], int(match[2]), match[3]
        head = "middle_block"
        index = 1 if kind == "attentions" else 2 * slot
        return _inner(f"{head}.{index}", kind, rest, slot_in_head=False)
    return None


def _inner(head: str, kind: str, rest: str, slot_in_head: bool = True) -> str | None:
    position = "" if not slot_in_head else (".1" if kind == "attentions" else ".0")
    if kind == "attentions":
        return f"{head}{position}.{rest}"
    if rest not in _RESNET_SUFFIXES:
        return None
    return f"{head}{position}.{_RESNET_SUFFIXES[rest]}"


class UNetNaming:
    """Diffusers path ↔ file name for one UNet, in the style its architecture's files use."""

    def __init__(self, unet, sgm_style: bool):
        config = unet.config
        layers = config.layers_per_block
        if not isinstance(layers, int):  # per-block lists exist in diffusers configs; kohya's layout assumes one
            layers = int(layers[0])
        self.layers_per_block = layers
        self.up_with_attention = {
            index for index, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)
        }
        self.sgm_style = sgm_style

    def sgm_path(self, path: str) -> str | None:
        return unet_sgm_path(path, self.layers_per_block, self.up_with_attention)

    def file_name(self, path: str) -> str:
        if self.sgm_style:
            sgm = self.sgm_path(path)
            if sgm is None:
                raise ValueError(f"UNet module {path!r} has no sgm-style name; it cannot be written to an SDXL file")
            return flat(UNET_PREFIX, sgm)
        return flat(UNET_PREFIX, path)

    def accepted_names(self, path: str) -> list[str]:
        """Every spelling a file may use for this module (both styles are read, whatever we write)."""
        names = [flat(UNET_PREFIX, path)]
        sgm = self.sgm_path(path)
        if sgm is not None:
            names.append(flat(UNET_PREFIX, sgm))
        return names


def text_encoder_file_name(prefix: str, path: str) -> str:
    return flat(prefix, text_encoder_path(path))


def text_encoder_accepted_names(prefixes: tuple[str, ...], path: str) -> list[str]:
    """Both spellings of a text-encoder module: with ``text_model_`` (what we write) and without (what kohya and
    LyCORIS write when they name modules from a transformers-5 ``CLIPTextModel``)."""
    stripped = path[len("text_model."):] if path.startswith("text_model.") else path
    candidates = dict.fromkeys((text_encoder_path(stripped), stripped))
    return [flat(prefix, candidate) for prefix in prefixes for candidate in candidates]
