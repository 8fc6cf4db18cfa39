"""Text conditioning and the transformer call (trainer/dit_conditioning.py) against the diffusers pipelines on the
tiny SD3/SD3.5/Flux models: ``encode`` equals ``encode_prompt``, ``predict`` equals the transformer call the
pipeline makes at its second denoising step (σ < 1)."""

from __future__ import annotations

import pytest
import torch
from dit_pipelines import T5_TOKENS, tiny_pipeline_factory

from trainer.dit_architectures import VARIANTS
from trainer.dit_conditioning import encode, predict

CAPTIONS = ["a photo of zq", "red circle on white background, painting style"]


@pytest.fixture(scope="module")
def make_pipeline(tmp_path_factory):
    return tiny_pipeline_factory(tmp_path_factory.mktemp("dit-tokenizers"))


def pipeline_embeddings(pipe, family: str, captions: list[str], **options):
    if family == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS, **options)
        return hidden, pooled
    hidden, pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=T5_TOKENS)
    return hidden, pooled


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium", "flux-dev"])
@torch.no_grad()
def test_encode_is_the_pipelines(make_pipeline, name):
    pipe = make_pipeline(name)
    family = VARIANTS[name].family
    hidden, pooled = pipeline_embeddings(pipe, family, CAPTIONS)
    conditioning = encode(pipe, family, CAPTIONS, T5_TOKENS)
    assert torch.equal(conditioning.hidden_states, hidden) and torch.equal(conditioning.pooled, pooled)
    if family == "sd3":  # 77 CLIP tokens (768+1280 padded to 4096 at real size) before the T5 tokens
        assert hidden.shape == (2, 77 + T5_TOKENS, pipe.transformer.config.joint_attention_dim)
        assert pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)


@torch.no_grad()
def test_sd3_clip_skip_and_missing_t5(make_pipeline):
    pipe = make_pipeline("sd3-medium")
    hidden, pooled = pipeline_embeddings(pipe, "sd3", CAPTIONS, clip_skip=1)  # diffusers' 1 = one further back
    skipped = encode(pipe, "sd3", CAPTIONS, T5_TOKENS, clip_skip=2)
    assert torch.equal(skipped.hidden_states, hidden) and torch.equal(skipped.pooled, pooled)
    assert not torch.equal(skipped.hidden_states, encode(pipe, "sd3", CAPTIONS, T5_TOKENS).hidden_states)
    pipe.text_encoder_3 = None
    hidden, pooled = pipeline_embeddings(pipe, "sd3", CAPTIONS)
    without_t5 = encode(pipe, "sd3", CAPTIONS, T5_TOKENS)
    assert torch.equal(without_t5.hidden_states, hidden) and not without_t5.hidden_states[:, 77:].any()
    with pytest.raises(ValueError, match="clip_skip"):
        encode(pipe, "sd3", CAPTIONS, T5_TOKENS, clip_skip=0)
    with pytest.raises(ValueError, match="Flux"):
        encode(make_pipeline("flux-dev"), "flux", CAPTIONS, T5_TOKENS, clip_skip=2)


@pytest.mark.parametrize("name", ["sd3.5-medium", "flux-dev", "flux-schnell"])
@torch.no_grad()
def test_predict_is_the_pipelines_transformer_call(make_pipeline, name):
    pipe = make_pipeline(name)
    family = VARIANTS[name].family
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    start = latents if family == "sd3" else pipe._pack_latents(latents, 1, 16, 16, 16)
    # SD3's guidance_scale is classifier-free guidance (a doubled batch above 1); Flux dev's is embedded
    guidance = 1.0 if family == "sd3" else 2.5
    pipe(CAPTIONS[0], latents=start, height=32, width=32, num_inference_steps=3, guidance_scale=guidance,
         max_sequence_length=T5_TOKENS, output_type="latent")
    hook.remove()
    kwargs, output = calls[1]  # the second step: σ < 1, latents no longer the start
    sigma = kwargs["timestep"].float() / (1000 if family == "sd3" else 1)
    assert 0 < float(sigma) < 1
    step_latents = kwargs["hidden_states"]
    if family == "flux":
        step_latents = pipe._unpack_latents(step_latents, 32, 32, pipe.vae_scale_factor)
        output = pipe._unpack_latents(output, 32, 32, pipe.vae_scale_factor)
    conditioning = encode(pipe, family, CAPTIONS[:1], T5_TOKENS)
    ours = predict(pipe.transformer, family, step_latents, sigma, conditioning, guidance=guidance)
    torch.testing.assert_close(ours, output, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flux_dev_needs_a_guidance_value(make_pipeline):
    pipe = make_pipeline("flux-dev")
    conditioning = encode(pipe, "flux", CAPTIONS[:1], T5_TOKENS)
    with pytest.raises(ValueError, match="guidance"):
        predict(pipe.transformer, "flux", torch.zeros(1, 16, 4, 4), torch.tensor([0.5]), conditioning)
    with pytest.raises(ValueError, match="family"):
        predict(pipe.transformer, "sdxl", torch.zeros(1, 16, 4, 4), torch.tensor([0.5]), conditioning)
