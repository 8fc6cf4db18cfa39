"""Preview images during training and in the UI: samplers, deterministic rendering, grids and safe saving.

Every prompt is rendered on its own with the generator seeded ``seed + index``, so the preview of a prompt is the
same noise at every step of a run (and does not depend on the other prompts). Rendering borrows the pipeline: it
swaps in the chosen sampler, puts the models in eval mode and silences the progress bar, and gives everything back
as it was afterwards, also when rendering fails.

SD3/SD3.5 and FLUX.1 pipelines sample with their own flow-matching Euler scheduler (sampler ``euler``; the SD
samplers are refused), from prompt embeddings computed as in training (:mod:`trainer.dit_conditioning`: the same
T5 length and CLIP layer); ``guidance_scale`` is SD3's classifier-free guidance and FLUX.1 dev's embedded guidance.

Long renders report each denoising step to the callback installed with :func:`on_denoising_step` (per thread): a
progress bar counts them, and a callback that raises (e.g. :class:`RenderStopped` when a stop was asked for) ends
the render within one step.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn

log = logging.getLogger(__name__)

SAMPLERS = ("euler_a", "dpmpp_2m", "ddim", "euler")
SAMPLER_LABELS = {"euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler"}
_STEP_HOOK = threading.local()


class RenderStopped(Exception):
    """A render ended early because a stop was asked for (raised by a denoising-step callback)."""


@contextlib.contextmanager
def on_denoising_step(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback()`` after every denoising step that :func:`render_previews` runs in this thread, inside the
    block; an exception it raises ends the render (the pipeline is restored as after any failure)."""
    previous = getattr(_STEP_HOOK, "callback", None)
    _STEP_HOOK.callback = callback
    try:
        yield
    finally:
        _STEP_HOOK.callback = previous


# ================================================================================================ schedulers
def make_scheduler(name: str, base_scheduler_config: Any) -> Any:
    """A fresh diffusers scheduler for sampler ``name`` built on the model's scheduler config.

    ``base_scheduler_config`` is a scheduler or its config. The model's noise schedule (betas, number of training
    timesteps, ``prediction_type``, ``timestep_spacing``/``steps_offset``, zero-terminal-SNR rescaling) carries
    over; only the sampling algorithm changes. DDIM never clips the predicted sample: that clipping is meant for
    pixel-space models and ruins latents (a DDPM training config often leaves ``clip_sample`` on).
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    config = getattr(base_scheduler_config, "config", base_scheduler_config)
    if config is None:
        raise ValueError("make_scheduler needs the model's scheduler (or its config) to keep its noise schedule")
    config = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


# ================================================================================================ borrowing
@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode and restore every submodule's own ``training`` flag afterwards."""
    flags = [(sub, sub.training) for module in modules if module is not None for sub in module.modules()]
    for module in modules:
        if module is not None:
            module.eval()
    try:
        yield
    finally:
        for sub, training in flags:
            sub.training = training


@contextlib.contextmanager
def swapped_scheduler(pipe: Any, scheduler: Any) -> Iterator[Any]:
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = original


@contextlib.contextmanager
def _quiet_progress(pipe: Any) -> Iterator[None]:
    had_config = hasattr(pipe, "_progress_bar_config")
    previous = dict(pipe._progress_bar_config) if had_config else None
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if previous is None:
            with contextlib.suppress(AttributeError):
                del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = previous


@contextlib.contextmanager
def _bounded_tokenizers(pipe: Any) -> Iterator[None]:
    """A tokenizer saved without ``model_max_length`` reports 1e30; pad to the text encoder's positions instead."""
    changed = []
    for tokenizer_name, encoder_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
        positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        if tokenizer is None or positions is None or getattr(tokenizer, "model_max_length", 0) <= positions:
            continue
        if any(t is tokenizer for t, _ in changed):
            continue
        changed.append((tokenizer, tokenizer.model_max_length))
        tokenizer.model_max_length = positions
    try:
        yield
    finally:
        for tokenizer, length in changed:
            tokenizer.model_max_length = length


def _is_sdxl(pipe: Any) -> bool:
    """SDXL pipelines take the size conditioning (``original_size``/``target_size``) as call arguments."""
    try:
        return "original_size" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return getattr(pipe, "text_encoder_2", None) is not None


# ================================================================================================ rendering
def render_previews(
    pipe: Any,
    prompts: Sequence[str],
    *,
    sampler: str = "euler_a",
    steps: int = 20,
    guidance_scale: float = 7.0,
    seed: int = 1234,
    width: int = 512,
    height: int = 512,
    negative_prompt: str = "",
    generator_device: str | torch.device = "cpu",
    clip_skip: int = 1,
    guidance_rescale: float = 0.0,
    extra_modules: Iterable[nn.Module] = (),
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """One image per prompt, prompt ``i`` with its own generator seeded ``seed + i``.

    Works on SD1/SD2 (ε or v-prediction: the sampler keeps the model's ``prediction_type``) and SDXL pipelines
    (``original_size``/``target_size`` = the requested size). ``clip_skip`` counts as in kohya (1 = last layer).
    ``extra_modules`` (e.g. the adapter network, whose modules are not children of the UNet) are put in eval mode
    too. Latents are decoded here, in fp32 again when the VAE's (fp16) decode gives NaN/inf. SD3/Flux pipelines:
    see the module docstring; ``max_sequence_length`` is their T5 length (default: the variant's).
    """
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"preview size must be positive multiples of 8, got {width}×{height}")
    if steps < 1:
        raise ValueError(f"preview steps must be ≥ 1, got {steps}")
    family = _dit_family(pipe)
    if family is not None:
        if guidance_rescale:
            raise ValueError("guidance_rescale applies to SD/SDXL previews, not to SD3/Flux")
        return _render_dit(pipe, family, prompts, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                           seed=seed, width=width, height=height, negative_prompt=negative_prompt,
                           generator_device=generator_device, clip_skip=clip_skip, extra_modules=extra_modules,
                           max_sequence_length=max_sequence_length)
    scheduler = make_scheduler(sampler, pipe.scheduler)
    models = [getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2", "vae")]
    sdxl = _is_sdxl(pipe)
    images: list[Image.Image] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(*models, *extra_modules))
        stack.enter_context(swapped_scheduler(pipe, scheduler))
        stack.enter_context(_quiet_progress(pipe))
        stack.enter_context(_bounded_tokenizers(pipe))
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device=generator_device).manual_seed(int(seed) + index)
            kwargs: dict[str, Any] = {
                "prompt": prompt, "negative_prompt": negative_prompt or None, "num_inference_steps": int(steps),
                "guidance_scale": float(guidance_scale), "width": int(width), "height": int(height),
                "generator": generator, "output_type": "latent",
            }
            if clip_skip > 1 and sdxl:
                kwargs["clip_skip"] = clip_skip - 1  # diffusers counts the layers skipped beyond SDXL's default
            elif clip_skip > 1:
                kwargs.update(_skipped_embeddings(pipe, prompt, negative_prompt, clip_skip))
            if guidance_rescale:
                kwargs["guidance_rescale"] = float(guidance_rescale)
            if sdxl:
                kwargs["original_size"] = kwargs["target_size"] = (int(height), int(width))
            hook = getattr(_STEP_HOOK, "callback", None)
            if hook is not None:
                kwargs["callback_on_step_end"] = _step_callback(hook)
            latents = pipe(**kwargs).images
            images.extend(decode_latents(pipe, latents))
    return images


def _step_callback(hook: Callable[[], None]) -> Callable:
    """diffusers' ``callback_on_step_end`` around ``hook`` (it must hand back the tensors it was given)."""

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        hook()
        return tensors

    return callback


def _dit_family(pipe: Any) -> str | None:
    from methods.dit_naming import dit_family

    transformer = getattr(pipe, "transformer", None)
    return dit_family(transformer) if transformer is not None else None


def _render_dit(pipe: Any, family: str, prompts: Sequence[str], *, sampler: str, steps: int, guidance_scale: float,
                seed: int, width: int, height: int, negative_prompt: str, generator_device: str | torch.device,
                clip_skip: int, extra_modules: Iterable[nn.Module], max_sequence_length: int | None
                ) -> list[Image.Image]:
    """SD3/Flux previews: the pipeline's own flow-match scheduler, our prompt embeddings, latents decoded here."""
    from .dit_architectures import detect
    from .dit_conditioning import encode
    from .flow_matching import unpack_latents

    if sampler != "euler":
        raise ValueError(f"sampler {sampler!r} is for SD/SDXL; SD3/Flux previews use the pipeline's flow-matching "
                         "Euler sampler (sampler \"euler\")")
    if family == "flux" and negative_prompt:
        raise ValueError("FLUX.1 previews take no negative prompt (the model is guidance-distilled); leave it empty")
    length = max_sequence_length or detect(pipe).variant.t5_max_length
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    images: list[Image.Image] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(*(getattr(pipe, name, None) for name in names), *extra_modules))
        stack.enter_context(_quiet_progress(pipe))
        dtype = pipe.transformer.dtype
        negative = encode(pipe, family, [negative_prompt or ""], length, clip_skip) if family == "sd3" else None
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device=generator_device).manual_seed(int(seed) + index)
            text = encode(pipe, family, [prompt], length, clip_skip)
            kwargs: dict[str, Any] = {
                "prompt_embeds": text.hidden_states.to(dtype), "pooled_prompt_embeds": text.pooled.to(dtype),
                "num_inference_steps": int(steps), "guidance_scale": float(guidance_scale), "width": int(width),
                "height": int(height), "generator": generator, "output_type": "latent"}
            if negative is not None:
                kwargs.update(negative_prompt_embeds=negative.hidden_states.to(dtype),
                              negative_pooled_prompt_embeds=negative.pooled.to(dtype))
            hook = getattr(_STEP_HOOK, "callback", None)
            if hook is not None:
                kwargs["callback_on_step_end"] = _step_callback(hook)
            latents = pipe(**kwargs).images
            if family == "flux":  # packed 2×2-patch tokens (FluxPipeline._unpack_latents's sizes)
                factor = pipe.vae_scale_factor * 2
                latents = unpack_latents(latents, 2 * (int(height) // factor), 2 * (int(width) // factor))
            images.extend(decode_latents(pipe, latents))
    return images


def _skipped_embeddings(pipe: Any, prompt: str, negative_prompt: str, clip_skip: int) -> dict[str, Any]:
    """SD1/SD2 prompt embeddings from an earlier CLIP layer, computed as in training.

    (diffusers' own ``clip_skip`` path for these pipelines reaches for ``text_encoder.text_model``, which the
    transformers 5 ``CLIPTextModel`` no longer has.)
    """
    from .conditioning import encode_captions

    return {"prompt": None, "negative_prompt": None,
            "prompt_embeds": encode_captions(pipe, [prompt], clip_skip).hidden_states,
            "negative_prompt_embeds": encode_captions(pipe, [negative_prompt or ""], clip_skip).hidden_states}


def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents → PIL images through the pipeline's VAE; re-decoded in fp32 when the result is not finite."""
    vae = pipe.vae
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        channels = latents.shape[1]
        mean_t = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:  # SD3/Flux VAEs also shift their latents (shift_factor); SD's have none
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if not torch.isfinite(image).all():
            log.warning("the VAE decode in %s gave NaN/inf (a known fp16 VAE problem, notably SDXL's); "
                        "decoding the preview again in fp32 (set model.vae_fp32 = true to avoid this)",
                        str(vae.dtype).replace("torch.", ""))
            image = _decode_fp32(vae, latents)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def _decode_fp32(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        return vae.decode(latents.float(), return_dict=False)[0]
    finally:
        vae.to(dtype)


def compare_with_without(
    pipe: Any,
    prompt: str,
    adapter_path: str | os.PathLike,
    strength: float = 1.0,
    seed: int = 1234,
    **render_options: Any,
) -> tuple[Image.Image, Image.Image]:
    """The same prompt and seed rendered with the adapter file applied at ``strength`` and without it.

    ``render_options`` are those of :func:`render_previews` (sampler, steps, guidance_scale, width, height, …).
    The adapter is removed again before returning, also when rendering raises.
    """
    from methods.apply import apply_adapter

    handle = apply_adapter(pipe, adapter_path, strength)
    try:
        with_image = render_previews(pipe, [prompt], seed=seed, **render_options)[0]
    finally:
        handle.remove()
    without_image = render_previews(pipe, [prompt], seed=seed, **render_options)[0]
    return with_image, without_image


def preview_options(sample: Any, resolution: int) -> dict[str, Any]:
    """Keyword arguments of :func:`render_previews` from a ``[sample]`` config section (0 size → resolution)."""
    return {"sampler": sample.sampler, "steps": sample.steps, "guidance_scale": sample.guidance_scale,
            "seed": sample.seed, "width": sample.width or resolution, "height": sample.height or resolution,
            "negative_prompt": sample.negative_prompt}


# ================================================================================================ grids
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
FONT_SIZE = 12


def make_grid(
    images: Sequence[Image.Image] | None = None,
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    rows: Sequence[Sequence[Image.Image | None]] | None = None,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    padding: int = 4,
    max_label_lines: int = 2,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """Images in a grid, each cell ``max width × max height`` of the images (smaller ones centred).

    Two forms:

    * ``make_grid(images, columns=None, labels=None)``: a flat list wrapped into ``columns`` columns (default:
      ``ceil(sqrt(n))``), ``labels[i]`` written above image ``i``.
    * ``make_grid(rows=[[...], [...]], row_labels=[...], column_labels=[...])``: one row per list (e.g. one per
      method, one column per prompt), row labels in a column on the left, column labels in a header row. A row
      may be shorter than the others or hold ``None`` for an empty cell; ``labels`` may then be a list of lists.

    Labels are wrapped to the cell width (at most ``max_label_lines`` lines, cut with "..."). With no labels the
    grid is exactly ``columns·w + (columns+1)·padding`` wide and ``rows·h + (rows+1)·padding`` high.
    """
    if (images is None) == (rows is None):
        raise ValueError("make_grid takes either a flat list of images or rows=[[...], ...], not both")
    cell_labels: list[list[str | None]] | None = None
    if images is not None:
        flat = list(images)
        if not flat:
            raise ValueError("make_grid: no images")
        columns = max(1, int(columns or math.ceil(math.sqrt(len(flat)))))
        grid_rows: list[list[Image.Image | None]] = [flat[i:i + columns] for i in range(0, len(flat), columns)]
        if labels is not None:
            flat_labels = [str(label) for label in labels]
            if len(flat_labels) != len(flat):
                raise ValueError(f"make_grid: {len(flat_labels)} labels for {len(flat)} images")
            cell_labels = [flat_labels[i:i + columns] for i in range(0, len(flat_labels), columns)]
    else:
        if columns is not None:
            raise ValueError("make_grid: columns is set by the rows; pass rows= without columns=")
        grid_rows = [list(row) for row in rows]
        if not grid_rows or not any(image is not None for row in grid_rows for image in row):
            raise ValueError("make_grid: no images")
        columns = max(len(row) for row in grid_rows)
        if labels is not None:
            cell_labels = [[None if label is None else str(label) for label in row] for row in labels]
            if len(cell_labels) != len(grid_rows) or any(len(a) != len(b) for a, b in zip(cell_labels, grid_rows)):
                raise ValueError("make_grid: labels must have the shape of rows")
    if row_labels is not None and len(row_labels) != len(grid_rows):
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {len(grid_rows)} rows")
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"make_grid: {len(column_labels)} column labels for {columns} columns")

    present = [image for row in grid_rows for image in row if image is not None]
    cell_w = max(image.width for image in present)
    cell_h = max(image.height for image in present)
    font = _font()
    line_h = _line_height(font)
    pad = max(0, int(padding))

    wrapped_cells = None
    label_h = 0
    if cell_labels is not None:
        wrapped_cells = [[_wrap(label or "", font, cell_w, max_label_lines) for label in row] for row in cell_labels]
        lines = max((len(cell) for row in wrapped_cells for cell in row), default=0)
        label_h = lines * line_h + (2 if lines else 0)
    header_h = 0
    wrapped_columns = None
    if column_labels is not None:
        wrapped_columns = [_wrap(str(label), font, cell_w, max_label_lines) for label in column_labels]
        lines = max((len(cell) for cell in wrapped_columns), default=0)
        header_h = lines * line_h + pad if lines else 0
    side_w = 0
    wrapped_rows = None
    if row_labels is not None:
        side_limit = max(cell_w, 120)
        side_lines = max(1, (cell_h + label_h) // line_h)
        wrapped_rows = [_wrap(str(label), font, side_limit, side_lines) for label in row_labels]
        widest = max((_text_width(font, line) for cell in wrapped_rows for line in cell), default=0)
        side_w = min(widest, side_limit) + pad if widest else 0

    row_h = label_h + cell_h
    width = side_w + columns * cell_w + (columns + 1) * pad
    height = header_h + len(grid_rows) * row_h + (len(grid_rows) + 1) * pad
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)

    def cell_x(column: int) -> int:
        return side_w + pad + column * (cell_w + pad)

    if wrapped_columns is not None:
        for column, lines in enumerate(wrapped_columns):
            _draw_lines(draw, lines, font, cell_x(column), pad, cell_w, line_h, centre=True)
    for r, row in enumerate(grid_rows):
        top = header_h + pad + r * (row_h + pad)
        if wrapped_rows is not None:
            lines = wrapped_rows[r]
            block = len(lines) * line_h
            _draw_lines(draw, lines, font, pad, top + label_h + max(0, (cell_h - block) // 2), side_w - pad, line_h,
                        centre=False)
        for c, image in enumerate(row):
            x = cell_x(c)
            if wrapped_cells is not None:
                _draw_lines(draw, wrapped_cells[r][c], font, x, top, cell_w, line_h, centre=True)
            if image is None:
                continue
            image = image.convert("RGB")
            canvas.paste(image, (x + (cell_w - image.width) // 2, top + label_h + (cell_h - image.height) // 2))
    return canvas


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - left))


def _line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Hgjy|")
    return int(math.ceil(bottom - min(top, 0))) + 2


def _wrap(text: str, font: Any, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line are split; overflow ends in '...'."""
    text = " ".join(text.split())
    if not text or max_lines < 1:
        return []
    lines: list[str] = []
    current = ""
    words = text.split(" ")
    index = 0
    while index < len(words):
        word = words[index]
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= max_width:
            current = candidate
            index += 1
            continue
        if current:
            lines.append(current)
            current = ""
        else:  # a single word wider than the line: cut it
            cut = max(1, _fit(word, font, max_width))
            lines.append(word[:cut])
            words[index] = word[cut:]
        if len(lines) == max_lines:
            break
    else:
        if current:
            lines.append(current)
        return lines
    # Out of lines with text left: end the last line with an ellipsis.
    last = lines[-1]
    while last and _text_width(font, last + "...") > max_width:
        last = last[:-1]
    lines[-1] = last.rstrip() + "..."
    return lines


def _fit(text: str, font: Any, max_width: int) -> int:
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if _text_width(font, text[:middle]) <= max_width:
            low = middle
        else:
            high = middle - 1
    return low


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: Any, x: int, y: int, width: int, line_h: int,
                centre: bool) -> None:
    for number, line in enumerate(lines):
        offset = max(0, (width - _text_width(font, line)) // 2) if centre else 0
        draw.text((x + offset, y + number * line_h), line, fill=TEXT_COLOR, font=font)


# ================================================================================================ saving
def save_previews(
    images: Sequence[Image.Image],
    folder: str | os.PathLike,
    step: int,
    prompts: Sequence[str] | None = None,
    *,
    grid: bool = True,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``step{step:06d}_{i}.png`` per image and ``step{step:06d}_grid.png`` (labelled with the prompts).

    Files are written atomically (temporary file, then rename) and never replace an existing file: a name that
    is taken gets ``_v2``, ``_v3``, … Each PNG carries its prompt and step as text chunks. Returns the written
    paths, the grid last.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(prompts) if prompts is not None else []
    if prompts and len(prompts) != len(images):
        raise ValueError(f"save_previews: {len(prompts)} prompts for {len(images)} images")
    written: list[Path] = []
    for index, image in enumerate(images):
        info = {"step": str(step), **(metadata or {})}
        if prompts:
            info["prompt"] = prompts[index]
        written.append(save_png_unique(image, folder / f"step{step:06d}_{index}.png", info))
    if grid and images:
        labels = [prompt or f"#{i}" for i, prompt in enumerate(prompts)] if prompts else None
        grid_image = make_grid(list(images), columns=min(len(images), 4), labels=labels)
        written.append(save_png_unique(grid_image, folder / f"step{step:06d}_grid.png",
                                       {"step": str(step), **(metadata or {})}))
    return written


def save_png_unique(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically under ``path`` or, when that exists, the first free ``<stem>_vN.png``."""
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(str(key), str(value))
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
            stream.flush()
            os.fsync(stream.fileno())
        for candidate in _candidates(path):
            if _claim(temporary, candidate):
                return candidate
        raise FileExistsError(f"{path}: no free name")  # unreachable: _candidates is unbounded
    finally:
        Path(temporary).unlink(missing_ok=True)


def _candidates(path: Path) -> Iterator[Path]:
    yield path
    version = 2
    while True:
        yield path.with_name(f"{path.stem}_v{version}{path.suffix}")
        version += 1


def _claim(temporary: str, target: Path) -> bool:
    """Move the finished file to ``target`` unless a file is there (hard link: atomic, never replaces)."""
    try:
        os.link(temporary, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: check, then rename
        if target.exists():
            return False
        os.replace(temporary, target)
        return True
