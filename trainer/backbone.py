"""The frozen pipeline a run trains adapters on: loaded onto its device and dtypes, and what a training step
asks of it — pixels → latents (VAE), captions → conditioning (text encoders, optionally cached), and the
denoiser's prediction for a noised batch (UNet, with SDXL's size/crop conditioning; or the SD3/Flux transformer,
with Flux's packed tokens and dev's guidance embedding: :mod:`trainer.dit_conditioning`).

The objective (:mod:`trainer.objective`) decides what is noised and predicted; this module only runs the models.
SD1/SD2/SDXL train with :class:`~trainer.objective.DiffusionObjective`, SD3/SD3.5 and FLUX.1 with
:class:`~trainer.objective.FlowMatchingObjective` (options in the ``[dit]`` config section).

:func:`store_in_fp8` keeps the frozen denoiser's and text encoders' Linear/Conv2d weights in float8
(``train.fp8_base``, sd-scripts' name) for any base, CUDA only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.base import ConfigError

from .conditioning import Conditioning, encode_captions, sdxl_time_ids
from .config import DiTSection, TrainerConfig
from .events import log
from .models import FLOW
from .objective import (
    DiffusionObjective,
    FlowMatchingObjective,
    NoisedBatch,
    Objective,
    diffusion_only_options,
    zero_terminal_snr_scheduler,
)

FP8 = getattr(torch, "float8_e4m3fn", None)


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
    objective: Objective
    variant: str = ""  # SD3/Flux: sd3.5-large, flux-dev, … (trainer/dit_architectures.py)
    t5_max_length: int = 0  # SD3/Flux: T5 tokens per caption, in training and previews
    guidance: float | None = None  # FLUX.1 dev: the embedded guidance scale while training
    max_token_length: int = 75  # dataset.max_token_length: SD/SDXL captions beyond 77 tokens in chunks (sd-scripts)
    weighted_captions: bool = False  # dataset.weighted_captions: (word:1.2) attention weights

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def family(self) -> str | None:
        """sd3 or flux for the diffusion transformers, else None."""
        return self.arch if self.prediction_type == FLOW else None

    @property
    def denoiser(self) -> nn.Module:
        """The model adapters train on besides the text encoders: the UNet, or the SD3/Flux transformer."""
        return self.pipe.transformer if self.family else self.pipe.unet

    def text_encoders(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [te for te in (getattr(self.pipe, name, None) for name in names) if te is not None]

    def encode_text(self, captions: list[str], clip_skip: int) -> Conditioning:
        """Conditioning as the pipelines compute it (SD3/Flux: CLIP and T5 as in their diffusers pipelines)."""
        if self.family:
            from .dit_conditioning import encode

            return encode(self.pipe, self.family, captions, self.t5_max_length, clip_skip)
        return encode_captions(self.pipe, captions, clip_skip, self.is_sdxl, self.max_token_length,
                               self.weighted_captions)

    def text_cache_id(self, base: str) -> str:
        """What identifies the text encoders' outputs in the text-embedding cache (SD3/Flux: with the T5 length)."""
        return f"{base}|t5={self.t5_max_length}" if self.family else base

    def metadata(self) -> dict[str, Any]:
        """The kohya ``ss_*`` keys of this base's objective (SD3/Flux, as sd-scripts names them)."""
        if not self.family:
            return {}
        values = {**self.objective.metadata(), "ss_apply_t5_attn_mask": False,
                  "ss_t5xxl_max_token_length": self.t5_max_length}
        if self.family == "flux":
            values.update(ss_model_type="flux", ss_guidance_scale=self.guidance)
        else:
            values["ss_apply_lg_attn_mask"] = False
        return values

    def preview_options(self) -> dict[str, Any]:
        """Options of :func:`trainer.sampling.render_previews` this base needs (SD3/Flux: the T5 length)."""
        return {"max_sequence_length": self.t5_max_length} if self.family else {}

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
                conditioning = self.encode_text(captions, clip_skip)
            return conditioning.to(self.device, self.weight_dtype)

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            # One caption at a time: an entry must not depend on which captions it was first batched with
            # (CPU kernels may round differently per batch size), or a resumed run would drift from the original.
            parts = [self.encode_text([text], clip_skip) for text in texts]
            stacked = Conditioning.stack(parts)
            return stacked.hidden_states, stacked.pooled

        hidden, pooled = text_cache(captions, encode)
        return Conditioning(hidden, pooled).to(self.device, self.weight_dtype)

    def predict(self, noised: NoisedBatch, conditioning: Conditioning, batch: dict[str, Any],
                autocast: Callable[[], Any]) -> torch.Tensor:
        """The denoiser's output for a noised batch (under ``autocast``, accelerate's mixed precision)."""
        if self.family:
            from .dit_conditioning import predict

            with autocast():
                return predict(self.denoiser, self.family, noised.model_input.to(self.weight_dtype),
                               noised.timesteps, conditioning, self.guidance)
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
                               tokenizer=config.model.tokenizer or None, config=config.model.config or None)
    missing = [name for name in ("tokenizer", "tokenizer_2") if hasattr(pipe, name) and getattr(pipe, name) is None]
    if missing:
        raise ConfigError(f"model.base = {config.model.base!r} comes without a {missing[0]} (single-file "
                          "checkpoints carry none); set model.tokenizer to a folder with vocab.json and "
                          "merges.txt, or use a diffusers folder")
    if config.model.vae:
        pipe.vae = load_vae(config.model.vae, pipe.vae)
    vae_dtype = torch.float32 if config.model.vae_fp32 else weight_dtype
    if info.prediction_type == FLOW:
        models = _dit_models(config, pipe, info, device, weight_dtype, vae_dtype)
    else:
        _check_no_dit_options(config, info.arch)
        if config.train.zero_terminal_snr:
            pipe.scheduler = zero_terminal_snr_scheduler(pipe.scheduler)  # previews sample the rescaled schedule
        objective = DiffusionObjective(pipe.scheduler.config, info.prediction_type, config.train)
        models = Models(pipe, info.arch, info.prediction_type, info.source_kind, device, weight_dtype, vae_dtype,
                        objective, max_token_length=config.dataset.max_token_length,
                        weighted_captions=config.dataset.weighted_captions)
    if config.network.base_weights:
        merge_base_weights(pipe, info.arch, config.network.base_weights, config.network.base_weights_multiplier)
    for model in models.text_encoders() + [models.denoiser, pipe.vae]:
        model.requires_grad_(False)
        model.eval()
    models.denoiser.to(device, weight_dtype)
    for encoder in models.text_encoders():
        encoder.to(device, weight_dtype)
    pipe.vae.to(device, vae_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if not config.train.sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        pipe.unet.set_attn_processor(AttnProcessor())
    if config.train.fp8_base or config.train.fp8_base_unet:
        # the denoiser (UNet or SD3/Flux transformer) and, unless fp8_base_unet, the text encoders, as sd-scripts
        for model in [models.denoiser] + ([] if config.train.fp8_base_unet else models.text_encoders()):
            store_in_fp8(model, weight_dtype, device)
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


def _dit_models(config: TrainerConfig, pipe: Any, info: Any, device: torch.device, weight_dtype: torch.dtype,
                vae_dtype: torch.dtype) -> Models:
    """SD3/Flux: the flow-matching objective of ``[dit]`` and the variant's T5 length and guidance."""
    from .dit_architectures import VARIANTS
    from .flow_matching import FlowMatchingError, config_for

    train = config.train
    refused = [(key, why) for key, value, why in (
        ("train.min_snr_gamma", train.min_snr_gamma, "use dit.weighting_scheme (sigma_sqrt, cosmap)"),
        ("train.noise_offset", train.noise_offset, "flow matching blends latents with noise; there is no offset"),
        ("train.sdpa", not train.sdpa, "SD3/Flux attention runs through PyTorch's SDPA only"),
        *((f"train.{key}", changed, "an option of the SD/SDXL noise-prediction objective")
          for key, changed in diffusion_only_options(train)),
        ("dataset.max_token_length", config.dataset.max_token_length != 75,
         "CLIP reads 77 tokens and T5 dit.t5_max_length"),
        ("dataset.weighted_captions", config.dataset.weighted_captions, "sd-scripts weights SD/SDXL captions only"),
    ) if value]
    if refused:
        key, why = refused[0]
        raise ConfigError(f"{key} does not apply to {info.variant_title} (flow matching): {why}; leave it at its "
                          "default")
    # The transformer sees 2×2 patches of latents: image sides must be multiples of twice the VAE's downscaling.
    multiple = 2 * pipe.vae_scale_factor
    data = config.dataset
    sides = ([("dataset.bucket_step", data.bucket_step), ("dataset.min_bucket_side", data.min_bucket_side)]
             if data.enable_buckets else [("dataset.resolution", data.resolution)])
    uneven = [(key, value) for key, value in sides if value % multiple]
    if uneven:
        key, value = uneven[0]
        raise ConfigError(f"{key} = {value}: {info.variant_title} needs image sides in multiples of {multiple} "
                          f"(2×2 latent patches); use {value - value % multiple or multiple}")
    try:
        objective = FlowMatchingObjective(config_for(info.arch, config.dit))
    except FlowMatchingError as error:
        raise ConfigError(f"dit.{error}") from error
    variant = VARIANTS[info.variant]
    if config.sample.prompts:
        _check_dit_sampling(config, info)
    guidance = float(config.dit.guidance_scale) if pipe.transformer.config.get("guidance_embeds") else None
    return Models(pipe, info.arch, info.prediction_type, info.source_kind, device, weight_dtype, vae_dtype, objective,
                  variant=info.variant, t5_max_length=config.dit.t5_max_length or variant.t5_max_length,
                  guidance=guidance)


def _check_dit_sampling(config: TrainerConfig, info: Any) -> None:
    sample = config.sample
    if sample.sampler != "euler":
        raise ConfigError(f"sample.sampler = {sample.sampler!r} is a sampler for SD/SDXL; {info.variant_title} "
                          "previews use the pipeline's own flow-matching Euler sampler: set sample.sampler = \"euler\"")
    if sample.negative_prompt and info.arch == "flux":
        raise ConfigError("sample.negative_prompt: FLUX.1 is guidance-distilled and its pipeline takes no negative "
                          "prompt at this guidance; leave it empty")


def _check_no_dit_options(config: TrainerConfig, arch: str) -> None:
    """``[dit]`` options and the SD3/Flux file layouts do nothing on SD1/SD2/SDXL: say so rather than ignore them."""
    changed = [f"dit.{field.name}" for field in dataclasses.fields(DiTSection)
               if getattr(config.dit, field.name) != field.default]
    if config.output.file_layout not in ("auto", "kohya"):
        changed.append("output.file_layout")
    if changed:
        raise ConfigError(f"{', '.join(changed)} apply to SD3/SD3.5 and FLUX.1 bases only; this base is {arch}: "
                          "remove them")


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
