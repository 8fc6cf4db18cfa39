"""Auto-captioning: write a caption file next to every image of a dataset folder (or only the uncaptioned ones).

Two kinds of model do the writing:

* **captioners** (sentences) through transformers' ``AutoModelForImageTextToText`` + ``AutoProcessor``: BLIP,
  BLIP-2, GIT and Florence-2 (``florence-community/Florence-2-base`` / ``-large``, the conversions transformers runs
  natively), by hub id or local folder. ``prompt`` is the text the caption starts with (BLIP, BLIP-2, GIT: e.g.
  "a photography of") or, for Florence-2, its task token (``<CAPTION>``, ``<DETAILED_CAPTION>``,
  ``<MORE_DETAILED_CAPTION>``).
* **taggers** (comma-separated booru tags, WD style): an ``AutoModelForImageClassification`` whose labels are tags
  (``config.id2label``), or a WD tagger's ``model.onnx`` + ``selected_tags.csv`` run by onnxruntime (imported only
  then; never a required dependency). A ``selected_tags.csv`` beside either gives the tag categories: rating tags
  (category 9) are left out, character tags (4) need ``character_threshold``, the others ``threshold``. Tags are
  written character tags first, then by confidence; underscores become spaces (kaomoji such as ``^_^`` kept).

Remote code is never run (``trust_remote_code`` stays off) and weights are read from ``.safetensors`` only (never a
pickle): a model whose processor needs its own Python file, or that ships only ``.bin`` weights, cannot be used.
Images are listed as training lists them (:func:`trainer.dataset.image_files`: the folder and its immediate
sub-folders) and decoded as training decodes them (EXIF orientation, alpha on white), so a file the trainer would
skip is reported here too (named, with the reason) and skipped; it never ends the run.

Every caption is written atomically (temporary file + rename) right after its batch, so a stop or a crash loses
nothing already written; :class:`trainer.events.StopSignal` is checked between batches. Progress reaches
``on_event`` as dicts (``event`` = ``caption_loading``, ``caption_start``, ``caption_progress``, ``caption_error``,
``caption_done``; see :func:`caption_folder`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.dataset import (
    UnusableImage,
    caption_file,
    image_files,
    inspect_image,
    load_image,
    process_caption,
    read_caption,
    split_tags,
)
from trainer.events import EventCallback, EventLog, StopSignal

logger = logging.getLogger(__name__)

CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")
CAPTION_MODES = ("skip_existing", "overwrite", "append")  # skip_existing: caption only the images without one
MODEL_KINDS = ("auto", "captioner", "tagger", "onnx_tagger")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# transformers model types that caption by generating text, with their display names.
CAPTIONER_TYPES = {"blip": "BLIP", "blip-2": "BLIP-2", "git": "GIT", "florence2": "Florence-2"}
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_FLORENCE_TASK = "<DETAILED_CAPTION>"
# WD tagger conventions (SmilingWolf's selected_tags.csv categories and the thresholds its demo uses).
TAG_CATEGORY_GENERAL, TAG_CATEGORY_CHARACTER, TAG_CATEGORY_RATING = 0, 4, 9
DEFAULT_TAG_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
TAG_LIST_FILE = "selected_tags.csv"
ONNX_MODEL_FILE = "model.onnx"
ONNX_DEFAULT_SIZE = 448  # WD taggers' input side, used when the ONNX file leaves it dynamic
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
                     "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class CaptionError(ValueError):
    """A captioning mistake the user can fix (unknown model, bad option, missing package); one clear sentence."""


# ----- options -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CaptionOptions:
    model: str  # hub id ("Salesforce/blip-image-captioning-base") or local folder
    kind: str = "auto"  # auto (from the model's files), captioner, tagger, onnx_tagger
    mode: str = "skip_existing"  # skip_existing, overwrite, append
    caption_extension: str = ".txt"  # one of CAPTION_EXTENSIONS
    prefix: str = ""  # put before the model's text ("photo of")
    suffix: str = ""  # put after it ("high quality")
    trigger_word: str = ""  # first, once (not repeated when the caption already has it)
    prompt: str = ""  # captioners: text the caption starts with; Florence-2: task token ("" → <DETAILED_CAPTION>)
    batch_size: int = 4
    max_new_tokens: int = 40
    num_beams: int = 1
    threshold: float = DEFAULT_TAG_THRESHOLD  # taggers: general tags
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD  # taggers with a tag list: character tags
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16
    max_pixels: int = 40_000_000  # larger images are reported and skipped (decompression-bomb guard)

    def validate(self) -> None:
        if not self.model.strip():
            raise CaptionError("no captioning model given: pass a hub id (owner/name) or a local model folder")
        choices = (("kind", self.kind, MODEL_KINDS), ("mode", self.mode, CAPTION_MODES),
                   ("caption_extension", self.caption_extension, CAPTION_EXTENSIONS),
                   ("dtype", self.dtype, ("auto", *DTYPES)))
        for name, value, allowed in choices:
            if value not in allowed:
                raise CaptionError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise CaptionError(f"device = {self.device!r} is not allowed; choose auto, cpu, cuda or cuda:N")
        for name, value in (("batch_size", self.batch_size), ("max_new_tokens", self.max_new_tokens),
                            ("num_beams", self.num_beams), ("max_pixels", self.max_pixels)):
            if value < 1:
                raise CaptionError(f"{name} must be ≥ 1, got {value}")
        for name, value in (("threshold", self.threshold), ("character_threshold", self.character_threshold)):
            if not 0.0 <= value <= 1.0:
                raise CaptionError(f"{name} must be between 0 and 1, got {value}")
        for name, value in (("prefix", self.prefix), ("suffix", self.suffix), ("trigger_word", self.trigger_word),
                            ("prompt", self.prompt)):
            if "\n" in value or "\r" in value:
                raise CaptionError(f"{name} must be one line (a caption is the first line of its file)")


@dataclasses.dataclass
class CaptionResult:
    written: list[tuple[Path, str]]  # (caption file, caption)
    failed: list[tuple[Path, str]]  # (image, reason)
    skipped: list[Path]  # images that already had a caption (mode skip_existing)
    stopped: bool
    seconds: float  # captioning time, model loading excluded
    load_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"written": [[str(path), text] for path, text in self.written],
                "failed": [[str(path), reason] for path, reason in self.failed],
                "skipped": [str(path) for path in self.skipped], "stopped": self.stopped,
                "seconds": self.seconds, "load_seconds": self.load_seconds}


# ----- model sources ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files come from: a local folder, or a hub repository (downloaded on first use)."""

    location: str
    is_local: bool

    def file(self, name: str) -> Path | None:
        """Local path of one of the model's files, or None when the model has no such file."""
        if self.is_local:
            path = Path(self.location) / name
            return path if path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self.location, name))
        except EntryNotFoundError:
            return None
        except Exception as error:  # offline, unknown repo, gated repo, ...
            raise CaptionError(f"cannot fetch {name} of {self.location} from the hub ({_first_line(error)}); check "
                               "the id and the network, or download the model and pass its folder") from None

    @property
    def load_kwargs(self) -> dict[str, Any]:
        return {"local_files_only": True} if self.is_local else {}


def resolve_model_source(model: str) -> ModelSource:
    """A local folder when ``model`` names one, else a hub id (``owner/name``); anything else is a clear error."""
    text = model.strip()
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CaptionError(f"{text}: a captioning model is a folder (config.json + weights, or model.onnx + "
                               f"{TAG_LIST_FILE}), not a file")
        return ModelSource(str(path.resolve()), True)
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return ModelSource(text, False)
    raise CaptionError(f"{text!r} is neither a model folder nor a hub id such as "
                       "'Salesforce/blip-image-captioning-base'")


def detect_kind(source: ModelSource) -> str:
    """captioner, tagger or onnx_tagger, from the model's config.json (model type / architecture) and files."""
    config_path = source.file("config.json")
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path is not None else {}
    model_type = config.get("model_type")
    if model_type in CAPTIONER_TYPES:
        return "captioner"
    if model_type and any(name.endswith("ForImageClassification") for name in config.get("architectures") or []):
        return "tagger"
    if model_type:
        raise CaptionError(f"{source.location}: model type {model_type!r} is not a supported captioner; supported: "
                           f"{', '.join(CAPTIONER_TYPES.values())}, or an image-classification tagger")
    # A WD tagger repository holds model.onnx + selected_tags.csv (and, for v3, timm weights with a timm config).
    if _onnxruntime_available() or "architecture" not in config:
        if source.file(ONNX_MODEL_FILE) is not None:
            return "onnx_tagger"
    if "architecture" in config:
        return "tagger"  # timm weights, run through transformers' TimmWrapper (needs the timm package)
    raise CaptionError(f"{source.location}: neither a transformers model (config.json with a model_type) nor a WD "
                       f"tagger ({ONNX_MODEL_FILE} + {TAG_LIST_FILE})")


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ----- devices -------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here; use cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----- captioners ------------------------------------------------------------------------------------------------


class Captioner:
    """Turns a batch of RGB images into one caption each. Load one with :func:`load_captioner`; it can be kept and
    reused for several folders."""

    name: str = ""  # what to show: "BLIP", "WD tagger (ONNX)", ...
    kind: str = ""  # captioner, tagger or onnx_tagger
    device: str = "cpu"
    dtype: str = "fp32"

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {"model_name": self.name, "kind": self.kind, "device": self.device, "dtype": self.dtype}


class TextCaptioner(Captioner):
    """A transformers image-to-text model: processor → ``generate`` → decoded text (one line)."""

    kind = "captioner"

    def __init__(self, model: Any, processor: Any, model_type: str, options: CaptionOptions, device: torch.device,
                 dtype: torch.dtype):
        self.model = model
        self.processor = processor
        self.model_type = model_type
        self.name = CAPTIONER_TYPES[model_type]
        self.torch_device = device
        self.torch_dtype = dtype
        self.device = str(device)
        self.dtype = _dtype_name(dtype)
        self.max_new_tokens = options.max_new_tokens
        self.num_beams = options.num_beams
        self.prompt = " ".join(options.prompt.split())
        if model_type == "florence2":
            self.prompt = self.prompt or DEFAULT_FLORENCE_TASK
            if self.prompt not in FLORENCE_TASKS:
                raise CaptionError(f"Florence-2 prompt {self.prompt!r} is not a captioning task; choose one of: "
                                   f"{', '.join(FLORENCE_TASKS)}")

    def _inputs(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        count = len(images)
        if self.model_type == "git" and self.prompt:
            # GIT continues a [CLS]-started text; the processor would end the prompt with [SEP] (end of caption).
            inputs = dict(self.processor(images=list(images), return_tensors="pt"))
            tokenizer = self.processor.tokenizer
            ids = [tokenizer.cls_token_id, *tokenizer(self.prompt, add_special_tokens=False).input_ids]
            inputs["input_ids"] = torch.tensor([ids] * count)
            return inputs
        if self.prompt:
            return dict(self.processor(images=list(images), text=[self.prompt] * count, return_tensors="pt"))
        return dict(self.processor(images=list(images), return_tensors="pt"))

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = {key: _to_device(value, self.torch_device, self.torch_dtype)
                  for key, value in self._inputs(images).items()}
        if self.model_type == "git":
            inputs.pop("token_type_ids", None)
            inputs.pop("attention_mask", None)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [self._clean(text) for text in texts]

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())
        if self.model_type == "florence2" or not self.prompt:
            return text
        # BLIP and GIT echo the prompt (BLIP lower-cased): keep it as the user wrote it.
        if text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):].strip()
        return f"{self.prompt} {text}".strip()


class TagCaptioner(Captioner):
    """Multi-label tag scores → "tag, tag, ..." (character tags first, then by confidence)."""

    kind = "tagger"

    def __init__(self, name: str, scores: Callable[[Sequence[Image.Image]], np.ndarray], labels: Sequence[str],
                 categories: Sequence[int] | None, threshold: float, character_threshold: float):
        self.name = name
        self.scores = scores
        self.labels = list(labels)
        self.categories = list(categories) if categories is not None else [TAG_CATEGORY_GENERAL] * len(self.labels)
        self.threshold = threshold
        self.character_threshold = character_threshold

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        scores = np.asarray(self.scores(images), dtype=np.float64)
        if scores.shape != (len(images), len(self.labels)):
            raise CaptionError(f"{self.name}: the model gives {scores.shape[-1]} scores per image but its tag list "
                               f"has {len(self.labels)} tags; the tag list does not belong to this model")
        if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):  # logits, not probabilities
            scores = 1.0 / (1.0 + np.exp(-scores))
        return [self._tags(row) for row in scores]

    def _tags(self, row: np.ndarray) -> str:
        characters: list[tuple[float, str]] = []
        general: list[tuple[float, str]] = []
        for label, category, score in zip(self.labels, self.categories, row):
            if category == TAG_CATEGORY_RATING:
                continue
            if category == TAG_CATEGORY_CHARACTER:
                if score >= self.character_threshold:
                    characters.append((float(score), label))
            elif score >= self.threshold:
                general.append((float(score), label))
        ordered = sorted(characters, key=lambda pair: -pair[0]) + sorted(general, key=lambda pair: -pair[0])
        return ", ".join(format_tag(label) for _, label in ordered)


def format_tag(label: str) -> str:
    """Booru tag → caption text: underscores become spaces, except in kaomoji (``^_^``)."""
    return label if label in KAOMOJI else label.replace("_", " ")


def read_tag_list(path: Path) -> tuple[list[str], list[int]]:
    """(tag names, categories) from a WD ``selected_tags.csv`` (columns tag_id, name, category, count)."""
    try:
        with path.open(encoding="utf-8", newline="") as stream:
            rows = list(csv.DictReader(stream))
        return [row["name"] for row in rows], [int(row["category"]) for row in rows]
    except (KeyError, ValueError, TypeError) as error:
        raise CaptionError(f"{path}: not a WD tag list (needs the columns name and category): {error}") from None


def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Centre ``image`` on a white square (WD taggers were trained on padded squares; a crop would lose tags)."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}.get(dtype, str(dtype))


def load_captioner(options: CaptionOptions) -> Captioner:
    """Load the model ``options.model`` names (folder or hub id) on the chosen device and dtype."""
    options.validate()
    source = resolve_model_source(options.model)
    kind = detect_kind(source) if options.kind == "auto" else options.kind
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if kind == "onnx_tagger":
        return _load_onnx_tagger(source, options, device)
    if kind == "tagger":
        return _load_transformers_tagger(source, options, device, dtype)
    return _load_text_captioner(source, options, device, dtype)


def _load_text_captioner(source: ModelSource, options: CaptionOptions, device: torch.device,
                         dtype: torch.dtype) -> TextCaptioner:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(source.location, **source.load_kwargs)
        if config.model_type not in CAPTIONER_TYPES:
            raise CaptionError(f"{source.location}: model type {config.model_type!r} is not a supported captioner; "
                               f"supported: {', '.join(CAPTIONER_TYPES.values())}")
        processor = AutoProcessor.from_pretrained(source.location, **source.load_kwargs)
        model = AutoModelForImageTextToText.from_pretrained(source.location, dtype=dtype, use_safetensors=True,
                                                            **source.load_kwargs)
    except CaptionError:
        raise
    except Exception as error:  # missing files, a processor that needs remote code, out of memory, ...
        raise CaptionError(f"cannot load the captioner {source.location}: {_first_line(error)}") from None
    model.to(device).eval()
    return TextCaptioner(model, processor, config.model_type, options, device, dtype)


def _load_transformers_tagger(source: ModelSource, options: CaptionOptions, device: torch.device,
                              dtype: torch.dtype) -> TagCaptioner:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        processor = AutoImageProcessor.from_pretrained(source.location, **source.load_kwargs)
        model = AutoModelForImageClassification.from_pretrained(source.location, dtype=dtype, use_safetensors=True,
                                                                **source.load_kwargs)
    except Exception as error:
        hint = " (WD taggers in timm format need the timm package; or use their model.onnx with onnxruntime)" \
            if "timm" in str(error).lower() else ""
        raise CaptionError(f"cannot load the tagger {source.location}: {_first_line(error)}{hint}") from None
    model.to(device).eval()
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(len(id2label))]
    categories = None
    tag_list = source.file(TAG_LIST_FILE)
    if tag_list is not None:
        names, found = read_tag_list(tag_list)
        if not labels or labels[0].startswith("LABEL_"):  # timm weights carry no label names
            labels = names
        if names == labels:
            categories = found
        else:
            logger.warning("%s: %s does not match the model's labels; every tag uses the general threshold",
                           source.location, TAG_LIST_FILE)
    if not labels:
        raise CaptionError(f"{source.location}: the model has no tag labels (config.id2label) and no {TAG_LIST_FILE}")

    @torch.inference_mode()
    def scores(images: Sequence[Image.Image]) -> np.ndarray:
        inputs = processor(images=[pad_to_square(image) for image in images], return_tensors="pt")
        inputs = {key: _to_device(value, device, dtype) for key, value in inputs.items()}
        logits = model(**inputs).logits.float()
        return torch.sigmoid(logits).cpu().numpy()

    captioner = TagCaptioner("tagger", scores, labels, categories, options.threshold, options.character_threshold)
    captioner.name = f"tagger ({model.config.model_type})"
    captioner.device, captioner.dtype = str(device), _dtype_name(dtype)
    return captioner


def _load_onnx_tagger(source: ModelSource, options: CaptionOptions, device: torch.device) -> TagCaptioner:
    try:
        import onnxruntime
    except ImportError:
        raise CaptionError("this is an ONNX tagger: install onnxruntime (pip install onnxruntime, or "
                           "onnxruntime-gpu for CUDA) to run it") from None
    model_path = source.file(ONNX_MODEL_FILE)
    tag_list = source.file(TAG_LIST_FILE)
    if model_path is None or tag_list is None:
        raise CaptionError(f"{source.location}: an ONNX tagger needs {ONNX_MODEL_FILE} and {TAG_LIST_FILE}")
    labels, categories = read_tag_list(tag_list)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    elif device.type == "cuda":
        logger.warning("onnxruntime has no CUDA provider here (install onnxruntime-gpu); tagging on the CPU")
    try:
        session = onnxruntime.InferenceSession(str(model_path), providers=providers)
    except Exception as error:
        raise CaptionError(f"cannot load {model_path}: {_first_line(error)}") from None
    captioner = TagCaptioner("WD tagger (ONNX)", onnx_scorer(session), labels, categories, options.threshold,
                             options.character_threshold)
    captioner.kind = "onnx_tagger"
    captioner.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
    return captioner


def onnx_scorer(session: Any) -> Callable[[Sequence[Image.Image]], np.ndarray]:
    """Scores from a WD-style ONNX session: white-padded squares, BGR, 0–255 floats, NHWC (or NCHW when the
    model's input says so); a model with a fixed batch of one is run image by image."""
    model_input = session.get_inputs()[0]
    output_name = session.get_outputs()[0].name
    shape = list(model_input.shape)
    channels_first = len(shape) == 4 and shape[1] == 3
    side = shape[2] if channels_first else shape[1]
    side = side if isinstance(side, int) and side > 0 else ONNX_DEFAULT_SIZE
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def prepare(image: Image.Image) -> np.ndarray:
        square = pad_to_square(image).resize((side, side), Image.Resampling.BICUBIC)
        array = np.asarray(square, dtype=np.float32)[:, :, ::-1]  # RGB → BGR
        return np.ascontiguousarray(array.transpose(2, 0, 1) if channels_first else array)

    def scores(images: Sequence[Image.Image]) -> np.ndarray:
        batch = np.stack([prepare(image) for image in images])
        if fixed_batch == 1:
            return np.concatenate([session.run([output_name], {model_input.name: batch[i:i + 1]})[0]
                                   for i in range(len(batch))])
        return session.run([output_name], {model_input.name: batch})[0]

    return scores


# ----- captions on disk -----------------------------------------------------------------------------------------


def compose_caption(generated: str, options: CaptionOptions, existing: str | None = None) -> str:
    """The caption to write: prefix, the model's text, suffix (joined by ", "); appended to ``existing`` in mode
    append (parts it already has left out); the trigger word first, once (as training puts it)."""
    body = _join([options.prefix, generated, options.suffix])
    if options.mode == "append" and existing:
        have = set(split_tags(existing))
        body = _join([existing, *(part for part in split_tags(body) if part not in have)])
    return process_caption(body, random.Random(0), trigger_word=options.trigger_word)


def _join(parts: Sequence[str]) -> str:
    cleaned = (" ".join(part.split()).strip(", ") for part in parts)
    return ", ".join(part for part in cleaned if part)


def images_to_caption(folder: str | os.PathLike, options: CaptionOptions) -> tuple[list[Path], list[Path]]:
    """(images the run will caption, images it skips because they already have a caption — mode skip_existing).

    A caption counts when its file has a non-blank line, as in training; a file that cannot be read counts as a
    caption (it is never replaced unasked).
    """
    options.validate()
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CaptionError(f"{root} is not a folder")
    images = image_files(root)
    if options.mode != "skip_existing":
        return images, []
    todo, skipped = [], []
    for path in images:
        try:
            caption, _ = read_caption(path, options.caption_extension)
        except UnusableImage:
            caption = "unreadable"
        (skipped if caption else todo).append(path)
    return todo, skipped


def write_caption(image_path: Path, generated: str, options: CaptionOptions) -> tuple[Path, str]:
    """Write the caption of ``image_path`` atomically; return (caption file, caption).

    Mode append extends the first non-blank line (what training reads) and keeps any other lines of the file.
    """
    from methods.files import atomic_write_bytes

    target = image_path.with_suffix(options.caption_extension)
    lines: list[str] = []
    existing = None
    if options.mode == "append":
        found = caption_file(image_path, options.caption_extension)
        if found is not None:
            target = found
            try:
                lines = found.read_bytes().decode("utf-8-sig").splitlines()
            except UnicodeDecodeError:
                raise UnusableImage(f"caption file {found.name} is not UTF-8; fix or delete it to append") from None
            existing = next((line.strip() for line in lines if line.strip()), None)
    caption = compose_caption(generated, options, existing)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        lines = [caption]
    else:
        lines[first] = caption
    atomic_write_bytes(target, ("\n".join(lines) + "\n").encode("utf-8"))
    return target, caption


# ----- the run ---------------------------------------------------------------------------------------------------


def caption_folder(folder: str | os.PathLike, options: CaptionOptions, *, on_event: EventCallback | None = None,
                   stop: StopSignal | None = None, captioner: Captioner | None = None) -> CaptionResult:
    """Caption the images of ``folder`` as ``options`` say; return what was written, failed and skipped.

    ``captioner``: an already loaded one (else :func:`load_captioner` loads ``options.model`` when there is work);
    it keeps the model options it was loaded with (kind, prompt, max_new_tokens, num_beams, thresholds, device,
    dtype) and ``options`` give the rest (mode, extension, prefix, suffix, trigger word, batch size).
    ``stop``: checked between batches; captions written so far stay. Events passed to ``on_event``:

    * ``{"event": "caption_loading", "model": str}`` before the model loads;
    * ``{"event": "caption_start", "total": N to caption, "skipped": M, "model": str, "model_name", "kind",
      "device", "dtype", "load_seconds"}``;
    * ``{"event": "caption_progress", "done": n, "total": N, "written": w, "failed": f, "elapsed_s", "eta_s"
      (None before the first batch), "images_per_s", "recent": [{"path", "caption_path", "caption"}, ...]}``
      after each batch;
    * ``{"event": "caption_error", "path": image, "reason": str}`` for each image that could not be captioned;
    * ``{"event": "caption_done", "written", "failed", "skipped", "stopped", "seconds", "load_seconds"}``.

    Raises :class:`CaptionError` for a mistake in the options or the model (nothing written then).
    """
    emit = EventLog(None, [on_event] if on_event else None).emit  # a failing listener is logged, never fatal
    todo, skipped = images_to_caption(folder, options)
    if captioner is None:
        resolve_model_source(options.model)  # a mistyped model fails now, not after the folder was listed
    written: list[tuple[Path, str]] = []
    failed: list[tuple[Path, str]] = []
    load_seconds = 0.0
    if todo and not (stop is not None and stop.requested()) and captioner is None:
        emit("caption_loading", model=options.model)
        started = time.perf_counter()
        captioner = load_captioner(options)
        load_seconds = time.perf_counter() - started
    described = captioner.describe() if captioner is not None else {}
    emit("caption_start", total=len(todo), skipped=len(skipped), model=options.model, load_seconds=load_seconds,
         **described)
    started = time.perf_counter()
    stopped = False
    done = 0
    for start in range(0, len(todo), options.batch_size):
        if stop is not None and stop.requested():
            stopped = True
            break
        batch = todo[start:start + options.batch_size]
        images: list[tuple[Path, Image.Image]] = []
        for path in batch:
            try:
                images.append((path, _decode(path, options.max_pixels)))
            except UnusableImage as error:
                failed.append((path, str(error)))
                emit("caption_error", path=str(path), reason=str(error))
        recent = []
        if images:
            try:
                texts = captioner.caption([image for _, image in images])
            except CaptionError:
                raise
            except Exception as error:  # out of memory, a model that cannot run on this device/dtype, ...
                raise CaptionError(f"{captioner.name} failed on the batch starting with {images[0][0]} "
                                   f"({type(error).__name__}: {_first_line(error)}); {len(written)} caption(s) "
                                   "written before were kept") from error
            for (path, _), text in zip(images, texts):
                if not text.strip():  # nothing to write: an existing caption is never replaced by nothing
                    reason = ("the model returned an empty caption" if captioner.kind == "captioner" else
                              "no tag reached the threshold")
                    failed.append((path, reason))
                    emit("caption_error", path=str(path), reason=reason)
                    continue
                try:
                    target, caption = write_caption(path, text, options)
                except (OSError, UnusableImage) as error:
                    reason = f"cannot write its caption ({getattr(error, 'strerror', None) or error})"
                    failed.append((path, reason))
                    emit("caption_error", path=str(path), reason=reason)
                    continue
                written.append((target, caption))
                recent.append({"path": str(path), "caption_path": str(target), "caption": caption})
        done += len(batch)
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else None
        emit("caption_progress", done=done, total=len(todo), written=len(written), failed=len(failed),
             elapsed_s=elapsed, eta_s=(len(todo) - done) / rate if rate else None, images_per_s=rate, recent=recent)
    seconds = time.perf_counter() - started
    emit("caption_done", written=len(written), failed=len(failed), skipped=len(skipped), stopped=stopped,
         seconds=seconds, load_seconds=load_seconds)
    return CaptionResult(written, failed, skipped, stopped, seconds, load_seconds)


def _decode(path: Path, max_pixels: int) -> Image.Image:
    inspect_image(path, max_pixels)  # the reasons training gives for a file it cannot use
    try:
        image, _ = load_image(path)
    except Exception as error:  # pragma: no cover - inspect_image decodes the same bytes first
        raise UnusableImage(f"cannot decode the image ({type(error).__name__}: {error})") from None
    return image


__all__ = [
    "CAPTION_EXTENSIONS", "CAPTION_MODES", "CAPTIONER_TYPES", "FLORENCE_TASKS", "MODEL_KINDS", "CaptionError",
    "CaptionOptions", "CaptionResult", "Captioner", "ModelSource", "TagCaptioner", "TextCaptioner", "caption_folder",
    "compose_caption", "detect_kind", "format_tag", "images_to_caption", "load_captioner", "onnx_scorer",
    "pad_to_square", "read_tag_list", "resolve_model_source", "write_caption",
]
