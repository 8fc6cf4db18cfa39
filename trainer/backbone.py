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
from .objective import DiffusionObjective, NoisedBatch, zero_terminal_snr_scheduler


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
    max_token_length: int = 75  # dataset.max_token_length: captions beyond 77 tokens in chunks (sd-scripts)
    weighted_captions: bool = False  # dataset.weighted_captions: (word:1.2) attention weights

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
                conditioning = encode_captions(self.pipe, captions, clip_skip, self.is_sdxl, self.max_token_length,
                                               self.weighted_captions)
            return conditioning.to(self.device, self.weight_dtype)

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            # One caption at a time: an entry must not depend on which captions it was first batched with
            # (CPU kernels may round differently per batch size), or a resumed run would drift from the original.
            parts = [encode_captions(self.pipe, [text], clip_skip, self.is_sdxl, self.max_token_length,
                                     self.weighted_captions) for text in texts]
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
    if config.train.zero_terminal_snr:
        pipe.scheduler = zero_terminal_snr_scheduler(pipe.scheduler)  # previews sample with the rescaled schedule
    objective = DiffusionObjective(pipe.scheduler.config, info.prediction_type, config.train)
    models = Models(pipe, info.arch, info.prediction_type, info.source_kind, device, weight_dtype, vae_dtype,
                    objective, config.dataset.max_token_length, config.dataset.weighted_captions)
    if config.network.base_weights:
        merge_base_weights(pipe, info.arch, config.network.base_weights, config.network.base_weights_multiplier)
    for model in models.text_encoders() + [pipe.unet, pipe.vae]:
        model.requires_grad_(False)
        model.eval()
    pipe.unet.to(device, weight_dtype)
    for encoder in models.text_encoders():
        encoder.to(device, weight_dtype)
    pipe.vae.to(device, vae_dtype)
    if config.train.fp8_base or config.train.fp8_base_unet:
        frozen = [pipe.unet] + ([] if config.train.fp8_base_unet else models.text_encoders())
        for model in frozen:
            store_in_fp8(model, weight_dtype, device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if not config.train.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    return models


def merge_base_weights(pipe: Any, arch: str, files: list[str], multipliers: list[float]) -> None:
    """sd-scripts' ``base_weights``: merge each adapter file (of any method) into the frozen base, at its
    ``base_weights_multiplier`` (default 1), before the new adapters are built — they then learn on top of it."""
    from methods.apply import network_from_tensors
    from methods.files import AdapterFileError, load_adapter_file

    for index, file in enumerate(files):
        multiplier = multipliers[index] if index < len(multipliers) else 1.0
        try:
            tensors, metadata = load_adapter_file(file)
            network, _ = network_from_tensors(pipe, file, tensors, metadata, arch)
        except (AdapterFileError, OSError) as error:
            raise ConfigError(f"network.base_weights[{index}] = {file!r}: {error}") from error
        network.merge(multiplier, keep_original=False)
        log.info("merged %s (%d modules) into the base at strength %s", file, len(network), multiplier)


FP8 = getattr(torch, "float8_e4m3fn", None)


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """sd-scripts' ``fp8_base``: keep a frozen model's Linear/Conv2d weights in float8 (e4m3) — a quarter of their fp32
    memory — and upcast each to ``compute_dtype`` only inside its own call. CUDA only; elsewhere a ConfigError.
    Returns the number of layers stored in fp8 (see :func:`cast_weights_to_fp8`)."""
    if FP8 is None:
        raise ConfigError(f"train.fp8_base needs the float8 dtypes of torch ≥ 2.1; this is torch {torch.__version__}")
    if device.type != "cuda":
        raise ConfigError(f"train.fp8_base stores the base model in fp8 to save GPU memory, and this run is on "
                          f"{device.type}, which has no fp8 kernels worth it; set train.fp8_base = false "
                          "(and fp8_base_unet)")
    return cast_weights_to_fp8(model, compute_dtype)


def cast_weights_to_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """The mechanism of :func:`store_in_fp8`, on any device: each Linear/Conv2d weight becomes float8 and the layer's
    ``forward`` upcasts it for the call. A weight an adapter lends for a call (``W + s·ΔW``, already in a compute
    dtype) is used as it is; adapters never lend over fp8 (:meth:`methods.base.AdapterModule.rebuilds_weight`).
    Norms, embeddings and biases stay as they are: they are small, and sensitive to rounding."""
    count = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or module.weight.dtype == FP8:
            continue
        module.weight.data = module.weight.data.to(FP8)
        module.forward = _upcasting_forward(module, type(module).forward, compute_dtype)
        count += 1
    return count


def _upcasting_forward(module: torch.nn.Module, forward: Callable, compute_dtype: torch.dtype) -> Callable:
    def upcast_forward(x: torch.Tensor) -> torch.Tensor:
        stored = module._parameters["weight"]
        if stored.dtype != FP8:
            return forward(module, x)
        module._parameters["weight"] = stored.to(compute_dtype)
        try:
            return forward(module, x)
        finally:
            module._parameters["weight"] = stored

    return upcast_forward


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


__all__ = ["Models", "cast_weights_to_fp8", "load_models", "load_vae", "merge_base_weights", "store_in_fp8"]
