"""Loss curves as PNG images drawn with PIL alone (no matplotlib): axes with tick labels, a legend, EMA smoothing."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# The "tab10" colours: distinct, and readable on white.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
BACKGROUND = (255, 255, 255)
AXIS_COLOR = (60, 60, 60)
GRID_COLOR = (228, 228, 228)
TEXT_COLOR = (30, 30, 30)

Point = tuple[float, float]


def loss_curve_png(
    series: dict[str, Sequence[tuple[int | float, float]]],
    path: str | os.PathLike | None = None,
    title: str = "",
    smoothing: float = 0.0,
    *,
    width: int = 800,
    height: int = 400,
    x_label: str = "step",
    y_label: str = "loss",
) -> Image.Image:
    """Draw one curve per ``name → [(step, value), …]`` and return the image; also write it to ``path`` if given.

    ``smoothing`` in [0, 1) is TensorBoard's debiased EMA weight: above 0 each series is drawn faint as measured
    and in full colour smoothed. NaN/inf values are skipped. The PNG is replaced atomically, so a viewer polling
    the file never reads half of it.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if width < 200 or height < 150:
        raise ValueError(f"the plot needs at least 200×150 pixels, got {width}×{height}")
    font = _font(12)
    title_font = _font(15)
    image = Image.new("RGB", (int(width), int(height)), BACKGROUND)
    draw = ImageDraw.Draw(image)

    curves = {name: _clean(points) for name, points in series.items()}
    xs = [x for points in curves.values() for x, _ in points]
    ys = [y for points in curves.values() for _, y in points]

    title_h = _text_size(title_font, title)[1] + 10 if title else 0
    if title:
        draw.text(((width - _text_size(title_font, title)[0]) // 2, 6), title, fill=TEXT_COLOR, font=title_font)
    if not xs:
        message = "no data yet"
        w, h = _text_size(font, message)
        draw.text(((width - w) // 2, (height - h) // 2), message, fill=AXIS_COLOR, font=font)
        _write(image, path)
        return image

    x_lo, x_hi = _padded_range(min(xs), max(xs))
    y_ticks, y_step = _nice_ticks(*_padded_range(min(ys), max(ys)))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    x_ticks = [x for x in _nice_ticks(x_lo, x_hi, integer=True)[0] if x_lo <= x <= x_hi]
    y_texts = [_format(value, y_step) for value in y_ticks]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    x_texts = [_format(value, x_step) for value in x_ticks]

    line_h = _text_size(font, "0")[1]
    left = 12 + (line_h + 8 if y_label else 0) + max(_text_size(font, t)[0] for t in y_texts) + 8
    right = width - 16
    top = title_h + 12
    bottom = height - (8 + line_h + 8 + (line_h + 8 if x_label else 0))

    def to_px(x: float, y: float) -> Point:
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return px, py

    # Grid, ticks and their labels.
    for value, text in zip(y_ticks, y_texts):
        _, py = to_px(x_lo, value)
        draw.line([(left, py), (right, py)], fill=GRID_COLOR)
        draw.line([(left - 4, py), (left, py)], fill=AXIS_COLOR)
        w, h = _text_size(font, text)
        draw.text((left - 8 - w, py - h / 2 - 1), text, fill=TEXT_COLOR, font=font)
    for value, text in zip(x_ticks, x_texts):
        px, _ = to_px(value, y_lo)
        draw.line([(px, top), (px, bottom)], fill=GRID_COLOR)
        draw.line([(px, bottom), (px, bottom + 4)], fill=AXIS_COLOR)
        w, _ = _text_size(font, text)
        draw.text((min(max(px - w / 2, 0), width - w), bottom + 8), text, fill=TEXT_COLOR, font=font)
    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOR)
    if x_label:
        w, _ = _text_size(font, x_label)
        draw.text(((left + right - w) / 2, height - line_h - 8), x_label, fill=TEXT_COLOR, font=font)
    if y_label:
        _draw_vertical(image, y_label, font, 10, (top + bottom) // 2)

    # Curves: measured values faint under the smoothed line when smoothing, else the measured values in colour.
    colours = {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(curves)}
    plot_width = max(1, right - left)
    for name, points in curves.items():
        if not points:
            continue
        colour = colours[name]
        pixels = _thin([to_px(x, y) for x, y in points], plot_width)
        if smoothing > 0:
            _polyline(draw, pixels, _tint(colour, 0.35), 1)
            smoothed = [to_px(x, y) for x, y in zip((p[0] for p in points), _ema([p[1] for p in points], smoothing))]
            _polyline(draw, _thin(smoothed, plot_width), colour, 2)
        else:
            _polyline(draw, pixels, colour, 2)

    _draw_legend(draw, font, [(name, colours[name]) for name in curves], right, top)
    _write(image, path)
    return image


NOISY_LENGTH = 20  # from this many points per curve on, per-step losses are drawn smoothed


def loss_curves_png(
    losses: dict[str, Sequence[float]],
    path: str | os.PathLike | None = None,
    title: str = "",
    **size: int,
) -> Image.Image:
    """One curve per ``name → [loss at step 1, loss at step 2, …]`` on shared axes (e.g. one per adapter method).

    Per-step losses are noisy, so curves of at least ``NOISY_LENGTH`` points are smoothed (EMA 0.6) over the
    faint measured values; ``size`` is ``width``/``height`` as in :func:`loss_curve_png`.
    """
    series = {name: list(enumerate(values, start=1)) for name, values in losses.items()}
    longest = max((len(values) for values in losses.values()), default=0)
    return loss_curve_png(series, path, title=title, smoothing=0.6 if longest >= NOISY_LENGTH else 0.0, **size)


# ----- data ---------------------------------------------------------------------------------------------------
def _clean(points: Sequence[tuple[int | float, float]]) -> list[Point]:
    cleaned = []
    for x, y in points:
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            cleaned.append((x, y))
    cleaned.sort(key=lambda p: p[0])
    return cleaned


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (the first values are not pulled towards 0)."""
    return _ema(values, smoothing)


def _ema(values: Sequence[float], smoothing: float) -> list[float]:
    result, last = [], 0.0
    for count, value in enumerate(values, start=1):
        last = last * smoothing + (1 - smoothing) * value
        result.append(last / (1 - smoothing**count) if smoothing else last)
    return result


def _padded_range(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        margin = abs(lo) * 0.05 or 1.0
        return lo - margin, hi + margin
    return lo, hi


def _nice_ticks(lo: float, hi: float, target: int = 6, integer: bool = False) -> tuple[list[float], float]:
    """Ticks at multiples of 1, 2, 2.5 or 5 × 10^k covering [lo, hi] (the first ≤ lo, the last ≥ hi)."""
    raw = (hi - lo) / max(1, target - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    count = int(round((last - first) / step))
    return [first + i * step for i in range(count + 1)], step


def _format(value: float, step: float) -> str:
    if step >= 1 and abs(value - round(value)) < 1e-9:
        number = int(round(value))
        if abs(number) >= 10_000 and number % 1000 == 0:
            return f"{number // 1000}k"
        return str(number)
    mantissa = step / 10 ** math.floor(math.log10(step))
    decimals = max(0, -math.floor(math.log10(step))) + (1 if abs(mantissa - 2.5) < 1e-9 else 0)
    if decimals > 6:
        return f"{value:.2e}"
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _thin(pixels: list[Point], plot_width: int) -> list[Point]:
    """At most about four points per pixel column (first, min, max, last), so spikes survive and drawing is fast."""
    if len(pixels) <= 4 * plot_width:
        return pixels
    columns: dict[int, list[Point]] = {}
    for point in pixels:
        columns.setdefault(int(point[0]), []).append(point)
    thinned: list[Point] = []
    for column in sorted(columns):
        group = columns[column]
        keep = {0, len(group) - 1, min(range(len(group)), key=lambda i: group[i][1]),
                max(range(len(group)), key=lambda i: group[i][1])}
        thinned.extend(group[i] for i in sorted(keep))
    return thinned


# ----- drawing ------------------------------------------------------------------------------------------------
def _polyline(draw: ImageDraw.ImageDraw, pixels: list[Point], colour: tuple[int, int, int], width: int) -> None:
    if len(pixels) == 1:
        x, y = pixels[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    else:
        draw.line(pixels, fill=colour, width=width, joint="curve")


def _tint(colour: tuple[int, int, int], strength: float) -> tuple[int, int, int]:
    return tuple(int(round(c * strength + 255 * (1 - strength))) for c in colour)


def _draw_legend(draw: ImageDraw.ImageDraw, font: Any, entries: list[tuple[str, tuple[int, int, int]]],
                 right: float, top: float) -> None:
    if not entries:
        return
    line_h = _text_size(font, "Hg")[1] + 6
    text_w = max(_text_size(font, name)[0] for name, _ in entries)
    box_w, box_h = 8 + 22 + 6 + text_w + 8, 6 + line_h * len(entries) + 2
    x0, y0 = right - box_w - 8, top + 8
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=BACKGROUND, outline=(190, 190, 190))
    for index, (name, colour) in enumerate(entries):
        y = y0 + 6 + index * line_h
        middle = y + line_h / 2 - 2
        draw.line([(x0 + 8, middle), (x0 + 30, middle)], fill=colour, width=3)
        draw.text((x0 + 36, y), name, fill=TEXT_COLOR, font=font)


def _draw_vertical(image: Image.Image, text: str, font: Any, x: int, centre_y: int) -> None:
    w, h = _text_size(font, text)
    label = Image.new("L", (w + 4, h + 6), 0)
    ImageDraw.Draw(label).text((2, 1), text, fill=255, font=font)
    label = label.rotate(90, expand=True)
    ink = Image.new("RGB", label.size, TEXT_COLOR)
    image.paste(ink, (x, int(centre_y - label.height / 2)), label)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text_size(font: Any, text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = font.getbbox(text)
    return int(math.ceil(right - left)), int(math.ceil(bottom - min(top, 0)))


def _write(image: Image.Image, path: str | os.PathLike | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
