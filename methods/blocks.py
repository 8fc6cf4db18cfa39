"""kohya's per-block UNet options: learning-rate factors (``down_lr_weight``/``mid_lr_weight``/``up_lr_weight``) and
ranks/alphas (``block_dims``/``block_alphas``/``conv_block_dims``/``conv_block_alphas``), as ``networks.lora`` of
sd-scripts defines them, read off the kohya file names of the modules.

Blocks (sd-scripts ``get_block_index``):

- SD1/SD2, 25 blocks: a ``down_blocks_i`` module with ``resnets_j``/``attentions_j`` is block ``1 + 3i + j``, its
  ``downsamplers`` block ``1 + 3i + 2``; the mid block is 12; ``up_blocks_i`` is ``13 + 3i + j`` (upsamplers
  ``13 + 3i + 2``). Block 0 holds no module; ``conv_in``, the time embedding and ``conv_out`` are in no block.
- SDXL (sgm names), 23 blocks: ``time_embed``/``label_emb`` 0, ``input_blocks_i`` ``1 + i``, ``middle_block_i``
  ``10 + i``, ``output_blocks_i`` ``13 + i``, ``out`` 22.

Learning-rate factors list the down blocks shallow → deep (12 values; SDXL 9), the mid block(s) (1; SDXL 3) and the up
blocks deep → shallow (12; SDXL 9), as comma-separated numbers (an empty entry is 0) or, for down/up, a preset
``cosine``, ``sine``, ``linear``, ``reverse_linear`` or ``zeros`` with an optional ``+offset``. A short list is filled
with 1, a long one cut (sd-scripts warns). Unset parts are 1; SDXL's blocks 0 and 22 are always 1. Factors at or below
``block_lr_zero_threshold`` become 0, and a block whose factor is 0 gets no adapter at all (sd-scripts
``remove_block_dims_and_alphas``). A UNet module outside every block keeps factor 1 and the network's rank (sd-scripts
would index its lists with -1; its own targets never include such modules).

``block_dims`` (one rank per block, 25 or 23 values; 0 = no adapter in that block) and ``block_alphas`` set the rank and
alpha of Linear/1×1-conv modules, ``conv_block_dims``/``conv_block_alphas`` those of k×k convs; unset lists fall back
to the network's ``rank``/``alpha``/``conv_rank``/``conv_alpha``. Text-encoder modules are never affected.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .arch import UNET_PREFIX, get_architecture
from .base import AdapterConfig, ConfigError, LowRankConfig

SD_BLOCKS, SD_DOWN, SD_MID = 25, 12, 1  # sd-scripts LoRANetwork.NUM_OF_BLOCKS, NUM_OF_MID_BLOCKS
SDXL_BLOCKS, SDXL_DOWN, SDXL_MID = 23, 9, 3  # SDXL_NUM_OF_BLOCKS, SDXL_NUM_OF_MID_BLOCKS
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
_UP_DOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


UNET_ARCHITECTURES = ("sd1", "sd2", "sdxl")


def is_sgm(arch: str) -> bool:
    if arch not in UNET_ARCHITECTURES:
        raise ConfigError(f"the per-block options (network.down_lr_weight, block_dims, …) are sd-scripts' UNet blocks "
                          f"of SD1/SD2/SDXL; this model is {arch}")
    return get_architecture(arch).sgm_unet_names


def block_count(arch: str) -> int:
    return SDXL_BLOCKS if is_sgm(arch) else SD_BLOCKS


def block_index(name: str, arch: str) -> int:
    """The block of a UNet module's file name (sd-scripts ``get_block_index``); -1 for text-encoder modules and
    UNet modules outside every block."""
    if not name.startswith(UNET_PREFIX + "_"):
        return -1
    if not is_sgm(arch):
        match = _UP_DOWN.search(name)
        if match:
            side, block, kind, layer = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            position = 3 * block + (2 if kind in ("upsamplers", "downsamplers") else layer)
            return 1 + position if side == "down" else SD_DOWN + 1 + position
        return SD_DOWN if "mid_block_" in name else -1
    rest = name[len(UNET_PREFIX) + 1:]
    if rest.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if rest.startswith(prefix):
            return first + int(rest[len(prefix):].split("_")[0])
    return SDXL_BLOCKS - 1 if rest.startswith("out_") else -1


# ----- parsing -------------------------------------------------------------------------------------------------
def _numbers(key: str, text: str, kind: type) -> list[Any]:
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(kind(float(part)) if part else kind(0))
        except ValueError:
            raise ConfigError(f"network.{key} = {text!r}: {part!r} is not a number; write comma-separated "
                              "numbers as in sd-scripts' network_args") from None
    return values


def _lr_list(key: str, text: str, length: int) -> list[float]:
    """sd-scripts' ``get_list`` for presets, or the numbers; filled with 1 / cut to ``length``."""
    name, _, offset = text.strip().partition("+")
    if name in LR_PRESETS and key != "mid_lr_weight":
        base = float(offset) if offset else 0.0
        steps = [i / (length - 1) for i in range(length)]
        curve = {"cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
                 "sine": [math.sin(math.pi * s / 2) for s in steps],
                 "linear": steps, "reverse_linear": list(reversed(steps)), "zeros": [0.0] * length}[name]
        return [value + base for value in curve]
    if name.strip().isidentifier():
        raise ConfigError(f"network.{key} = {text!r}: unknown preset; use comma-separated numbers or one of "
                          f"{', '.join(LR_PRESETS)} (with an optional +offset)")
    values = _numbers(key, text, float)
    return (values + [1.0] * length)[:length]


def lr_weights(section: Any, arch: str) -> list[float] | None:
    """The learning-rate factor of every block (sd-scripts ``get_block_lr_weight``), or None when no factor is
    set. ``section`` is the [network] section."""
    if not any(getattr(section, key) for key in LR_KEYS):
        return None
    sgm = is_sgm(arch)
    down_length, mid_length = (SDXL_DOWN, SDXL_MID) if sgm else (SD_DOWN, SD_MID)
    threshold = section.block_lr_zero_threshold
    parts = []
    for key, length in (("down_lr_weight", down_length), ("mid_lr_weight", mid_length),
                        ("up_lr_weight", down_length)):
        text = getattr(section, key)
        if text:
            parts.extend(value if value > threshold else 0.0 for value in _lr_list(key, text, length))
        else:
            parts.extend([1.0] * length)
    return [1.0, *parts, 1.0] if sgm else parts


def block_dims(section: Any, arch: str) -> dict[str, list[float] | None]:
    """``block_dims`` … ``conv_block_alphas`` parsed, each None when unset; lengths checked against ``arch``."""
    count = block_count(arch)
    result: dict[str, list[float] | None] = {}
    for key in DIM_KEYS:
        text = getattr(section, key)
        if not text:
            result[key] = None
            continue
        values = _numbers(key, text, int if key.endswith("dims") else float)
        if len(values) != count:
            raise ConfigError(f"network.{key} has {len(values)} value(s); {arch} models have {count} blocks "
                              f"({SD_BLOCKS} for SD1/SD2, {SDXL_BLOCKS} for SDXL), one value each")
        result[key] = values
    return result


def check_block_options(section: Any) -> None:
    """Syntax checks that need no model (config loading): numbers or presets, and list lengths."""
    for key in LR_KEYS:
        if getattr(section, key):
            _lr_list(key, getattr(section, key), SD_DOWN)
    for key in DIM_KEYS:
        text = getattr(section, key)
        if text:
            values = _numbers(key, text, int if key.endswith("dims") else float)
            if len(values) not in (SD_BLOCKS, SDXL_BLOCKS):
                raise ConfigError(f"network.{key} has {len(values)} value(s); give one per block: {SD_BLOCKS} for "
                                  f"SD1/SD2, {SDXL_BLOCKS} for SDXL")
            if key.endswith("dims") and min(values) < 0:
                raise ConfigError(f"network.{key}: ranks must be ≥ 0 (0 = no adapter in that block)")
    if (section.block_alphas and not section.block_dims) or (section.conv_block_alphas and not section.conv_block_dims):
        raise ConfigError("network.block_alphas / conv_block_alphas need block_dims / conv_block_dims")


def uses_blocks(section: Any) -> bool:
    return any(getattr(section, key) for key in (*LR_KEYS, *DIM_KEYS))


# ----- what the network and the optimizer ask -----------------------------------------------------------------
def module_configurator(section: Any, arch: str,
                        config: AdapterConfig) -> Callable[[str, nn.Module], AdapterConfig | None] | None:
    """For :meth:`methods.network.AdapterNetwork.create`: each UNet module's config with its block's rank and alpha,
    or None (no adapter) in a block with rank 0 or learning-rate factor 0. None when no block option is set."""
    if not uses_blocks(section):
        return None
    dims = block_dims(section, arch)
    if any(dims.values()) and not isinstance(config, LowRankConfig):
        raise ConfigError("network.block_dims / conv_block_dims set ranks, and this method has none; use them with "
                          "lora, loha, lokr or glora")
    weights = lr_weights(section, arch)

    def configure(name: str, base: nn.Module) -> AdapterConfig | None:
        index = block_index(name, arch)
        if index < 0:
            return config
        if weights is not None and weights[index] == 0:
            return None
        changes = {}
        for field, key in (("rank", "block_dims"), ("alpha", "block_alphas"), ("conv_rank", "conv_block_dims"),
                           ("conv_alpha", "conv_block_alphas")):
            if dims[key] is not None:
                changes[field] = dims[key][index]
        if not changes:
            return config
        adapted = dataclasses.replace(config, **changes)
        return adapted if adapted.rank_and_alpha_for(base)[0] > 0 else None

    return configure


def unet_block_groups(adapters: dict[str, nn.Module], arch: str) -> dict[int, list[nn.Parameter]]:
    """Trainable parameters of the UNet adapters by block (-1: outside every block), in first-seen order."""
    groups: dict[int, list[nn.Parameter]] = {}
    for name, adapter in adapters.items():
        if name.startswith(UNET_PREFIX + "_"):
            groups.setdefault(block_index(name, arch), []).extend(p for p in adapter.parameters() if p.requires_grad)
    return groups


def block_network_args(section: Any) -> dict[str, str]:
    """The set block options under their sd-scripts names, for ``ss_network_args``."""
    keys = (*LR_KEYS, "block_lr_zero_threshold", *DIM_KEYS)
    return {key: str(getattr(section, key)) for key in keys if getattr(section, key)}


__all__ = ["block_count", "block_dims", "block_index", "block_network_args", "check_block_options", "lr_weights",
           "module_configurator", "unet_block_groups", "uses_blocks"]
