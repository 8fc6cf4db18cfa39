"""Previews (trainer/sampling.py) on tiny SD1/SD2/SDXL pipelines, grids, safe saving, and loss plots (trainer/plots.py).

Images are 32×32 (16×16 latents) with 2 sampling steps: what is checked is plumbing (sizes, seeds, restoring the
pipeline, files), not image quality.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import sampling
from trainer.architectures import build_tiny_pipeline
from trainer.config import SAMPLERS, SampleSection
from trainer.plots import PALETTE, ema, loss_curve_png
from trainer.sampling import (
    compare_with_without,
    make_grid,
    make_scheduler,
    preview_options,
    render_previews,
    save_previews,
)

SIZE = 32
FAST = {"steps": 2, "guidance_scale": 5.0, "width": SIZE, "height": SIZE}
PROMPTS = ["a photo of a red circle", "a blue square on white background"]





@pytest.fixture(scope="module")
def sd1(tokenizer_dir):
    return build_tiny_pipeline("sd1", tokenizer_dir)


@pytest.fixture(scope="module")
def sdxl(tokenizer_dir):
    return build_tiny_pipeline("sdxl", tokenizer_dir)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


# ----- schedulers -----------------------------------------------------------------------------------------------
def test_sampler_names_match_the_config():
    assert tuple(sampling.SAMPLERS) == tuple(SAMPLERS)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_make_scheduler_keeps_the_model_schedule(sd1, prediction_type):
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    # A DDPM training config with clip_sample on (its default) and a custom schedule.
    base = DDPMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear", num_train_timesteps=900,
                         prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=1)
    expected = {"euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    for name in SAMPLERS:
        scheduler = make_scheduler(name, base)
        assert type(scheduler) is expected[name]
        config = scheduler.config
        assert config.prediction_type == prediction_type
        assert config.num_train_timesteps == 900 and config.timestep_spacing == "trailing"
        assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.001, 0.02, "scaled_linear")
        assert config.steps_offset == 1
        # the config dict works as well as the scheduler
        assert type(make_scheduler(name, base.config)) is expected[name]
    dpm = make_scheduler("dpmpp_2m", base).config
    assert dpm.algorithm_type == "dpmsolver++" and dpm.solver_order == 2
    assert make_scheduler("ddim", base).config.clip_sample is False
    assert make_scheduler("euler", sd1.scheduler) is not sd1.scheduler
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun", base)


# ----- rendering ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sd1_samplers_render_deterministic_previews(sd1, sampler):
    images = render_previews(sd1, PROMPTS, sampler=sampler, seed=7, **FAST)
    assert [image.size for image in images] == [(SIZE, SIZE)] * 2
    assert all(image.mode == "RGB" for image in images)
    assert not same(images[0], images[1]), "different prompts (and seeds) gave the same image"
    # Prompt 1 alone with seed 8 is prompt 1 of the batch seeded 7: each prompt has its own seed + index.
    again = render_previews(sd1, PROMPTS[1:], sampler=sampler, seed=8, **FAST)
    assert same(again[0], images[1])


def test_sd1_seed_and_prompt_change_the_image(sd1):
    base = render_previews(sd1, PROMPTS[:1], seed=3, **FAST)[0]
    assert same(base, render_previews(sd1, PROMPTS[:1], seed=3, **FAST)[0])
    assert not same(base, render_previews(sd1, PROMPTS[:1], seed=4, **FAST)[0])
    # Same seed, other prompt: the text conditioning changes the image.
    assert not same(base, render_previews(sd1, PROMPTS[1:], seed=3, **FAST)[0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sdxl_samplers_render(sdxl, sampler):
    images = render_previews(sdxl, PROMPTS[:1], sampler=sampler, seed=11, **FAST)
    assert [image.size for image in images] == [(SIZE, SIZE)]
    if sampler == "euler_a":  # the ancestral sampler draws fresh noise per step: from the seeded generator too
        assert same(images[0], render_previews(sdxl, PROMPTS[:1], sampler=sampler, seed=11, **FAST)[0])
        assert not same(images[0], render_previews(sdxl, PROMPTS[1:], sampler=sampler, seed=11, **FAST)[0])


def test_sdxl_non_square_and_negative_prompt(sdxl):
    image = render_previews(sdxl, PROMPTS[:1], seed=1, **{**FAST, "width": 48, "height": 32})[0]
    assert image.size == (48, 32)
    negative = render_previews(sdxl, PROMPTS[:1], seed=1, negative_prompt="black background",
                               **{**FAST, "width": 48, "height": 32})[0]
    assert not same(image, negative)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_clip_skip_changes_the_conditioning(request, arch):
    pipe = request.getfixturevalue(arch)
    last = render_previews(pipe, PROMPTS[:1], seed=4, **FAST)[0]
    skipped = render_previews(pipe, PROMPTS[:1], seed=4, clip_skip=2, **FAST)[0]
    assert skipped.size == (SIZE, SIZE) and not same(last, skipped)
    assert same(skipped, render_previews(pipe, PROMPTS[:1], seed=4, clip_skip=2, **FAST)[0])


def test_sd2_v_prediction_renders(tokenizer_dir):
    pipe = build_tiny_pipeline("sd2", tokenizer_dir)
    used = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: used.append(pipe.scheduler.config))
    try:
        images = render_previews(pipe, PROMPTS[:1], sampler="dpmpp_2m", seed=2, **FAST)
    finally:
        handle.remove()
    assert images[0].size == (SIZE, SIZE)
    assert used and all(c.prediction_type == "v_prediction" and c.algorithm_type == "dpmsolver++" for c in used)


def test_render_restores_scheduler_modes_and_progress_bar(sd1):
    scheduler = sd1.scheduler
    sd1.unet.train()
    sd1.text_encoder.train()
    sd1.vae.eval()
    frozen = next(m for name, m in sd1.text_encoder.named_modules() if name.endswith("embeddings"))
    frozen.eval()  # one submodule in eval inside a training model must stay so
    extra = torch.nn.Dropout(0.5).train()  # e.g. the adapter network, not a child of the UNet
    modes_during = []
    handle = sd1.unet.register_forward_pre_hook(
        lambda module, args: modes_during.append((module.training, sd1.text_encoder.training, extra.training,
                                                  type(sd1.scheduler).__name__, torch.is_grad_enabled())))
    try:
        render_previews(sd1, PROMPTS[:1], sampler="ddim", seed=0, extra_modules=[extra], **FAST)
    finally:
        handle.remove()
    assert modes_during and all(m == (False, False, False, "DDIMScheduler", False) for m in modes_during)
    assert sd1.scheduler is scheduler
    assert sd1.unet.training and sd1.text_encoder.training and extra.training
    assert not frozen.training and all(not m.training for m in frozen.modules())
    assert any(m.training for m in sd1.text_encoder.modules() if m is not sd1.text_encoder)
    assert not sd1.vae.training  # was in eval before: stays in eval
    assert getattr(sd1, "_progress_bar_config", {}).get("disable") is not True
    assert sd1.tokenizer.model_max_length == 77  # the tokenizer's own bound is left as it was
    sd1.unet.eval()
    sd1.text_encoder.eval()


def test_render_restores_everything_when_it_fails(sd1):
    scheduler = sd1.scheduler
    sd1.unet.train()

    def fail(module, args):
        raise RuntimeError("boom")

    handle = sd1.unet.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            render_previews(sd1, PROMPTS[:1], sampler="euler", seed=0, **FAST)
    finally:
        handle.remove()
    assert sd1.scheduler is scheduler and sd1.unet.training
    sd1.unet.eval()


def test_nan_decode_is_redone_in_fp32(sd1, monkeypatch, caplog):
    reference = render_previews(sd1, PROMPTS[:1], seed=5, **FAST)[0]
    vae = sd1.vae
    real_decode = vae.decode
    dtypes = []

    def flaky_decode(latents, *args, **kwargs):  # NaN like an fp16 SDXL VAE, fine in fp32
        dtypes.append(vae.dtype)
        output = real_decode(latents, *args, **kwargs)
        if len(dtypes) == 1:
            return (torch.full_like(output[0], float("nan")),)
        return output

    monkeypatch.setattr(vae, "decode", flaky_decode)
    with caplog.at_level(logging.WARNING, logger="trainer.sampling"):
        image = render_previews(sd1, PROMPTS[:1], seed=5, **FAST)[0]
    assert dtypes == [torch.float32, torch.float32]
    assert "NaN" in caplog.text and "fp32" in caplog.text
    assert same(image, reference)


def test_nan_decode_fp16_vae_goes_back_to_its_dtype(sd1, monkeypatch):
    vae = sd1.vae
    real_decode = vae.decode
    dtypes = []

    def decode(latents, *args, **kwargs):
        dtypes.append((vae.dtype, latents.dtype))
        output = real_decode(latents, *args, **kwargs)
        return (torch.full_like(output[0], float("nan")),) if vae.dtype != torch.float32 else output

    monkeypatch.setattr(vae, "decode", decode)
    vae.to(torch.bfloat16)
    try:
        latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
        image = sampling.decode_latents(sd1, latents)[0]
        assert dtypes == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
        assert vae.dtype == torch.bfloat16 and image.size == (SIZE, SIZE)
    finally:
        vae.to(torch.float32)


def test_bad_arguments(sd1):
    with pytest.raises(ValueError, match="multiples of 8"):
        render_previews(sd1, PROMPTS[:1], **{**FAST, "width": 30})
    with pytest.raises(ValueError, match="unknown sampler"):
        render_previews(sd1, PROMPTS[:1], sampler="plms", **FAST)


def test_preview_options_from_config():
    options = preview_options(SampleSection(prompts=["x"], width=0, height=768, sampler="ddim"), 512)
    assert options["width"] == 512 and options["height"] == 768 and options["sampler"] == "ddim"


# ----- compare with / without an adapter ------------------------------------------------------------------------
@pytest.fixture()
def lora_file(sd1, tmp_path) -> Path:
    from methods.apply import create_network, save_network

    network = create_network(sd1, "lora", {"rank": 4})
    network.detach()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return save_network(network, tmp_path / "test_lora.safetensors", dtype="fp32")


def test_compare_with_without(sd1, lora_file):
    base = render_previews(sd1, PROMPTS[:1], seed=9, **FAST)[0]
    with_image, without_image = compare_with_without(sd1, PROMPTS[0], lora_file, strength=1.0, seed=9, **FAST)
    assert with_image.size == without_image.size == (SIZE, SIZE)
    assert not same(with_image, without_image)
    assert same(without_image, base)
    assert same(render_previews(sd1, PROMPTS[:1], seed=9, **FAST)[0], base), "the adapter was left applied"
    # Strength 0: the adapter changes nothing.
    zero, plain = compare_with_without(sd1, PROMPTS[0], lora_file, strength=0.0, seed=9, **FAST)
    assert same(zero, plain)


def test_compare_removes_the_adapter_when_rendering_fails(sd1, lora_file, monkeypatch):
    base = render_previews(sd1, PROMPTS[:1], seed=9, **FAST)[0]
    real_render = sampling.render_previews

    def failing(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(sampling, "render_previews", failing)
    with pytest.raises(RuntimeError, match="render failed"):
        compare_with_without(sd1, PROMPTS[0], lora_file, seed=9, **FAST)
    assert same(real_render(sd1, PROMPTS[:1], seed=9, **FAST)[0], base)


# ----- grids ----------------------------------------------------------------------------------------------------
def solid(colour, size=(20, 10)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_grid_dimensions_without_labels():
    images = [solid((i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(images, columns=3, padding=0)
    assert grid.size == (3 * 20, 2 * 10)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((45, 5)) == (80, 0, 0)
    assert grid.getpixel((25, 15)) == (160, 0, 0) and grid.getpixel((45, 15)) == (255, 255, 255)  # empty cell
    padded = make_grid(images, columns=3, padding=4)
    assert padded.size == (3 * 20 + 4 * 4, 2 * 10 + 3 * 4)
    assert make_grid(images[:4]).size == (2 * 20 + 3 * 4, 2 * 10 + 3 * 4)  # default columns: ceil(sqrt(n))


def test_grid_labels_add_rows_of_text():
    images = [solid((0, 0, 200), (64, 64)) for _ in range(4)]
    plain = make_grid(images, columns=2)
    labelled = make_grid(images, columns=2, labels=["a red circle", "x", "a " * 40, ""])
    assert labelled.width == plain.width and labelled.height > plain.height
    text_area = pixels(labelled.crop((4, 4, 4 + 64, 10)))
    assert (text_area < 128).any(), "no label drawn"
    with pytest.raises(ValueError, match="labels"):
        make_grid(images, labels=["one"])


def test_grid_of_rows_with_row_and_column_labels():
    rows = [[solid((255, 0, 0)), solid((0, 255, 0))], [solid((0, 0, 255))]]
    grid = make_grid(rows=rows, padding=0)
    assert grid.size == (40, 20)
    assert grid.getpixel((25, 5)) == (0, 255, 0) and grid.getpixel((5, 15)) == (0, 0, 255)
    assert grid.getpixel((25, 15)) == (255, 255, 255)
    labelled = make_grid(rows=rows, row_labels=["LoRA", "base"], column_labels=["p1", "p2"], padding=2)
    assert labelled.width > 2 * 20 + 3 * 2 and labelled.height > 2 * 10 + 3 * 2
    # the images sit at the right of the row-label column and below the header, with the padding around them
    array = pixels(labelled)
    green_y, green_x = np.nonzero((array == (0, 255, 0)).all(axis=-1))
    blue_y, blue_x = np.nonzero((array == (0, 0, 255)).all(axis=-1))
    assert green_x.max() == labelled.width - 3 and blue_y.max() == labelled.height - 3
    assert blue_x.min() > 2 + 10 and green_y.min() > 2 + 6  # after the row labels, under the column labels
    assert blue_x.min() == green_x.min() - 22 and blue_y.min() == green_y.min() + 12
    with_cells = make_grid(rows=rows, labels=[["a", "b"], ["c"]])
    assert with_cells.height > make_grid(rows=rows).height
    with pytest.raises(ValueError):
        make_grid(rows=rows, row_labels=["only one"])
    with pytest.raises(ValueError):
        make_grid(rows=rows, column_labels=["a"])
    with pytest.raises(ValueError):
        make_grid([solid((0, 0, 0))], rows=rows)
    with pytest.raises(ValueError):
        make_grid([])


def test_grid_of_mixed_sizes_centres_images():
    grid = make_grid([solid((255, 0, 0), (20, 20)), solid((0, 0, 255), (10, 10))], columns=2, padding=0)
    assert grid.size == (40, 20)
    assert grid.getpixel((30, 10)) == (0, 0, 255) and grid.getpixel((21, 1)) == (255, 255, 255)


# ----- saving ---------------------------------------------------------------------------------------------------
def test_save_previews_writes_files_and_never_overwrites(tmp_path):
    images = [solid((255, 0, 0), (32, 32)), solid((0, 255, 0), (32, 32))]
    folder = tmp_path / "samples"
    paths = save_previews(images, folder, 25, ["red", "green"])
    assert [p.name for p in paths] == ["step000025_0.png", "step000025_1.png", "step000025_grid.png"]
    assert all(p.is_file() for p in paths)
    with Image.open(paths[0]) as saved:
        assert saved.size == (32, 32) and saved.convert("RGB").getpixel((1, 1)) == (255, 0, 0)
        assert saved.text.get("prompt") == "red" and saved.text.get("step") == "25"
    with Image.open(paths[2]) as grid:
        assert grid.width > 64
    before = {p: p.read_bytes() for p in paths}

    again = save_previews([solid((0, 0, 255), (32, 32)), images[1]], folder, 25, ["blue", "green"])
    assert [p.name for p in again] == ["step000025_0_v2.png", "step000025_1_v2.png", "step000025_grid_v2.png"]
    assert all(p.read_bytes() == data for p, data in before.items()), "an existing preview was overwritten"
    third = save_previews(images[:1], folder, 25, ["red"], grid=False)
    assert [p.name for p in third] == ["step000025_0_v3.png"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        save_previews(images, folder, 26, ["only one prompt"])


def test_save_previews_without_prompts(tmp_path):
    paths = save_previews([solid((1, 2, 3))], tmp_path, 0)
    assert [p.name for p in paths] == ["step000000_0.png", "step000000_grid.png"]


# ----- loss plots -----------------------------------------------------------------------------------------------
def colour_present(image: Image.Image, colour, tolerance: int = 10) -> bool:
    difference = np.abs(pixels(image) - np.array(colour, dtype=np.int16)).max(axis=-1)
    return bool((difference <= tolerance).any())


def test_loss_curve_two_series(tmp_path):
    rng = np.random.default_rng(0)
    train = [(step, 0.2 + 0.1 * np.exp(-step / 100) + rng.normal(0, 0.02)) for step in range(0, 500, 2)]
    validation = [(step, 0.15 + 0.05 * np.exp(-step / 200)) for step in range(0, 500, 50)]
    path = tmp_path / "plots" / "loss.png"
    image = loss_curve_png({"train": train, "validation": validation}, path, title="loss", smoothing=0.8)
    assert image.size == (800, 400)
    assert path.is_file()
    with Image.open(path) as saved:
        assert saved.size == (800, 400)
    assert colour_present(image, PALETTE[0]) and colour_present(image, PALETTE[1])
    assert colour_present(image, (30, 30, 30), tolerance=40)  # tick labels / text
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_loss_curve_sizes_and_edge_cases():
    image = loss_curve_png({"loss": [(1, 0.5), (2, float("nan")), (3, 0.4)]}, None, width=640, height=300)
    assert image.size == (640, 300) and colour_present(image, PALETTE[0])
    single = loss_curve_png({"loss": [(10, 0.3)]}, None)
    assert colour_present(single, PALETTE[0])
    flat = loss_curve_png({"loss": [(i, 1.0) for i in range(5)]}, None)
    assert colour_present(flat, PALETTE[0])
    empty = loss_curve_png({}, None, title="nothing yet")
    assert empty.size == (800, 400)
    many = loss_curve_png({"loss": [(i, float(np.sin(i / 500))) for i in range(20_000)]}, None)
    assert colour_present(many, PALETTE[0])
    with pytest.raises(ValueError):
        loss_curve_png({"loss": [(0, 1.0)]}, None, smoothing=1.0)


def test_ema_is_debiased():
    assert ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert ema([0.0, 2.0], 0.0) == [0.0, 2.0]
    smoothed = ema([0.0, 10.0], 0.5)
    assert smoothed[0] == 0.0 and 0.0 < smoothed[1] < 10.0
