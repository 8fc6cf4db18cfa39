"""What a save writes: the adapter file with its metadata, a self-check of that file, and the resumable state.

The adapter file is reloaded into fresh adapters right after writing and every module's merged ΔW is compared
with the live network's (:func:`verify_file`), so a file that would not load the same is reported at once.

Resumable state is a folder next to the adapter (``<name>-state``): the adapter weights, optimizer, learning-rate
scheduler, EMA, gradient scaler, RNG states and the data position of the last optimizer step, written to a
temporary folder and moved into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from methods.base import ConfigError
from methods.files import load_adapter_file
from methods.network import AdapterNetwork, pipeline_parts

from .events import log

STATE_FILE = "state.pt"
STATE_WEIGHTS = "adapter.safetensors"
CHECK_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}  # relative max |ΔW − ΔW reloaded| per save dtype


def state_dir(adapter_file: Path) -> Path:
    return adapter_file.with_name(adapter_file.stem + "-state")


def unique_path(path: Path) -> Path:
    """``path`` or, if taken, ``stem-1``, ``stem-2``… — outputs never overwrite a user's file silently."""
    candidate, index = path, 1
    while candidate.exists() or state_dir(candidate).exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


def write_text_atomic(path: Path, text: str) -> None:
    from methods.files import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


# ----- metadata ------------------------------------------------------------------------------------------------
def training_metadata(config: Any, scan: Any, dataset: Any, state: Any, processes: int) -> dict[str, Any]:
    """The kohya ``ss_*`` and ModelSpec keys that describe the run (format spec §3)."""
    train, data = config.train, config.dataset
    return {
        "ss_steps": state.progress.step, "ss_epoch": state.progress.epoch, "ss_max_train_steps": state.total_steps,
        "ss_learning_rate": train.learning_rate, "ss_unet_lr": train.unet_lr or None,
        "ss_text_encoder_lr": train.text_encoder_lr or None, "ss_lr_scheduler": train.scheduler,
        "ss_lr_warmup_steps": train.warmup_steps, "ss_optimizer": train.optimizer,
        "ss_mixed_precision": train.mixed_precision, "ss_seed": train.seed,
        "ss_batch_size_per_device": train.batch_size,
        "ss_total_batch_size": train.batch_size * processes * train.gradient_accumulation,
        "ss_gradient_accumulation_steps": train.gradient_accumulation,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_clip_skip": train.clip_skip, "ss_noise_offset": train.noise_offset,
        "ss_min_snr_gamma": train.min_snr_gamma or None,
        "ss_num_train_images": scan.num_train_images, "ss_num_reg_images": scan.num_reg_images,
        "ss_num_batches_per_epoch": state.batches_per_epoch, "ss_cache_latents": state.latents_cached,
        "ss_shuffle_caption": data.shuffle_caption, "ss_keep_tokens": data.keep_tokens,
        "ss_caption_dropout_rate": data.caption_dropout, "ss_flip_aug": data.flip,
        "ss_enable_bucket": data.enable_buckets, "ss_min_bucket_reso": data.min_bucket_side,
        "ss_max_bucket_reso": data.max_bucket_side, "ss_sd_model_name": Path(config.model.base).name,
        "ss_tag_frequency": scan.tag_frequency, "ss_dataset_dirs": scan.dataset_dirs,
        "ss_reg_dataset_dirs": scan.reg_dataset_dirs or None,
        "ss_bucket_info": dataset.bucket_info(), "ss_training_finished_at": time.time(),
        "ss_ema_decay": train.ema_decay or None,
        "modelspec.trigger_phrase": data.trigger_word or None,
        "modelspec.author": config.output.author or None,
        "modelspec.description": config.output.description or None,
        "modelspec.encoder_layer": train.clip_skip if train.clip_skip > 1 else None,
        **kohya_option_metadata(config),
        "ss_datasets": subsets_metadata(config, scan, dataset) if data.subsets else None,
    }


def kohya_option_metadata(config: Any) -> dict[str, Any]:
    """sd-scripts' ``ss_*`` keys of its loss, noise, memory and regularisation options, under its names and with its
    values (``None`` where an option is off and sd-scripts' default is None, written "None" as sd-scripts does)."""
    train, network, data = config.train, config.network, config.dataset
    return {
        "ss_loss_type": train.loss_type, "ss_huber_schedule": train.huber_schedule, "ss_huber_c": train.huber_c,
        "ss_huber_scale": train.huber_scale, "ss_debiased_estimation": train.debiased_estimation_loss,
        "ss_zero_terminal_snr": train.zero_terminal_snr,
        "ss_ip_noise_gamma": train.ip_noise_gamma or "None",
        "ss_ip_noise_gamma_random_strength": train.ip_noise_gamma_random_strength,
        "ss_multires_noise_iterations": train.multires_noise_iterations or "None",
        "ss_multires_noise_discount": train.multires_noise_discount,
        "ss_adaptive_noise_scale": train.adaptive_noise_scale or "None",
        "ss_noise_offset_random_strength": train.noise_offset_random_strength,
        "ss_full_fp16": train.full_fp16, "ss_fp8_base": train.fp8_base, "ss_fp8_base_unet": train.fp8_base_unet,
        "ss_scale_weight_norms": network.scale_weight_norms or "None", "ss_max_grad_norm": train.max_grad_norm,
        "ss_caption_tag_dropout_rate": data.caption_tag_dropout_rate,
        "ss_caption_dropout_every_n_epochs": data.caption_dropout_every_n_epochs,
        "ss_max_token_length": data.max_token_length if data.max_token_length > 75 else "None",
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
def save_resume_state(folder: Path, state: Any, scaler: Any, config: Any, processes: int) -> None:
    """Adapter weights, optimizer, scheduler, EMA, scaler, RNG and the data position of the last optimizer step."""
    from safetensors.torch import save_file

    temporary = folder.with_name(folder.name + ".tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.network.state_dict().items()},
              str(temporary / STATE_WEIGHTS))
    saved = {
        "progress": dataclasses.asdict(state.boundary), "losses": state.losses[:state.boundary.step],
        "optimizer": state.optimizer.state_dict(), "scheduler": state.lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(), "ema": state.ema.state_dict() if state.ema is not None else None,
        "config": config.to_dict(), "processes": processes,
        # full_fp16/bf16 with fp32 master weights: the masters are the weights (the saved half ones their rounding)
        "half_precision": state.half_precision.state_dict() if getattr(state, "half_precision", None) else None,
    }
    torch.save(saved, temporary / STATE_FILE)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)


def load_resume_state(folder: Path, state: Any, scaler: Any, config: Any, processes: int,
                      device: torch.device) -> list[str]:
    """Restore what :func:`save_resume_state` wrote into ``state``; returns the settings that changed since."""
    from safetensors.torch import load_file

    saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
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
    except RuntimeError as error:
        raise ConfigError(f"resume: {folder} does not fit this network ({str(error).splitlines()[0]})") from error
    state.progress = type(state.progress)(**saved["progress"])
    state.boundary = dataclasses.replace(state.progress)
    state.losses = list(saved["losses"])
    half = getattr(state, "half_precision", None)
    with half.fp32_values() if half is not None else contextlib.nullcontext():  # torch casts the state to the params'
        state.optimizer.load_state_dict(saved["optimizer"])
    state.lr_scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") and scaler is not None:
        scaler.load_state_dict(saved["scaler"])
    if saved.get("ema") is not None and state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
        state.ema.to(device)
    if saved.get("half_precision") and getattr(state, "half_precision", None) is not None:
        state.half_precision.load_state_dict(saved["half_precision"], device)
    set_rng_state(saved["rng"])
    return changed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


__all__ = ["STATE_FILE", "STATE_WEIGHTS", "load_resume_state", "save_resume_state", "state_dir",
           "training_metadata", "unique_path", "verify_file", "write_text_atomic"]
