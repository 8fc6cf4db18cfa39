"""The flow-matching objective (trainer/flow_matching.py) against closed forms and diffusers' own functions:
``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3`` (same generator, same draws),
FlowMatchEulerDiscreteScheduler's static and dynamic shifts, FluxPipeline's ``calculate_shift``, ``_pack_latents``,
``_unpack_latents`` and ``_prepare_latent_image_ids``.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer import flow_matching as fm
from trainer.flow_matching import FlowMatchingConfig, FlowMatchingError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", ["logit_normal", "mode", "uniform"])
def test_density_draws_are_diffusers(method):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    config = FlowMatchingConfig(timestep_sampling=method, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = fm.density_samples(config, 64, generator(5))
    theirs = compute_density_for_timestep_sampling(method if method != "uniform" else "none", 64, logit_mean=0.3,
                                                   logit_std=1.2, mode_scale=1.29, generator=generator(5))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_sigmoid_shift_and_flux_shift_closed_forms():
    normal = torch.randn(32, generator=generator(1))
    sigmoid = FlowMatchingConfig(timestep_sampling="sigmoid", sigmoid_scale=1.7)
    expected = torch.sigmoid(1.7 * normal).clamp(fm.SIGMA_MIN, 1)
    torch.testing.assert_close(fm.sample_sigmas(sigmoid, 32, generator(1)), expected)
    shifted = FlowMatchingConfig(timestep_sampling="shift", sigmoid_scale=1.7, shift=3.0)
    base = torch.sigmoid(1.7 * normal)
    torch.testing.assert_close(fm.sample_sigmas(shifted, 32, generator(1)), (3 * base / (1 + 2 * base)).clamp(1e-3, 1))
    flux = FlowMatchingConfig(timestep_sampling="flux_shift", sigmoid_scale=1.7, shift=5.0)  # shift not used
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)
    expected = math.exp(mu) / (math.exp(mu) + (1 / torch.sigmoid(1.7 * normal) - 1))  # sd-scripts' time_shift
    torch.testing.assert_close(fm.sample_sigmas(flux, 32, generator(1), image_seq_len=1024), expected.clamp(1e-3, 1))
    with pytest.raises(FlowMatchingError, match="image_seq_len"):
        fm.sample_sigmas(flux, 2, generator())


def test_shift_is_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    shifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    torch.testing.assert_close(fm.shift_sigmas(plain.sigmas, 3.0), shifted.sigmas)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    base = torch.linspace(1.0, 0.05, 20)
    mu = fm.flux_mu(4096)
    torch.testing.assert_close(fm.shift_sigmas(base, math.exp(mu)), dynamic.time_shift(mu, 1.0, base))


def test_flux_mu_is_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (16, 256, 1024, 4096, 6400):
        assert fm.flux_mu(tokens) == pytest.approx(calculate_shift(tokens))
    assert fm.flux_mu(256) == pytest.approx(0.5) and fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.flux_image_seq_len(128, 128) == 4096  # 1024 px


def test_sampling_is_seeded_bounded_and_shifted():
    config = FlowMatchingConfig(timestep_sampling="logit_normal")
    first = fm.sample_sigmas(config, 1000, generator(3))
    assert torch.equal(first, fm.sample_sigmas(config, 1000, generator(3)))
    assert not torch.equal(first, fm.sample_sigmas(config, 1000, generator(4)))
    assert first.dtype == torch.float32 and bool(((first >= fm.SIGMA_MIN) & (first <= 1)).all())
    assert 0.45 < float(first.mean()) < 0.55  # logit-normal(0, 1) is symmetric about 0.5
    noisier = fm.sample_sigmas(FlowMatchingConfig(timestep_sampling="logit_normal", shift=3.0), 1000, generator(3))
    assert bool((noisier >= first).all()) and float(noisier.mean()) > 0.65
    uniform = fm.sample_sigmas(FlowMatchingConfig(timestep_sampling="uniform"), 20000, generator(0))
    assert float(uniform.min()) >= fm.SIGMA_MIN
    torch.testing.assert_close(fm.timesteps_of(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))


def test_noising_targets_and_weights_closed_forms():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0 = torch.randn(3, 4, 6, 6, generator=generator(0))
    noise = torch.randn(3, 4, 6, 6, generator=generator(1))
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    noisy = fm.noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(noisy[1], 0.5 * x0[1] + 0.5 * noise[1])
    prediction = torch.randn(3, 4, 6, 6, generator=generator(2))
    pred, target = fm.prediction_and_target(prediction, x0, noise, noisy, sigmas, "velocity")
    assert pred is prediction and torch.equal(target, noise - x0)
    pred_x0, target_x0 = fm.prediction_and_target(prediction, x0, noise, noisy, sigmas, "x0")
    assert torch.equal(target_x0, x0)
    torch.testing.assert_close(pred_x0, noisy - sigmas[:, None, None, None] * prediction)
    # the x0 form is the velocity loss weighted by σ²
    velocity_loss = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    x0_loss = ((pred_x0 - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(x0_loss, sigmas**2 * velocity_loss)
    # a perfect velocity recovers x0 exactly
    exact, _ = fm.prediction_and_target(noise - x0, x0, noise, noisy, sigmas, "x0")
    torch.testing.assert_close(exact, x0)
    for scheme in fm.LOSS_WEIGHTING:
        torch.testing.assert_close(fm.loss_weights(sigmas, scheme),
                                   compute_loss_weighting_for_sd3(scheme, sigmas).float())
    with pytest.raises(FlowMatchingError):
        fm.loss_weights(sigmas, "snr")
    with pytest.raises(FlowMatchingError):
        fm.prediction_and_target(prediction, x0, noise, noisy, sigmas, "epsilon")


def test_packing_and_ids_are_the_flux_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12, generator=generator(0))
    packed = fm.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12), rtol=0, atol=0)
    vae_scale_factor = 8
    unpacked = FluxPipeline._unpack_latents(packed, 8 * vae_scale_factor, 12 * vae_scale_factor, vae_scale_factor)
    assert torch.equal(fm.unpack_latents(packed, 8, 12), unpacked) and torch.equal(unpacked, latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    assert torch.equal(fm.latent_image_ids(8, 12), ids)
    assert torch.equal(fm.text_ids(5), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 16, 7, 8))


def test_latent_normalisation_inverts_and_matches_the_decoders():
    from trainer.dit_architectures import FLUX_VAE, SD3_VAE

    latents = torch.randn(1, 16, 4, 4, generator=generator(0))
    for values in (SD3_VAE, FLUX_VAE):
        config = type("VaeConfig", (), values)
        normal = fm.normalize_latents(latents, config)
        torch.testing.assert_close(normal, (latents - values["shift_factor"]) * values["scaling_factor"])
        # the pipelines decode `latents / scaling_factor + shift_factor`
        torch.testing.assert_close(fm.denormalize_latents(normal, config), latents)


def test_config_validation_defaults_and_metadata():
    FlowMatchingConfig().validate()
    for bad in ({"timestep_sampling": "lognorm"}, {"weighting_scheme": "snr"}, {"target": "epsilon"},
                {"shift": 0.0}, {"logit_std": -1.0}, {"sigmoid_scale": float("nan")}, {"mode_scale": 2.0},
                {"logit_mean": float("inf")}):
        with pytest.raises(FlowMatchingError, match=next(iter(bad))):
            FlowMatchingConfig(**bad).validate()
    sd3, flux = fm.default_config("sd3"), fm.default_config("flux")
    assert (sd3.timestep_sampling, sd3.shift, sd3.target) == ("logit_normal", 3.0, "x0")
    assert (flux.timestep_sampling, flux.target) == ("flux_shift", "velocity")
    with pytest.raises(FlowMatchingError):
        fm.default_config("sdxl")
    metadata = flux.metadata()
    assert metadata["ss_timestep_sampling"] == "flux_shift" and metadata["ss_model_prediction_type"] == "raw"
    assert {"ss_logit_mean", "ss_logit_std", "ss_mode_scale", "ss_sigmoid_scale", "ss_discrete_flow_shift",
            "ss_weighting_scheme"} <= set(metadata)
