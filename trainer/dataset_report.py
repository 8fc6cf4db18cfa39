"""Dataset report: what training will do with every image, before it does it.

For a ``[dataset]`` section (the one the trainer reads), per image: size and aspect, the bucket it lands in, the
box of the source image that training keeps (so a UI can draw it over a thumbnail), the upscale factor, how much
is cropped away, the caption as training reads it and its length in tokens, duplicates; for the dataset: images
and samples per bucket, tag frequency, and warnings. A contact sheet (PNG) shows every thumbnail with its crop box.

Nothing here re-implements a training rule: images are found and decoded by :func:`trainer.dataset.scan_dataset`,
buckets, crops and captions come from :class:`trainer.dataset.ImageDataset` (``plan``/``caption``) and batch
filling from :class:`trainer.dataset.BucketBatchSampler`, exactly as training builds them.

Warnings (thresholds are the named constants below):

* ``upscaled``: the image is enlarged more than ``UPSCALE_WARNING_FACTOR`` to cover its bucket (soft pixels);
* ``heavy_crop``: more than ``HEAVY_CROP_WARNING_FRACTION`` of the (resized) image is cut away;
* ``missing_caption`` / ``empty_caption``: no caption file, or a blank one (training uses "" or the class word);
* ``long_caption``: more than ``CAPTION_TOKEN_LIMIT`` tokens (CLIP's 77-token window minus start/end tokens):
  training cuts the rest off. Counted with the model's tokenizer when one is given, else approximated (see
  :func:`approximate_token_count`, marked ``~``);
* ``exact_duplicate`` (same bytes) and ``near_duplicate`` (difference hash within ``NEAR_DUPLICATE_MAX_DISTANCE``
  of 64 bits: resized, re-encoded or lightly edited copies);
* ``split_trigger`` (for the dataset): a word of the trigger (``dataset.trigger_word``, or a training folder's class
  word that its captions use, ``10_ohwx``) is several tokens of the model's tokenizer. A trigger that is one rare
  token ties the concept to itself faster (measured on the toy model: README, "Further LoRA runs"). Only with the
  model's tokenizer: an approximate count cannot tell.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from trainer.config import DatasetSection
from trainer.dataset import BucketBatchSampler, ImageDataset, read_caption, scan_dataset, to_rgb
from trainer.events import EventCallback, EventLog, StopSignal
from trainer.prior import named_trigger_words

logger = logging.getLogger(__name__)

UPSCALE_WARNING_FACTOR = 1.1  # enlarged by more than 10 %: training sees interpolated pixels
HEAVY_CROP_WARNING_FRACTION = 0.10  # more than 10 % of the resized image cut away
NEAR_DUPLICATE_MAX_DISTANCE = 6  # of the 64 bits of the difference hash
CLIP_TOKEN_WINDOW = 77
CAPTION_TOKEN_LIMIT = CLIP_TOKEN_WINDOW - 2  # the start and end tokens take two places
APPROX_LETTERS_PER_TOKEN = 6  # approximation: a word of up to 6 letters is one token, longer ones one per 6
SHEET_CELL = 160  # contact sheet: thumbnail box side in pixels
SHEET_COLUMNS = 8
SHEET_LIMIT = 256  # images on one contact sheet (those with warnings first when there are more)
REPORT_JSON = "dataset_report.json"
REPORT_PNG = "dataset_report.png"

_HASH_SIDE = 64  # decode size for the difference hash (JPEGs are decoded at reduced scale)
_APPROX_PIECES = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_", re.UNICODE)


# ----- token counting --------------------------------------------------------------------------------------------


def approximate_token_count(text: str) -> int:
    """CLIP-like token count without a tokenizer: one per word of up to ``APPROX_LETTERS_PER_TOKEN`` letters (one
    more per further such run), one per digit and per punctuation mark — common English words are single CLIP
    tokens, rare and long ones split; digits and punctuation are split as CLIP splits them."""
    return sum(math.ceil(len(piece) / APPROX_LETTERS_PER_TOKEN) if piece[0].isalpha() else 1
               for piece in _APPROX_PIECES.findall(text))


@dataclasses.dataclass
class TokenCounter:
    """Caption → tokens (start/end tokens not counted); ``exact`` when a real tokenizer counts."""

    name: str
    exact: bool
    count: Callable[[str], int]


def token_counter(tokenizer: Any = None, subfolder: str | None = None) -> TokenCounter:
    """A counter from a tokenizer object, a tokenizer folder (vocab.json + merges.txt; ``subfolder`` e.g.
    "tokenizer" of a diffusers model folder) or a hub id already in the local cache; else the approximation.
    Nothing is downloaded."""
    if tokenizer is None:
        return TokenCounter("approximation", False, approximate_token_count)
    if isinstance(tokenizer, str | os.PathLike):
        where = os.fspath(tokenizer)
        try:
            from transformers import CLIPTokenizer

            kwargs = {"subfolder": subfolder} if subfolder else {}
            loaded = CLIPTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        except (OSError, ValueError, TypeError) as error:
            logger.info("no tokenizer at %s (%s); token counts are approximate", where, error)
            return TokenCounter("approximation", False, approximate_token_count)
        if len(loaded) <= 2:  # transformers 5 builds an empty tokenizer when the files are missing
            return TokenCounter("approximation", False, approximate_token_count)
        name = where + (f"/{subfolder}" if subfolder else "")
        tokenizer = loaded
    else:
        name = type(tokenizer).__name__

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    return TokenCounter(name, True, count)


# ----- hashing -----------------------------------------------------------------------------------------------------


def preview(path: str | os.PathLike, side: int) -> Image.Image:
    """The image upright, alpha on white (as training decodes it), at most ``side`` pixels on its long side;
    JPEGs are decoded at reduced scale."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (side, side))
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # broken EXIF: as stored (training does the same)
            pass
        rgb, _ = to_rgb(image)
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return rgb


def difference_hash(image: Image.Image) -> int:
    """64-bit dHash: is each pixel of a 9×8 grey thumbnail brighter than its right neighbour."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if bit else "0" for bit in bits), 2)


def near_duplicate_pairs(hashes: Sequence[int | None], max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE
                         ) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j whose hashes differ in at most ``max_distance`` bits."""
    known = [i for i, value in enumerate(hashes) if value is not None]
    if len(known) < 2:
        return []
    values = np.array([hashes[i] for i in known], dtype=np.uint64)
    pairs = []
    for position in range(len(values) - 1):
        distances = np.bitwise_count(values[position + 1:] ^ values[position])
        for offset in np.flatnonzero(distances <= max_distance):
            pairs.append((known[position], known[position + 1 + int(offset)], int(distances[offset])))
    return pairs


def _groups(count: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return [group for group in members.values() if len(group) > 1]


# ----- the report ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageReport:
    path: str
    folder: str  # concept folder as written ("10_mychar")
    repeats: int  # samples per epoch (0 for a validation image)
    role: str  # train, reg or validation
    width: int  # as displayed (EXIF orientation applied)
    height: int
    bucket: tuple[int, int]  # (width, height) the sample is trained at
    resized: tuple[int, int]  # (width, height) the image is resized to before the crop
    scale: float  # resized / source (> 1: upscaled)
    crop_box: tuple[float, float, float, float]  # (left, top, right, bottom) kept, in source pixels (centre crop)
    cropped_fraction: float  # of the resized image's area cut away
    caption: str  # as training reads it (trigger word first; before shuffle/dropout)
    caption_status: str  # ok, missing, empty
    caption_tokens: int
    sha256: str
    dhash: str | None  # 16 hex digits, None when not computed (report stopped)
    warnings: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {"code", "message"}

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["aspect"] = round(self.aspect, 4)
        return data


@dataclasses.dataclass
class DatasetReport:
    settings: dict[str, Any]  # the dataset options the report was made for
    images: list[ImageReport]
    skipped: list[dict[str, str]]  # unusable files: {"path", "reason"}
    buckets: list[dict[str, Any]]  # {"bucket": [w, h], "aspect", "images", "samples", "filled"}
    duplicates: list[dict[str, Any]]  # {"kind": exact|near, "paths": [...], "distance"}
    tag_frequency: dict[str, int]  # over training images, each image counted once per tag
    warnings: list[dict[str, str]]  # dataset-level {"code", "message"}
    tokens: dict[str, Any]  # {"counter": name, "exact": bool, "limit": 75}
    stopped: bool = False  # stopped while hashing: duplicates cover the hashed images only
    seconds: float = 0.0

    def warning_counts(self) -> dict[str, int]:
        return dict(Counter(warning["code"] for image in self.images for warning in image.warnings))

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "summary": {"images": len(self.images), "samples_per_epoch": sum(b["samples"] for b in self.buckets),
                        "skipped": len(self.skipped), "warnings": self.warning_counts()},
            "buckets": self.buckets,
            "warnings": self.warnings,
            "duplicates": self.duplicates,
            "tag_frequency": self.tag_frequency,
            "tokens": self.tokens,
            "skipped": self.skipped,
            "images": [image.to_dict() for image in self.images],
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
        }

    def format_text(self, max_image_lines: int = 40) -> str:
        """A bucket table, the dataset warnings and the images' warnings (at most ``max_image_lines``)."""
        tilde = "" if self.tokens["exact"] else "~"
        lines = [f"{len(self.images)} image(s), {sum(b['samples'] for b in self.buckets)} sample(s) per epoch, "
                 f"{len(self.skipped)} skipped; tokens counted by {self.tokens['counter']}", ""]
        rows = [{"bucket": f"{b['bucket'][0]}×{b['bucket'][1]}", "aspect": f"{b['aspect']:.2f}",
                 "images": str(b["images"]), "samples": str(b["samples"]),
                 "filled": str(b["filled"]) if b["filled"] else ""} for b in self.buckets]
        if rows:
            lines += _table(rows) + [""]
        for warning in self.warnings:
            lines.append(f"warning: {warning['message']}")
        image_lines = [f"  {image.name}: {warning['message']}" for image in self.images for warning in image.warnings]
        if image_lines:
            lines += ["", "per image:"] + image_lines[:max_image_lines]
            if len(image_lines) > max_image_lines:
                lines.append(f"  … and {len(image_lines) - max_image_lines} more (see the JSON report)")
        top = sorted(self.tag_frequency.items(), key=lambda pair: (-pair[1], pair[0]))[:15]
        if top:
            lines += ["", "most frequent tags: " + ", ".join(f"{tag} ({count})" for tag, count in top)]
        longest = max((image.caption_tokens for image in self.images), default=0)
        lines.append(f"longest caption: {tilde}{longest} token(s) of {CAPTION_TOKEN_LIMIT}")
        return "\n".join(lines)


def _table(rows: list[dict[str, str]]) -> list[str]:
    columns = list(rows[0])
    widths = [max(len(column), *(len(row[column]) for row in rows)) for column in columns]
    out = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    out += ["  ".join(row[column].ljust(width) for column, width in zip(columns, widths)) for row in rows]
    return [line.rstrip() for line in out]


def build_report(section: DatasetSection, *, seed: int = 0, batch_size: int = 1, tokenizer: Any = None,
                 on_event: EventCallback | None = None, stop: StopSignal | None = None) -> DatasetReport:
    """The report for ``section`` (as ``train`` reads it, with ``train.seed`` and ``train.batch_size``).

    ``tokenizer``: a tokenizer object or folder for exact token counts (see :func:`token_counter`). Events:
    ``{"event": "report_progress", "phase": "scanning" | "hashing", "done", "total", "eta_s"}`` and
    ``{"event": "report_done", "images", "seconds", "stopped"}``. ``stop`` is checked between images while
    hashing; a stopped report has no hash (and no near-duplicate check) for the rest. Raises ``ValueError`` (the
    scanner's message) when the folder is missing or holds no usable image.
    """
    emit = EventLog(None, [on_event] if on_event else None).emit  # a failing listener is logged, never fatal
    started = time.perf_counter()
    counter = tokenizer if isinstance(tokenizer, TokenCounter) else token_counter(tokenizer)
    emit("report_progress", phase="scanning", done=0, total=None, eta_s=None)
    scan = scan_dataset(section, seed)
    items = scan.items + scan.validation
    geometry = ImageDataset(items, section, seed, augment=False)
    training = ImageDataset(scan.items, section, seed)
    sampler = BucketBatchSampler(training, batch_size, seed)

    hashes: list[int | None] = [None] * len(items)
    stopped = False
    hashing_started = time.perf_counter()
    for index, item in enumerate(items):
        if stop is not None and stop.requested():
            stopped = True
            break
        try:
            hashes[index] = difference_hash(preview(item.path, _HASH_SIDE))
        except Exception as error:  # scanned fine a moment ago; a file changed under us
            logger.warning("%s: cannot hash (%s)", item.path, error)
        done = index + 1
        elapsed = time.perf_counter() - hashing_started
        emit("report_progress", phase="hashing", done=done, total=len(items),
             eta_s=elapsed / done * (len(items) - done))

    images: list[ImageReport] = []
    random_crop = section.crop == "random"
    for index, item in enumerate(items):
        plan = geometry.plan(index)
        height, width = item.size
        box = plan.source_box(width, height)
        caption, _ = read_caption(item.path, section.caption_extension)
        status = "missing" if caption is None else ("empty" if not caption else "ok")
        text = geometry.caption(index)
        role = "reg" if item.is_reg else ("validation" if index >= len(scan.items) else "train")
        images.append(ImageReport(
            path=str(item.path), folder=item.folder, repeats=item.n_repeats if role != "validation" else 0,
            role=role, width=width, height=height, bucket=plan.bucket, resized=plan.resized,
            scale=round(plan.resized[0] / width, 4), crop_box=tuple(round(v, 1) for v in box),
            cropped_fraction=round(1 - plan.bucket[0] * plan.bucket[1] / (plan.resized[0] * plan.resized[1]), 4),
            caption=text, caption_status=status, caption_tokens=counter.count(text) if text else 0,
            sha256=item.sha256, dhash=f"{hashes[index]:016x}" if hashes[index] is not None else None))
        _image_warnings(images[-1], section, counter, random_crop)

    duplicates = _duplicates(images, hashes)
    report = DatasetReport(
        settings={"dir": section.dir, "reg_dir": section.reg_dir, "resolution": section.resolution,
                  "enable_buckets": section.enable_buckets, "min_bucket_side": section.min_bucket_side,
                  "max_bucket_side": section.max_bucket_side, "bucket_step": section.bucket_step,
                  "crop": section.crop, "caption_extension": section.caption_extension,
                  "missing_caption": section.missing_caption, "trigger_word": section.trigger_word,
                  "batch_size": batch_size, "seed": seed},
        images=images,
        skipped=[{"path": str(path), "reason": reason} for path, reason in scan.skipped],
        buckets=_bucket_summary(geometry, sampler, items, batch_size),
        duplicates=duplicates,
        tag_frequency=_total_tags(scan.tag_frequency, scan),
        warnings=[],
        tokens={"counter": counter.name, "exact": counter.exact, "limit": CAPTION_TOKEN_LIMIT},
        stopped=stopped,
    )
    report.warnings = _dataset_warnings(report, section) + _trigger_warnings(section, scan.train_items, counter)
    report.seconds = time.perf_counter() - started
    emit("report_done", images=len(images), seconds=report.seconds, stopped=stopped)
    return report


def _image_warnings(image: ImageReport, section: DatasetSection, counter: TokenCounter, random_crop: bool) -> None:
    def warn(code: str, message: str) -> None:
        image.warnings.append({"code": code, "message": message})

    if image.scale > UPSCALE_WARNING_FACTOR:
        warn("upscaled", f"{image.width}×{image.height} is enlarged ×{image.scale:.2f} to cover its "
                         f"{image.bucket[0]}×{image.bucket[1]} bucket (soft detail); use a larger image")
    if image.cropped_fraction > HEAVY_CROP_WARNING_FRACTION:
        where = "a random part" if random_crop else "the centre"
        hint = "" if section.enable_buckets else "; dataset.enable_buckets = true keeps it whole"
        warn("heavy_crop", f"{image.cropped_fraction:.0%} is cut away ({where} kept for the "
                           f"{image.bucket[0]}×{image.bucket[1]} bucket){hint}")
    fallback = repr(image.caption) if image.caption else "an empty caption (unconditional)"
    if image.caption_status == "missing":
        warn("missing_caption", f"no caption file: trains on {fallback}")
    elif image.caption_status == "empty":
        warn("empty_caption", f"empty caption file: trains on {fallback}")
    if image.caption_tokens > CAPTION_TOKEN_LIMIT:
        tilde = "" if counter.exact else "~"
        warn("long_caption", f"caption has {tilde}{image.caption_tokens} tokens; training cuts it after "
                             f"{CAPTION_TOKEN_LIMIT}")


def _trigger_warnings(section: DatasetSection, items: Sequence[Any], counter: TokenCounter) -> list[dict[str, str]]:
    if not counter.exact:
        return []
    words = dict.fromkeys(word for trigger in named_trigger_words(section, items) for word in trigger.split())
    return [{"code": "split_trigger",
             "message": f"the trigger word {word!r} is {tokens} tokens of the model's tokenizer: a trigger that is "
                        f"one rare token ties the concept to itself faster; consider a rare word the tokenizer keeps "
                        f"whole (in the captions, and the folder name or dataset.trigger_word)"}
            for word, tokens in ((word, counter.count(word)) for word in words) if tokens > 1]


def _duplicates(images: list[ImageReport], hashes: list[int | None]) -> list[dict[str, Any]]:
    by_digest: dict[str, list[int]] = {}
    for index, image in enumerate(images):
        by_digest.setdefault(image.sha256, []).append(index)
    exact = [group for group in by_digest.values() if len(group) > 1]
    found: list[dict[str, Any]] = []
    same_bytes = {i: group[0] for group in exact for i in group}
    for group in exact:
        found.append({"kind": "exact", "paths": [images[i].path for i in group], "distance": 0})
        for i in group:
            others = ", ".join(images[j].name for j in group if j != i)
            images[i].warnings.append({"code": "exact_duplicate", "message": f"same file as {others}"})
    # Near duplicates: pairs of images whose bytes differ (one representative per exact group).
    representative = [hashes[i] if same_bytes.get(i, i) == i else None for i in range(len(images))]
    pairs = near_duplicate_pairs(representative)
    distance = {(a, b): d for a, b, d in pairs}
    for group in _groups(len(images), [(a, b) for a, b, _ in pairs]):
        worst = max(distance.get((a, b), 0) for a in group for b in group if a < b)
        found.append({"kind": "near", "paths": [images[i].path for i in group], "distance": worst})
        for i in group:
            others = ", ".join(images[j].name for j in group if j != i)
            images[i].warnings.append({"code": "near_duplicate",
                                       "message": f"looks like {others} (hash distance ≤ {worst})"})
    return found


def _bucket_summary(geometry: ImageDataset, sampler: BucketBatchSampler, items: Sequence[Any],
                    batch_size: int) -> list[dict[str, Any]]:
    images = Counter(geometry.item_buckets[i] for i in range(len(items)))
    summary = []
    for bucket_index in sorted(images, key=lambda b: geometry.buckets[b]):
        width, height = geometry.buckets[bucket_index]
        samples = len(sampler.groups.get(bucket_index, []))  # both datasets build the same bucket list
        summary.append({"bucket": [width, height], "aspect": round(width / height, 4), "images": images[bucket_index],
                        "samples": samples, "filled": (-samples % batch_size) if samples else 0})
    return summary


def _total_tags(per_folder: dict[str, dict[str, int]], scan: Any) -> dict[str, int]:
    reg_folders = {item.folder for item in scan.reg_items}
    total: Counter = Counter()
    for folder, tags in per_folder.items():
        if folder not in reg_folders:
            total.update(tags)
    return dict(sorted(total.items(), key=lambda pair: (-pair[1], pair[0])))


def _dataset_warnings(report: DatasetReport, section: DatasetSection) -> list[dict[str, str]]:
    warnings: list[dict[str, str]] = []

    def warn(code: str, message: str) -> None:
        warnings.append({"code": code, "message": message})

    counts = report.warning_counts()
    images = len(report.images)
    if not section.enable_buckets:
        non_square = sum(1 for image in report.images if image.width != image.height)
        if non_square:
            warn("buckets_off", f"dataset.enable_buckets is off: {non_square} non-square image(s) are cropped to "
                                f"{section.resolution}×{section.resolution}; turn buckets on to keep them whole")
    if section.crop == "random" and counts.get("heavy_crop"):
        warn("random_crop", "dataset.crop = 'random': the crop boxes shown are the centre ones; each step takes "
                            "another position of the same size")
    messages = {
        "upscaled": f"image(s) enlarged more than ×{UPSCALE_WARNING_FACTOR} to fit their bucket",
        "heavy_crop": f"image(s) lose more than {HEAVY_CROP_WARNING_FRACTION:.0%} to the crop",
        "missing_caption": "image(s) without a caption file",
        "empty_caption": "image(s) with an empty caption file",
        "long_caption": f"caption(s) longer than {CAPTION_TOKEN_LIMIT} tokens (cut off in training)",
        "exact_duplicate": "image(s) with an identical copy in the dataset",
        "near_duplicate": "image(s) that look like another one (resized or re-encoded copies?)",
    }
    for code, text in messages.items():
        if counts.get(code):
            warn(code, f"{counts[code]} of {images} {text}")
    filled = [b for b in report.buckets if b["filled"]]
    if filled:
        names = ", ".join(f"{b['bucket'][0]}×{b['bucket'][1]} (+{b['filled']})" for b in filled)
        warn("batch_fill", f"bucket(s) not filling whole batches of {report.settings['batch_size']}: each epoch "
                           f"repeats samples to complete them: {names}")
    if report.skipped:
        warn("skipped", f"{len(report.skipped)} file(s) cannot be used and are skipped: "
                        + "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in report.skipped[:5])
                        + (" …" if len(report.skipped) > 5 else ""))
    if report.stopped:
        warn("stopped", "the report was stopped: duplicates were looked for among the hashed images only")
    return warnings


# ----- pictures and files ----------------------------------------------------------------------------------------

_INK = (30, 30, 30)
_MUTED = (110, 110, 110)
_WARN = (200, 40, 30)
_BOX = (255, 200, 0)


def sheet_selection(report: DatasetReport, limit: int = SHEET_LIMIT) -> list[ImageReport]:
    """The images a contact sheet shows: all, or (over ``limit``) those with warnings first, in dataset order."""
    if len(report.images) <= limit:
        return list(report.images)
    ranked = sorted(range(len(report.images)), key=lambda i: (not report.images[i].warnings, i))[:limit]
    return [report.images[i] for i in sorted(ranked)]


def render_contact_sheet(report: DatasetReport, *, limit: int = SHEET_LIMIT, cell: int = SHEET_CELL,
                         columns: int = SHEET_COLUMNS) -> Image.Image:
    """Thumbnails with the kept box outlined (the cut-away part dimmed), the bucket under each, a red frame and
    the warning names for images with warnings."""
    shown = sheet_selection(report, limit)
    font = ImageFont.load_default(size=11)
    title_font = ImageFont.load_default(size=14)
    columns = max(1, min(columns, len(shown) or 1))
    label_height = 44
    pad = 8
    header = 40
    rows = max(1, math.ceil(len(shown) / columns))
    counts = report.warning_counts()
    title = (f"{len(report.images)} images - {len(report.buckets)} bucket(s) - "
             + (", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "no warnings"))
    if len(shown) < len(report.images):
        title += f" - showing {len(shown)} (those with warnings first)"
    width = max(pad + columns * (cell + pad), 2 * pad + math.ceil(title_font.getlength(title)))
    sheet = Image.new("RGB", (width, header + rows * (cell + label_height + pad)), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 10), title, font=title_font, fill=_INK)
    for position, image in enumerate(shown):
        x = pad + (position % columns) * (cell + pad)
        y = header + (position // columns) * (cell + label_height + pad)
        _draw_cell(sheet, draw, image, x, y, cell, font)
    return sheet


def _draw_cell(sheet: Image.Image, draw: ImageDraw.ImageDraw, image: ImageReport, x: int, y: int, cell: int,
               font: Any) -> None:
    try:
        thumb = ImageOps.contain(preview(image.path, cell), (cell, cell))  # small images enlarged to the cell
    except Exception:  # the file went away since the report: an empty cell says so
        thumb = Image.new("RGB", (cell, cell), (220, 220, 220))
    scale = thumb.width / image.width
    left = x + (cell - thumb.width) // 2
    top = y + (cell - thumb.height) // 2
    box = [v * scale for v in image.crop_box]
    kept = (round(box[0]), round(box[1]), round(box[2]), round(box[3]))
    dimmed = Image.blend(thumb, Image.new("RGB", thumb.size, (0, 0, 0)), 0.55)
    dimmed.paste(thumb.crop(kept), kept[:2])
    sheet.paste(dimmed, (left, top))
    draw.rectangle((left + kept[0], top + kept[1], left + kept[2] - 1, top + kept[3] - 1), outline=_BOX, width=2)
    if image.warnings:
        draw.rectangle((x - 3, y - 3, x + cell + 2, y + cell + 2), outline=_WARN, width=3)
    # The default font has no "×" or "→": plain ASCII labels.
    draw.text((x, y + cell + 3), _fit(draw, image.name, font, cell), font=font, fill=_INK)
    sizes = f"{image.width}x{image.height} -> {image.bucket[0]}x{image.bucket[1]}"
    draw.text((x, y + cell + 16), _fit(draw, sizes, font, cell), font=font, fill=_MUTED)
    if image.warnings:
        codes = ", ".join(dict.fromkeys(w["code"].replace("_", " ") for w in image.warnings))
        draw.text((x, y + cell + 29), _fit(draw, codes, font, cell), font=font, fill=_WARN)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text``, shortened with "..." until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def write_report(report: DatasetReport, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``dataset_report.json`` and ``dataset_report.png`` (contact sheet) into ``out_dir``, atomically."""
    from methods.files import atomic_write_bytes

    out = Path(out_dir).expanduser()
    json_path, png_path = out / REPORT_JSON, out / REPORT_PNG
    atomic_write_bytes(json_path, json.dumps(report.to_dict(), indent=1, ensure_ascii=False).encode("utf-8"))
    buffer = io.BytesIO()
    render_contact_sheet(report).save(buffer, format="PNG")
    atomic_write_bytes(png_path, buffer.getvalue())
    return json_path, png_path


def check_out_dir(out_dir: str | os.PathLike, section: DatasetSection) -> Path:
    """``out_dir`` resolved; refused inside the dataset (its PNG would become a training image)."""
    out = Path(out_dir).expanduser().resolve()
    for root in (section.dir, section.reg_dir):
        if root and out.is_relative_to(Path(root).expanduser().resolve()):
            raise ValueError(f"report folder {out} is inside the dataset folder {root}: its PNG would be read as a "
                             "training image; choose a folder outside it")
    return out


__all__ = [
    "CAPTION_TOKEN_LIMIT", "HEAVY_CROP_WARNING_FRACTION", "NEAR_DUPLICATE_MAX_DISTANCE", "UPSCALE_WARNING_FACTOR",
    "DatasetReport", "ImageReport", "TokenCounter", "approximate_token_count", "build_report", "check_out_dir",
    "difference_hash", "near_duplicate_pairs", "preview", "render_contact_sheet", "sheet_selection",
    "token_counter", "write_report",
]
