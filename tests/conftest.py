"""Shared fixtures: tiny diffusers pipelines (sd1, sd2 v-prediction, sdxl), real-size meta-device models, and
deterministic UNet inputs. Nothing here downloads anything; every model is built from trainer/architectures.py."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from trainer.architectures import build_text_encoders, build_tiny_pipeline, build_unet, write_tiny_tokenizer

ARCHS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """Every model in the suite is tiny: one thread is fastest, and immune to OpenMP spinning on a shared CI machine
    (measured: several times slower with two threads on two busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def ws(tmp_path):
    """A fresh web-UI workspace (``ui.workspace.Workspace``) under the test's temporary folder."""
    from ui.workspace import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny CLIP BPE tokenizer folder (vocab.json + merges.txt), written once per session."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture
def tiny_pipeline(tokenizer_dir) -> Callable[..., Any]:
    """Factory: ``tiny_pipeline("sd1" | "sd2" | "sdxl", seed=0, prediction_type=None)`` → a fresh pipeline.

    Each call builds new modules (≈0.2 s), so tests may mutate weights, inject PEFT layers or attach hooks freely.
    The same seed gives bit-identical weights. sd2 defaults to v-prediction, as the real SD2-768 model.
    """

    def make(arch: str, seed: int = 0, prediction_type: str | None = None):
        if arch not in ARCHS:
            raise ValueError(f"unknown tiny architecture {arch!r}; allowed: {ARCHS}")
        pipe = build_tiny_pipeline(arch, tokenizer_dir, seed=seed, prediction_type=prediction_type)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae):
            if module is not None:
                module.eval().requires_grad_(False)
        return pipe

    return make


@functools.cache
def _real_models(arch: str):
    unet = build_unet(arch, meta=True)
    encoders = build_text_encoders(arch, meta=True)
    return unet, encoders


@pytest.fixture(scope="session")
def real_models() -> Callable[[str], tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """Factory: ``real_models(arch)`` → (UNet, [text encoders]) at real size on the meta device (no memory).

    Cached for the session: do not attach hooks or otherwise modify these models in a test.
    """
    return _real_models


def unet_inputs(pipe: Any, seed: int = 0, batch: int = 1, tokens: int = 5) -> dict[str, Any]:
    """Deterministic keyword arguments for ``pipe.unet(**inputs)`` of a tiny pipeline (SDXL adds its conditioning)."""
    unet = pipe.unet
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, tokens, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        text_embeds = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_embeds, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


@pytest.fixture
def run_unet() -> Callable[..., torch.Tensor]:
    """``run_unet(pipe, seed=0)`` → the UNet's output on deterministic inputs (no grad)."""

    def run(pipe: Any, seed: int = 0) -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(**unet_inputs(pipe, seed), return_dict=False)[0]

    return run


def randomize_adapters(network: Any, seed: int = 0, std: float = 0.1) -> None:
    """Fill every trainable adapter tensor with random non-zero values (LoRA ``up`` starts at zero otherwise).

    ``dora_scale`` and ``rescale`` keep their initial values (norms / ones), so the adapters stay well-conditioned.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network:
            for name, parameter in adapter.named_parameters():
                if name in ("dora_scale", "rescale"):
                    continue
                values = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(values.to(parameter.dtype))


@pytest.fixture
def randomize() -> Callable[..., None]:
    """``randomize(network, seed=0, std=0.1)``: see :func:`randomize_adapters`."""
    return randomize_adapters
