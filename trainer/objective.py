"""The training objective: how clean latents become the model's input, what it must predict, how errors are weighed.

The loop asks an objective two things (:class:`Objective`):

- ``noised(latents, keys)`` → :class:`NoisedBatch`: the model input, the timesteps to condition on and the target;
- ``loss(prediction, noised, masks, sample_weights)`` → the scalar loss of the batch.

:class:`DiffusionObjective` is the DDPM objective SD1/SD2/SDXL were trained with: noise (plus the optional noise
offset) added at a uniformly drawn timestep, an epsilon or v-prediction target, an MSE per sample, optionally
weighted by min-SNR-γ (Hang et al. 2023), by a loss mask and by each sample's weight (regularisation images).
:class:`FlowMatchingObjective` is that of SD3/SD3.5 and FLUX.1 (rectified flow, :mod:`trainer.flow_matching`): the
latents are blended with noise at a drawn σ, the model predicts the velocity ε − x0 (or, preconditioned, x0), and
the loss is weighted per sample by the SD3 weighting scheme, the mask and the sample's weight.

Determinism: each sample's noise and timestep come from a generator seeded by its key (see :func:`noise_keys`),
never from global RNG state, so they do not depend on how batches are spread over processes, on previews in
between, or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .config import TrainSection


@dataclasses.dataclass
class NoisedBatch:
    model_input: torch.Tensor  # what the denoiser sees (float32, cast by the caller)
    timesteps: torch.Tensor  # (B,) what it is conditioned on
    target: torch.Tensor  # what it should predict


class Objective(Protocol):
    def noised(self, latents: torch.Tensor, keys: Sequence[tuple]) -> NoisedBatch: ...

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, masks: torch.Tensor | None,
             sample_weights: torch.Tensor) -> torch.Tensor: ...


def stable_seed(*key: Any) -> int:
    """A 63-bit seed from a tuple of plain values, the same in every process and Python session."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def noise_keys(train: TrainSection, indices: Sequence[int], epoch: int, global_batch: int) -> list[tuple]:
    """One key per sample of a batch: (seed, epoch, global batch index, position), which every process and a
    resumed run compute alike. ``train.fixed_noise`` (debug) keys by the sample alone, so it sees the same draw
    every time it comes back."""
    if train.fixed_noise:
        seen: dict[int, int] = {}
        keys = []
        for index in indices:
            seen[index] = seen.get(index, -1) + 1
            keys.append(("fixed", train.seed, int(index), seen[index]))
        return keys
    return [("train", train.seed, epoch, global_batch, position) for position in range(len(indices))]


class DiffusionObjective:
    """DDPM noise prediction, epsilon or v, on the model's own noise schedule."""

    def __init__(self, scheduler_config: Any, prediction_type: str, train: TrainSection):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type)
        self.prediction_type = prediction_type
        self.noise_offset = train.noise_offset
        self.min_snr_gamma = train.min_snr_gamma

    def draw(self, latents: torch.Tensor, keys: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the noise offset: one extra value per sample and channel) and timesteps, one generator per
        sample seeded by its key."""
        if len(keys) != latents.shape[0]:
            raise ValueError(f"{len(keys)} noise keys for a batch of {latents.shape[0]}")
        shape, channels = latents.shape[1:], latents.shape[1]
        steps = self.scheduler.config.num_train_timesteps
        noises, timesteps = [], []
        for key in keys:
            generator = torch.Generator().manual_seed(stable_seed(*key))
            timesteps.append(int(torch.randint(0, steps, (1,), generator=generator)))
            sample = torch.randn(shape, generator=generator)
            if self.noise_offset:
                sample = sample + self.noise_offset * torch.randn((channels, 1, 1), generator=generator)
            noises.append(sample)
        noise = torch.stack(noises).to(latents.device)
        return noise, torch.tensor(timesteps, dtype=torch.long, device=latents.device)

    def noised(self, latents: torch.Tensor, keys: Sequence[tuple]) -> NoisedBatch:
        noise, timesteps = self.draw(latents, keys)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisedBatch(noisy, timesteps, target)

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, masks: torch.Tensor | None,
             sample_weights: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(prediction.float(), noised.target.float(), reduction="none")
        if masks is not None:
            loss = loss * F.interpolate(masks.to(loss.device, torch.float32), size=loss.shape[-2:], mode="area")
        loss = loss.mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            loss = loss * self.min_snr_weights(noised.timesteps)
        return (loss * sample_weights.to(loss.device, torch.float32)).mean()

    def metadata(self) -> dict[str, Any]:
        """kohya's ``ss_*`` keys for what this objective does (``"None"`` where an option is off, as kohya writes)."""
        return {"ss_loss_type": "l2", "ss_noise_offset": self.noise_offset,
                "ss_min_snr_gamma": self.min_snr_gamma or "None"}

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ)/SNR for epsilon targets, min(SNR, γ)/(SNR+1) for v targets (Hang et al. 2023)."""
        alphas = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


class FlowMatchingObjective:
    """Flow matching: ``x_σ = (1 − σ)·x0 + σ·ε``, the model conditioned on σ (``NoisedBatch.timesteps`` holds σ)."""

    def __init__(self, config: Any):
        self.config = config  # trainer.flow_matching.FlowMatchingConfig

    def noised(self, latents: torch.Tensor, keys: Sequence[tuple]) -> NoisedBatch:
        """σ and noise of each sample from one generator seeded by its key, so a resumed or multi-process run draws
        the same; ``flux_shift`` reads the packed image sequence length of the batch's latents."""
        from .flow_matching import flux_image_seq_len, noisy_latents, sample_sigmas, velocity

        if len(keys) != latents.shape[0]:
            raise ValueError(f"{len(keys)} noise keys for a batch of {latents.shape[0]}")
        image_seq_len = flux_image_seq_len(*latents.shape[-2:])
        sigmas, noises = [], []
        for key in keys:
            generator = torch.Generator().manual_seed(stable_seed(*key))
            sigmas.append(sample_sigmas(self.config, 1, generator, image_seq_len))
            noises.append(torch.randn(latents.shape[1:], generator=generator))
        sigma = torch.cat(sigmas).to(latents.device)
        noise = torch.stack(noises).to(latents.device)
        target = velocity(latents, noise) if self.config.target == "velocity" else latents
        return NoisedBatch(noisy_latents(latents, noise, sigma), sigma, target)

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, masks: torch.Tensor | None,
             sample_weights: torch.Tensor) -> torch.Tensor:
        from .flow_matching import loss_weights, model_prediction

        predicted = model_prediction(prediction.float(), noised.model_input.float(), noised.timesteps,
                                     self.config.target)
        loss = F.mse_loss(predicted, noised.target.float(), reduction="none")
        if masks is not None:
            loss = loss * F.interpolate(masks.to(loss.device, torch.float32), size=loss.shape[-2:], mode="area")
        loss = loss.mean(dim=(1, 2, 3)) * loss_weights(noised.timesteps.float(), self.config.weighting_scheme)
        return (loss * sample_weights.to(loss.device, torch.float32)).mean()

    def metadata(self) -> dict[str, Any]:
        return self.config.metadata()


__all__ = ["DiffusionObjective", "FlowMatchingObjective", "NoisedBatch", "Objective", "noise_keys", "stable_seed"]
