"""What a save writes: the adapter file with its metadata, a self-check of that file, and the resumable state.

The adapter file is reloaded into fresh adapters right after writing and every module's merged ΔW is compared
with the live network's (:func:`verify_file`), so a file that would not load the same is reported at once.

Resumable state is a folder next to the adapter (``<name>-state``): the adapter weights, optimizer, learning-rate
scheduler, EMA, gradient scaler, RNG states and the data position of the last optimizer step, written to a
temporary folder and moved into place — as safetensors and JSON only (:mod:`trainer.statefile`), so resuming
never unpickles anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.arch import denoiser_prefixes
from methods.base import ConfigError
from methods.embeddings import embedding_path
from methods.files import load_adapter_file, write_text_atomic
from methods.network import AdapterNetwork, pipeline_parts

from .events import log
from .statefile import StateFormatError, read_state, write_state

STATE_NAME = "state"  # state.json + state.safetensors (trainer.statefile: no pickle)
STATE_FILE = f"{STATE_NAME}.json"
STATE_WEIGHTS = "adapter.safetensors"
LEGACY_STATE_FILE = "state.pt"  # the pickled state of earlier versions: refused
CHECK_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}  # relative max |ΔW − ΔW reloaded| per save dtype


def state_dir(adapter_file: Path) -> Path:
    return adapter_file.with_name(adapter_file.stem + "-state")


def unique_path(path: Path) -> Path:
    """``path`` or, if taken, ``stem-1``, ``stem-2``… — outputs never overwrite a user's file silently."""
    candidate, index = path, 1
    while candidate.exists() or state_dir(candidate).exists() or embedding_path(candidate).exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


# ----- the output folder ---------------------------------------------------------------------------------------
def check_output_folder(output_file: Path, overwrite: bool, save_state: bool, resume_from: Path | None) -> bool:
    """Refuse to replace a finished run's files unless ``overwrite``; returns whether this run extends the finished
    run of this very folder (resuming from its final state), whose files are then kept (:func:`keep_finished_run`)."""
    final_state = state_dir(output_file)
    extending = resume_from is not None and final_state.exists() and resume_from.resolve() == final_state.resolve()
    if not overwrite and not extending:
        taken = [path for path in (output_file, embedding_path(output_file), final_state) if path.exists()
                 and (path != final_state or save_state)]
        if taken:
            hint = (f"; to train it further, resume from its final state {final_state}"
                    if final_state.exists() else "")
            raise ConfigError(f"{taken[0]} already exists; change output.name or output.dir, or set "
                              f"output.overwrite = true{hint}")
    if resume_from is not None:
        check_resume_folder(resume_from)
    return extending


def keep_finished_run(output_file: Path, step: int) -> Path | None:
    """Rename a finished run's final file (and its state) to the step file names it would have had mid-run, so that
    extending the run writes a new final file without replacing anything."""
    if not output_file.exists():
        return None
    kept = unique_path(output_file.with_name(f"{output_file.stem}-step{step:06d}.safetensors"))
    os.replace(output_file, kept)
    for companion in (state_dir, embedding_path):
        if companion(output_file).exists():
            os.replace(companion(output_file), companion(kept))
    return kept


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files a killed save left in an output folder (ours only: hidden ``.*.tmp`` files and
    ``*-state.tmp`` folders, here and in ``samples/`` and the latent cache)."""
    removed: list[Path] = []
    places = [folder, folder / "samples", *sorted((folder / "cache" / "latents").glob("*"))]
    for place in places:
        if not place.is_dir():
            continue
        for path in sorted(place.iterdir()):
            if path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.is_dir() and path.name.endswith("-state.tmp"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


# ----- when the disk refuses -----------------------------------------------------------------------------------
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
RESCUE_FOLDER = "rankwright-rescue"


@dataclasses.dataclass
class SaveFailure:
    """A save the file system refused. ``train(on_save_error=…)`` gets it and returns where to try next (the same
    path again, e.g. after space was freed, or another) or None for the default rescue folders."""

    path: Path
    error: OSError
    needed_bytes: int
    free_bytes: int | None
    final: bool
    step: int

    @property
    def reason(self) -> str:
        return self.error.strerror or str(self.error) or type(self.error).__name__


def is_disk_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_ERRORS


def free_bytes(folder: Path) -> int | None:
    """Free space where ``folder`` is (or would be created), None when that cannot be told."""
    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def adapter_file_bytes(network: AdapterNetwork, dtype: str) -> int:
    """About the size of the adapter file (its tensors in the save dtype; the header is small)."""
    size = {"fp32": 4, "bf16": 2, "fp16": 2}.get(dtype, 2)
    return sum(tensor.numel() * size for tensor in network.export_state_dict().values()) + 64 * 1024


def rescue_paths(output_file: Path) -> list[Path]:
    """Where a final adapter goes when its folder refuses it: $RANKWRIGHT_RESCUE_DIR, ~/rankwright-rescue, then the
    system's temporary folder — each a new, time-stamped name."""
    import tempfile

    stamp = time.strftime("%Y%m%d-%H%M%S")
    folders = [Path(os.environ["RANKWRIGHT_RESCUE_DIR"])] if os.environ.get("RANKWRIGHT_RESCUE_DIR") else []
    folders += [Path.home() / RESCUE_FOLDER, Path(tempfile.gettempdir()) / RESCUE_FOLDER]
    return [folder / f"{output_file.stem}-{stamp}{output_file.suffix}" for folder in folders]


# ----- metadata ------------------------------------------------------------------------------------------------
# kohya writes str(None) for options that are off; safetensors metadata is all strings.
NONE = "None"


def run_metadata(config: Any, data: Any, models: Any, state: Any, processes: int, session_id: int) -> dict[str, Any]:
    """The kohya ``ss_*`` and ModelSpec keys that describe the run (format spec §3), as kohya words them; the
    per-save ones (steps, epoch, finish time, base model hashes) are added by the save.
    tests/test_training_metadata.py::KOHYA_KEYS says, key by key, which of kohya's we write and why not the others."""
    train, dataset_config, scan, dataset = config.train, config.dataset, data.scan, data.dataset
    resolution = dataset_config.resolution
    used = [tuple(bucket["resolution"]) for bucket in dataset.bucket_info()["buckets"].values()]
    trains_text_encoder = any(prefix not in denoiser_prefixes() for prefix in state.network.counts())
    text_encoder_lr = train.text_encoder_lr or train.learning_rate if trains_text_encoder else NONE
    epochs = train.epochs if train.epochs > 0 else math.ceil(state.total_steps / max(1, state.steps_per_epoch))
    return {
        "ss_session_id": session_id, "ss_training_started_at": state.started_at,
        "ss_resolution": str((resolution, resolution)), "modelspec.resolution": f"{resolution}x{resolution}",
        "ss_enable_bucket": dataset_config.enable_buckets,
        # the bucket sides the samples actually got (not the configured limits, which a small run never reaches)
        "ss_min_bucket_reso": min(min(b) for b in used) if dataset_config.enable_buckets else NONE,
        "ss_max_bucket_reso": max(max(b) for b in used) if dataset_config.enable_buckets else NONE,
        "ss_max_train_steps": state.total_steps, "ss_num_epochs": epochs,
        "ss_learning_rate": train.learning_rate, "ss_unet_lr": train.unet_lr or train.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr, "ss_lr_scheduler": train.scheduler,
        "ss_lr_warmup_steps": train.warmup_steps, "ss_optimizer": train.optimizer,
        "ss_max_grad_norm": train.max_grad_norm, "ss_mixed_precision": train.mixed_precision, "ss_seed": train.seed,
        "ss_batch_size_per_device": train.batch_size,
        "ss_total_batch_size": train.batch_size * processes * train.gradient_accumulation,
        "ss_gradient_accumulation_steps": train.gradient_accumulation,
        "ss_gradient_checkpointing": train.gradient_checkpointing, "ss_clip_skip": train.clip_skip,
        **models.objective.metadata(),
        "ss_num_train_images": scan.num_train_images, "ss_num_reg_images": scan.num_reg_images,
        "ss_num_validation_images": len(data.validation) if data.validation is not None else 0,
        "ss_validation_split": dataset_config.validation_split,
        "ss_validate_every_n_steps": train.validation_every_n_steps or NONE,
        "ss_prior_loss_weight": dataset_config.reg_weight,
        "ss_num_batches_per_epoch": state.batches_per_epoch, "ss_cache_latents": state.latents_cached,
        "ss_shuffle_caption": dataset_config.shuffle_caption, "ss_keep_tokens": dataset_config.keep_tokens,
        "ss_caption_dropout_rate": dataset_config.caption_dropout, "ss_flip_aug": dataset_config.flip,
        "ss_random_crop": dataset_config.crop == "random",
        "ss_sd_model_name": Path(config.model.base).name,
        "ss_tag_frequency": scan.tag_frequency, "ss_dataset_dirs": scan.dataset_dirs,
        "ss_reg_dataset_dirs": scan.reg_dataset_dirs,
        "ss_bucket_info": dataset.bucket_info(), "ss_training_comment": config.output.comment or NONE,
        "ss_ema_decay": train.ema_decay or None,
        "modelspec.trigger_phrase": dataset_config.trigger_word or None,
        "modelspec.author": config.output.author or None,
        "modelspec.description": config.output.description or None,
        "modelspec.encoder_layer": train.clip_skip if train.clip_skip > 1 else None,
        **kohya_option_metadata(config),
        "ss_datasets": subsets_metadata(config, scan, dataset) if dataset_config.subsets else None,
    }


def kohya_option_metadata(config: Any) -> dict[str, Any]:
    """sd-scripts' ``ss_*`` keys of its memory, regularisation, caption and data options (the loss and noise ones are
    the objective's: :meth:`trainer.objective.DiffusionObjective.metadata`), with sd-scripts' values."""
    train, network, data = config.train, config.network, config.dataset
    return {
        "ss_full_fp16": train.full_fp16, "ss_fp8_base": train.fp8_base, "ss_fp8_base_unet": train.fp8_base_unet,
        "ss_scale_weight_norms": network.scale_weight_norms or NONE,
        "ss_caption_tag_dropout_rate": data.caption_tag_dropout_rate,
        "ss_caption_dropout_every_n_epochs": data.caption_dropout_every_n_epochs,
        "ss_max_token_length": data.max_token_length if data.max_token_length > 75 else NONE,
        "ss_color_aug": data.color_aug, "ss_bucket_no_upscale": data.bucket_no_upscale,
    }


def subsets_metadata(config: Any, scan: Any, dataset: Any) -> list[dict[str, Any]]:
    """sd-scripts' ``ss_datasets`` (written when a dataset config is used): one dataset with its subsets."""
    from .dataset import subset_section

    data, train = config.dataset, config.train
    subsets = []
    for index, subset in enumerate(data.subsets):
        own = subset_section(data, index)
        entry = {"img_count": scan.subset_images[index] if index < len(scan.subset_images) else 0,
                 "num_repeats": subset.num_repeats, "color_aug": own.color_aug, "flip_aug": own.flip,
                 "random_crop": data.crop == "random", "shuffle_caption": own.shuffle_caption,
                 "keep_tokens": own.keep_tokens, "caption_prefix": own.caption_prefix or None,
                 "caption_suffix": own.caption_suffix or None, "image_dir": Path(subset.image_dir).name,
                 "class_tokens": subset.class_tokens, "is_reg": subset.is_reg}
        if subset.resolution is not None:
            entry["resolution"] = (subset.resolution, subset.resolution)  # ours: sd-scripts sets it per dataset
        subsets.append(entry)
    return [{"is_dreambooth": True, "batch_size_per_device": train.batch_size,
             "num_train_images": scan.num_train_images, "num_reg_images": scan.num_reg_images,
             "resolution": (data.resolution, data.resolution), "enable_bucket": data.enable_buckets,
             "min_bucket_reso": data.min_bucket_side, "max_bucket_reso": data.max_bucket_side,
             "tag_frequency": scan.tag_frequency, "bucket_info": dataset.bucket_info(), "subsets": subsets}]


def base_model_hashes(source: str) -> dict[str, str]:
    """kohya's ``ss_sd_model_hash`` (A1111's old 8-hex hash: sha256 of 64 KiB at 1 MiB) and
    ``ss_new_sd_model_hash`` (sha256 of the file) of a single-file base; nothing for folders and hub ids, which
    have no one file to hash."""
    import hashlib

    path = Path(source).expanduser()
    if not path.is_file():
        return {}
    with open(path, "rb") as stream:
        stream.seek(0x100000)
        legacy = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
        stream.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: stream.read(1 << 24), b""):
            digest.update(block)
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": digest.hexdigest()}


# ----- self-check ----------------------------------------------------------------------------------------------
def verify_file(path: Path, network: AdapterNetwork, pipe: Any, arch: str, save_dtype: str) -> dict[str, Any]:
    """Reload a written file into fresh adapters and compare merged weights with the live network."""
    tensors, _ = load_adapter_file(path)
    parts, _ = pipeline_parts(pipe, arch)
    reloaded, unmatched = AdapterNetwork.from_state_dict(parts, arch, tensors, source=str(path))
    worst, worst_relative = 0.0, 0.0
    missing = [name for name in network.adapters if name not in reloaded.adapters]
    # One module at a time: all ΔW of a real model at once would be the size of the adapted weights (GBs).
    with torch.no_grad():
        for name, adapter in network.adapters.items():
            if name not in reloaded.adapters:
                continue
            delta = adapter.merged_delta().float().cpu()
            again = reloaded.adapters[name].merged_delta().float().cpu()
            difference = float((delta - again).abs().max())
            scale = float(delta.abs().max()) or 1.0
            worst = max(worst, difference)
            worst_relative = max(worst_relative, difference / scale)
    tolerance = CHECK_TOLERANCE.get(save_dtype, CHECK_TOLERANCE["fp16"])
    # full_fp16/bf16: the live ΔW itself is computed in half precision, the reloaded one in fp32
    live = {torch.float16: "fp16", torch.bfloat16: "bf16"}
    tolerance = max([tolerance] + [CHECK_TOLERANCE[live[p.dtype]] for p in network.parameters() if p.dtype in live])
    ok = not missing and not unmatched and worst_relative <= tolerance
    result = {"check_modules": len(reloaded.adapters), "check_missing": len(missing),
              "check_unmatched": len(unmatched), "check_max_difference": worst,
              "check_max_relative_difference": worst_relative, "check_tolerance": tolerance, "check_ok": ok}
    if not ok:
        log.warning("self-check of %s failed: %s", path, result)
    return result


def check_failure_text(path: Path, check: dict[str, Any]) -> str:
    return (f"self-check of {path.name} failed: {check['check_missing']} module(s) missing, "
            f"{check['check_unmatched']} unmatched, max relative difference "
            f"{check['check_max_relative_difference']:.2e} (tolerance {check['check_tolerance']:.0e})")


# ----- resumable state -----------------------------------------------------------------------------------------
def resume_state_tree(state: Any, scaler: Any, config: Any, processes: int, started_at: float) -> dict[str, Any]:
    """Everything resuming needs besides the adapter weights, as plain values and tensors (see trainer.statefile)."""
    return {
        "progress": dataclasses.asdict(state.boundary), "losses": state.losses[:state.boundary.step],
        "optimizer": state.optimizer.state_dict(), "scheduler": state.lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(), "ema": state.ema.state_dict() if state.ema is not None else None,
        "config": config.to_dict(), "processes": processes, "started_at": started_at,
        # full_fp16/bf16 with fp32 master weights: the masters are the weights (the saved half ones their rounding)
        "half_precision": state.half_precision.state_dict() if getattr(state, "half_precision", None) else None,
    }


def save_resume_state(folder: Path, network: AdapterNetwork, tree: dict[str, Any]) -> None:
    """Adapter weights (``adapter.safetensors``) and the rest of :func:`resume_state_tree` (``state.json`` +
    ``state.safetensors``), written into ``<folder>.tmp`` and moved into place; no pickle anywhere."""
    from safetensors.torch import save_file

    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                  str(temporary / STATE_WEIGHTS))
        write_state(temporary, STATE_NAME, tree)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def check_resume_folder(folder: Path) -> None:
    """A folder :func:`load_resume_state` can read, or a ConfigError saying why not (before anything loads)."""
    if (folder / LEGACY_STATE_FILE).is_file() and not (folder / STATE_FILE).is_file():
        raise ConfigError(f"resume: {folder} holds {LEGACY_STATE_FILE}, the pickled state of an earlier version; it "
                          "is not loaded, because unpickling a file can run any code in it. Resume from a state "
                          "folder this version wrote (state.json + state.safetensors), or start the run again "
                          "with network.init_from set to the adapter file")
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"resume: {folder} is not a resumable state folder (no {STATE_FILE}); pass a *-state "
                          "folder written next to a save (output.save_state)")


def read_resume_state(folder: Path) -> dict[str, Any]:
    """The saved tree (no weights yet); refuses a folder in any other form than ours."""
    check_resume_folder(folder)
    try:
        saved = read_state(folder, STATE_NAME)
    except StateFormatError as error:
        raise ConfigError(f"resume: {folder} cannot be resumed from: {error}") from error
    if not isinstance(saved, dict) or not isinstance(saved.get("progress"), dict):
        raise ConfigError(f"resume: {folder}/{STATE_FILE} is not a Rankwright training state")
    return saved


def load_resume_state(folder: Path, saved: dict[str, Any], state: Any, scaler: Any, config: Any, processes: int,
                      device: torch.device) -> list[str]:
    """Restore ``saved`` (from :func:`read_resume_state`) and the folder's weights into ``state``; returns the
    settings that changed since."""
    from safetensors.torch import load_file

    before = saved.get("config", {})
    now = config.to_dict()
    if before.get("network") != now["network"]:
        raise ConfigError(f"resume: {folder} was trained with another [network] section "
                          f"({before.get('network')}); resume with the same method, options and targets")
    lengths = ("max_steps", "epochs")  # continuing to a new length is what resuming is for
    changed = [f"{section}.{key}" for section in ("dataset", "train") for key, value in now[section].items()
               if before.get(section, {}).get(key, value) != value and key not in lengths]
    if saved.get("processes", 1) != processes:
        changed.append(f"processes ({saved.get('processes')} → {processes})")
    weights = load_file(str(folder / STATE_WEIGHTS), device=str(device))
    try:
        state.network.load_state_dict(weights)
        state.progress = type(state.progress)(**saved["progress"])
        half = getattr(state, "half_precision", None)
        with half.fp32_values() if half is not None else contextlib.nullcontext():  # torch casts state to params'
            state.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("half_precision") and half is not None:
            half.load_state_dict(saved["half_precision"], device)
        state.lr_scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler") and scaler is not None:
            scaler.load_state_dict(saved["scaler"])
        if saved.get("ema") is not None and state.ema is not None:
            state.ema.load_state_dict(saved["ema"])
            state.ema.to(device)
        set_rng_state(saved["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"resume: {folder} does not fit this run ({str(error).splitlines()[0]})") from error
    state.boundary = dataclasses.replace(state.progress)
    state.losses = list(saved["losses"])
    return changed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


__all__ = ["STATE_FILE", "STATE_WEIGHTS", "SaveFailure", "base_model_hashes", "check_output_folder",
           "check_resume_folder", "clean_leftovers", "keep_finished_run", "load_resume_state", "read_resume_state",
           "rescue_paths", "resume_state_tree", "run_metadata", "save_resume_state", "state_dir", "unique_path",
           "verify_file", "write_text_atomic"]
