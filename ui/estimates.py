"""What the Model tab estimates before anything is loaded: the base model's shapes from a model folder's configs,
and the GPU memory a run needs.

:func:`folder_models` builds a local diffusers folder's UNet and text encoders on the ``meta`` device from their
``config.json`` files (no weights read, a fraction of a second), so the parameter estimate is the model's own
before *Detect* loads it — the toy demo's 64 px model is not counted as SD1.5.

:func:`memory_estimate` adds up, in bytes: the frozen base weights (parameters × bytes of the run's precision; the
VAE in fp32 when ``model.vae_fp32``), the adapter's weights, gradients and optimizer states (fp32), the EMA copy,
and the activations of one training step, scaled from reference figures per latent pixel and sample
(:data:`ACTIVATION_GB`, for half precision; gradient checkpointing keeps about 60 % of them with diffusers' per-block
checkpointing and SDPA attention) and by the model's size relative to the standard one of its architecture, plus the
CUDA context. The larger of that and the VAE's encode peak while latents are cached is the estimate. SD1.5's figures
are calibrated on this project's measured H100 runs; the estimate itself was not checked on a GPU in this session.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from pathlib import Path
from typing import Any

import torch

GB = 1e9
# Activations of one sample in half precision, in GB per 64×64 latent pixels (512 px), without and with gradient
# checkpointing. SD1.5: calibrated on this project's measured H100 runs (README, Speed: LoRA rank 16, 512 px, batch
# 4, bf16 — peak 7.1 GB with the latent cache; 5.4 GB with checkpointing and no cache). SD2 and SDXL: scaled from
# it by their UNets and kohya users' reports (SDXL LoRA at 1024 px, batch 1, checkpointing: about 11 GB).
ACTIVATION_GB = {"sd1": (1.15, 0.7), "sd2": (1.25, 0.75), "sdxl": (2.5, 0.9)}
TEXT_ENCODER_ACTIVATION_GB = {"sd1": 0.05, "sd2": 0.1, "sdxl": 0.2}  # per sample, when its adapters train
VAE_ENCODE_GB_PER_MEGAPIXEL = 2.0  # fp32 encode of one image (the SD VAE's full-resolution 128-channel layers)
CUDA_CONTEXT_GB = 0.6
# Bytes per adapter parameter beyond its fp32 weight and gradient (8 + …): the optimizer's states.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4, "lion": 4, "sgd": 4}
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "no": 4}
VAE_PARAMETERS = 83_653_863  # the SD/SDXL AutoencoderKL (trainer.architectures.SD_VAE)
# (UNet, text encoders) parameters of the models the activation figures are for; another model's activations are
# scaled by its size relative to these (a small test model has small activations).
REFERENCE_PARAMETERS = {"sd1": (859_520_964, 123_060_480), "sd2": (865_910_724, 340_387_840),
                        "sdxl": (2_567_463_684, 817_244_160)}


@dataclasses.dataclass
class MemoryEstimate:
    weights: float  # bytes, frozen base model
    adapter: float  # bytes: weights, gradients, optimizer states, EMA
    activations: float
    vae_encode: float
    context: float = CUDA_CONTEXT_GB * GB

    @property
    def total(self) -> float:
        return self.weights + self.context + max(self.adapter + self.activations, self.vae_encode)

    def text(self, resolution: int, batch: int, precision: str, checkpointing: bool) -> str:
        peak = "training" if self.adapter + self.activations >= self.vae_encode else "encoding latents"
        return (f"GPU memory ≈ **{self.total / GB:.1f} GB** (peak while {peak}): base weights "
                f"{self.weights / GB:.1f} GB ({precision}) + adapter, gradients and optimizer "
                f"{self.adapter / GB:.2f} GB + activations ≈ {self.activations / GB:.1f} GB at {resolution} px × "
                f"batch {batch}, checkpointing {'on' if checkpointing else 'off'} + {self.context / GB:.1f} GB CUDA "
                "context. *An estimate: parameters × bytes, activations scaled per pixel and sample from SD1.5 runs "
                "measured on an H100 (7.1 GB at 512 px, batch 4, bf16); unverified on a GPU in this session.*")


def memory_estimate(config: Any, arch: str, base_parameters: dict[str, int], adapter_parameters: int,
                    text_encoder_trained: bool) -> MemoryEstimate:
    """The GPU memory ``config`` needs on a base model with ``base_parameters`` (unet, text_encoders, vae)."""
    train, dataset = config.train, config.dataset
    weight_bytes = DTYPE_BYTES.get(train.mixed_precision, 4)
    vae_bytes = 4 if config.model.vae_fp32 else weight_bytes
    weights = (base_parameters.get("unet", 0) + base_parameters.get("text_encoders", 0)) * weight_bytes
    weights += base_parameters.get("vae", VAE_PARAMETERS) * vae_bytes
    per_parameter = 8 + OPTIMIZER_STATE_BYTES.get(train.optimizer, 8) + (4 if train.ema_decay else 0)
    adapter = adapter_parameters * per_parameter
    without, with_checkpointing = ACTIVATION_GB.get(arch, ACTIVATION_GB["sd1"])
    unet_size, encoder_size = REFERENCE_PARAMETERS.get(arch, REFERENCE_PARAMETERS["sd1"])
    latent_pixels = (dataset.resolution / 8) ** 2 / 4096
    samples = train.batch_size
    activations = (with_checkpointing if train.gradient_checkpointing else without) * latent_pixels * samples
    activations *= base_parameters.get("unet", unet_size) / unet_size
    if text_encoder_trained:
        activations += TEXT_ENCODER_ACTIVATION_GB.get(arch, 0.15) * samples * (
            0.3 if train.gradient_checkpointing else 1.0) * base_parameters.get("text_encoders", encoder_size) \
            / encoder_size
    activations *= 2 if weight_bytes == 4 else 1
    megapixels = dataset.resolution ** 2 / 1e6
    # The VAE encodes a batch before training (latent cache) or at every step (no cache), never during the UNet's
    # forward and backward: the peak is the larger of the two.
    vae_encode = VAE_ENCODE_GB_PER_MEGAPIXEL * megapixels * samples * (vae_bytes / 4) * GB
    return MemoryEstimate(weights, adapter, activations * GB, vae_encode)


def parameter_counts(unet: Any, encoders: list[Any], vae: Any = None) -> dict[str, int]:
    def count(module: Any) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    return {"unet": count(unet), "text_encoders": sum(count(e) for e in encoders),
            "vae": count(vae) if vae is not None else VAE_PARAMETERS}


# ----- a model folder's shapes without its weights -------------------------------------------------------------
def folder_models(base: str) -> Any:
    """A stand-in pipeline (``unet``, ``text_encoder``, ``text_encoder_2``, ``vae`` on the meta device) built from
    the configs of the diffusers folder ``base``; None when ``base`` is not such a folder or its configs are not
    the SD/SDXL classes this estimate knows."""
    path = Path(str(base or "").strip()).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        stamp = tuple(p.stat().st_mtime_ns for p in sorted(path.glob("*/config.json")))
        return _folder_models(str(path.resolve()), stamp)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None


@functools.lru_cache(maxsize=4)
def _folder_models(folder: str, stamp: tuple) -> Any:
    import diffusers
    import transformers

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    parts: dict[str, Any] = {}
    with torch.device("meta"):
        for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
            entry = index.get(name)
            config_path = root / name / "config.json"
            if not isinstance(entry, list) or len(entry) != 2 or not config_path.is_file():
                continue
            library, class_name = entry
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                parts[name] = cls.from_config(cls.load_config(str(root / name)))
            elif library == "transformers":
                cls = getattr(transformers, class_name)
                parts[name] = cls(transformers.AutoConfig.from_pretrained(str(root / name)))
    if "unet" not in parts:
        return None
    return types.SimpleNamespace(unet=parts["unet"], text_encoder=parts.get("text_encoder"),
                                 text_encoder_2=parts.get("text_encoder_2"), vae=parts.get("vae"))
