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
sd-scripts' loss and noise options are options of the diffusion objective (huber/smooth_l1/l1 losses with their
threshold schedules, debiased estimation, v-pred-like loss, a timestep range, zero terminal SNR, random-strength and
adaptive noise offsets, pyramid noise, input perturbation); SD3/Flux runs refuse them (:data:`DIFFUSION_ONLY`), and
:func:`elementwise_loss` is there for a flow-matching objective that wants the huber losses too.

Determinism: each sample's noise and timestep come from a generator seeded by its key (see :func:`noise_keys`),
never from global RNG state, so they do not depend on how batches are spread over processes, on previews in
between, or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
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


# Zero terminal SNR makes ᾱ_T = 0 (SNR 0) and some weights divide by the SNR: floored, as diffusers floors ᾱ_T.
SNR_FLOOR = 2.0**-24
SNR_CEILING = 1000.0  # sd-scripts' cap where its SNR weights would be infinite at t = 0


@dataclasses.dataclass
class Draw:
    """One batch's random draws (see :meth:`DiffusionObjective.draw`)."""

    noise: torch.Tensor  # the noise the target is made of (offset and pyramid noise included)
    timesteps: torch.Tensor  # (B,) long
    input_noise: torch.Tensor  # the noise added to the model input: ``noise`` plus the input perturbation, if any


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """sd-scripts' ``conditional_loss`` without reduction: l2 (squared error), l1, or its pseudo-Huber forms with a
    per-sample threshold ``c`` — huber ``2c(√(r² + c²) − c)`` (≈ r² for |r| ≪ c, ≈ 2c|r| for |r| ≫ c) and smooth_l1
    ``2(√(r² + c²) − c)`` (≈ r²/c, then ≈ 2|r|)."""
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs a threshold huber_c")
        c = huber_c.view(-1, *([1] * (prediction.ndim - 1))).to(prediction)
        root = torch.sqrt((prediction - target) ** 2 + c**2) - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss_type {loss_type!r}")


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """sd-scripts' multi-resolution noise for one sample (C, H, W): ``iterations`` coarser random layers, each
    ``r`` ∈ [2, 4) times smaller than the last and weighted ``discount^i``, upsampled bilinearly and added; the sum
    is rescaled to unit standard deviation. sd-scripts normalises by the whole batch's deviation and draws ``r``
    from Python's global RNG; here both are per sample, so a sample's noise does not depend on its batch."""
    channels, height, width = noise.shape
    for level in range(iterations):
        ratio = float(torch.rand((), generator=generator)) * 2 + 2
        level_height, level_width = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((1, channels, level_height, level_width), generator=generator)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount**level
        if level_height == 1 or level_width == 1:
            break
    return noise / noise.std()


# sd-scripts' loss and noise options that only DiffusionObjective implements (the flow-matching objective refuses them)
DIFFUSION_ONLY = ("loss_type", "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss",
                  "min_timestep", "max_timestep", "zero_terminal_snr", "multires_noise_iterations", "ip_noise_gamma")


def diffusion_only_options(train: TrainSection) -> list[tuple[str, bool]]:
    """(option, set away from its default) for each of :data:`DIFFUSION_ONLY`."""
    defaults = TrainSection()
    return [(key, getattr(train, key) != getattr(defaults, key)) for key in DIFFUSION_ONLY]


def zero_terminal_snr_scheduler(scheduler: Any) -> Any:
    """The pipeline's scheduler with its betas rescaled to zero terminal SNR (Lin et al. 2023, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"), sampling from the last timestep ("trailing" spacing) as the paper
    prescribes. Every preview sampler built from its config (:func:`trainer.sampling.make_scheduler`) inherits both;
    a scheduler class without the option is replaced by DDIM, which has it."""
    import inspect

    from diffusers import DDIMScheduler

    scheduler_class = type(scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
        scheduler_class = DDIMScheduler
    return scheduler_class.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


class DiffusionObjective:
    """DDPM noise prediction, epsilon or v, on the model's own noise schedule, with sd-scripts' loss and noise
    options (``train.loss_type``, ``zero_terminal_snr``, ``ip_noise_gamma``, …: see :class:`TrainSection`)."""

    def __init__(self, scheduler_config: Any, prediction_type: str, train: TrainSection):
        from diffusers import DDPMScheduler

        from methods.base import ConfigError

        extra = {"rescale_betas_zero_snr": True} if train.zero_terminal_snr else {}
        self.scheduler = DDPMScheduler.from_config(scheduler_config, prediction_type=prediction_type, **extra)
        self.prediction_type = prediction_type
        self.train = train
        self.noise_offset = train.noise_offset
        self.min_snr_gamma = train.min_snr_gamma
        steps = self.scheduler.config.num_train_timesteps
        high = steps if train.max_timestep is None else train.max_timestep
        if high > steps:
            raise ConfigError(f"train.max_timestep {high} is beyond the model's {steps} training timesteps")
        self.timestep_range = (train.min_timestep, high)
        v_prediction = prediction_type == "v_prediction"
        if train.scale_v_pred_loss_like_noise_pred and not v_prediction:
            raise ConfigError("train.scale_v_pred_loss_like_noise_pred is for v-prediction models; this model "
                              "predicts epsilon")
        if train.v_pred_like_loss and v_prediction:
            raise ConfigError("train.v_pred_like_loss is for epsilon-prediction models; this model predicts v")
        alphas = self.scheduler.alphas_cumprod.double()
        self.snr = (alphas / (1 - alphas)).float()  # SNR(t) = ᾱ/(1 − ᾱ); 0 at T with zero terminal SNR

    def draw(self, latents: torch.Tensor, keys: Sequence[tuple]) -> Draw:
        """Noise, timesteps and input noise, one generator per sample seeded by its key.

        A sample's draws, in this order (so enabling a later option never changes the earlier ones): its timestep,
        its noise, the noise offset (one value per channel), the offset's random strength, the pyramid noise
        levels, the input perturbation and its random strength. The adaptive noise offset also reads the sample's
        latents (sd-scripts: ``noise_offset + adaptive_noise_scale·|channel mean|``, at least 0).
        """
        if len(keys) != latents.shape[0]:
            raise ValueError(f"{len(keys)} noise keys for a batch of {latents.shape[0]}")
        train = self.train
        shape, channels = latents.shape[1:], latents.shape[1]
        low, high = self.timestep_range
        noises, inputs, timesteps = [], [], []
        for latent, key in zip(latents.detach().float().cpu(), keys):
            generator = torch.Generator().manual_seed(stable_seed(*key))
            timestep = int(torch.randint(low, high, (1,), generator=generator)) if low < high else high
            timesteps.append(timestep)
            sample = torch.randn(shape, generator=generator)
            if self.noise_offset:
                offset = torch.randn((channels, 1, 1), generator=generator)
                strength = torch.tensor(self.noise_offset)
                if train.noise_offset_random_strength:
                    strength = strength * torch.rand((), generator=generator)
                if train.adaptive_noise_scale:
                    channel_mean = latent.mean(dim=(1, 2), keepdim=True).abs()
                    strength = torch.clamp(strength + train.adaptive_noise_scale * channel_mean, min=0.0)
                sample = sample + strength * offset
            if train.multires_noise_iterations:
                sample = pyramid_noise(sample, generator, train.multires_noise_iterations,
                                       train.multires_noise_discount)
            noised_input = sample
            if train.ip_noise_gamma:
                perturbation = torch.randn(shape, generator=generator)
                gamma = train.ip_noise_gamma
                if train.ip_noise_gamma_random_strength:
                    gamma = gamma * float(torch.rand((), generator=generator))
                noised_input = sample + gamma * perturbation
            noises.append(sample)
            inputs.append(noised_input)
        device = latents.device
        noise = torch.stack(noises).to(device)
        input_noise = torch.stack(inputs).to(device) if train.ip_noise_gamma else noise
        return Draw(noise, torch.tensor(timesteps, dtype=torch.long, device=device), input_noise)

    def noised(self, latents: torch.Tensor, keys: Sequence[tuple]) -> NoisedBatch:
        draw = self.draw(latents, keys)
        noisy = self.scheduler.add_noise(latents, draw.input_noise, draw.timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, draw.noise, draw.timesteps)
        else:
            target = draw.noise
        return NoisedBatch(noisy, draw.timesteps, target)

    def loss(self, prediction: torch.Tensor, noised: NoisedBatch, masks: torch.Tensor | None,
             sample_weights: torch.Tensor) -> torch.Tensor:
        loss = elementwise_loss(prediction.float(), noised.target.float(), self.train.loss_type,
                                self.huber_threshold(noised.timesteps))
        if masks is not None:
            loss = loss * F.interpolate(masks.to(loss.device, torch.float32), size=loss.shape[-2:], mode="area")
        loss = loss.mean(dim=(1, 2, 3))
        loss = loss * self.timestep_weights(noised.timesteps).to(loss.device)
        return (loss * sample_weights.to(loss.device, torch.float32)).mean()

    def metadata(self) -> dict[str, Any]:
        """kohya's ``ss_*`` keys for what this objective does, with sd-scripts' values (``"None"`` where an option
        is off and sd-scripts' default is None)."""
        train = self.train
        return {"ss_loss_type": train.loss_type, "ss_noise_offset": self.noise_offset,
                "ss_min_snr_gamma": self.min_snr_gamma or "None",
                "ss_huber_schedule": train.huber_schedule, "ss_huber_c": train.huber_c,
                "ss_huber_scale": train.huber_scale, "ss_debiased_estimation": train.debiased_estimation_loss,
                "ss_zero_terminal_snr": train.zero_terminal_snr, "ss_ip_noise_gamma": train.ip_noise_gamma or "None",
                "ss_ip_noise_gamma_random_strength": train.ip_noise_gamma_random_strength,
                "ss_multires_noise_iterations": train.multires_noise_iterations or "None",
                "ss_multires_noise_discount": train.multires_noise_discount,
                "ss_adaptive_noise_scale": train.adaptive_noise_scale or "None",
                "ss_noise_offset_random_strength": train.noise_offset_random_strength}

    # ----- per-timestep factors -------------------------------------------------------------------------------
    def huber_threshold(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """sd-scripts' ``get_huber_threshold_if_needed``: ``c`` per sample for huber/smooth_l1 — ``constant``
        huber_c·huber_scale; ``exponential`` huber_scale·huber_c^(t/T) (from huber_scale at t = 0 to
        huber_scale·huber_c at T); ``snr`` (1 − huber_c)/(1 + σ_t)² + huber_c with σ_t = √((1 − ᾱ)/ᾱ)."""
        train = self.train
        if train.loss_type not in ("huber", "smooth_l1"):
            return None
        t = timesteps.detach().cpu()
        if train.huber_schedule == "constant":
            c = torch.full(t.shape, train.huber_c * train.huber_scale)
        elif train.huber_schedule == "exponential":
            rate = -math.log(train.huber_c) / self.scheduler.config.num_train_timesteps
            c = torch.exp(-rate * t.double()).float() * train.huber_scale
        else:
            alphas = self.scheduler.alphas_cumprod[t].double()
            sigmas = ((1.0 - alphas) / alphas) ** 0.5  # inf at ᾱ = 0: c → huber_c
            c = ((1 - train.huber_c) / (1 + sigmas) ** 2 + train.huber_c).float()
        return c.to(timesteps.device)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The product of the enabled per-timestep loss factors (1 when none is): min-SNR-γ, sd-scripts'
        scale_v_pred_loss_like_noise_pred, v_pred_like_loss and debiased estimation, in sd-scripts' order."""
        train = self.train
        weights = torch.ones(timesteps.shape, dtype=torch.float32)
        t = timesteps.detach().cpu()
        if self.min_snr_gamma:
            weights = weights * self.min_snr_weights(t)
        snr = self.snr[t].clamp(SNR_FLOOR, SNR_CEILING)
        if train.scale_v_pred_loss_like_noise_pred:
            weights = weights * snr / (snr + 1)
        if train.v_pred_like_loss:
            weights = weights * (1 + train.v_pred_like_loss * (snr + 1) / snr)  # loss + loss/scale·v
        if train.debiased_estimation_loss:
            weights = weights * (1 / (snr + 1) if self.prediction_type == "v_prediction" else 1 / snr.sqrt())
        return weights.to(timesteps.device)

    def min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ)/SNR for epsilon targets, min(SNR, γ)/(SNR+1) for v targets (Hang et al. 2023); for epsilon
        written as 1 below γ, so an SNR of 0 (zero terminal SNR) gives 1, not 0/0."""
        snr = self.snr.to(timesteps.device)[timesteps]
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return torch.where(snr <= self.min_snr_gamma, torch.ones_like(snr), self.min_snr_gamma / snr)


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


__all__ = ["DIFFUSION_ONLY", "DiffusionObjective", "Draw", "FlowMatchingObjective", "NoisedBatch", "Objective",
           "diffusion_only_options", "elementwise_loss", "noise_keys", "pyramid_noise", "stable_seed",
           "zero_terminal_snr_scheduler"]
