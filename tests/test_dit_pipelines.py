"""Tiny SD3/SD3.5/Flux pipelines (trainer/dit_architectures.py) and the variants of the released models.

Every tiny pipeline generates offline, saves to a folder and reloads with ``DiffusionPipeline.from_pretrained``
into identical images; real-size transformers are built on the meta device and detected as the released variant.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dit_pipelines import (
    SD3_VARIANTS,
    VARIANT_NAMES,
    generation_kwargs,
    native_checkpoint,
    real_transformer,
    tiny_pipeline_factory,
)

from trainer.dit_architectures import VARIANTS, detect, detect_checkpoint, parameter_count


@pytest.fixture(scope="module")
def make_pipeline(tmp_path_factory):
    return tiny_pipeline_factory(tmp_path_factory.mktemp("dit-tokenizers"))


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_tiny_pipeline_generates_saves_and_reloads_offline(make_pipeline, name, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_pipeline(name)
    images = pipe("a photo of zq", **generation_kwargs(name)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    pipe.save_pretrained(tmp_path / name)
    index = json.loads((tmp_path / name / "model_index.json").read_text())
    t5_tokenizer = "tokenizer_3" if VARIANTS[name].family == "sd3" else "tokenizer_2"
    # transformers 5 reloads a word-level tokenizer only through the generic fast class (T5TokenizerFast wants a
    # Unigram vocabulary); its alias TokenizersBackend is what save_pretrained records.
    assert index[t5_tokenizer][1] in ("PreTrainedTokenizerFast", "TokenizersBackend")
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / name, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    # the same images up to float rounding: with transformers 5.24 they differ by about 1e-7 after the reload
    np.testing.assert_allclose(reloaded("a photo of zq", **generation_kwargs(name)).images, images, rtol=0, atol=1e-5)
    found = detect(reloaded)
    assert found.variant.name == name and not found.exact


# Parameters of the released transformers (model cards: SD3 Medium 2B, SD3.5 Large 8.1B, FLUX.1 12B).
PARAMETERS = {"sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520,
              "flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560}


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_real_size_transformers_are_detected_exactly(name):
    transformer = real_transformer(name)
    found = detect(transformer)
    assert found.variant.name == name and found.exact
    assert found.description == VARIANTS[name].title
    assert parameter_count(transformer) == PARAMETERS[name]


def test_detect_ignores_unets_and_pipelines_without_transformer(real_models):
    unet, _ = real_models("sdxl")
    assert detect(unet) is None
    assert detect(object()) is None


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_detect_checkpoint_reads_original_key_layouts(name):
    """The checkpoint rules of diffusers/sd-scripts, fed the native key set our naming gives each real model
    (plus the QK-norm scales, which are no Linear layers) with and without ComfyUI's prefix."""
    from methods.dit_naming import TransformerNaming

    naming = TransformerNaming(real_transformer(name))
    keys = {native.path + ".weight": (1,) for native in naming.native.values()}  # shapes are not read
    if VARIANTS[name].transformer.get("qk_norm"):
        keys["joint_blocks.0.x_block.attn.ln_k.weight"] = (64,)
    assert detect_checkpoint(keys) is VARIANTS[name]
    prefixed = {f"model.diffusion_model.{key}": shape for key, shape in keys.items()}
    assert detect_checkpoint(prefixed) is VARIANTS[name]


def test_sd3_variants_differ_in_what_detection_reads():
    configs = {name: VARIANTS[name].transformer for name in SD3_VARIANTS}
    assert configs["sd3.5-medium"]["dual_attention_layers"] == tuple(range(13))
    assert configs["sd3.5-medium"]["pos_embed_max_size"] == 384 and configs["sd3-medium"]["pos_embed_max_size"] == 192
    assert configs["sd3.5-large"]["qk_norm"] == "rms_norm" and configs["sd3.5-large"]["num_layers"] == 38
    assert detect_checkpoint({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}) is None


def test_original_layout_single_file_loads_offline_with_our_config(tmp_path, monkeypatch):
    """An sgm-layout SD3.5-medium-like checkpoint (ComfyUI's prefix) → from_single_file with our config folder."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from trainer.dit_architectures import TINY_TRANSFORMER, build_transformer, write_transformer_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformer = build_transformer("sd3.5-medium", tiny=True)
    native = {f"model.diffusion_model.{key}": tensor.contiguous() for key, tensor in
              native_checkpoint(transformer).items()}
    save_file(native, tmp_path / "model.safetensors")
    assert detect_checkpoint({key: tuple(t.shape) for key, t in native.items()}) is VARIANTS["sd3.5-medium"]
    config = write_transformer_config(tmp_path / "config", "sd3.5-medium", TINY_TRANSFORMER["sd3.5-medium"])
    loaded = SD3Transformer2DModel.from_single_file(str(tmp_path / "model.safetensors"), config=str(config),
                                                    subfolder="transformer", local_files_only=True)
    original = transformer.state_dict()
    assert all(torch.equal(loaded.state_dict()[key], tensor) for key, tensor in original.items())
    assert detect(loaded).variant.name == "sd3.5-medium"
    real = write_transformer_config(tmp_path / "real", "flux-dev")
    assert json.loads((real / "transformer" / "config.json").read_text())["num_single_layers"] == 38
