"""The frozen pipeline a run trains adapters on: loaded onto its device and dtypes, and what a training step
asks of it — pixels → latents (VAE), captions → conditioning (text encoders, optionally cached), and the
denoiser's prediction for a noised batch (UNet, with SDXL's size/crop conditioning).

The objective (:mod:`trainer.objective`) decides what is noised and predicted; this module only runs the models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from methods.base import ConfigError

from .conditioning import Conditioning, encode_captions, sdxl_time_ids
from .config import TrainerConfig
from .events import log
from .objective import DiffusionObjective, NoisedBatch


@dataclasses.dataclass
class Models:
    """The frozen pipeline on its devices and dtypes, and the objective it is trained with."""

    pipe: Any
    arch: str
    prediction_type: str
    source_kind: str
    device: torch.device
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype
    objective: DiffusionObjective

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    def text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if te is not None]

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's latents (cached, or encoded now) in float32 on the device."""
        latents = batch["latents"] if batch.get("latents") is not None else self.encode_pixels(batch["pixels"])
        return latents.to(self.device, torch.float32)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents of (B, 3, H, W) pixels in [-1, 1], scaled (and shifted) as the denoiser expects, on the CPU."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, self.vae_dtype)).latent_dist.mean
        if not torch.isfinite(latents).all() and self.vae_dtype != torch.float32:
            log.warning("the VAE produced NaN in %s; encoding in fp32 from now on", self.vae_dtype)
            self.vae_dtype = torch.float32
            vae.to(torch.float32)
            latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * vae.config.scaling_factor).cpu()

    def conditioning(self, captions: list[str], clip_skip: int, text_cache: Any | None,
                     train_text_encoder: bool) -> Conditioning:
        """Text conditioning on the device in the weight dtype; from ``text_cache`` while the encoders are frozen."""
        if text_cache is None:
            with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
                conditioning = encode_captions(self.pipe, captions, clip_skip, self.is_sdxl)
            return conditioning.to(self.device, self.weight_dtype)

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            # One caption at a time: an entry must not depend on which captions it was first batched with
            # (CPU kernels may round differently per batch size), or a resumed run would drift from the original.
            parts = [encode_captions(self.pipe, [text], clip_skip, self.is_sdxl) for text in texts]
            stacked = Conditioning.stack(parts)
            return stacked.hidden_states, stacked.pooled

        hidden, pooled = text_cache(captions, encode)
        return Conditioning(hidden, pooled).to(self.device, self.weight_dtype)

    def predict(self, noised: NoisedBatch, conditioning: Conditioning, batch: dict[str, Any],
                autocast: Callable[[], Any]) -> torch.Tensor:
        """The denoiser's output for a noised batch (under ``autocast``, accelerate's mixed precision)."""
        extra = {}
        if self.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"],
                                     self.device, self.weight_dtype)
            extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        with autocast():
            return self.pipe.unet(noised.model_input.to(self.weight_dtype), noised.timesteps,
                                  conditioning.hidden_states, **extra).sample


def load_models(config: TrainerConfig, device: torch.device) -> Models:
    """The base pipeline of ``config.model``, frozen, on ``device`` in the run's dtypes."""
    from .models import load_pipeline

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)
    arch = None if config.model.arch == "auto" else config.model.arch
    prediction = None if config.model.prediction_type == "auto" else config.model.prediction_type
    pipe, info = load_pipeline(config.model.base, arch=arch, prediction_type=prediction,
                               tokenizer=config.model.tokenizer or None)
    missing = [name for name in ("tokenizer", "tokenizer_2") if hasattr(pipe, name) and getattr(pipe, name) is None]
    if missing:
        raise ConfigError(f"model.base = {config.model.base!r} comes without a {missing[0]} (single-file "
                          "checkpoints carry none); set model.tokenizer to a folder with vocab.json and "
                          "merges.txt, or use a diffusers folder")
    if config.model.vae:
        pipe.vae = load_vae(config.model.vae, pipe.vae)
    vae_dtype = torch.float32 if config.model.vae_fp32 else weight_dtype
    objective = DiffusionObjective(pipe.scheduler.config, info.prediction_type, config.train)
    models = Models(pipe, info.arch, info.prediction_type, info.source_kind, device, weight_dtype, vae_dtype,
                    objective)
    for model in models.text_encoders() + [pipe.unet, pipe.vae]:
        model.requires_grad_(False)
        model.eval()
    pipe.unet.to(device, weight_dtype)
    for encoder in models.text_encoders():
        encoder.to(device, weight_dtype)
    pipe.vae.to(device, vae_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if not config.train.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    return models


def load_vae(source: str, current: Any):
    """A replacement VAE from a diffusers folder (with or without a ``vae`` sub-folder) or a single file."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return AutoencoderKL.from_pretrained(str(folder))
    if path.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as config_dir:
            current.save_config(config_dir)
            return AutoencoderKL.from_single_file(str(path), config=config_dir)
    raise ConfigError(f"model.vae = {source!r}: no such file or folder")


__all__ = ["Models", "load_models", "load_vae"]
