"""Image folders → training samples: scanning, image decoding, aspect-ratio buckets, captions, batches.

Layout (kohya DreamBooth style)::

    data/                       dataset.dir
      10_mychar/                10 repeats, class word "mychar"
        001.png  001.txt        caption sidecar (dataset.caption_extension)
        002.jpg                 no caption → "" or "mychar" (dataset.missing_caption)
        002_mask.png            optional loss mask (dataset.masked_loss; white = train)
      style/                    no "N_" prefix → 1 repeat, class word "style"
      003.png                   images directly in the root: one concept named after the root (1 repeat, or N
                                when the root itself is called "N_name")

Only the root and its immediate sub-folders are read; hidden files and folders (".name") and deeper folders are
ignored. ``dataset.reg_dir`` is scanned the same way; its images are flagged ``is_reg``, weighted by
``dataset.reg_weight`` and repeated so that they balance the training images, as kohya does.

Every image is decoded once while scanning, so a corrupt, truncated, empty or oversized file is skipped (with a
warning naming it and the reason) instead of crashing a worker hours into training.

Randomness (crop, flip, caption shuffle and dropout, batch order) never comes from global RNG state: each
decision has its own generator seeded by (seed, epoch, sample index) or (seed, epoch), so a run is reproducible,
and resuming mid-epoch (:meth:`BucketBatchSampler.resume`) replays exactly the batches an uninterrupted run sees.

Decisions worth knowing:

* A sample index counts repeats: ``len(dataset)`` = Σ images × repeats (kohya's "number of train images"), and
  each repeat of an image gets its own crop/flip/caption draws.
* Buckets follow kohya's ``make_bucket_resolutions``; an image goes to the bucket whose aspect ratio is nearest
  in log space (so an image and its 90° rotation land in transposed buckets), is resized to cover the bucket and
  cropped (center or random). Resizing is Lanczos; masks are resized bilinearly over the same box.
* Partial batches are filled up with other samples of the same bucket (``drop_last=False``) or dropped
  (``drop_last=True``): every batch is whole — one bucket, ``batch_size`` samples — which is what accelerate's
  ``BatchSamplerShard`` needs to shard batches across processes without mixing resolutions.
* A caption file's first non-blank line is the caption (kohya); a blank or missing file falls back per
  ``missing_caption``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.config import DatasetSection

if TYPE_CHECKING:
    from trainer.cache import LatentCache

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = "_mask"
_REPEAT_PREFIX = re.compile(r"^(\d+)_(.+)$")
_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# ----- scanning ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One usable image found by :func:`scan_dataset`."""

    path: Path
    caption: str  # from the sidecar file, or the missing-caption fallback
    folder: str  # concept folder name as written ("10_mychar"), the key of ss_tag_frequency / ss_dataset_dirs
    n_repeats: int  # samples per epoch (for reg images: after balancing against the training images)
    size: tuple[int, int]  # (height, width) as displayed, i.e. after the EXIF orientation
    sha256: str  # of the file's bytes (latent cache key)
    is_reg: bool = False
    loss_weight: float = 1.0
    has_alpha: bool = False
    mask_path: Path | None = None  # <stem>_mask.png beside the image, when masked_loss and present
    subset: int = -1  # its dataset.subsets entry (-1: dataset.dir or reg_dir)


@dataclasses.dataclass
class DatasetScan:
    items: list[ImageItem]  # training items: concept images then regularisation images
    validation: list[ImageItem]  # held-out non-reg images (dataset.validation_split), one sample each
    skipped: list[tuple[Path, str]]  # unusable files and why
    tag_frequency: dict[str, dict[str, int]]  # ss_tag_frequency
    dataset_dirs: dict[str, dict[str, int]]  # ss_dataset_dirs {folder: {"n_repeats", "img_count"}}
    reg_dataset_dirs: dict[str, dict[str, int]]  # ss_reg_dataset_dirs
    subset_images: list[int] = dataclasses.field(default_factory=list)  # usable images per dataset.subsets entry

    @property
    def train_items(self) -> list[ImageItem]:
        return [item for item in self.items if not item.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [item for item in self.items if item.is_reg]

    @property
    def num_train_images(self) -> int:
        """Training images × repeats (kohya's ss_num_train_images)."""
        return sum(item.n_repeats for item in self.train_items)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images × their folder repeats (kohya's ss_num_reg_images)."""
        return sum(info["n_repeats"] * info["img_count"] for info in self.reg_dataset_dirs.values())


class UnusableImage(Exception):
    """An image file that cannot be trained on; the message is the reason shown to the user."""


@dataclasses.dataclass(frozen=True)
class _Concept:
    name: str  # folder name as written
    class_word: str
    n_repeats: int
    images: tuple[Path, ...]
    files: dict[str, Path]  # every file of the folder by lower-cased name (caption look-up)


def scan_dataset(section: DatasetSection, seed: int = 0, should_stop: Callable[[], bool] | None = None) -> DatasetScan:
    """Find every usable image (and caption) under ``section.dir`` and ``section.reg_dir``.

    Raises ``ValueError`` when a folder is missing or holds no usable image. Unusable files are listed in
    ``scan.skipped`` and logged as warnings. ``should_stop()`` is asked after every image; when it says yes the
    scan ends with :class:`trainer.events.StopRequested`.
    """
    should_stop = should_stop or (lambda: False)
    if section.subsets:
        return _scan_subsets(section, seed, should_stop)
    skipped: list[tuple[Path, str]] = []
    caption_extension = _caption_extension(section.caption_extension)
    train, train_concepts = _scan_root(Path(section.dir).expanduser(), "dataset.dir", section, caption_extension,
                                       skipped, should_stop, is_reg=False)
    reg: list[ImageItem] = []
    reg_concepts: list[_Concept] = []
    if section.reg_dir:
        reg, reg_concepts = _scan_root(Path(section.reg_dir).expanduser(), "dataset.reg_dir", section,
                                       caption_extension, skipped, should_stop, is_reg=True)
    train, validation = _split_validation(train, section.validation_split, seed)
    reg = _balance_regularisation(reg, sum(item.n_repeats for item in train))
    items = train + reg
    return DatasetScan(
        items=items,
        validation=validation,
        skipped=skipped,
        tag_frequency=_tag_frequency(items),
        dataset_dirs=_dataset_dirs(train_concepts, train),
        reg_dataset_dirs=_dataset_dirs(reg_concepts, reg),
    )


def subset_section(section: DatasetSection, index: int) -> DatasetSection:
    """The [dataset] settings as they apply to the images of ``dataset.subsets[index]``: the subset's own values
    where set (-1: the [dataset] section itself)."""
    if index < 0:
        return section
    subset = section.subsets[index]
    shared = {field.name for field in dataclasses.fields(DatasetSection)}
    own = {field.name: getattr(subset, field.name) for field in dataclasses.fields(subset)
           if field.name in shared and getattr(subset, field.name) is not None}
    return dataclasses.replace(section, **own, subsets=[])


def _scan_subsets(section: DatasetSection, seed: int, should_stop: Callable[[], bool]) -> DatasetScan:
    """sd-scripts' dataset config: every subset is one folder of images with its own repeats, captions, flags."""
    skipped: list[tuple[Path, str]] = []
    train: list[ImageItem] = []
    reg: list[ImageItem] = []
    train_concepts: list[_Concept] = []
    reg_concepts: list[_Concept] = []
    counts: list[int] = []
    names: set[str] = set()
    for index, subset in enumerate(section.subsets):
        where = f"dataset.subsets[{index}].image_dir"
        folder = Path(subset.image_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(f"{where} = {subset.image_dir!r} is not a folder")
        concept = _concept(folder)
        if concept is None:
            raise ValueError(f"{where} = {subset.image_dir!r}: no image directly inside (accepted extensions: "
                             f"{', '.join(IMAGE_EXTENSIONS)}); give each sub-folder its own subset")
        name, number = folder.name, 2
        while name in names:  # the same folder name twice: sd-scripts' "name (2)"
            name, number = f"{folder.name} ({number})", number + 1
        names.add(name)
        class_word = subset.class_tokens if subset.class_tokens is not None else concept.class_word
        concept = dataclasses.replace(concept, name=name, class_word=class_word, n_repeats=subset.num_repeats)
        settings = subset_section(section, index)
        missing_caption = "class_word" if subset.class_tokens else settings.missing_caption
        items = _inspect_concept(concept, dataclasses.replace(settings, missing_caption=missing_caption),
                                 _caption_extension(settings.caption_extension), skipped, should_stop,
                                 subset.is_reg, where)
        items = [dataclasses.replace(item, subset=index) for item in items]
        counts.append(len(items))
        (reg if subset.is_reg else train).extend(items)
        (reg_concepts if subset.is_reg else train_concepts).append(concept)
    train, validation = _split_validation(train, section.validation_split, seed)
    reg = _balance_regularisation(reg, sum(item.n_repeats for item in train))
    items = train + reg
    return DatasetScan(items=items, validation=validation, skipped=skipped, tag_frequency=_tag_frequency(items),
                       dataset_dirs=_dataset_dirs(train_concepts, train),
                       reg_dataset_dirs=_dataset_dirs(reg_concepts, reg), subset_images=counts)


def _caption_extension(extension: str) -> str:
    extension = extension.strip() or ".txt"
    return extension if extension.startswith(".") else "." + extension


def parse_folder_name(name: str) -> tuple[int, str]:
    """``"10_my char"`` → (10, "my char"); a name without a repeat prefix → (1, name)."""
    match = _REPEAT_PREFIX.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return 1, name


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def training_images(files: Sequence[Path]) -> list[Path]:
    """The training images among one folder's ``files``: visible image files, loss masks excluded."""
    images = [p for p in files if is_image_name(p.name)]
    stems = {p.stem for p in images}
    # "<stem>_mask.png" beside "<stem>.<ext>" is a loss mask, never a training image.
    return [p for p in images if not (p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in stems)]


def _concept(folder: Path) -> _Concept | None:
    """The folder's images (sorted) and files, or None when it holds no image directly."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = training_images(files)
    if not images:
        return None
    repeats, class_word = parse_folder_name(folder.name)
    lowered: dict[str, Path] = {}
    for path in files:
        lowered.setdefault(path.name.lower(), path)
    return _Concept(folder.name, class_word, repeats, tuple(images), lowered)


def _find_concepts(root: Path, exclude: Path | None = None) -> list[_Concept]:
    root_concept = _concept(root)
    concepts = [root_concept] if root_concept else []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if exclude is not None and folder.resolve() == exclude:
            continue  # reg_dir placed inside dir
        concept = _concept(folder)
        if concept is None:
            logger.info("%s: no images directly inside; folder ignored", folder)
        elif concept.n_repeats == 0:
            logger.warning("%s: 0 repeats in the folder name; its %d image(s) are not used", folder,
                           len(concept.images))
        else:
            concepts.append(concept)
    return concepts


def image_files(root: str | os.PathLike) -> list[Path]:
    """Every image file training reads under ``root`` (the root and its immediate sub-folders; hidden files, loss
    masks and 0-repeat folders left out), folder by folder in name order. Files are listed, not decoded."""
    return [path for concept in _find_concepts(Path(root).expanduser()) for path in concept.images]


def _scan_root(root: Path, what: str, section: DatasetSection, caption_extension: str,
               skipped: list[tuple[Path, str]], should_stop: Callable[[], bool], *,
               is_reg: bool) -> tuple[list[ImageItem], list[_Concept]]:
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not root.is_dir():
        raise ValueError(f"{what} = {str(root)!r} is not a folder")
    exclude = Path(section.reg_dir).expanduser().resolve() if section.reg_dir and not is_reg else None
    concepts = _find_concepts(root, exclude)
    items = _inspect_images(concepts, section, caption_extension, skipped, should_stop, is_reg, root)
    if not items:
        bad = sum(1 for path, _ in skipped if path.is_relative_to(root))
        detail = f" ({bad} file(s) skipped as unusable, see the warnings)" if bad else ""
        raise ValueError(f"{what} = {str(root)!r}: no usable image found{detail}; accepted extensions: {accepted} "
                         "(directly inside the folder or inside its immediate sub-folders such as '10_name')")
    used = {item.folder for item in items}
    return items, [concept for concept in concepts if concept.name in used]


def _inspect_concept(concept: _Concept, section: DatasetSection, caption_extension: str,
                     skipped: list[tuple[Path, str]], should_stop: Callable[[], bool], is_reg: bool,
                     what: str) -> list[ImageItem]:
    """The usable images of one subset folder (:func:`_inspect_images`); a ValueError naming ``what`` if none."""
    folder = concept.images[0].parent
    items = _inspect_images([concept], section, caption_extension, skipped, should_stop, is_reg, folder)
    if not items:
        raise ValueError(f"{what} = {str(folder)!r}: no usable image found (see the warnings)")
    return items


def _inspect_images(concepts: list[_Concept], section: DatasetSection, caption_extension: str,
                    skipped: list[tuple[Path, str]], should_stop: Callable[[], bool], is_reg: bool,
                    root: Path) -> list[ImageItem]:
    """Decode every image of ``concepts`` (in threads) into items; unusable ones go to ``skipped``."""
    jobs = [(concept, path) for concept in concepts for path in concept.images]

    def inspect(job: tuple[_Concept, Path]) -> tuple[ImageItem, bool] | tuple[Path, str]:
        concept, path = job
        try:
            return _inspect_item(path, concept, section, caption_extension, is_reg)
        except UnusableImage as error:
            return path, str(error)

    results = _run_all(inspect, jobs, should_stop)

    items: list[ImageItem] = []
    multi_line = 0
    for first, second in results:
        if isinstance(first, ImageItem):
            items.append(first)
            multi_line += second
        else:
            logger.warning("skipping %s: %s", first, second)
            skipped.append((first, second))
    if multi_line:
        logger.warning("%d caption file(s) in %s have several lines; only the first non-blank line is used",
                       multi_line, root)
    return items


def _run_all(function: Callable[[Any], Any], jobs: list[Any], should_stop: Callable[[], bool]) -> list[Any]:
    """``[function(job) for job in jobs]`` on a few threads (Pillow decodes with the GIL released), asking
    ``should_stop()`` after each result; a stop cancels the jobs not started yet."""
    from trainer.events import StopRequested

    workers = max(1, min(8, os.cpu_count() or 1))
    if len(jobs) <= 1 or workers <= 1:
        results = []
        for job in jobs:
            results.append(function(job))
            if should_stop():
                raise StopRequested("stopped while scanning the images")
        return results
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        futures = [pool.submit(function, job) for job in jobs]
        results = []
        for future in futures:
            results.append(future.result())
            if should_stop():
                raise StopRequested("stopped while scanning the images")
        return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _inspect_item(path: Path, concept: _Concept, section: DatasetSection, caption_extension: str,
                  is_reg: bool) -> tuple[ImageItem, bool]:
    """The item for one image file, and whether its caption file had more than one line."""
    height, width, digest, has_alpha = inspect_image(path, section.max_pixels)
    mask_path = None
    if section.masked_loss:
        candidate = path.with_name(path.stem + MASK_SUFFIX + ".png")
        if candidate.is_file():
            try:
                inspect_image(candidate, section.max_pixels)
            except UnusableImage as error:
                raise UnusableImage(f"its mask {candidate.name} is unusable: {error}") from None
            mask_path = candidate
    caption, multi_line = read_caption(path, caption_extension, concept.files)
    if not caption:  # no sidecar, or a blank one
        caption = concept.class_word if section.missing_caption == "class_word" else ""
    return ImageItem(path=path, caption=caption, folder=concept.name, n_repeats=concept.n_repeats,
                     size=(height, width), sha256=digest, is_reg=is_reg,
                     loss_weight=float(section.reg_weight) if is_reg else 1.0, has_alpha=has_alpha,
                     mask_path=mask_path), multi_line


def inspect_image(path: Path, max_pixels: int) -> tuple[int, int, str, bool]:
    """Decode ``path`` completely; return (height, width as displayed, sha256 of the bytes, has alpha).

    Raises :class:`UnusableImage` with the reason for an empty, unidentifiable, oversized, truncated or corrupt file.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnusableImage(f"cannot read the file ({error.strerror or error})") from None
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise UnusableImage(f"too many pixels ({error})") from None
        except UnidentifiedImageError:
            raise UnusableImage("not an image file (Pillow cannot identify its format)") from None
        except Exception as error:  # any parser error means the file is unusable
            raise UnusableImage(f"corrupt image header ({type(error).__name__}: {error})") from None
        with image:
            width, height = image.size
            if width < 1 or height < 1:
                raise UnusableImage(f"empty image ({width}×{height})")
            if width * height > max_pixels:
                raise UnusableImage(f"too many pixels: {width}×{height} = {width * height:,} > dataset.max_pixels = "
                                f"{max_pixels:,}")
            if image.format == "JPEG":  # decode every byte, at 1/8 scale (much faster); truncation still shows
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            try:
                image.load()
            except Exception as error:  # truncated (OSError), broken chunks (SyntaxError), ...
                raise UnusableImage(f"truncated or corrupt image data ({type(error).__name__}: {error})") from None
            has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
            if _orientation(image) in (5, 6, 7, 8):
                width, height = height, width
    return height, width, hashlib.sha256(data).hexdigest(), has_alpha


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # broken EXIF: treat as unrotated
        return 1


def caption_file(image_path: Path, extension: str, files: dict[str, Path] | None = None) -> Path | None:
    """The caption sidecar of ``image_path`` that training reads: ``<stem><extension>``, else the same name in
    another letter case ("IMG.TXT" serves "IMG.jpg" on case-sensitive disks), else None.

    ``files``: the folder's files by lower-cased name (listed here when not given).
    """
    caption_path = image_path.with_suffix(_caption_extension(extension))
    if caption_path.is_file():
        return caption_path
    if files is None:
        files = {}
        for path in sorted(p for p in image_path.parent.iterdir() if p.is_file()):
            files.setdefault(path.name.lower(), path)
    return files.get(caption_path.name.lower())


def read_caption(image_path: Path, extension: str, files: dict[str, Path] | None = None) -> tuple[str | None, bool]:
    """(first non-blank line of the sidecar or None when there is none, whether the file has several lines).

    Raises :class:`UnusableImage` for a caption file that is not UTF-8 or cannot be read.
    """
    caption_path = caption_file(image_path, extension, files)
    if caption_path is None:
        return None, False
    try:
        text = caption_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        reason = f"caption file {caption_path.name} is not UTF-8 ({error.reason} at byte {error.start})"
        raise UnusableImage(reason) from None
    except OSError as error:
        raise UnusableImage(f"cannot read caption file {caption_path.name} ({error.strerror or error})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else ""), len(lines) > 1


def _split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    if fraction <= 0 or not items:
        return items, []
    if len(items) < 2:
        logger.warning("dataset.validation_split = %s ignored: only one training image", fraction)
        return items, []
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))

    def rank(item: ImageItem) -> str:  # stable per file: adding images does not reshuffle the others
        return hashlib.sha256(f"{seed}\0{item.folder}\0{item.path.name}".encode()).hexdigest()

    held = set(sorted(range(len(items)), key=lambda i: rank(items[i]))[:count])
    validation = [dataclasses.replace(items[i], n_repeats=1) for i in sorted(held)]
    return [item for i, item in enumerate(items) if i not in held], validation


def _balance_regularisation(reg: list[ImageItem], target: int) -> list[ImageItem]:
    """kohya: reg images × repeats = training images × repeats (extra reg images unused, few ones repeated)."""
    if not reg or target <= 0:
        return reg
    repeats: list[int] = []
    total = 0
    for item in reg:
        if total >= target:
            break
        repeats.append(item.n_repeats)
        total += item.n_repeats
    if total < target:  # the deficit spread one by one over the images in turn, first ones first
        whole, extra = divmod(target - total, len(repeats))
        repeats = [n + whole + (position < extra) for position, n in enumerate(repeats)]
    if len(repeats) < len(reg):
        logger.info("%d of %d regularisation images used to balance %d training samples", len(repeats), len(reg),
                    target)
    return [dataclasses.replace(item, n_repeats=n) for item, n in zip(reg, repeats)]


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def _tag_frequency(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    frequency: dict[str, Counter] = {}
    for item in items:
        frequency.setdefault(item.folder, Counter()).update(split_tags(item.caption))
    return {folder: dict(counter) for folder, counter in frequency.items()}


def _dataset_dirs(concepts: Sequence[_Concept], items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    counts = Counter(item.folder for item in items)
    return {c.name: {"n_repeats": c.n_repeats, "img_count": counts[c.name]} for c in concepts if counts[c.name]}


# ----- image loading -------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> tuple[Image.Image, Image.Image | None]:
    """Decode ``path`` upright (EXIF orientation applied) as RGB; alpha is composited on white.

    Returns (RGB image, alpha channel as an "L" image or None when the image has no transparency).
    """
    with warnings.catch_warnings():  # dataset.max_pixels, checked while scanning, is the limit that applies
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return to_rgb(_upright(image, path))


def _upright(image: Image.Image, path: str | Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # broken EXIF: use the stored orientation
        logger.warning("%s: cannot apply the EXIF orientation (%s); using the image as stored", path, error)
        return image


def to_rgb(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Any Pillow mode → (RGB, alpha or None). 16-bit values are scaled to 8 bits rather than clipped."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        elif mode != "I" or (values.size and values.max() > 255):  # "I" holds 8-bit data for some sources
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        mode = "L"
    if mode == "1":
        image, mode = image.convert("L"), "L"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), alpha
    if mode != "RGB":
        image = image.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, RGBX
    return image, None


def load_mask(path: str | Path) -> Image.Image:
    """A mask image as "L" (white = train), upright."""
    with Image.open(path) as image:
        image.load()
        rgb, _ = to_rgb(_upright(image, path))
        return rgb.convert("L")


# ----- buckets -------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    """kohya's ``make_bucket_resolutions``: (width, height) pairs, sides multiples of ``step`` within
    [min_side, max_side], area ≤ resolution², plus the largest square; sorted."""
    if step % 8:
        raise ValueError(f"dataset.bucket_step must be a multiple of 8 (the VAE's factor), got {step}")
    max_area = resolution * resolution
    buckets = {(int(math.sqrt(max_area) // step) * step,) * 2}
    width = min_side
    while width <= max_side:
        height = min(max_side, int((max_area // width) // step) * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket nearest in aspect ratio (log distance; ties → the first) for an image (height, width)."""
    height, width = size
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing an image (height, width) to cover ``bucket`` (width, height), kohya rounding."""
    height, width = size
    bucket_w, bucket_h = bucket
    if width / height > bucket_w / bucket_h:
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    return max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5))


def no_upscale_bucket(size: tuple[int, int], resolution: int, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """sd-scripts' ``bucket_no_upscale`` (``BucketManager.select_bucket``): an image (height, width) larger than
    resolution² in area is shrunk to that area (its aspect ratio kept, one side rounded to ``step``, whichever keeps
    the ratio better), a smaller one keeps its size; the bucket is that size rounded down to ``step`` (the image
    is cropped, never enlarged). Returns (bucket, resized), both (width, height); a side below ``step`` becomes
    ``step`` (the one case that enlarges)."""
    height, width = size
    ratio = width / height
    max_area = resolution * resolution

    def to_steps(value: float) -> int:
        value = int(value + 0.5)
        return max(step, value - value % step)

    if width * height > max_area:
        resized_width = math.sqrt(max_area * ratio)
        resized_height = max_area / resized_width
        by_width = to_steps(resized_width)
        by_height = to_steps(resized_height)
        width_error = abs(by_width / to_steps(by_width / ratio) - ratio)
        height_error = abs(to_steps(by_height * ratio) / by_height - ratio)
        if width_error < height_error:
            resized = (by_width, int(by_width / ratio + 0.5))
        else:
            resized = (int(by_height * ratio + 0.5), by_height)
    else:
        resized = (width, height)
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    if bucket[0] > resized[0] or bucket[1] > resized[1]:
        resized = cover_size(size, bucket)
    return bucket, resized


def bucket_geometry(items: Sequence[ImageItem], sections: Sequence[DatasetSection],
                    section: DatasetSection) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int]]]:
    """(buckets, each item's bucket index, each item's resized size): kohya's buckets of each item's resolution
    (nearest aspect ratio), or with ``bucket_no_upscale`` :func:`no_upscale_bucket`; the square resolution when
    buckets are off. The bucket list is every candidate bucket of the resolutions in use, sorted."""
    candidates: dict[int, list[tuple[int, int]]] = {}
    chosen: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for item, own in zip(items, sections):
        if not section.enable_buckets:
            bucket = (own.resolution, own.resolution)
            chosen.append((bucket, cover_size(item.size, bucket)))
        elif section.bucket_no_upscale:
            chosen.append(no_upscale_bucket(item.size, own.resolution, section.bucket_step))
        else:
            options = candidates.get(own.resolution)
            if options is None:
                options = candidates[own.resolution] = make_buckets(own.resolution, section.min_bucket_side,
                                                                    section.max_bucket_side, section.bucket_step)
            bucket = options[assign_bucket(item.size, options)]
            chosen.append((bucket, cover_size(item.size, bucket)))
    buckets = sorted(set().union(*candidates.values(), (bucket for bucket, _ in chosen)))
    index = {bucket: position for position, bucket in enumerate(buckets)}
    return buckets, [index[bucket] for bucket, _ in chosen], [resized for _, resized in chosen]


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """sd-scripts' ``color_aug``: a third of the time, either a hue shift of up to ±8 (of OpenCV's 180 hues) or a
    gamma in [0.95, 1.05]; otherwise the image unchanged. (sd-scripts raises the raw 0–255 values to γ, which moves
    mid-greys by up to ~30 levels; here γ acts on values in [0, 1], as the albumentations transform it replaced.)"""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift = round(rng.uniform(-8, 8) * 256 / 180)  # Pillow's hue runs over 0-255
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    values = np.asarray(image, dtype=np.float32) / 255.0
    return Image.fromarray(np.clip(np.rint(255.0 * values**gamma), 0, 255).astype(np.uint8))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one sample is cut from its image: resize to ``resized``, crop ``bucket`` at (left, top), maybe mirror."""

    bucket: tuple[int, int]  # (width, height)
    resized: tuple[int, int]  # (width, height)
    left: int
    top: int
    flip: bool

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """SDXL crop conditioning (top, left) in the resized image as seen by the model (mirrored when flipped)."""
        left = self.resized[0] - self.left - self.bucket[0] if self.flip else self.left
        return self.top, left

    @property
    def target_size(self) -> tuple[int, int]:
        return self.bucket[1], self.bucket[0]

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The (left, top, right, bottom) box, in pixels of the upright source image of that size, that the sample
        is cut from (before mirroring)."""
        scale_x, scale_y = width / self.resized[0], height / self.resized[1]
        return (self.left * scale_x, self.top * scale_y,
                (self.left + self.bucket[0]) * scale_x, (self.top + self.bucket[1]) * scale_y)


def render(image: Image.Image, plan: Plan, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize-and-crop ``image`` per ``plan`` in one resampling pass (only the crop box is resampled)."""
    out = image.resize(plan.bucket, resample, box=plan.source_box(*image.size), reducing_gap=3.0)
    return ImageOps.mirror(out) if plan.flip else out


def pixels_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """"L" PIL image → (1, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).unsqueeze(0).float().div_(255.0)


# ----- captions ------------------------------------------------------------------------------------------------


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def process_caption(caption: str, rng: random.Random, *, trigger_word: str = "", shuffle: bool = False,
                    keep_tokens: int = 0, dropout: float = 0.0, tag_dropout: float = 0.0, prefix: str = "",
                    suffix: str = "", drop: bool = False) -> str:
    """Caption as used for one sample.

    * prefix/suffix (sd-scripts' caption_prefix/suffix): joined to the caption with a space, before anything else.
    * dropout: with probability ``dropout`` (or always with ``drop``: sd-scripts' caption_dropout_every_n_epochs)
      the whole caption (trigger included) becomes "" (unconditional).
    * trigger word: first, once. A caption that already has it as a tag gets it moved to the front; one that
      mentions it inside prose ("a photo of ohwx man") is left as written.
    * shuffle: comma-separated tags are shuffled except the first ``keep_tokens``, counted with the trigger first
      (kohya's usual "ohwx, ..." + keep_tokens = 1); the trigger itself is always kept in front.
    * tag_dropout (sd-scripts' caption_tag_dropout_rate): after shuffling, each tag not kept in front is dropped
      with this probability.
    """
    if prefix:
        caption = f"{prefix} {caption}"
    if suffix:
        caption = f"{caption} {suffix}"
    if drop or (dropout > 0 and rng.random() < dropout):
        return ""
    caption = caption.strip()
    trigger = trigger_word.strip()
    tags = split_tags(caption)
    as_tag = bool(trigger) and trigger in tags
    lead = [trigger] if as_tag or (trigger and not _contains_word(caption, trigger)) else []
    rest = [tag for tag in tags if tag != trigger] if lead else tags
    if shuffle or tag_dropout > 0:
        keep = max(0, keep_tokens - len(lead))
        fixed, free = rest[:keep], rest[keep:]
        if shuffle:
            rng.shuffle(free)
        if tag_dropout > 0:
            free = [tag for tag in free if rng.random() >= tag_dropout]
        return ", ".join(lead + fixed + free)
    if not lead or tags[:1] == lead:
        return caption
    body = ", ".join(rest) if as_tag else caption
    return f"{trigger}, {body}" if body else trigger


# ----- dataset -------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Samples (images × repeats) with bucketed geometry and per-sample captions; see the module docstring.

    ``augment=False`` (validation): one sample per image, center crop, no flip, no caption shuffle/dropout.
    ``dataset[i]`` is a dict — see :func:`collate_batch` for the batched form. Call :meth:`set_epoch` (the
    sampler does) before fetching an epoch's samples.
    """

    def __init__(self, items: Sequence[ImageItem], section: DatasetSection, seed: int, *, augment: bool = True):
        if not items:
            raise ValueError("a dataset needs at least one image")
        self.items = list(items)
        self.section = section
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self.latent_cache: LatentCache | None = None
        # Each image's settings: [dataset], or its dataset.subsets entry's (own resolution, flip, captions, …).
        by_subset = {index: subset_section(section, index) for index in {item.subset for item in self.items}}
        self.item_sections = [by_subset[item.subset] for item in self.items]
        self.buckets, self.item_buckets, self.item_resized = bucket_geometry(self.items, self.item_sections, section)
        # Sample indices count repeats: item i owns samples sample_starts[i] … sample_starts[i + 1] − 1. Kept as
        # offsets, not one entry per sample: a folder named "100000000_x" must not build a 10⁸-long list.
        self.repeats = np.array([item.n_repeats if augment else 1 for item in self.items], dtype=np.int64)
        self.sample_starts = np.concatenate([[0], np.cumsum(self.repeats)])
        self.random_crop = augment and section.crop == "random"
        self.item_flip = [augment and own.flip for own in self.item_sections]
        self.item_color_aug = [augment and own.color_aug for own in self.item_sections]
        self.flip = any(self.item_flip)

    # --- sizes and metadata ---
    def __len__(self) -> int:
        return int(self.sample_starts[-1])

    def item_index(self, index: int) -> int:
        """The item (image) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a dataset of {len(self)}")
        return int(np.searchsorted(self.sample_starts, index, side="right")) - 1

    @property
    def num_images(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_bucket(self, index: int) -> int:
        return self.item_buckets[self.item_index(index)]

    def bucket_info(self) -> dict[str, Any]:
        """ss_bucket_info: used buckets with their sample counts (repeats included) and the mean |AR error|."""
        counts: Counter = Counter()
        for bucket, repeats in zip(self.item_buckets, self.repeats):
            counts[bucket] += int(repeats)
        errors = [abs(self.buckets[b][0] / self.buckets[b][1] - item.size[1] / item.size[0])
                  for item, b in zip(self.items, self.item_buckets)]
        return {
            "buckets": {i: {"resolution": list(self.buckets[i]), "count": counts[i]} for i in sorted(counts)},
            "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0,
        }

    # --- per-sample decisions ---
    def _rng(self, what: str, index: int, epoch: int | None) -> random.Random:
        return random.Random(f"{what}/{self.seed}/{self.epoch if epoch is None else epoch}/{index}")

    def plan(self, index: int, epoch: int | None = None) -> Plan:
        """Geometry of sample ``index`` in ``epoch`` (default: the current epoch)."""
        crop_rng = self._rng("crop", index, epoch) if self.random_crop else None
        item_index = self.item_index(index)
        flip = self.item_flip[item_index] and self._rng("flip", index, epoch).random() < 0.5
        return self._item_plan(item_index, flip, crop_rng)

    def _item_plan(self, item_index: int, flip: bool, crop_rng: random.Random | None = None) -> Plan:
        bucket = self.buckets[self.item_buckets[item_index]]
        resized = self.item_resized[item_index]
        spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
        if crop_rng is not None:
            left, top = crop_rng.randint(0, spare_w), crop_rng.randint(0, spare_h)
        else:
            left, top = spare_w // 2, spare_h // 2
        return Plan(bucket, resized, left, top, flip)

    def caption(self, index: int, epoch: int | None = None) -> str:
        item_index = self.item_index(index)
        item, own = self.items[item_index], self.item_sections[item_index]
        if not self.augment:
            return process_caption(item.caption, random.Random(0), trigger_word=own.trigger_word,
                                   prefix=own.caption_prefix, suffix=own.caption_suffix)
        every = own.caption_dropout_every_n_epochs  # sd-scripts counts epochs from 1: every Nth one is dropped
        drop = bool(every) and ((self.epoch if epoch is None else epoch) + 1) % every == 0
        return process_caption(item.caption, self._rng("caption", index, epoch), trigger_word=own.trigger_word,
                               shuffle=own.shuffle_caption, keep_tokens=own.keep_tokens, dropout=own.caption_dropout,
                               tag_dropout=own.caption_tag_dropout_rate, prefix=own.caption_prefix,
                               suffix=own.caption_suffix, drop=drop)

    # --- latent caching support (trainer.cache) ---
    def cache_blocker(self) -> str | None:
        """Why latents of this dataset cannot be cached, or None."""
        if self.random_crop:
            return ("dataset.crop = 'random' picks a new crop at every step, so latents cannot be cached; the VAE "
                    "encodes every batch instead (use crop = 'center' to cache latents)")
        if any(self.item_color_aug):
            return ("dataset.color_aug changes the colours at every step, so latents cannot be cached; the VAE "
                    "encodes every batch instead")
        return None

    def cache_plans(self) -> list[tuple[int, Plan]]:
        """Every (item index, plan) a sample can use — both mirror images when flipping — for precomputing."""
        return [(i, self._item_plan(i, flip)) for i in range(len(self.items))
                for flip in ((False, True) if self.item_flip[i] else (False,))]

    def load_pixels(self, item_index: int, plan: Plan) -> torch.Tensor:
        image, _ = load_image(self.items[item_index].path)
        return pixels_to_tensor(render(image, plan))

    def use_latent_cache(self, cache: LatentCache | None) -> None:
        """Yield latents from ``cache`` instead of pixels (None: back to pixels)."""
        self.latent_cache = cache

    def cache_key(self, item_index: int, plan: Plan) -> str | None:
        if self.latent_cache is None:
            return None
        return self.latent_cache.key_for(self.items[item_index], plan)

    # --- fetching ---
    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        item_index = self.item_index(index)
        item = self.items[item_index]
        plan = self.plan(index)
        pixels = latents = mask = None
        key = self.cache_key(item_index, plan)
        need_image = key is None or (self.section.masked_loss and item.mask_path is None and item.has_alpha)
        image = alpha = None
        if need_image:
            image, alpha = load_image(item.path)
        if key is not None:
            latents = self.latent_cache.get(key)
            if latents is None:
                raise RuntimeError(f"no cached latents for {item.path} ({plan}); run LatentCache.encode_all on this "
                                   "dataset before training")
        else:
            rendered = render(image, plan)
            if self.item_color_aug[item_index]:
                rendered = color_augment(rendered, self._rng("color", index, None))
            pixels = pixels_to_tensor(rendered)
        if self.section.masked_loss:
            mask = self._mask(item, plan, image, alpha)
        return {
            "pixels": pixels,
            "latents": latents,
            "caption": self.caption(index),
            "mask": mask,
            "loss_weight": item.loss_weight,
            "original_size": item.size,
            "crop_top_left": plan.crop_top_left,
            "target_size": plan.target_size,
            "cache_key": key,
            "index": index,
        }

    def _mask(self, item: ImageItem, plan: Plan, image: Image.Image | None, alpha: Image.Image | None) -> torch.Tensor:
        if item.mask_path is not None:
            mask = load_mask(item.mask_path)
        elif alpha is not None:
            mask = alpha
        else:
            return torch.ones(1, plan.bucket[1], plan.bucket[0])
        height, width = item.size
        if mask.size != (width, height):  # a mask drawn at another size still covers the whole image
            mask = mask.resize((width, height), Image.Resampling.BILINEAR)
        return mask_to_tensor(render(mask, plan, Image.Resampling.BILINEAR))


def load_datasets(section: DatasetSection, seed: int, should_stop: Callable[[], bool] | None = None
                  ) -> tuple[ImageDataset, ImageDataset | None, DatasetScan]:
    """Scan ``section`` and build (training dataset, validation dataset or None, scan)."""
    scan = scan_dataset(section, seed, should_stop)
    train = ImageDataset(scan.items, section, seed)
    validation = ImageDataset(scan.validation, section, seed, augment=False) if scan.validation else None
    return train, validation, scan


# ----- batching ------------------------------------------------------------------------------------------------


class KeyedPermutation:
    """A pseudo-random permutation of ``range(size)`` fixed by ``key``, evaluated one position at a time.

    A four-round Feistel network over the smallest even power of two ≥ ``size`` (a bijection), walked until it
    lands inside the range (cycle walking keeps it a bijection of ``range(size)``). Memory is constant, so a
    shuffled epoch of 10⁸ samples costs nothing until its batches are drawn.
    """

    ROUNDS = 4

    def __init__(self, size: int, key: str):
        self.size = int(size)
        bits = max(2, (self.size - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(key.encode(), digest_size=8 * self.ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(self.ROUNDS)]

    def __call__(self, position: int) -> int:
        if not 0 <= position < self.size:
            raise IndexError(f"position {position} of a permutation of {self.size}")
        value = position
        while True:
            value = self._encrypt(value)
            if value < self.size:
                return value

    def _encrypt(self, value: int) -> int:
        left, right = value >> self.half, value & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right


def _mix(value: int) -> int:
    """splitmix64's finaliser: a fast, well-spread 64-bit hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


class _EpochForwarder:
    """Exposed as ``BucketBatchSampler.sampler``: accelerate's ``DataLoaderShard.set_epoch`` reaches a wrapped
    batch sampler only through ``batch_sampler.batch_sampler.sampler.set_epoch``."""

    def __init__(self, owner: BucketBatchSampler):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


@dataclasses.dataclass
class _Bucket:
    """One bucket's samples: the items in it and where each item's samples start among the bucket's members."""

    index: int  # in dataset.buckets
    items: np.ndarray  # item indices
    starts: np.ndarray  # members before each item (len(items) + 1 entries; the last is the member count)
    batches: int  # batches per epoch

    @property
    def size(self) -> int:
        return int(self.starts[-1])


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of sample indices, each from one bucket and exactly ``batch_size`` long.

    The order depends only on (seed, epoch): each bucket's samples are shuffled and cut into batches, and the
    batches of all buckets are shuffled together. ``len()`` is the number of batches per epoch. A bucket's last,
    partial batch is filled with the first samples of its shuffled order, or dropped with ``drop_last``.

    Nothing is built per sample: both shuffles are keyed permutations (:class:`KeyedPermutation`), so the sampler
    works from the images and their repeat counts alone, and resuming mid-epoch costs nothing.

    With accelerate: ``accelerator.prepare(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch))``
    shards whole batches round-robin over processes; call ``dataloader.set_epoch(epoch)`` on the prepared loader
    (it forwards to this sampler and the dataset). To resume mid-epoch, :meth:`resume` skips batches of this
    sampler, i.e. batches before sharding: per-process steps × number of processes.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, drop_last: bool = False,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0  # consumed by the next iteration
        self.sampler = _EpochForwarder(self)
        item_buckets = np.asarray(dataset.item_buckets, dtype=np.int64)
        self.buckets: list[_Bucket] = []
        for bucket in sorted(set(dataset.item_buckets)):
            items = np.flatnonzero(item_buckets == bucket)
            starts = np.concatenate([[0], np.cumsum(dataset.repeats[items])])
            size = int(starts[-1])
            batches = size // self.batch_size if drop_last else -(-size // self.batch_size)
            self.buckets.append(_Bucket(bucket, items, starts, batches))
        self.batch_starts = np.concatenate([[0], np.cumsum([b.batches for b in self.buckets])])
        small = [b for b in self.buckets if b.size < self.batch_size]
        if drop_last and small:
            logger.warning("%d sample(s) in %d bucket(s) smaller than batch_size %d are never used (drop_last)",
                           sum(b.size for b in small), len(small), self.batch_size)
        if len(self) == 0:
            raise ValueError(f"batch_size {batch_size} is larger than every bucket and drop_last is set: no batch")
        filled = 0 if drop_last else sum(-b.size % self.batch_size for b in self.buckets)
        if filled:
            logger.info("%d sample(s) per epoch repeat others of their bucket to complete the last batch of each "
                        "bucket (batch_size %d)", filled, self.batch_size)

    @property
    def groups(self) -> dict[int, Sequence[int]]:
        """Bucket index → its sample indices in ascending order (a lazy view: nothing is listed per sample)."""
        return {bucket.index: _BucketSamples(self, bucket) for bucket in self.buckets}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue ``epoch`` after its first ``batches_done`` batches (an uninterrupted run's exact sequence)."""
        self.set_epoch(epoch)
        self.skip_batches = int(batches_done)

    def __len__(self) -> int:
        return int(self.batch_starts[-1])

    def batch(self, epoch: int, position: int) -> list[int]:
        """The ``position``-th batch of ``epoch``."""
        if self.shuffle:
            position = KeyedPermutation(len(self), f"batches/{self.seed}/{epoch}")(position)
        number = int(np.searchsorted(self.batch_starts, position, side="right")) - 1
        bucket = self.buckets[number]
        order = (KeyedPermutation(bucket.size, f"members/{self.seed}/{epoch}/{number}") if self.shuffle
                 else (lambda member: member))
        first = (position - int(self.batch_starts[number])) * self.batch_size
        # A partial last batch wraps around to the bucket's first samples (in this epoch's order).
        return [self._sample(bucket, order(member % bucket.size)) for member in range(first, first + self.batch_size)]

    def _sample(self, bucket: _Bucket, member: int) -> int:
        """Sample index of the ``member``-th sample of a bucket (its items' samples, in item order)."""
        slot = int(np.searchsorted(bucket.starts, member, side="right")) - 1
        item = int(bucket.items[slot])
        return int(self.dataset.sample_starts[item]) + member - int(bucket.starts[slot])

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches, without skipping (for small datasets: tests, previews of the order)."""
        return [self.batch(epoch, position) for position in range(len(self))]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip_batches = self.skip_batches, 0
        self.dataset.set_epoch(self.epoch)
        epoch = self.epoch
        for position in range(skip, len(self)):
            yield self.batch(epoch, position)


class _BucketSamples(Sequence):
    def __init__(self, sampler: BucketBatchSampler, bucket: _Bucket):
        self.sampler, self.bucket = sampler, bucket

    def __len__(self) -> int:
        return self.bucket.size

    def __getitem__(self, member):
        if isinstance(member, slice):
            return [self[i] for i in range(*member.indices(len(self)))]
        if not -len(self) <= member < len(self):
            raise IndexError(member)
        return self.sampler._sample(self.bucket, member % len(self))


def collate_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples from :class:`ImageDataset` → one batch dict.

    "pixels" (B, 3, H, W) float in [-1, 1] or None; "latents" (B, C, h, w) or None (cached); "captions" list[str];
    "masks" (B, 1, H, W) in [0, 1] or None; "loss_weights" (B,); "original_sizes", "crop_top_lefts",
    "target_sizes" (B, 2) long, (height, width) / (top, left) — ``torch.cat`` of the three is SDXL's add_time_ids;
    "cache_keys" list[str | None]; "indices" list[int].
    """

    def stack(key: str) -> torch.Tensor | None:
        values = [sample[key] for sample in samples]
        if all(value is None for value in values):
            return None
        if any(value is None for value in values):
            raise ValueError(f"a batch mixes samples with and without {key!r}")
        return torch.stack(values)

    return {
        "pixels": stack("pixels"),
        "latents": stack("latents"),
        "captions": [sample["caption"] for sample in samples],
        "masks": stack("mask"),
        "loss_weights": torch.tensor([sample["loss_weight"] for sample in samples], dtype=torch.float32),
        "original_sizes": torch.tensor([sample["original_size"] for sample in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([sample["crop_top_left"] for sample in samples], dtype=torch.long),
        "target_sizes": torch.tensor([sample["target_size"] for sample in samples], dtype=torch.long),
        "cache_keys": [sample["cache_key"] for sample in samples],
        "indices": [sample["index"] for sample in samples],
    }


def make_dataloader(dataset: ImageDataset, sampler: BucketBatchSampler, num_workers: int = 0,
                    **kwargs: Any) -> torch.utils.data.DataLoader:
    """``DataLoader`` over ``sampler`` with :func:`collate_batch`; workers are not persistent (each epoch's workers
    receive the dataset with its current epoch)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                                       num_workers=num_workers, persistent_workers=False, **kwargs)


__all__ = [
    "IMAGE_EXTENSIONS", "BucketBatchSampler", "DatasetScan", "ImageDataset", "ImageItem", "Plan", "UnusableImage",
    "assign_bucket", "bucket_geometry", "caption_file", "collate_batch", "color_augment", "cover_size", "image_files",
    "inspect_image", "load_datasets", "load_image", "load_mask", "make_buckets", "make_dataloader",
    "no_upscale_bucket", "process_caption", "read_caption", "render", "scan_dataset", "split_tags", "subset_section",
    "to_rgb",
]

