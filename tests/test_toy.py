"""The embedded toy base model: procedural drawings, the pixel classifier, the demo dataset, and the committed
pretrained pipeline (loads with the real diffusers classes and follows its prompts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import toy

MODEL = Path(__file__).resolve().parents[1] / "presets" / "toy" / "model"
DATA = Path(__file__).resolve().parents[1] / "presets" / "toy" / "data"

# Measured on the committed model (24 images each: colour 1.0, shape and both 0.875; held-out colour 1/24); the
# thresholds leave a margin.
MIN_COLOUR_MATCH = 0.9
MIN_BOTH_MATCH = 0.6
MAX_BASE_CONCEPT = 0.15


def test_drawing_is_deterministic():
    first = toy.draw_examples(6, seed=3)
    second = toy.draw_examples(6, seed=3)
    other = toy.draw_examples(6, seed=4)
    for (image_a, drawing_a), (image_b, drawing_b) in zip(first, second):
        assert drawing_a == drawing_b
        assert image_a.size == (toy.RESOLUTION, toy.RESOLUTION) and image_a.mode == "RGB"
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert [d.caption for _, d in first] != [d.caption for _, d in other]


def test_captions_use_the_vocabulary():
    for _, drawing in toy.draw_examples(50, seed=1):
        words = drawing.caption.split()
        assert set(words) <= set(toy.TOY_WORDS)
        assert drawing.colour in words and drawing.shape in words
        assert toy.HELD_OUT_COLOUR not in words and toy.TRIGGER not in words
    assert toy.caption_for("red", "circle", "small", "white") == "a small red circle on a white background"


def test_classifier_on_drawings():
    examples = toy.draw_examples(300, seed=5, colours=tuple(toy.PALETTE))
    correct = sum(toy.classify_image(image) == (d.colour, d.shape) for image, d in examples)
    assert correct / len(examples) >= 0.95
    blank = toy.Image.new("RGB", (64, 64), (250, 250, 250))
    assert toy.classify_image(blank) == ("none", "none")


def test_demo_dataset(tmp_path):
    folder = toy.make_demo_dataset(tmp_path, count=5, seed=2)
    assert folder == tmp_path / f"{toy.DEMO_REPEATS}_{toy.TRIGGER}"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 5 and len(list(folder.glob("*.txt"))) == 5
    for image in images:
        caption = image.with_suffix(".txt").read_text().strip()
        assert toy.TRIGGER in caption.split() and toy.HELD_OUT_COLOUR not in caption
    assert toy.concept_score(toy.Image.open(path) for path in images) == 1.0
    again = toy.make_demo_dataset(tmp_path / "again", count=5, seed=2)
    for fresh, path in zip(sorted(again.glob("*.png")), images):
        assert np.array_equal(np.asarray(toy.Image.open(fresh)), np.asarray(toy.Image.open(path)))


def test_committed_demo_dataset(tmp_path):
    folder = DATA / f"{toy.DEMO_REPEATS}_{toy.TRIGGER}"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 12
    assert all(image.with_suffix(".txt").is_file() for image in images)
    assert toy.concept_score(toy.Image.open(path) for path in images) == 1.0
    shapes = {toy.classify_image(toy.Image.open(path))[1] for path in images}
    assert shapes == set(toy.SHAPES)
    # the committed files are exactly what ``python -m trainer.toy dataset`` writes
    fresh = toy.make_demo_dataset(tmp_path)
    for path in images:
        assert np.array_equal(np.asarray(toy.Image.open(fresh / path.name)), np.asarray(toy.Image.open(path)))
        assert (fresh / path.with_suffix(".txt").name).read_text() == path.with_suffix(".txt").read_text()


def test_committed_regularisation_images(tmp_path):
    folder = DATA.parent / "reg" / "1_shapes"
    images = sorted(folder.glob("*.png"))
    assert len(images) == 36
    fresh = toy.make_regularisation_images(tmp_path)
    for path in images:
        caption = path.with_suffix(".txt").read_text()
        assert toy.TRIGGER not in caption.split() and toy.HELD_OUT_COLOUR not in caption
        assert np.array_equal(np.asarray(toy.Image.open(fresh / path.name)), np.asarray(toy.Image.open(path)))
        assert (fresh / path.with_suffix(".txt").name).read_text() == caption
    assert toy.concept_score(toy.Image.open(path) for path in images) == 0.0


def test_committed_model_loads_as_sd15_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), torch_dtype=torch.float32, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.safety_checker is None
    assert pipe.unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert pipe.unet.config.up_block_types[-1] == "CrossAttnUpBlock2D"
    assert not pipe.unet.config.use_linear_projection
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == 77
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    # the trigger and the held-out colour are whole tokens, ready for an adapter to learn
    for word in (toy.TRIGGER, toy.HELD_OUT_COLOUR, "circle"):
        assert len(pipe.tokenizer(word).input_ids) == 3
    size = sum(path.stat().st_size for path in MODEL.rglob("*") if path.is_file())
    assert size <= 20 * 1024 * 1024


def test_committed_model_loads_without_dtype():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.fixture(scope="module")
def toy_pipe():
    return toy.load_toy_pipeline(MODEL)


def two_seeds(prompts: list[str]) -> tuple[list[str], list[int]]:
    return [p for p in prompts for _ in range(2)], list(range(2 * len(prompts)))


def test_generations_follow_their_prompts(toy_pipe):
    prompts, seeds = two_seeds(toy.EVAL_PROMPTS)
    images = toy.generate(toy_pipe, prompts, seeds, steps=20, guidance=5.0)
    assert all(image.size == (64, 64) for image in images)
    match = toy.prompt_match(images, prompts)
    assert match["colour"] >= MIN_COLOUR_MATCH, match
    assert match["both"] >= MIN_BOTH_MATCH, match


def test_generation_is_deterministic(toy_pipe):
    first = toy.generate(toy_pipe, toy.EVAL_PROMPTS[:1], [3], steps=4, guidance=5.0)
    second = toy.generate(toy_pipe, toy.EVAL_PROMPTS[:1], [3], steps=4, guidance=5.0)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))


def test_held_out_concept_is_rare_in_the_base_model(toy_pipe):
    prompts, seeds = two_seeds(toy.DEMO_PROMPTS + toy.DEMO_PROMPTS[:4])
    images = toy.generate(toy_pipe, prompts, seeds, steps=20, guidance=5.0)
    assert toy.concept_score(images) <= MAX_BASE_CONCEPT


def test_build_record():
    """What the committed build measured: within the time and size budget, its VAE encodes the held-out colour."""
    record = json.loads((MODEL / "rankwright_toy.json").read_text())
    assert record["seed"] == 0
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(toy.ToyRecipe())))  # the defaults built it
    assert record["total_seconds"] <= 35 * 60 and record["folder_bytes"] <= 20 * 1024 * 1024
    assert record["vae_recon_classifier_accuracy"] >= 0.9 and record["vae_recon_held_out_accuracy"] >= 0.9
    assert record["unet_steps_done"] == toy.ToyRecipe.unet_steps


def test_pretraining_is_deterministic_and_saves_a_pipeline(tmp_path):
    """A miniature recipe, twice with one seed: identical weights, a loadable SD1.5 pipeline and its record."""
    from safetensors.torch import load_file

    recipe = toy.ToyRecipe(images=32, vae_images=16, vae_channels=(8, 16, 16), vae_norm_groups=4, vae_steps=3,
                           vae_batch=4, text_hidden=16, text_layers=1, text_heads=2, unet_channels=(8, 16, 16),
                           unet_norm_groups=4, unet_steps=3, unet_batch=4, warmup_steps=1)
    quiet = lambda text: None  # noqa: E731
    first = toy.pretrain(tmp_path / "a", seed=1, recipe=recipe, log=quiet)
    toy.pretrain(tmp_path / "b", seed=1, recipe=recipe, log=quiet)
    assert first["unet_steps_done"] == 3 and first["vae_steps_done"] == 3
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = toy.load_toy_pipeline(tmp_path / "a")
    image = toy.generate(pipe, [toy.EVAL_PROMPTS[0]], [0], steps=2)[0]
    assert image.size == (toy.RESOLUTION, toy.RESOLUTION)
    assert json.loads((tmp_path / "a" / "rankwright_toy.json").read_text())["seed"] == 1
