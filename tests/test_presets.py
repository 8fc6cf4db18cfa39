"""Every shipped preset is a valid config whose network builds on the real architecture (meta device); the SD3/Flux
presets state the GPU memory the UI estimates for them."""

import re
from pathlib import Path

import pytest

from methods.network import AdapterNetwork, model_parts
from trainer import dit_architectures
from trainer.architectures import build_text_encoders, build_unet
from trainer.config import TrainerConfig

ROOT = Path(__file__).parent.parent
PRESETS = sorted((ROOT / "presets").glob("*.toml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    expected = {"sd15_character_lora", "sd15_style_loha", "sd15_lokr", "sd15_oft", "sd15_boft",
                "sdxl_character_lora", "sdxl_style_lokr", "toy_demo", "sd35_medium_lora", "sd35_large_lora",
                "flux_dev_lora"}
    assert expected <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates_and_builds(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("#"), "each preset starts with a comment saying what it is for"
    assert "VRAM" in text.split("[", 1)[0] or path.stem.startswith("toy"), "the comment states the VRAM it expects"
    config = TrainerConfig.load(path)
    assert TrainerConfig.from_dict(config.to_dict()) == config  # every key survives a round trip
    if config.model.base.startswith("presets/"):  # the toy demo: its model and dataset live in the repository
        from diffusers import StableDiffusionPipeline

        assert (ROOT / config.dataset.dir).is_dir()
        pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / config.model.base), local_files_only=True)
        arch, unet, encoders = "sd1", pipe.unet, [pipe.text_encoder]
    elif (variant := next((v for v in dit_architectures.VARIANTS.values() if v.hub_id == config.model.base), None)):
        arch, unet = variant.family, dit_architectures.build_transformer(variant.name, meta=True)
        encoders = dit_architectures.build_text_encoders(variant.name, meta=True)
    else:
        arch = "sdxl" if "xl" in config.model.base else "sd1"
        unet = build_unet(arch, meta=True)
        encoders = build_text_encoders(arch, meta=True) if config.train.train_text_encoder else []
    parts = model_parts(unet, encoders if config.train.train_text_encoder else [], arch)
    network = AdapterNetwork.create(parts, arch, config.network.method, config.network.options,
                                    config.target_config())
    assert len(network) > 0
    assert network.method == config.network.method
    if arch in ("sd3", "flux"):  # the stated need is the UI's estimate, rounded to whole GB
        import torch
        from diffusers import AutoencoderKL

        from ui.pipelines import vram_estimate

        with torch.device("meta"):
            vae = AutoencoderKL(**variant.vae)
        stated = float(re.search(r"~(\d+) GB VRAM", text)[1])
        estimated = vram_estimate(config, unet, encoders, vae, network.trainable_parameter_count(), variant.name)
        assert round(estimated.total / 1e9) == stated
        assert config.sample.sampler == "euler" and network.variant == variant.name
