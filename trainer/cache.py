"""Caches that take the frozen encoders out of the training step.

:class:`LatentCache` holds VAE latents per (image content, bucket, resize, crop box, flip, VAE) — in memory, or on
disk as one ``.safetensors`` file per entry written atomically (a new run, or another process, reuses them; any
change of those inputs is a different key, so stale latents are never read). :meth:`LatentCache.encode_all`
encodes every (image, flip variant) once before training; afterwards the dataset yields ``latents`` instead of
``pixels``.

Random crops make caching impossible (each step needs a new crop): ``encode_all`` then returns an inactive
report with the reason and the dataset keeps yielding pixels, so the caller runs the VAE per batch. We do not fix
one crop per image, because that silently turns ``crop = "random"`` into a fixed crop.

:class:`TextEmbeddingCache` holds text-encoder outputs per (caption, encoder id, clip skip) in memory. It is only
valid while the text encoders are frozen (no text-encoder adapters trained). It fills lazily, one entry per
distinct caption: caption shuffle and dropout make captions vary between epochs, so they cannot be precomputed,
and an LRU bound (``max_entries``) keeps shuffled captions from growing it without limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from trainer.dataset import ImageDataset, ImageItem, Plan

logger = logging.getLogger(__name__)

CACHE_FORMAT = "rankwright-latents-v1"  # part of every key: bump when the pixel pipeline changes
LATENT_CACHE_MODES = ("memory", "disk", "off")


@dataclasses.dataclass
class CacheReport:
    """What :meth:`LatentCache.encode_all` did. ``active`` False: the dataset yields pixels; ``reason`` says why."""

    active: bool
    reason: str = ""
    total: int = 0  # distinct entries the dataset needs
    encoded: int = 0  # entries encoded now (by this process)
    reused: int = 0  # entries found already cached


class LatentCache:
    """VAE latents keyed by image content + geometry + VAE. ``mode``: "memory", "disk" (needs ``folder``) or "off".

    ``vae_id`` must identify the VAE and how it is run (e.g. model id + VAE file + dtype); latents from another
    VAE are never reused.
    """

    def __init__(self, mode: str = "memory", folder: str | Path | None = None, vae_id: str = ""):
        if mode not in LATENT_CACHE_MODES:
            allowed = ", ".join(LATENT_CACHE_MODES)
            raise ValueError(f"latent cache mode {mode!r} is not allowed; choose one of: {allowed}")
        if mode == "disk" and not folder:
            raise ValueError("a disk latent cache needs a folder")
        self.mode = mode
        self.folder = Path(folder) if folder else None
        self.vae_id = vae_id
        self._memory: dict[str, torch.Tensor] = {}

    # --- keys ---
    def key(self, sha256: str, bucket: tuple[int, int], resized: tuple[int, int], crop_left_top: tuple[int, int],
            flip: bool) -> str:
        """Hex key for the latents of an image (``sha256`` of its bytes) resized to ``resized`` (w, h), cropped to
        ``bucket`` (w, h) at ``crop_left_top`` (in resized pixels), optionally mirrored, encoded by this VAE."""
        left, top = crop_left_top
        box = (left, top, left + bucket[0], top + bucket[1])
        text = (f"{CACHE_FORMAT}|{sha256}|bucket={bucket[0]}x{bucket[1]}|resized={resized[0]}x{resized[1]}"
                f"|crop={box[0]},{box[1]},{box[2]},{box[3]}|flip={int(bool(flip))}|vae={self.vae_id}")
        return hashlib.sha256(text.encode()).hexdigest()

    def key_for(self, item: ImageItem, plan: Plan) -> str:
        return self.key(item.sha256, plan.bucket, plan.resized, (plan.left, plan.top), plan.flip)

    # --- storage ---
    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        if self.mode == "memory":
            return key in self._memory
        if self.mode == "disk":
            path = self._path(key)
            if not path.is_file():
                return False
            try:  # reads the header only
                with safe_open(str(path), framework="pt") as handle:
                    return "latents" in handle.keys()
            except Exception as error:  # a damaged file is a miss; encode_all rewrites it
                logger.warning("latent cache entry %s is unreadable (%s); it will be encoded again", path, error)
                return False
        return False

    def __len__(self) -> int:
        if self.mode == "disk" and self.folder is not None and self.folder.is_dir():
            return sum(1 for _ in self.folder.glob("*/*.safetensors"))
        return len(self._memory)

    def get(self, key: str) -> torch.Tensor | None:
        if self.mode == "memory":
            return self._memory.get(key)
        if self.mode == "disk":
            path = self._path(key)
            if not path.is_file():
                return None
            try:
                return load_file(str(path))["latents"]
            except Exception as error:  # damaged entry: report a miss
                logger.warning("latent cache entry %s is unreadable (%s)", path, error)
                return None
        return None

    def put(self, key: str, latents: torch.Tensor, source: str = "") -> None:
        latents = latents.detach().to("cpu").contiguous().clone()
        if self.mode == "memory":
            self._memory[key] = latents
        elif self.mode == "disk":
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            try:
                save_file({"latents": latents}, str(temporary),
                          metadata={"format": CACHE_FORMAT, "vae": self.vae_id, "source": source})
                os.replace(temporary, path)  # atomic: readers see the whole file or none
            finally:
                temporary.unlink(missing_ok=True)

    # --- precomputing ---
    def encode_all(self, dataset: ImageDataset, encode_fn: Callable[[torch.Tensor], torch.Tensor],
                   progress: Callable[[int, int], None] | None = None, batch_size: int = 1,
                   process_index: int = 0, num_processes: int = 1,
                   should_stop: Callable[[], bool] | None = None) -> CacheReport:
        """Encode every (image, flip variant) of ``dataset`` that is not cached yet, then make it yield latents.

        ``encode_fn(pixels)`` gets (B, 3, H, W) float32 in [-1, 1] on the CPU and returns (B, C, H/8, W/8) latents
        exactly as the UNet should receive them (scaled by the VAE's scaling factor); it is called under
        ``torch.no_grad``, one bucket per call, ``batch_size`` images at most. ``progress(done, total)`` is called
        after each call.

        Disk mode with several processes: each encodes its share (``process_index`` of ``num_processes``); wait for
        all of them (``accelerator.wait_for_everyone()``) before training. Memory mode always encodes everything.

        Returns an inactive report (dataset keeps yielding pixels) when the mode is "off" or the dataset cannot be
        cached (random crop). ``should_stop()`` is asked after each call; when it says yes, encoding ends with
        :class:`trainer.events.StopRequested` (what was encoded stays cached).
        """
        if self.mode == "off":
            dataset.use_latent_cache(None)
            return CacheReport(False, "dataset.latent_cache = 'off': the VAE encodes every batch")
        blocker = dataset.cache_blocker()
        if blocker:
            dataset.use_latent_cache(None)
            logger.warning("latents are not cached: %s", blocker)
            return CacheReport(False, blocker)

        needed: dict[str, tuple[int, Plan]] = {}
        for item_index, plan in dataset.cache_plans():
            needed.setdefault(self.key_for(dataset.items[item_index], plan), (item_index, plan))
        missing = [(key, *entry) for key, entry in needed.items() if key not in self]
        reused = len(needed) - len(missing)
        if self.mode == "disk" and num_processes > 1:
            missing = missing[process_index::num_processes]

        by_shape: dict[tuple[int, int], list[tuple[str, int, Plan]]] = {}
        for entry in missing:
            by_shape.setdefault(entry[2].bucket, []).append(entry)
        chunks = [group[i:i + batch_size] for group in by_shape.values() for i in range(0, len(group), batch_size)]
        done = 0
        for chunk in chunks:
            pixels = torch.stack([dataset.load_pixels(item_index, plan) for _, item_index, plan in chunk])
            with torch.no_grad():
                latents = encode_fn(pixels)
            if latents.shape[0] != len(chunk):
                raise ValueError(f"encode_fn returned {latents.shape[0]} latents for {len(chunk)} images")
            for (key, item_index, _), latent in zip(chunk, latents):
                self.put(key, latent, source=str(dataset.items[item_index].path))
            done += len(chunk)
            if progress is not None:
                progress(done, len(missing))
            if should_stop is not None and should_stop():
                from trainer.events import StopRequested

                raise StopRequested(f"stopped while caching latents ({done} of {len(missing)} encoded)")
        dataset.use_latent_cache(self)
        logger.info("latent cache (%s): %d entries, %d encoded, %d reused", self.mode, len(needed), done, reused)
        return CacheReport(True, "", total=len(needed), encoded=done, reused=reused)


# ----- text embeddings -----------------------------------------------------------------------------------------


class TextEmbeddingCache:
    """Text-encoder outputs per (caption, encoder id, clip skip), filled lazily; memory only, LRU-bounded.

    ``cache(captions, encode_fn)`` returns what ``encode_fn(captions)`` would: ``encode_fn`` gets only the distinct
    captions not cached yet and returns a tensor, or a tuple/list/dict of tensors (or None), batch first — e.g.
    SDXL's ``(prompt_embeds, pooled_prompt_embeds)``. Entries stay on the device ``encode_fn`` put them on.
    """

    def __init__(self, encoder_id: str, clip_skip: int = 1, max_entries: int = 4096):
        self.encoder_id = encoder_id
        self.clip_skip = int(clip_skip)
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[tuple[str, str, int], Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, caption: str) -> tuple[str, str, int]:
        return caption, self.encoder_id, self.clip_skip

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, caption: str) -> bool:
        return self.key(caption) in self._entries

    def clear(self) -> None:
        self._entries.clear()

    def __call__(self, captions: Sequence[str], encode_fn: Callable[[list[str]], Any]) -> Any:
        if not captions:
            raise ValueError("no captions to encode")
        parts: list[Any] = [None] * len(captions)
        missing: dict[str, list[int]] = {}
        for position, caption in enumerate(captions):
            key = self.key(caption)
            if key in self._entries:
                self._entries.move_to_end(key)
                parts[position] = self._entries[key]
                self.hits += 1
            else:
                missing.setdefault(caption, []).append(position)
        if missing:
            texts = list(missing)
            with torch.no_grad():
                output = encode_fn(texts)
            for text, entry in zip(texts, _split(output, len(texts)), strict=True):
                self._entries[self.key(text)] = entry
                for position in missing[text]:
                    parts[position] = entry
            self.misses += len(texts)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return _stack(parts)


def _split(output: Any, count: int) -> list[Any]:
    """Batch-first structure → ``count`` per-sample structures (tensors cloned so no batch storage is kept)."""
    if output is None:
        return [None] * count
    if isinstance(output, torch.Tensor):
        if output.shape[0] != count:
            raise ValueError(f"encode_fn returned a batch of {output.shape[0]} for {count} captions")
        return [row.detach().clone() for row in output]
    if isinstance(output, tuple | list):
        columns = [_split(value, count) for value in output]
        return [type(output)(column[i] for column in columns) for i in range(count)]
    if isinstance(output, dict):
        columns = {name: _split(value, count) for name, value in output.items()}
        return [{name: column[i] for name, column in columns.items()} for i in range(count)]
    raise TypeError(f"encode_fn must return tensors (or tuples/lists/dicts of them), got {type(output).__name__}")


def _stack(parts: list[Any]) -> Any:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.stack(parts)
    if isinstance(first, tuple | list):
        return type(first)(_stack([part[i] for part in parts]) for i in range(len(first)))
    return {name: _stack([part[name] for part in parts]) for name in first}


def cache_latents(config: Any, datasets: Sequence[Any], models: Any, accelerator: Any,
                  emit: Callable[[Any], Any], should_stop: Callable[[], bool]) -> bool:
    """Before training: every image of ``datasets`` (None entries skipped) encoded once, as dataset.latent_cache
    says, this process's share of them; whether batches bring latents (False when the cache is off or had to be
    turned off — a warning says why)."""
    from . import events as ev

    vae_id = f"{config.model.base}|{config.model.vae}|{models.vae_dtype}"
    cache = LatentCache(config.dataset.latent_cache, Path(config.output.dir) / "cache" / "latents", vae_id=vae_id)
    cached = config.dataset.latent_cache != "off"
    for dataset in datasets:
        if dataset is None:
            continue
        progress = ev.phase_progress(emit, "caching") if cached else None
        report = cache.encode_all(dataset, models.encode_pixels, progress=progress,
                                  batch_size=config.train.batch_size, process_index=accelerator.process_index,
                                  num_processes=accelerator.num_processes, should_stop=should_stop)
        cached = cached and report.active
        if not report.active and config.dataset.latent_cache != "off":
            emit(ev.RunWarning(message=f"latent cache off: {report.reason}"))
    accelerator.wait_for_everyone()
    return cached


__all__ = ["CACHE_FORMAT", "CacheReport", "LatentCache", "TextEmbeddingCache", "cache_latents"]

