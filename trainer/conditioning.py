"""Text conditioning for SD1/SD2 (one CLIP) and SDXL (two CLIPs, pooled embedding and size/crop ids)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Conditioning:
    hidden_states: torch.Tensor  # (B, 77, C)
    pooled: torch.Tensor | None = None  # SDXL: (B, 1280) from the second encoder

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        pooled = self.pooled.to(device, dtype) if self.pooled is not None else None
        return Conditioning(self.hidden_states.to(device, dtype), pooled)

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        pooled = torch.cat([c.pooled for c in items]) if items[0].pooled is not None else None
        return Conditioning(torch.cat([c.hidden_states for c in items]), pooled)

    def split(self) -> list[Conditioning]:
        count = self.hidden_states.shape[0]
        return [Conditioning(self.hidden_states[i:i + 1],
                             self.pooled[i:i + 1] if self.pooled is not None else None) for i in range(count)]


def tokenize(tokenizer: Any, captions: list[str], device: torch.device, encoder: Any = None) -> torch.Tensor:
    """Token ids padded/truncated to the encoder's positions (77 for CLIP).

    A tokenizer saved without ``tokenizer_config.json`` (vocab + merges only) reports a ``model_max_length`` of
    1e30, which the fast tokenizer cannot even pass to its backend, so the encoder's size bounds it.
    """
    length = tokenizer.model_max_length
    positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
    if positions is not None:
        length = min(length, positions)
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_captions(pipe: Any, captions: list[str], clip_skip: int = 1, is_sdxl: bool = False) -> Conditioning:
    """Hidden states as the pipelines compute them; ``clip_skip`` 2 takes the penultimate layer (kohya's sense).

    SD1/SD2 apply the final layer norm to a skipped layer as diffusers' pipelines do; SDXL uses the penultimate
    layer of both encoders (plus ``clip_skip - 1`` more) without it, and the pooled projection of the second.
    """
    device = pipe.text_encoder.device if pipe.text_encoder is not None else torch.device("cpu")
    if not is_sdxl:
        ids = tokenize(pipe.tokenizer, captions, device, pipe.text_encoder)
        if clip_skip <= 1:
            return Conditioning(pipe.text_encoder(ids)[0])
        output = pipe.text_encoder(ids, output_hidden_states=True)
        hidden = output.hidden_states[-clip_skip]
        return Conditioning(_final_layer_norm(pipe.text_encoder)(hidden))
    hidden_states = []
    pooled = None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenize(tokenizer, captions, encoder.device, encoder)
        output = encoder(ids, output_hidden_states=True)
        hidden_states.append(output.hidden_states[-(clip_skip + 1)])
        pooled = output[0] if encoder is pipe.text_encoder_2 else pooled
    return Conditioning(torch.cat(hidden_states, dim=-1), pooled)


def _final_layer_norm(encoder: Any):
    model = getattr(encoder, "text_model", encoder)
    return model.final_layer_norm


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor,
                  device, dtype) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per sample, each input (B, 2)."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).to(device, dtype)
