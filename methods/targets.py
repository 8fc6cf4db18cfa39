"""Which layers of a UNet and CLIP text encoder get adapters (format spec §1.5).

Presets, by the module classes kohya's trainer uses:

- ``attention``: the q/k/v/out projections of attention layers;
- ``attention_mlp`` (kohya's default): every Linear/Conv2d inside a ``Transformer2DModel`` (attention, feed-forward,
  proj_in/out) and inside CLIP attention and MLP blocks;
- ``full`` (LoCon style): the above plus every Linear/Conv2d in resnet, downsample and upsample blocks.

``include``/``exclude`` are regular expressions searched in the module path (``down_blocks.0.resnets.0.conv1``)
or in its file name (``lora_unet_down_blocks_0_resnets_0_conv1``): include adds matching Linear/Conv2d layers,
exclude removes them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

from torch import nn

from .base import WRAPPABLE, ConfigError

PRESETS = ("attention", "attention_mlp", "full")
PRESET_ALIASES = {"attn": "attention", "attn_mlp": "attention_mlp", "kohya": "attention_mlp", "all": "full",
                  "locon": "full"}

_UNET_TRANSFORMER = ("Transformer2DModel",)
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_ATTENTION_PROJECTIONS = re.compile(r"(^|\.)(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)$")


@dataclasses.dataclass
class TargetConfig:
    """Where adapters go. ``text_encoder_preset = "none"`` leaves the text encoder(s) untouched."""

    preset: str = "attention_mlp"
    text_encoder_preset: str | None = None  # None → same as preset; "none" → no text-encoder adapters
    include: list[str] = dataclasses.field(default_factory=list)
    exclude: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        for key in ("preset", "text_encoder_preset"):
            value = getattr(self, key)
            if value is None or (key == "text_encoder_preset" and value == "none"):
                continue
            if not isinstance(value, str) or normalise_preset(value) not in PRESETS:
                allowed = ", ".join(PRESETS + (("none",) if key == "text_encoder_preset" else ()))
                raise ConfigError(f"network.{key} = {value!r} is not a target preset; allowed: {allowed}")
        for key in ("include", "exclude"):
            patterns = getattr(self, key)
            # A bare string would be iterated character by character, each a valid pattern matching nearly all.
            if not isinstance(patterns, list | tuple) or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"network.{key} must be a list of regular expressions, got {patterns!r}")
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as error:
                    message = f"network.{key}: {pattern!r} is not a valid regular expression ({error})"
                    raise ConfigError(message) from error


def normalise_preset(name: str) -> str:
    return PRESET_ALIASES.get(name, name)


def _descendants(module: nn.Module, class_names: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    """Linear/Conv2d layers below any module whose class name is in ``class_names`` (paths relative to root)."""
    seen: set[int] = set()
    for path, parent in module.named_modules():
        if type(parent).__name__ not in class_names:
            continue
        for child_path, child in parent.named_modules():
            if isinstance(child, WRAPPABLE) and id(child) not in seen:
                seen.add(id(child))
                yield (f"{path}.{child_path}" if path else child_path), child


def _is_clip_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.startswith("CLIP") and name.endswith("Attention")


def unet_targets(unet: nn.Module, preset: str) -> dict[str, nn.Module]:
    preset = normalise_preset(preset)
    found = dict(_descendants(unet, _UNET_TRANSFORMER))
    if preset == "attention":
        found = {path: m for path, m in found.items() if ".attn" in path and _ATTENTION_PROJECTIONS.search(path)}
    elif preset == "full":
        found.update(_descendants(unet, _UNET_CONV_BLOCKS))
    return found


def text_encoder_targets(text_encoder: nn.Module, preset: str) -> dict[str, nn.Module]:
    preset = normalise_preset(preset)
    found: dict[str, nn.Module] = {}
    for path, parent in text_encoder.named_modules():
        is_attention = _is_clip_attention(parent)
        is_mlp = type(parent).__name__ == "CLIPMLP"
        if not (is_attention or (is_mlp and preset != "attention")):
            continue
        for child_path, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found[f"{path}.{child_path}"] = child
    return found


def select(
    root: nn.Module,
    preset: str,
    base_targets: Callable[[nn.Module, str], dict[str, nn.Module]],
    file_name: Callable[[str], str],
    config: TargetConfig,
) -> dict[str, nn.Module]:
    """Apply a preset plus include/exclude patterns; returns diffusers path → layer, in model order."""
    chosen = base_targets(root, preset) if preset != "none" else {}

    def matches(patterns: list[str], path: str) -> bool:
        return any(re.search(p, path) or re.search(p, file_name(path)) for p in patterns)

    if config.include:
        for path, module in root.named_modules():
            if isinstance(module, WRAPPABLE) and path not in chosen and matches(config.include, path):
                chosen[path] = module
    if config.exclude:
        chosen = {path: m for path, m in chosen.items() if not matches(config.exclude, path)}
    order = {path: index for index, (path, _) in enumerate(root.named_modules())}
    return dict(sorted(chosen.items(), key=lambda item: order.get(item[0], 0)))
