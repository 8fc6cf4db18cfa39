"""Which layers of an SD3/SD3.5 or Flux transformer and of a T5 encoder get adapters (the presets of
:mod:`methods.targets`, read for diffusion transformers).

Transformer presets, over the Linear/Conv2d layers of ``transformer_blocks`` (SD3 joint blocks, Flux double
blocks) and ``single_transformer_blocks`` (Flux):

- ``attention``: the projections of the attention layers — ``to_q/to_k/to_v/to_out.0`` of the image stream,
  ``add_q_proj/add_k_proj/add_v_proj/to_add_out`` of the text stream, SD3.5's second image attention ``attn2``;
  Flux single blocks have only ``to_q/to_k/to_v`` there (their output projection ``proj_out`` is fused with the
  MLP's, so it counts as MLP). diffusers' default LoRA targets for SD3, plus SD3.5 medium's ``attn2``.
- ``attention_mlp``: every layer of the blocks except the modulation (``norm*.linear``): adds ``ff``/``ff_context``
  and Flux's ``proj_mlp``/``proj_out``. diffusers' Flux default plus the single blocks' MLP.
- ``full``: every Linear/Conv2d of the transformer: adds the modulation layers (kohya's Flux and SD3 defaults train
  these too) and the embedders and final layer (kohya's ``in_dims`` / ``emb_dims``: ``x_embedder``/``pos_embed.proj``,
  ``context_embedder``, the timestep, pooled-text and guidance embedders, ``norm_out.linear``, ``proj_out``).

No preset takes the text-stream query of SD3's last block (``attn.add_q_proj`` where ``context_pre_only``): that block
discards its text output, so the text queries, which only shape it, never receive a gradient.

T5 presets: ``attention`` the ``SelfAttention`` q/k/v/o, ``attention_mlp`` and ``full`` also the gated MLP
(``wi_0``, ``wi_1``, ``wo``). CLIP encoders keep :func:`methods.targets.text_encoder_targets`.
"""

from __future__ import annotations

import re

from torch import nn

from .base import WRAPPABLE
from .targets import normalise_preset, text_encoder_targets

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.(.+)$")
_ATTENTION = re.compile(r"^attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
_MODULATION = re.compile(r"^norm[^.]*\.linear$")
_T5_ATTENTION = re.compile(r"\.SelfAttention\.(q|k|v|o)$")
_T5_MLP = re.compile(r"\.DenseReluDense\.(wi|wi_0|wi_1|wo)$")


def transformer_targets(transformer: nn.Module, preset: str) -> dict[str, nn.Module]:
    """diffusers path → layer for a preset, in model order."""
    preset = normalise_preset(preset)
    dead = {f"transformer_blocks.{index}.attn.add_q_proj"
            for index, block in enumerate(getattr(transformer, "transformer_blocks", ()))
            if getattr(block, "context_pre_only", False)}
    found: dict[str, nn.Module] = {}
    for path, module in transformer.named_modules():
        if not isinstance(module, WRAPPABLE) or path in dead:
            continue
        match = _BLOCK.match(path)
        inner = match[2] if match else None
        if preset == "full":
            chosen = True
        elif inner is None or _MODULATION.match(inner):
            chosen = False
        else:
            chosen = preset == "attention_mlp" or bool(_ATTENTION.match(inner))
        if chosen:
            found[path] = module
    return found


def t5_targets(encoder: nn.Module, preset: str) -> dict[str, nn.Module]:
    preset = normalise_preset(preset)
    found: dict[str, nn.Module] = {}
    for path, module in encoder.named_modules():
        if isinstance(module, nn.Linear) and (
                _T5_ATTENTION.search(path) or (preset != "attention" and _T5_MLP.search(path))):
            found[path] = module
    return found


def is_t5(encoder: nn.Module) -> bool:
    return type(encoder).__name__.startswith("T5") or hasattr(getattr(encoder, "encoder", None), "block")


def dit_text_encoder_targets(encoder: nn.Module, preset: str) -> dict[str, nn.Module]:
    """CLIP or T5, by the encoder's structure."""
    return t5_targets(encoder, preset) if is_t5(encoder) else text_encoder_targets(encoder, preset)
