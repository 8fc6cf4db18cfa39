"""Flow matching (rectified flow), the training objective of SD3/SD3.5 and FLUX.1, as pure functions.

With data latents ``x0``, noise ``ε`` and a noise level ``σ ∈ (0, 1]`` per sample (the transformer's timestep is
``t = 1000·σ``)::

    x_σ = (1 − σ)·x0 + σ·ε          the model predicts the velocity v = ε − x0

The loss compares either the velocity (``target = "velocity"``: what Flux trainers use, sd-scripts' ``raw``) or,
after preconditioning, the clean latents (``target = "x0"``: the prediction becomes ``x_σ − σ·v̂`` and is compared
with ``x0``; diffusers' SD3 ``--precondition_outputs`` and sd-scripts' SD3 trainer). The x0 form is the velocity
loss weighted by σ².

σ is drawn per sample from an explicit ``torch.Generator`` (the same draw on every process and after a resume):

- ``uniform``: σ ~ U(0, 1);
- ``logit_normal``: σ = sigmoid(N(logit_mean, logit_std)) (SD3 paper §3.1; diffusers' and sd-scripts' density);
- ``mode``: σ = 1 − u − mode_scale·(cos²(πu/2) − 1 + u), u ~ U(0, 1) (SD3 paper; mode_scale 1.29);
- ``sigmoid``: σ = sigmoid(sigmoid_scale·N(0, 1)) (x-flux; sd-scripts' Flux ``sigmoid``);
- ``shift``: sd-scripts' name for ``sigmoid`` followed by the shift below;
- ``flux_shift``: ``sigmoid`` followed by Flux's resolution-dependent shift: μ grows linearly with the packed image
  sequence length, 0.5 at 256 tokens to 1.15 at 4096 (the pipeline's ``calculate_shift``), and
  σ ← e^μ·σ / (1 + (e^μ − 1)·σ) (the scheduler's exponential ``time_shift`` with exponent 1).

Every method but ``flux_shift`` then applies ``shift`` s (sd-scripts' ``discrete_flow_shift`` / SD3's
``training_shift``; the scheduler's ``shift``): σ ← s·σ / (1 + (s − 1)·σ); s = 1 leaves σ unchanged, s > 1 favours
noisier samples. σ is finally kept in [0.001, 1], the range of the schedulers' training sigmas (σ = 0 would make the
``sigma_sqrt`` weight infinite).

Loss weights per sample (SD3 paper; diffusers' ``compute_loss_weighting_for_sd3``): ``none`` 1, ``sigma_sqrt`` σ⁻²,
``cosmap`` 2 / (π·(1 − 2σ + 2σ²)).

Latents: the VAE's ``(x − shift_factor)·scaling_factor``; Flux packs 2×2 latent patches into tokens
(``pack_latents``) and gives every token its (0, row, column) position id.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform", "sigmoid", "shift", "flux_shift")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
TARGETS = ("velocity", "x0")
SIGMA_MIN = 1e-3
NUM_TRAIN_TIMESTEPS = 1000
# FluxPipeline / FlowMatchEulerDiscreteScheduler defaults of FLUX.1 (scheduler_config.json)
FLUX_BASE_SEQ_LEN, FLUX_MAX_SEQ_LEN, FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 256, 4096, 0.5, 1.15


class FlowMatchingError(ValueError):
    """An objective option that cannot work; the message names the option and what is allowed."""


@dataclasses.dataclass
class FlowMatchingConfig:
    """The objective's options, with sd-scripts' names where it has them (recorded as ``ss_<name>``)."""

    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: float = 1.0  # sd-scripts: discrete_flow_shift (Flux) / training_shift (SD3)
    weighting_scheme: str = "none"
    target: str = "velocity"

    def validate(self) -> None:
        for key, allowed in (("timestep_sampling", TIMESTEP_SAMPLING), ("weighting_scheme", LOSS_WEIGHTING),
                             ("target", TARGETS)):
            if getattr(self, key) not in allowed:
                raise FlowMatchingError(f"{key} = {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("logit_std", "sigmoid_scale", "shift"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise FlowMatchingError(f"{key} must be a positive number, got {value!r}")
        if not (isinstance(self.logit_mean, int | float) and math.isfinite(self.logit_mean)):
            raise FlowMatchingError(f"logit_mean must be a finite number, got {self.logit_mean!r}")
        # mode's density is monotonic (a valid inverse CDF on [0, 1]) only for these scales (SD3 paper, eq. 20)
        upper = 2.0 / (math.pi - 2.0)
        if not (isinstance(self.mode_scale, int | float) and -1.0 <= self.mode_scale <= upper):
            raise FlowMatchingError(f"mode_scale must lie in [-1, {upper:.3f}], got {self.mode_scale!r}")

    def metadata(self) -> dict[str, Any]:
        """``ss_*`` keys of the kohya metadata block (sd-scripts' names; ``model_prediction_type`` raw / x0)."""
        return {
            "ss_timestep_sampling": self.timestep_sampling,
            "ss_logit_mean": self.logit_mean,
            "ss_logit_std": self.logit_std,
            "ss_mode_scale": self.mode_scale,
            "ss_sigmoid_scale": self.sigmoid_scale,
            "ss_discrete_flow_shift": self.shift,
            "ss_weighting_scheme": self.weighting_scheme,
            "ss_model_prediction_type": "raw" if self.target == "velocity" else "x0",
        }


def default_config(family: str) -> FlowMatchingConfig:
    """What the reference trainers use: SD3 logit-normal σ with the scheduler's shift 3 and the x0 target
    (diffusers' SD3 script through its shifted sigma table, sd-scripts' SD3 preconditioning); Flux the
    resolution-dependent shift with the velocity target (sd-scripts' recommended ``flux_shift`` + ``raw``; its
    ``discrete_flow_shift`` default 3.0 applies where another sampling is chosen)."""
    if family == "sd3":
        return FlowMatchingConfig(timestep_sampling="logit_normal", shift=3.0, target="x0")
    if family == "flux":
        return FlowMatchingConfig(timestep_sampling="flux_shift", shift=3.0, target="velocity")
    raise FlowMatchingError(f"no flow-matching defaults for {family!r}; families: sd3, flux")


def config_for(family: str, section: Any) -> FlowMatchingConfig:
    """The objective of a run: the family's defaults (:func:`default_config`) with the options a ``[dit]`` config
    section sets ("" and 0 keep the default)."""
    config = default_config(family)
    for key in ("timestep_sampling", "weighting_scheme", "target", "shift"):
        value = getattr(section, key)
        if value:
            setattr(config, key, value)
    for key in ("logit_mean", "logit_std", "mode_scale", "sigmoid_scale"):
        setattr(config, key, float(getattr(section, key)))
    config.validate()
    return config


# ----- σ ----------------------------------------------------------------------------------------------------------
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s·σ / (1 + (s − 1)·σ): FlowMatchEulerDiscreteScheduler's static ``shift``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = FLUX_BASE_SEQ_LEN, max_seq_len: int = FLUX_MAX_SEQ_LEN,
            base_shift: float = FLUX_BASE_SHIFT, max_shift: float = FLUX_MAX_SHIFT) -> float:
    """μ of Flux's dynamic shift, linear in the packed image sequence length (FluxPipeline's ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flux_image_seq_len(latent_height: int, latent_width: int) -> int:
    """Tokens of a packed latent: one per 2×2 patch."""
    return (latent_height // 2) * (latent_width // 2)


def density_samples(config: FlowMatchingConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The unshifted draw in [0, 1] (for logit_normal, mode and uniform exactly diffusers'
    ``compute_density_for_timestep_sampling`` with the same generator)."""
    method = config.timestep_sampling
    if method == "logit_normal":
        return torch.sigmoid(torch.normal(config.logit_mean, config.logit_std, size=(batch_size,), generator=generator))
    if method == "mode":
        u = torch.rand(batch_size, generator=generator)
        return 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    if method in ("sigmoid", "shift", "flux_shift"):
        return torch.sigmoid(config.sigmoid_scale * torch.randn(batch_size, generator=generator))
    raise FlowMatchingError(f"timestep_sampling = {method!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")


def sample_sigmas(config: FlowMatchingConfig, batch_size: int, generator: torch.Generator,
                  image_seq_len: int | None = None) -> torch.Tensor:
    """σ per sample in [SIGMA_MIN, 1] (float32, on the generator's device). ``image_seq_len`` (packed tokens, see
    :func:`flux_image_seq_len`) is needed by ``flux_shift`` only."""
    sigmas = density_samples(config, batch_size, generator).float()
    if config.timestep_sampling == "flux_shift":
        if image_seq_len is None:
            raise FlowMatchingError("timestep_sampling = 'flux_shift' needs the image size (image_seq_len)")
        sigmas = shift_sigmas(sigmas, math.exp(flux_mu(image_seq_len)))
    elif config.shift != 1.0:
        sigmas = shift_sigmas(sigmas, config.shift)
    return sigmas.clamp(SIGMA_MIN, 1.0)


def timesteps_of(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep for σ (SD3 takes it as is; Flux's forward divides it by 1000 again)."""
    return sigmas * NUM_TRAIN_TIMESTEPS


# ----- objective --------------------------------------------------------------------------------------------------
def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigma = _per_sample(sigmas, x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def prediction_and_target(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                          sigmas: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tensors the loss compares for ``target`` velocity (v̂, ε − x0) or x0 (x_σ − σ·v̂, x0)."""
    return model_prediction(prediction, noisy, sigmas, target), (velocity(x0, noise) if target == "velocity" else x0)


def model_prediction(prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                     target: str) -> torch.Tensor:
    """The model's velocity as the loss reads it: as is (``velocity``), or preconditioned to x0 = x_σ − σ·v̂."""
    if target == "velocity":
        return prediction
    if target == "x0":
        return noisy - _per_sample(sigmas, prediction) * prediction
    raise FlowMatchingError(f"target = {target!r} is not one of {', '.join(TARGETS)}")


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample weights (SD3 paper §3.1; diffusers' ``compute_loss_weighting_for_sd3``)."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise FlowMatchingError(f"weighting_scheme = {scheme!r} is not one of {', '.join(LOSS_WEIGHTING)}")


# ----- latents ----------------------------------------------------------------------------------------------------
def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latents → the transformer's space: (x − shift_factor)·scaling_factor."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def denormalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): each 2×2 patch one token, channels-major within the patch (FluxPipeline's
    ``_pack_latents``)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"Flux latents need even height and width, got {height}×{width}")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height × width``."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H/2·W/2, 3) position ids (0, row, column) of the packed tokens of an H×W latent."""
    rows, columns = height // 2, width // 2
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def text_ids(sequence_length: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Flux's text position ids: all zero."""
    return torch.zeros(sequence_length, 3, device=device, dtype=dtype)
