"""Text conditioning and one transformer call for SD3/SD3.5 and FLUX.1, as their diffusers pipelines do them.

SD3 (``StableDiffusion3Pipeline.encode_prompt``): CLIP-L and CLIP-G each give their penultimate hidden states
(77 tokens) and their projected pooled output; the two hidden states are concatenated along the features
(768 + 1280), zero-padded to T5's width (4096) and put before T5-XXL's ``t5_max_length`` tokens; the pooled vector
is CLIP-L's and CLIP-G's side by side (2048). Without T5 (``text_encoder_3`` None) its tokens are zeros.
Flux (``FluxPipeline.encode_prompt``): CLIP-L's pooled output (768) and T5-XXL's last hidden states.

Both fit :class:`trainer.conditioning.Conditioning` (hidden_states, pooled), so the text-embedding cache holds
them unchanged. ``clip_skip`` keeps the project's (kohya's) meaning: 1 is SD3's default penultimate layer, 2 one
further back (diffusers' ``clip_skip = 1``).

:func:`predict` calls the transformer on unpacked latents ``(B, 16, H, W)`` and returns the velocity in the same
shape; Flux latents are packed into 2×2-patch tokens with their position ids, the timestep is σ (the model scales
it by 1000 itself) and ``guidance`` feeds FLUX.1 dev's guidance embedder.
"""

from __future__ import annotations

from typing import Any

import torch

from .conditioning import Conditioning, tokenize
from .flow_matching import latent_image_ids, pack_latents, text_ids, timesteps_of, unpack_latents


def _clip(tokenizer: Any, encoder: Any, captions: list[str], hidden_index: int | None):
    ids = tokenize(tokenizer, captions, encoder.device, encoder)
    output = encoder(ids, output_hidden_states=hidden_index is not None)
    pooled = output[0] if hidden_index is not None else output.pooler_output
    hidden = output.hidden_states[hidden_index] if hidden_index is not None else None
    return hidden, pooled


def _t5(tokenizer: Any, encoder: Any, captions: list[str], max_length: int) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    return encoder(ids.to(encoder.device))[0]


def encode_sd3(pipe: Any, captions: list[str], t5_max_length: int = 256, clip_skip: int = 1) -> Conditioning:
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be 1 or more, got {clip_skip}")
    hidden_index = -(clip_skip + 1)
    clip_l, pooled_l = _clip(pipe.tokenizer, pipe.text_encoder, captions, hidden_index)
    clip_g, pooled_g = _clip(pipe.tokenizer_2, pipe.text_encoder_2, captions, hidden_index)
    clip = torch.cat([clip_l, clip_g.to(clip_l.dtype)], dim=-1)
    width = pipe.transformer.config.joint_attention_dim
    if getattr(pipe, "text_encoder_3", None) is not None:
        t5 = _t5(pipe.tokenizer_3, pipe.text_encoder_3, captions, t5_max_length)
    else:
        t5 = torch.zeros(len(captions), t5_max_length, width, device=clip.device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))


def encode_flux(pipe: Any, captions: list[str], t5_max_length: int = 512) -> Conditioning:
    _, pooled = _clip(pipe.tokenizer, pipe.text_encoder, captions, None)
    hidden = _t5(pipe.tokenizer_2, pipe.text_encoder_2, captions, t5_max_length)
    return Conditioning(hidden, pooled)


def encode(pipe: Any, family: str, captions: list[str], t5_max_length: int, clip_skip: int = 1) -> Conditioning:
    if family == "sd3":
        return encode_sd3(pipe, captions, t5_max_length, clip_skip)
    if family == "flux":
        if clip_skip != 1:
            raise ValueError("clip_skip does not apply to Flux (it reads only CLIP-L's pooled output); leave it at 1")
        return encode_flux(pipe, captions, t5_max_length)
    raise ValueError(f"unknown family {family!r}; sd3 or flux")


def predict(transformer: Any, family: str, latents: torch.Tensor, sigmas: torch.Tensor, conditioning: Conditioning,
            guidance: float | None = None) -> torch.Tensor:
    """The transformer's velocity for latents ``(B, C, H, W)`` at noise levels ``sigmas (B,)``, same shape."""
    batch = latents.shape[0]
    sigmas = sigmas.to(latents.device, latents.dtype).expand(batch)
    if family == "sd3":
        return transformer(hidden_states=latents, timestep=timesteps_of(sigmas),
                           encoder_hidden_states=conditioning.hidden_states,
                           pooled_projections=conditioning.pooled, return_dict=False)[0]
    if family != "flux":
        raise ValueError(f"unknown family {family!r}; sd3 or flux")
    height, width = latents.shape[-2:]
    guidance_vector = None
    if transformer.config.guidance_embeds:
        if guidance is None:
            raise ValueError("this Flux transformer embeds a guidance scale (FLUX.1 dev): pass guidance")
        guidance_vector = torch.full((batch,), float(guidance), device=latents.device, dtype=torch.float32)
    tokens = transformer(
        hidden_states=pack_latents(latents), timestep=sigmas, guidance=guidance_vector,
        pooled_projections=conditioning.pooled, encoder_hidden_states=conditioning.hidden_states,
        txt_ids=text_ids(conditioning.hidden_states.shape[1], latents.device, latents.dtype),
        img_ids=latent_image_ids(height, width, latents.device, latents.dtype), return_dict=False)[0]
    return unpack_latents(tokens, height, width)
