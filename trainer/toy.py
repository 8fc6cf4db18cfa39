"""The embedded toy base model: a tiny SD1.5-architecture pipeline pretrained from scratch on drawn shapes.

A fresh machine has no Stable Diffusion checkpoint and tests cannot download one, so the project ships its own:
``presets/toy/model`` is a diffusers folder (``StableDiffusionPipeline``: ``AutoencoderKL``, ``CLIPTextModel`` with
a tokenizer over the caption vocabulary, ``UNet2DConditionModel`` with SD1's block layout, an Euler scheduler) that
draws what its prompt asks for — "a small red circle on a white background" — at 64×64 px. Everything downstream
(training, previews, export, the UI) runs the real code paths on it in seconds to minutes on a CPU.

- :func:`draw_examples` draws the captioned images (4 colours × 3 shapes × 2 sizes × 3 backgrounds, position and
  texture jitter); :func:`draw_vae_examples` adds shapes in any RGB colour for the VAE alone, because a real SD VAE
  encodes every colour and the held-out concept must be representable.
- :func:`pretrain` trains the VAE, then the text encoder and UNet together (ε-prediction, min-SNR weighting, caption
  dropout for classifier-free guidance, EMA), deterministic in its seed on one thread, and writes the folder with
  ``rankwright_toy.json`` (the recipe and what was measured). ``python -m trainer.toy build --out DIR`` rebuilds it.
- :func:`classify_image` names a picture's main colour and shape from pixel statistics alone (dominant colour of the
  largest foreground region; filled fraction of its bounding box), :func:`prompt_match` scores prompt following.
- Held-out concepts (:data:`CONCEPTS`), never drawn for the UNet/text encoder, each called by a trigger word: the
  demo's purple (``zq``), orange (``kq``, a colour), a checkered background (``zb``) and hollow outlines (``wz``, a
  fill style). Each has its prompts and a pixel-statistic score (:meth:`Concept.score`: nearest palette colour,
  a two-tone border, the share of the shape's inside showing the background); :func:`make_concept_dataset` writes
  one's 12-image kohya dataset (``python -m trainer.toy concept --name orange --out DIR``), :func:`make_demo_dataset`
  the demo's (``presets/toy/data``), and :func:`concept_score` scores purple.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .architectures import write_tiny_tokenizer

# ----- vocabulary and palette ------------------------------------------------------------------------------------
RESOLUTION = 64
SUPERSAMPLE = 4
POSITION_JITTER = 10.0  # pixels the shape's centre may move from the image centre

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 205, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (12, 12, 12),
    "gray": (128, 128, 128),
}
# The held-out concept: a colour never drawn during pretraining, named by a trigger word in the demo captions.
HELD_OUT_COLOUR = "purple"
HELD_OUT_RGB = (150, 40, 200)
TRIGGER = "zq"
# More held-out concepts (see CONCEPTS): a second colour, a background pattern, a fill style. The palette is what
# classify_image names colours with, so it holds every colour a concept draws.
ORANGE_RGB = (240, 120, 20)
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, HELD_OUT_COLOUR: HELD_OUT_RGB, "orange": ORANGE_RGB}
CHECKER_TONES = ((250, 250, 250), (12, 12, 12))  # the "checkered" background: white and black cells
CHECKER_CELL = 16  # pixels per cell at 64 px (4 latent pixels: the toy VAE keeps such cells; 8 px ones wash out)

TOY_WORDS = sorted({"a", "an", "on", "of", "photo", "shape", "background", *COLOURS, *SHAPES, *SIZES, *BACKGROUNDS,
                    HELD_OUT_COLOUR, TRIGGER, ","})


@dataclasses.dataclass(frozen=True)
class Drawing:
    """What one procedural image shows; ``caption`` is the text it is trained with."""

    colour: str
    shape: str
    size: str
    background: str
    cx: float
    cy: float
    radius: float
    caption: str
    texture: str = "plain"  # plain, noise or gradient
    fill: tuple[int, int, int] | None = None  # an RGB instead of the palette colour (VAE training only)
    backdrop: tuple[int, int, int] | None = None  # an RGB instead of the named background (VAE training only)
    hollow: bool = False  # an outline only (the "hollow" concept), the background showing inside


# ----- drawing ---------------------------------------------------------------------------------------------------
def caption_for(colour: str, shape: str, size: str | None = None, background: str | None = None) -> str:
    """``a small red circle on a white background``; size and background are optional."""
    words = ["a"] + ([size] if size else []) + [colour, shape]
    text = " ".join(words)
    if background:
        text += f" on a {background} background"
    return text


def sample_drawing(rng: random.Random, colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES,
                   caption_colour: str | None = None, full_caption: bool = False,
                   backgrounds: Sequence[str] = tuple(BACKGROUNDS)) -> Drawing:
    """Pick what to draw; the caption sometimes omits size and/or background (so short prompts also work)."""
    colour = rng.choice(list(colours))
    shape = rng.choice(list(shapes))
    size = rng.choice(SIZES)
    background = rng.choice(list(backgrounds))
    radius = rng.uniform(8.0, 11.0) if size == "small" else rng.uniform(17.0, 22.0)
    reach = min(POSITION_JITTER, RESOLUTION / 2 - radius - 2.0)  # near the centre, never cut by the border
    cx = RESOLUTION / 2 + rng.uniform(-reach, reach)
    cy = RESOLUTION / 2 + rng.uniform(-reach, reach)
    texture = rng.choice(("plain", "plain", "noise", "gradient"))
    if full_caption:
        with_size, with_background = True, True
    else:
        roll = rng.random()
        with_size, with_background = roll < 0.85, (roll < 0.7 or roll >= 0.9)
    caption = caption_for(caption_colour or colour, shape, size if with_size else None,
                          background if with_background else None)
    return Drawing(colour, shape, size, background, cx, cy, radius, caption, texture)


def render(drawing: Drawing, seed: int = 0) -> Image.Image:
    """Draw ``drawing`` as a 64×64 RGB image (anti-aliased by supersampling); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    big = RESOLUTION * SUPERSAMPLE
    if drawing.background == "checkered":
        cells = (np.arange(big) // (CHECKER_CELL * SUPERSAMPLE)) % 2
        canvas = np.array(CHECKER_TONES, dtype=np.float32)[cells[:, None] ^ cells[None, :]]
    else:
        background = np.array(drawing.backdrop or BACKGROUNDS[drawing.background], dtype=np.float32)
        canvas = np.broadcast_to(background, (big, big, 3)).copy()
    if drawing.texture == "gradient":
        ramp = np.linspace(-1.0, 1.0, big, dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
        canvas += 14.0 * field[..., None]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-12, 13, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(drawing.fill or PALETTE[drawing.colour], jitter))
    s = SUPERSAMPLE
    cx, cy, r = drawing.cx * s, drawing.cy * s, drawing.radius * s
    # hollow: a line a quarter of the radius wide, at least 3 px (the toy VAE loses thinner lines)
    paint = {"outline": fill, "width": round(max(3.0, 0.25 * drawing.radius) * s)} if drawing.hollow else {"fill": fill}
    if drawing.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
    elif drawing.shape == "square":
        half = r * 0.9  # about the same area as the circle
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], **paint)
    elif drawing.shape == "triangle":
        half = r * 1.05
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], **paint)
    else:
        raise ValueError(f"unknown shape {drawing.shape!r}; allowed: {SHAPES}")
    image = image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)
    if drawing.texture == "noise":
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(RESOLUTION, RESOLUTION, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return image


def draw_examples(count: int, seed: int = 0, **kwargs: Any) -> list[tuple[Image.Image, Drawing]]:
    """``count`` (image, drawing) pairs, deterministic in ``seed``."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        drawing = sample_drawing(rng, **kwargs)
        examples.append((render(drawing, seed=seed * 1_000_003 + index), drawing))
    return examples


def draw_vae_examples(count: int, seed: int = 0) -> list[Image.Image]:
    """Shapes in any RGB colour, half of them on any RGB background: a real SD VAE encodes every colour, so the toy
    VAE must too (one trained on the four palette colours alone maps the held-out colour to a wrong one, and no
    adapter could then teach it)."""
    rng = random.Random(seed + 104729)
    images = []
    for index in range(count):
        drawing = sample_drawing(rng)
        fill = tuple(rng.randrange(256) for _ in range(3))
        backdrop = tuple(rng.randrange(256) for _ in range(3)) if rng.random() < 0.5 else None
        drawing = dataclasses.replace(drawing, fill=fill, backdrop=backdrop)
        images.append(render(drawing, seed=(seed + 104729) * 1_000_003 + index))
    return images


# ----- pixel-statistic classifier ---------------------------------------------------------------------------------
def _components(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Labels (1…n, 0 = outside ``mask``) of the 4-connected regions of ``mask`` and their sizes (index 0 unused):
    a flood fill, since images are 64×64 and scipy is no dependency."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes, label = [0], 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack, size = [start], 0
        while stack:
            row, col = stack.pop()
            size += 1
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not labels[r, c]:
                    labels[r, c] = label
                    stack.append((r, c))
        sizes.append(size)
    return labels, sizes


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (``mask`` itself when it is empty)."""
    labels, sizes = _components(mask)
    return labels == int(np.argmax(sizes)) if len(sizes) > 1 else mask


def _border(pixels: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of the outermost ``width`` rows and columns, as an (n, 3) array."""
    return np.concatenate([pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
                           pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3)])


TWO_TONE_DISTANCE = 100.0  # RGB distance between the two tones of a patterned background (checker: ~410)
TWO_TONE_SHARE = 0.25  # each tone's least share of the border pixels


def background_tones(pixels: np.ndarray, width: int = 1) -> list[np.ndarray]:
    """The background's colour(s) from the border: one median, or two when the border splits into two far-apart
    tones (a checkered background) each covering a quarter of it. A plain background with gradient or noise
    texture stays one tone (its spread is ~30, far below :data:`TWO_TONE_DISTANCE`)."""
    border = _border(pixels, width)
    luma = border @ np.array([0.299, 0.587, 0.114])
    low, high = np.percentile(luma, [10, 90])
    dark = luma < (low + high) / 2
    share = float(dark.mean())
    if TWO_TONE_SHARE <= share <= 1 - TWO_TONE_SHARE:
        tones = [np.median(border[dark], axis=0), np.median(border[~dark], axis=0)]
        if float(np.linalg.norm(tones[0] - tones[1])) >= TWO_TONE_DISTANCE:
            return tones
    return [np.median(border, axis=0)]


def foreground_mask(img: Image.Image | np.ndarray, threshold: float = 70.0, largest: bool = True) -> np.ndarray:
    """The largest region (``largest``, else all) of pixels far (RGB distance) from the background of
    :func:`background_tones`: its colour, or for two tones any mix of them (the soft edges between checker cells
    are background too)."""
    pixels = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)
    tones = background_tones(pixels)
    start, step = tones[0], tones[-1] - tones[0]
    along = np.clip((pixels - start) @ step / max(float(step @ step), 1e-6), 0.0, 1.0)
    distance = np.linalg.norm(pixels - (start + along[..., None] * step), axis=-1)
    return _largest_component(distance > threshold) if largest else distance > threshold


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region it encloses (not 4-connected to the image border) filled in."""
    outside = ~mask
    reached = np.zeros(mask.shape, dtype=bool)
    height, width = mask.shape
    stack = [(r, c) for r in range(height) for c in (0, width - 1) if outside[r, c]]
    stack += [(r, c) for c in range(width) for r in (0, height - 1) if outside[r, c]]
    for start in stack:
        reached[start] = True
    while stack:
        row, col = stack.pop()
        for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
            if 0 <= r < height and 0 <= c < width and outside[r, c] and not reached[r, c]:
                reached[r, c] = True
                stack.append((r, c))
    return ~reached


def _rgb(img: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float32)


def classify_image(img: Image.Image | np.ndarray) -> tuple[str, str]:
    """(colour name, shape name) of the main shape in ``img``, from pixel statistics alone.

    Colour: the median of the foreground pixels, mapped to the nearest palette entry (the held-out colours
    included). Shape: the filled fraction of the bounding box of the foreground with its holes filled (so an
    outline counts as its shape; square ≈ 1, circle ≈ π/4, triangle ≈ 1/2), with the share of the area in the top
    half separating an upright triangle (≈ 1/4) from a circle when the fraction is ambiguous. ``("none", "none")``
    when no foreground is found.
    """
    pixels = _rgb(img)
    mask = foreground_mask(pixels)
    if mask.sum() < 12:
        return "none", "none"
    rgb = np.median(pixels[mask], axis=0)
    colour = min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name]) - rgb) ** 2)))
    pieces = _shape_pieces(pixels)
    hull = _hull_mask(pieces)
    # an outline (perhaps broken) counts as its shape: the hull of its pieces; a filled one as itself, holes filled
    mask = hull if 1.0 - pieces.sum() / hull.sum() >= HOLLOW_SHARE else fill_holes(mask)
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = mask[top:bottom + 1, left:right + 1]
    fill = float(box.mean())
    height = box.shape[0]
    top_share = float(box[: height // 2].sum() / max(box.sum(), 1))
    if fill >= 0.89:
        shape = "square"
    elif fill < 0.6 or (fill < 0.7 and top_share < 0.38):
        shape = "triangle"
    else:
        shape = "circle"
    return colour, shape


def classify_background(img: Image.Image | np.ndarray) -> str:
    """``checkered`` for a two-tone border, else the nearest named background colour of the border's median."""
    tones = background_tones(_rgb(img))
    if len(tones) == 2:
        return "checkered"
    return min(BACKGROUNDS, key=lambda name: float(np.sum((np.array(BACKGROUNDS[name]) - tones[0]) ** 2)))


HOLLOW_SHARE = 0.15  # a shape is hollow when this share of its convex hull shows the background
PIECE_SHARE = 0.25  # regions at least this large against the largest are pieces of the shape (a broken outline)


def _hull_mask(mask: np.ndarray) -> np.ndarray:
    """The pixels of the convex hull of ``mask``'s pixels (Andrew's monotone chain, drawn as a polygon)."""
    points = sorted({(int(c), int(r)) for r, c in zip(*np.nonzero(mask))})

    def half(ordered):
        chain: list[tuple[int, int]] = []
        for point in ordered:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (point[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (point[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(point)
        return chain[:-1]

    hull = half(points) + half(points[::-1]) if len(points) > 2 else points
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    if len(hull) > 2:
        ImageDraw.Draw(canvas).polygon(hull, fill=1, outline=1)
    return np.asarray(canvas, dtype=bool) | mask


def _shape_pieces(pixels: np.ndarray) -> np.ndarray:
    """The main shape's pixels: the largest foreground region and the regions at least :data:`PIECE_SHARE` its
    size (a generated outline is often broken into a few arcs)."""
    labels, sizes = _components(foreground_mask(pixels, largest=False))
    if len(sizes) < 2:
        return labels > 0
    keep = [label for label, size in enumerate(sizes) if label and size >= PIECE_SHARE * max(sizes)]
    return np.isin(labels, keep)


def hollow_share(img: Image.Image | np.ndarray) -> float:
    """The share of the main shape's convex hull that is not the shape: ~0 for a filled (convex) shape, ~0.15–0.6
    for the hollow concept's outlines, closed or broken (a small triangle's inside is smallest); 0 when there is
    no shape."""
    pieces = _shape_pieces(_rgb(img))
    if pieces.sum() < 12:
        return 0.0
    return 1.0 - float(pieces.sum()) / float(_hull_mask(pieces).sum())


# ----- the toy SD1.5-architecture pipeline ------------------------------------------------------------------------
@dataclasses.dataclass
class ToyRecipe:
    """Every choice of :func:`pretrain`; the defaults are what built ``presets/toy/model``."""

    images: int = 6000  # procedural training images, drawn once
    # VAE: 3 blocks (two downsamples) → 16×16×4 latents for 64×64 images; trained on crops (fully convolutional)
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_norm_groups: int = 16
    vae_images: int = 6000  # extra any-colour drawings for the VAE only
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # text encoder: CLIPTextModel over the toy vocabulary
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # UNet: SD1 block layout (CrossAttnDown ×2 + Down, Up + CrossAttnUp ×2), conv proj_in/out
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_norm_groups: int = 8
    unet_heads: int = 1  # diffusers' SD1 ``attention_head_dim`` (really the head count): 1 → 32/64-dim heads
    unet_steps: int = 5000
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    ema_decay: float | None = 0.995  # the saved UNet and text encoder are the EMA weights
    threads: int = 1  # one thread: on a shared 2-core machine two threads spin and run ~4× slower


def toy_components(recipe: ToyRecipe, tokenizer_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Fresh (random) components of the toy pipeline: the same classes as a real SD1.5 pipeline."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77)
    vocab_size = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=recipe.text_hidden, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    text_encoder = CLIPTextModel(text_config)
    blocks = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=list(recipe.vae_channels), norm_num_groups=recipe.vae_norm_groups,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        sample_size=RESOLUTION, scaling_factor=0.18215)
    latent_size = RESOLUTION // 2 ** (blocks - 1)
    levels = len(recipe.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=list(recipe.unet_channels), norm_num_groups=recipe.unet_norm_groups,
        down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        cross_attention_dim=recipe.text_hidden, attention_head_dim=recipe.unet_heads, use_linear_projection=False)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def _to_tensor(images: Sequence[Image.Image]):
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _phase_steps(optimizer, base_lr: float, total: int, warmup: int, deadline: float, log, phase: str):
    """The step numbers of one training phase, each with its learning rate set; ends early at ``deadline``."""
    for step in range(total):
        if time.time() > deadline:
            log(f"{phase}: time budget reached at step {step}")
            return
        for group in optimizer.param_groups:
            group["lr"] = base_lr * _lr_factor(step, total, warmup)
        yield step


def _train_vae(vae, pixels, recipe: ToyRecipe, generator, deadline: float, log) -> dict[str, Any]:
    import torch

    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    count, crop = pixels.shape[0], recipe.vae_crop
    vae.train()
    started, losses = time.time(), []
    for step in _phase_steps(optimizer, recipe.vae_lr, recipe.vae_steps, recipe.warmup_steps, deadline, log, "vae"):
        index = torch.randint(0, count, (recipe.vae_batch,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, RESOLUTION - crop + 1, (2,), generator=generator))
        batch = pixels[index, :, top:top + crop, left:left + crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        rec = (recon - batch).abs().mean() + (recon - batch).pow(2).mean()
        kl = posterior.kl().mean()  # summed over the latent, as in SD's autoencoder loss
        loss = rec + recipe.vae_kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(rec.detach()))
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step} rec {np.mean(losses[-100:]):.4f} kl {float(kl.detach()):.1f} "
                f"({time.time() - started:.0f}s)")
    vae.eval()
    return {"vae_steps_done": len(losses), "vae_seconds": round(time.time() - started, 1),
            "vae_final_rec": round(float(np.mean(losses[-100:])), 5) if losses else None}


def _train_unet(unet, text_encoder, tokenizer, scheduler, latent_mean, latent_std, captions: list[str],
                recipe: ToyRecipe, generator, deadline: float, log, hook=None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    ema = [p.detach().clone() for p in params] if recipe.ema_decay else None
    unet.train()
    text_encoder.train()
    started, losses, count = time.time(), [], latent_mean.shape[0]
    for step in _phase_steps(optimizer, recipe.unet_lr, recipe.unet_steps, recipe.warmup_steps, deadline, log,
                             "unet"):
        index = torch.randint(0, count, (recipe.unet_batch,), generator=generator)
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=generator)
        batch_ids = ids[index].clone()
        drop = torch.rand(recipe.unet_batch, generator=generator) < recipe.caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.unet_batch,), generator=generator)
        a = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        s = (1.0 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        context = text_encoder(batch_ids)[0]
        prediction = unet(noisy, timesteps, context).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma:
            weight = torch.clamp(snr[timesteps], max=recipe.min_snr_gamma) / snr[timesteps]
            loss = (per_sample * weight).mean()
        else:
            loss = per_sample.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            decay = min(recipe.ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        losses.append(float(per_sample.detach().mean()))
        if hook is not None:
            hook(step, params, ema)
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step} eps-mse {np.mean(losses[-100:]):.4f} ({time.time() - started:.0f}s)")
    if ema is not None:
        with torch.no_grad():
            for param, average in zip(params, ema):
                param.copy_(average)
    unet.eval()
    text_encoder.eval()
    return {"unet_steps_done": len(losses), "unet_seconds": round(time.time() - started, 1),
            "unet_final_mse": round(float(np.mean(losses[-100:])), 5) if losses else None}


def pretrain(out_dir: str | Path, seed: int = 0, minutes_budget: float | None = 120.0,
             recipe: ToyRecipe | None = None, log=print) -> dict[str, Any]:
    """Pretrain the toy pipeline from scratch on CPU and save it as a diffusers folder in ``out_dir``.

    Deterministic in ``seed`` for a fixed thread count (``recipe.threads``) as long as every phase runs its full
    step count; ``minutes_budget`` is a safety cap (the VAE gets 20% of it, the rest goes to the text encoder and
    UNet) that stops a phase early and records the steps reached in ``rankwright_toy.json``.
    """
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline

    from .models import save_pipeline_folder

    recipe = recipe or ToyRecipe()
    torch.set_num_threads(recipe.threads)
    started, cpu_started = time.time(), time.process_time()
    budget = float("inf") if minutes_budget is None else minutes_budget * 60.0
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        parts = toy_components(recipe, write_tiny_tokenizer(Path(tmp) / "tokenizer", TOY_WORDS), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    examples = draw_examples(recipe.images, seed=seed)
    pixels = _to_tensor([image for image, _ in examples])
    captions = [drawing.caption for _, drawing in examples]
    vae_pixels = torch.cat([pixels, _to_tensor(draw_vae_examples(recipe.vae_images, seed=seed))])
    log(f"drew {len(examples)} captioned and {recipe.vae_images} any-colour images ({time.time() - started:.0f}s)")
    stats: dict[str, Any] = {"seed": seed, "recipe": dataclasses.asdict(recipe)}
    stats.update(_train_vae(parts["vae"], vae_pixels, recipe, generator, started + 0.25 * budget, log))
    vae = parts["vae"]
    with torch.no_grad():
        means, stds = [], []
        for chunk in pixels.split(128):
            posterior = vae.encode(chunk).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        latent_mean, latent_std = torch.cat(means), torch.cat(stds)
        recon = vae.decode(latent_mean[:256]).sample
        held_out = draw_examples(64, seed=seed + 1, colours=(HELD_OUT_COLOUR,))
        held_out_recon = _to_images(vae.decode(vae.encode(_to_tensor([i for i, _ in held_out])).latent_dist.mean)
                                    .sample)
    scaling = float(1.0 / torch.sqrt(latent_mean.var() + latent_std.pow(2).mean()))
    vae.register_to_config(scaling_factor=round(scaling, 5))
    recon_correct = sum(classify_image(image) == (d.colour, d.shape)
                        for image, (_, d) in zip(_to_images(recon), examples[:256]))
    held_out_correct = sum(classify_image(image) == (d.colour, d.shape)
                           for image, (_, d) in zip(held_out_recon, held_out))
    stats.update({"scaling_factor": round(scaling, 5), "vae_recon_classifier_accuracy": recon_correct / 256,
                  "vae_recon_held_out_accuracy": held_out_correct / 64,
                  "vae_recon_mae": round(float((recon - pixels[:256]).abs().mean()), 5)})
    log(f"latents cached; scaling factor {scaling:.4f}; classifier on reconstructions {recon_correct}/256, "
        f"held-out colour {held_out_correct}/64 ({time.time() - started:.0f}s)")
    stats.update(_train_unet(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                             latent_mean * scaling, latent_std * scaling, captions, recipe, generator,
                             started + budget, log))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    save_pipeline_folder(pipe, out_dir, overwrite=True)  # text encoder in the layout every transformers loads
    # vocab.json + merges.txt beside tokenizer.json, so transformers 4.x's slow CLIPTokenizer loads it too
    write_tiny_tokenizer(out_dir / "tokenizer", TOY_WORDS)
    stats["total_seconds"] = round(time.time() - started, 1)
    stats["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    stats["folder_bytes"] = sum(path.stat().st_size for path in out_dir.rglob("*") if path.is_file())
    (out_dir / "rankwright_toy.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"saved {out_dir} ({stats['folder_bytes'] / 1e6:.1f} MB) in {stats['total_seconds']:.0f}s")
    return stats


def _to_images(tensor) -> list[Image.Image]:
    array = ((tensor.detach().clamp(-1, 1) + 1.0) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(item) for item in array]


# ----- using the toy model ----------------------------------------------------------------------------------------
def load_toy_pipeline(folder: str | Path):
    """The saved toy pipeline in fp32 on CPU, progress bar off."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20,
             guidance: float = 5.0) -> list[Image.Image]:
    """One 64×64 image per (prompt, seed), each from its own CPU generator."""
    import torch

    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    with torch.no_grad():
        result = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION,
                      width=RESOLUTION, generator=generators)
    return list(result.images)


EVAL_PROMPTS = [caption_for(colour, shape, size, background)
                for colour, shape, size, background in [
                    ("red", "circle", "large", "white"), ("green", "square", "large", "black"),
                    ("blue", "triangle", "large", "white"), ("yellow", "circle", "small", "gray"),
                    ("red", "square", "small", "gray"), ("green", "triangle", "large", "white"),
                    ("blue", "circle", "small", "black"), ("yellow", "square", "large", "black"),
                    ("red", "triangle", "large", "gray"), ("green", "circle", "large", "gray"),
                    ("blue", "square", "large", "white"), ("yellow", "triangle", "small", "white")]]


def prompt_match(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose classified colour / shape / both / background match the words of their prompt, and
    ``all``: colour, shape and background (a prompt naming no background matches any)."""
    hits = dict.fromkeys(("colour", "shape", "both", "background", "all"), 0)
    for image, prompt in zip(images, prompts):
        words = prompt.replace(",", " ").split()
        colour, shape = classify_image(image)
        asked = [word for word in words[words.index("on") + 1:] if word != "a"][:1] if "on" in words else []
        ok = {"colour": colour in words, "shape": shape in words,
              "background": not asked or classify_background(image) in asked}
        ok["both"] = ok["colour"] and ok["shape"]
        ok["all"] = ok["both"] and ok["background"]
        for key, value in ok.items():
            hits[key] += value
    n = max(len(images), 1)
    return {key: value / n for key, value in hits.items()}


# ----- the held-out concept ---------------------------------------------------------------------------------------
DEMO_REPEATS = 10
@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept the toy model never saw, called by a trigger word, with a pixel statistic that tells it apart.

    ``kind``: ``colour`` (the shape drawn in ``colour``; the trigger takes the colour word's place), ``background``
    (a checkered background; the trigger takes the background word's place) or ``texture`` (hollow outlines; the
    trigger stands before the shape word, after the colour). Triggers are spelt from letters the toy tokenizer has
    (it has no ``j``, ``v`` or ``x``: such a word would become the unknown token, which is also the padding), as
    untrained letter tokens that no pretraining caption used.
    """

    name: str
    kind: str
    trigger: str
    colour: str = ""  # the drawn colour of a ``colour`` concept

    def caption(self, colour: str, shape: str, size: str | None = None, background: str | None = None) -> str:
        """A caption or prompt with the trigger where the concept's word would go."""
        if self.kind == "colour":
            return caption_for(self.trigger, shape, size, background)
        if self.kind == "background":
            return caption_for(colour, shape, size, self.trigger)
        return caption_for(f"{colour} {self.trigger}", shape, size, background)

    @property
    def prompts(self) -> list[str]:
        """The score's prompts: eight that cover every shape, size and (for the background concept: colour) in
        turn, each twice (previews seed prompt i with seed + i: two seeds each)."""
        colours = list(COLOURS)
        cases = [self.caption(colours[index % 4], shape, size, background)
                 for index, (shape, size, background) in enumerate(_PROMPT_CASES)]
        return cases * 2

    def shows(self, image: Image.Image) -> bool:
        """Whether ``image`` shows the concept, from pixel statistics alone."""
        if self.kind == "colour":
            return classify_image(image)[0] == self.colour
        if self.kind == "background":
            return classify_background(image) == "checkered"
        return hollow_share(image) >= HOLLOW_SHARE

    def score(self, images: Iterable[Image.Image]) -> float:
        """Fraction of ``images`` that show the concept."""
        images = list(images)
        return sum(self.shows(image) for image in images) / max(len(images), 1)

    def drawing(self, rng: random.Random, index: int) -> Drawing:
        """The ``index``-th training drawing: shapes (and backgrounds or colours) in turn, so a dozen images cover
        every pair; the full caption with the trigger."""
        shape = SHAPES[index % len(SHAPES)]
        turn = index // len(SHAPES)
        if self.kind == "colour":
            drawing = sample_drawing(rng, colours=(self.colour,), shapes=(shape,),
                                     backgrounds=(list(BACKGROUNDS)[turn % len(BACKGROUNDS)],), full_caption=True)
        elif self.kind == "background":
            drawing = sample_drawing(rng, colours=(list(COLOURS)[turn % len(COLOURS)],), shapes=(shape,),
                                     backgrounds=("checkered",), full_caption=True)
        else:
            drawing = dataclasses.replace(
                sample_drawing(rng, colours=(list(COLOURS)[turn % len(COLOURS)],), shapes=(shape,),
                               backgrounds=(list(BACKGROUNDS)[turn % len(BACKGROUNDS)],), full_caption=True),
                hollow=True)
        return dataclasses.replace(drawing, caption=self.caption(drawing.colour, drawing.shape, drawing.size,
                                                                 drawing.background))


_PROMPT_CASES = [("circle", "large", "white"), ("square", "large", "black"), ("triangle", "large", "gray"),
                 ("circle", "small", "gray"), ("square", "small", "white"), ("triangle", "large", "white"),
                 ("circle", "large", "black"), ("square", "large", "gray")]

# The demo's purple first; then a colour, a background and a fill style, each held out the same way.
CONCEPTS: dict[str, Concept] = {concept.name: concept for concept in (
    Concept(HELD_OUT_COLOUR, "colour", TRIGGER, colour=HELD_OUT_COLOUR),
    Concept("orange", "colour", "kq", colour="orange"),
    Concept("checkered", "background", "zb"),
    Concept("hollow", "texture", "wz"))}


DEMO_PROMPTS = CONCEPTS[HELD_OUT_COLOUR].prompts[:len(_PROMPT_CASES)]
CONCEPT_PROMPTS = CONCEPTS[HELD_OUT_COLOUR].prompts  # the demo's concept score: each demo prompt at two seeds


def get_concept(name: str) -> Concept:
    """The concept called ``name``; ValueError naming the known ones."""
    try:
        return CONCEPTS[name]
    except KeyError:
        raise ValueError(f"unknown toy concept {name!r}; known: {', '.join(CONCEPTS)}") from None


def concept_for_dataset(folder: str | Path) -> Concept | None:
    """The concept whose trigger names one of the dataset's kohya folders (``10_kq``), or None."""
    root = Path(folder).expanduser()
    names = {path.name.partition("_")[2] for path in root.iterdir() if path.is_dir()} if root.is_dir() else set()
    return next((concept for concept in CONCEPTS.values() if concept.trigger in names), None)


def make_concept_dataset(folder: str | Path, concept: Concept | str = HELD_OUT_COLOUR, count: int = 12,
                         seed: int = 0) -> Path:
    """Write ``count`` images of ``concept`` in kohya layout, ``folder/10_<trigger>/NNN.png`` with ``NNN.txt``
    captions such as ``a small zq circle on a white background``."""
    concept = get_concept(concept) if isinstance(concept, str) else concept
    target = Path(folder) / f"{DEMO_REPEATS}_{concept.trigger}"
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 7919)
    for index in range(count):
        drawing = concept.drawing(rng, index)
        image = render(drawing, seed=(seed + 7919) * 1_000_003 + index)
        image.save(target / f"{index:03d}.png")
        (target / f"{index:03d}.txt").write_text(drawing.caption + "\n")
    return target


def make_demo_dataset(folder: str | Path, count: int = 12, seed: int = 0) -> Path:
    """The demo dataset (``presets/toy/data``): purple shapes called ``zq``, ``folder/10_zq/NNN.png``."""
    return make_concept_dataset(folder, HELD_OUT_COLOUR, count, seed)


def make_regularisation_images(folder: str | Path, count: int = 36, seed: int = 0) -> Path:
    """Write ``count`` pretraining-kind images with full captions (``folder/1_shapes/NNN.png`` + ``.txt``): kohya-style
    regularisation images for ``dataset.reg_dir``, which keep the demo adapter from repainting unrelated prompts."""
    target = Path(folder) / "1_shapes"
    target.mkdir(parents=True, exist_ok=True)
    for index, (image, drawing) in enumerate(draw_examples(count, seed=seed + 99, full_caption=True)):
        image.save(target / f"{index:03d}.png")
        (target / f"{index:03d}.txt").write_text(drawing.caption + "\n")
    return target


def concept_score(images: Iterable[Image.Image]) -> float:
    """Fraction of ``images`` whose main shape is classified as the demo's held-out colour."""
    return CONCEPTS[HELD_OUT_COLOUR].score(images)


# ----- command line -----------------------------------------------------------------------------------------------
def evaluate(folder: str | Path, seeds_per_prompt: int = 1, steps: int = 20, guidance: float = 5.0,
             concept: str = HELD_OUT_COLOUR) -> dict[str, Any]:
    """Prompt match on :data:`EVAL_PROMPTS` and a held-out concept's score on its prompts (one seed each)."""
    pipe = load_toy_pipeline(folder)
    prompts = [p for p in EVAL_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [k for _ in EVAL_PROMPTS for k in range(seeds_per_prompt)]
    match = prompt_match(generate(pipe, prompts, seeds, steps, guidance), prompts)
    scored = get_concept(concept)
    trigger_prompts = scored.prompts[:len(_PROMPT_CASES)]
    images = generate(pipe, trigger_prompts, range(len(trigger_prompts)), steps, guidance)
    return {**match, "concept": scored.name, "concept_score": scored.score(images),
            "trigger_subject": prompt_match(images, trigger_prompts)["shape"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="pretrain the toy base model from scratch and save it")
    build.add_argument("--out", required=True, type=Path)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--minutes", type=float, default=120.0, help="safety cap on the training time")
    build.add_argument("--threads", type=int, default=ToyRecipe.threads)
    build.add_argument("--unet-steps", type=int, default=ToyRecipe.unet_steps)
    build.add_argument("--vae-steps", type=int, default=ToyRecipe.vae_steps)
    data = commands.add_parser("dataset", help="write the held-out-concept demo dataset (kohya layout)")
    data.add_argument("--out", required=True, type=Path)
    data.add_argument("--count", type=int, default=12)
    data.add_argument("--seed", type=int, default=0)
    made = commands.add_parser("concept", help="write the dataset of one held-out concept (kohya layout)")
    made.add_argument("--name", required=True, choices=list(CONCEPTS))
    made.add_argument("--out", required=True, type=Path)
    made.add_argument("--count", type=int, default=12)
    made.add_argument("--seed", type=int, default=0)
    reg = commands.add_parser("reg", help="write regularisation images of the pretraining kind (kohya layout)")
    reg.add_argument("--out", required=True, type=Path)
    reg.add_argument("--count", type=int, default=36)
    reg.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("eval", help="generate with a toy model and score prompt match / concept")
    check.add_argument("--model", required=True, type=Path)
    check.add_argument("--seeds", type=int, default=1)
    check.add_argument("--concept", choices=list(CONCEPTS), default=HELD_OUT_COLOUR)
    args = parser.parse_args(argv)
    if args.command == "build":
        recipe = ToyRecipe(threads=args.threads, unet_steps=args.unet_steps, vae_steps=args.vae_steps)
        stats = pretrain(args.out, seed=args.seed, minutes_budget=args.minutes, recipe=recipe,
                         log=lambda text: print(text, flush=True))
        print(json.dumps({k: v for k, v in stats.items() if k != "recipe"}, indent=2))
    elif args.command == "dataset":
        print(make_demo_dataset(args.out, count=args.count, seed=args.seed))
    elif args.command == "concept":
        print(make_concept_dataset(args.out, args.name, count=args.count, seed=args.seed))
    elif args.command == "reg":
        print(make_regularisation_images(args.out, count=args.count, seed=args.seed))
    else:
        print(json.dumps(evaluate(args.model, seeds_per_prompt=args.seeds, concept=args.concept), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
