"""The training engine: scan data → load → prepare → loop → save, under Accelerate.

``train(config, on_event=...)`` is the public entry point used by the CLI and the web UI. Everything the run
decides (paths, counts, memory, losses, previews, saves, errors) is emitted as events.

Determinism (what makes resuming exact and a multi-process run equal to a single-process one with the same
global batch): batch order comes from the bucket sampler (seeded by (seed, epoch)); the noise, timestep and noise
offset of each sample come from their own generator seeded by (seed, epoch, global batch index, position in the
batch) — not from global RNG state — so they do not depend on how batches are spread over processes, on
previews or validation in between, or on where a run was resumed. ``train.fixed_noise`` (a debug option) keys them
by the sample alone, so every step sees the same noise. Resumable state is taken at optimizer-step boundaries:
adapter weights, optimizer, scheduler, EMA, GradScaler, RNG states and the data position of that boundary.

Processes: adapters live in forward hooks, so they are not DDP-wrapped; gradients are all-reduced by hand before
each optimizer step, stop requests are agreed on by all processes, and only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from methods.apply import save_network
from methods.base import ConfigError
from methods.files import load_adapter_file
from methods.network import AdapterNetwork, pipeline_parts

from .conditioning import Conditioning, encode_captions, sdxl_time_ids
from .config import TrainerConfig
from .events import EventCallback, EventLog, StopSignal, log

STATE_FILE = "state.pt"
STATE_WEIGHTS = "adapter.safetensors"
NORM_EVERY = 10  # adapter-norm scalars for TensorBoard every N steps (a pass over every adapter parameter)
MEMORY_EVERY = 50  # "memory" events every N steps (and at step 1)


class TrainingError(RuntimeError):
    """The run could not continue (NaN loss, unusable data); the message says what was kept."""


@dataclasses.dataclass
class TrainResult:
    output_file: Path | None
    steps: int
    losses: list[float]
    saves: list[Path]
    stopped_early: bool = False
    reason: str = ""
    state_dir: Path | None = None  # resumable state of the last save (output.save_state)


@dataclasses.dataclass
class Progress:
    """Where the run is; saved in resumable state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch this process consumed (for exact resume)
    micro_step: int = 0  # batches consumed in all (forward/backward passes)


def train(config: TrainerConfig, on_event: EventCallback | None = None, stop: StopSignal | None = None,
          resume: str | Path | None = None) -> TrainResult:
    """Train an adapter as configured; ``stop.request()`` from another thread ends it with a save."""
    return Trainer(config, on_event=on_event, stop=stop, resume=resume).run()


def make_accelerator(mixed_precision: str):
    """An Accelerator for this run. Accelerate keeps its settings in a process-wide singleton that refuses a
    second mixed-precision setting, so a single-process host (tests, the web UI) resets it between runs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if PartialState._shared_state.get("num_processes", 1) <= 1 and not distributed:
        AcceleratorState._reset_state()
    # Without a GPU, accelerate only joins a torchrun/accelerate-launch process group when told to run on the CPU.
    return Accelerator(mixed_precision=mixed_precision, cpu=distributed and not torch.cuda.is_available())


def stable_seed(*key: Any) -> int:
    """A 63-bit seed from a tuple of plain values, the same in every process and Python session."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Trainer:
    def __init__(self, config: TrainerConfig, on_event: EventCallback | None = None,
                 stop: StopSignal | None = None, resume: str | Path | None = None):
        self.config = config
        self.accelerator = make_accelerator(config.train.mixed_precision)
        self.main = self.accelerator.is_main_process
        self.output_dir = Path(config.output.dir)
        self.output_file = self.output_dir / f"{config.output.name}.safetensors"
        self.stop = stop or StopSignal()
        self.stop.stop_file = self.output_dir / "STOP"
        self.resume_from = Path(resume) if resume else None
        self.events = EventLog(self.output_dir, [on_event] if on_event else [], tensorboard=config.output.tensorboard,
                               enabled=self.main)
        self.progress = Progress()
        self.boundary = Progress()  # the progress at the last optimizer step (what resumable state records)
        self.losses: list[float] = []
        self.saves: list[Path] = []
        self.last_good_save: Path | None = None
        self.last_state: Path | None = None
        self.saved_step = -1
        self.timings: dict[str, float] = {}

    # ================================================================================================ run
    def run(self) -> TrainResult:
        started = time.time()
        restore_signals = self._install_signal_handlers()
        try:
            self._check_outputs()
            self.events.emit("start", config=self.config.to_dict(), processes=self.accelerator.num_processes,
                             resume=str(self.resume_from) if self.resume_from else None)
            self._prepare_data()  # first: a dataset problem is reported before minutes of model loading
            self._load()
            self._prepare()
            self.timings["ready"] = time.time() - started
            self.events.emit("ready", seconds=round(self.timings["ready"], 2), **self.summary)
            self._loop()
            return self._finish()
        except Exception as error:
            self.events.emit("error", message=str(error), kind=type(error).__name__,
                             last_good_save=str(self.last_good_save) if self.last_good_save else None)
            raise
        finally:
            restore_signals()
            self.events.close()

    # ================================================================================================ data
    def _prepare_data(self) -> None:
        from .dataset import load_datasets

        config, accelerator = self.config, self.accelerator
        try:
            self.dataset, self.validation_dataset, self.scan = load_datasets(config.dataset, seed=config.train.seed)
        except ValueError as error:  # missing folder, no usable image: the message names the key
            raise ConfigError(str(error)) from error
        for path, reason in self.scan.skipped:
            self.events.emit("skipped_image", path=str(path), reason=reason)
        train = config.train
        needed = train.batch_size * accelerator.num_processes * train.gradient_accumulation
        samples = len(self.dataset)
        if samples < needed:
            raise ConfigError(
                f"the dataset gives {samples} sample(s) per epoch ({self.scan.num_train_images} image(s) × repeats"
                f"{f', {len(self.scan.reg_items)} regularisation image(s)' if self.scan.reg_items else ''}) but "
                f"one optimizer step needs train.batch_size {train.batch_size} × {accelerator.num_processes} "
                f"process(es) × train.gradient_accumulation {train.gradient_accumulation} = {needed}; add images "
                "or repeats (the N_ prefix of a folder name), or lower batch_size or gradient_accumulation")

    # ================================================================================================ load
    def _load(self) -> None:
        from .models import load_pipeline

        config = self.config
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision,
                                                                            torch.float32)
        arch = None if config.model.arch == "auto" else config.model.arch
        prediction = None if config.model.prediction_type == "auto" else config.model.prediction_type
        self.pipe, self.model_info = load_pipeline(config.model.base, arch=arch, prediction_type=prediction,
                                                   tokenizer=config.model.tokenizer or None)
        missing = [name for name in ("tokenizer", "tokenizer_2") if hasattr(self.pipe, name)
                   and getattr(self.pipe, name) is None]
        if missing:
            raise ConfigError(f"model.base = {config.model.base!r} comes without a {missing[0]} (single-file "
                              "checkpoints carry none); set model.tokenizer to a folder with vocab.json and "
                              "merges.txt, or use a diffusers folder")
        if config.model.vae:
            self.pipe.vae = load_vae(config.model.vae, self.pipe.vae)
        self.arch = self.model_info.arch
        self.prediction_type = self.model_info.prediction_type
        self.is_sdxl = self.arch == "sdxl"
        device = self.accelerator.device
        pipe = self.pipe
        for model in self._text_encoders() + [pipe.unet, pipe.vae]:
            model.requires_grad_(False)
            model.eval()
        pipe.unet.to(device, weight_dtype)
        for encoder in self._text_encoders():
            encoder.to(device, weight_dtype)
        self.vae_dtype = torch.float32 if config.model.vae_fp32 else weight_dtype
        pipe.vae.to(device, self.vae_dtype)
        self.weight_dtype = weight_dtype
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        if not config.train.sdpa:
            from diffusers.models.attention_processor import AttnProcessor

            pipe.unet.set_attn_processor(AttnProcessor())
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=self.prediction_type)
        self.events.emit("model", arch=self.arch, prediction_type=self.prediction_type,
                         source=self.model_info.source_kind, base=config.model.base)

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if te is not None]

    # ================================================================================================ prepare
    def _prepare(self) -> None:
        from .cache import LatentCache, TextEmbeddingCache
        from .dataset import BucketBatchSampler, make_dataloader

        config, accelerator = self.config, self.accelerator
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed % 2**32)

        # ---- adapters
        parts, _ = pipeline_parts(self.pipe, self.arch)
        self.network = AdapterNetwork.create(parts, self.arch, config.network.method, config.network.options,
                                             config.target_config())
        if not len(self.network):
            raise ConfigError(f"network.preset = {config.network.preset!r} with include/exclude "
                              f"{config.network.include}/{config.network.exclude} selects no layer of this model")
        if config.network.init_from:
            self._init_from_file(Path(config.network.init_from))
        self.network.to(accelerator.device)
        self.network.attach()
        self.network.train()
        self.train_text_encoder = any(not name.startswith("lora_unet") for name in self.network.adapters)
        if config.train.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            self.pipe.unet.train()  # diffusers only checkpoints in training mode (the UNet has no dropout)
            if self.train_text_encoder:
                for encoder in self._text_encoders():
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    encoder.train()

        # ---- caches
        self.latent_cache = LatentCache(config.dataset.latent_cache, self.output_dir / "cache" / "latents",
                                        vae_id=self._vae_id())
        cached = config.dataset.latent_cache != "off"
        self.cache_report = None
        for dataset in (self.dataset, self.validation_dataset):
            if dataset is None:
                continue
            report = self.latent_cache.encode_all(dataset, self._encode_pixels, batch_size=config.train.batch_size,
                                                  process_index=accelerator.process_index,
                                                  num_processes=accelerator.num_processes)
            self.cache_report = self.cache_report or report
            cached = cached and report.active
            if not report.active and config.dataset.latent_cache != "off":
                self.events.emit("warning", message=f"latent cache off: {report.reason}")
        self.latents_cached = cached
        accelerator.wait_for_everyone()
        self.text_cache = None
        if config.dataset.cache_text_encoder_outputs and not self.train_text_encoder:
            self.text_cache = TextEmbeddingCache(encoder_id=config.model.base, clip_skip=config.train.clip_skip)

        # ---- optimizer, data order and schedule
        from .optim import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(config.train, self._parameter_groups())
        self.sampler = BucketBatchSampler(self.dataset, config.train.batch_size, seed=config.train.seed)
        self.loader = accelerator.prepare(make_dataloader(self.dataset, self.sampler, config.dataset.num_workers))
        # Whole rounds only: accelerate would pad the last round by repeating an epoch's first batches.
        self.batches_per_epoch = len(self.sampler) // accelerator.num_processes
        steps_per_epoch = max(1, self.batches_per_epoch // config.train.gradient_accumulation)
        self.total_steps = (config.train.epochs * steps_per_epoch if config.train.epochs > 0
                            else config.train.max_steps)
        self.steps_per_epoch = steps_per_epoch
        self.lr_scheduler = build_scheduler(self.optimizer, config.train, self.total_steps)
        self.ema = [p.detach().clone() for p in self.network.parameters()] if config.train.ema_decay else None
        self.scaler = torch.amp.GradScaler(enabled=config.train.mixed_precision == "fp16"
                                           and accelerator.device.type == "cuda")
        if self.resume_from:
            self._load_state(self.resume_from)
        samples = len(self.dataset)
        self.summary = {
            "method": self.network.method, "modules": self.network.counts(),
            "trainable_parameters": self.network.trainable_parameter_count(),
            "parameter_groups": [{"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])}
                                 for g in self.optimizer.param_groups],
            "train_text_encoder": self.train_text_encoder,
            "images": self.scan.num_train_images, "samples_per_epoch": samples,
            "batches_per_epoch": self.batches_per_epoch, "steps_per_epoch": steps_per_epoch,
            "total_steps": self.total_steps, "global_batch_size": config.train.batch_size
            * accelerator.num_processes * config.train.gradient_accumulation,
            "latents_cached": self.latents_cached, "text_embeddings_cached": self.text_cache is not None,
            "buckets": self.dataset.bucket_info()["buckets"],
            "skipped_images": len(self.scan.skipped), "device": str(accelerator.device),
            "processes": accelerator.num_processes, "start_step": self.progress.step,
        }

    def _parameter_groups(self) -> list[dict[str, Any]]:
        train = self.config.train
        rates = {"lora_unet": train.unet_lr or train.learning_rate,
                 "lora_te": train.text_encoder_lr or train.learning_rate,
                 "lora_te1": train.text_encoder_lr or train.learning_rate,
                 "lora_te2": train.text_encoder_2_lr or train.text_encoder_lr or train.learning_rate}
        return [{"params": params, "lr": rates[prefix], "name": prefix}
                for prefix, params in self.network.parameter_groups().items() if params]

    def _init_from_file(self, path: Path) -> None:
        tensors, _ = load_adapter_file(path)
        parts, _ = pipeline_parts(self.pipe, self.arch)
        loaded, unmatched = AdapterNetwork.from_state_dict(parts, self.arch, tensors, source=str(path))
        missing = [name for name in self.network.adapters if name not in loaded.adapters]
        if missing or unmatched:
            raise ConfigError(f"network.init_from = {str(path)!r} does not fit this network ({len(missing)} module(s) "
                              f"missing, {len(unmatched)} unmatched); use the same method, targets and base model")
        with torch.no_grad():
            for name, adapter in self.network.adapters.items():
                source = loaded.adapters[name].state_dict()
                adapter.load_state_dict({k: v.to(adapter.state_dict()[k]) for k, v in source.items()})

    def _vae_id(self) -> str:
        return f"{self.config.model.base}|{self.config.model.vae}|{self.vae_dtype}"

    # ================================================================================================ loop
    def _loop(self) -> None:
        config, accelerator = self.config, self.accelerator
        processes, rank = accelerator.num_processes, accelerator.process_index
        accumulation = config.train.gradient_accumulation
        bar = self._progress_bar(total=self.total_steps, initial=self.progress.step, desc="training")
        window_start, window_steps = time.time(), 0
        pending: list[torch.Tensor] = []  # micro-batch losses of the current optimizer step
        self.boundary = dataclasses.replace(self.progress)
        finished = self.progress.step >= self.total_steps or self._stop_agreed()
        while not finished:
            if self.progress.batch_in_epoch >= self.batches_per_epoch:
                self._end_of_epoch()
                continue
            # Batches are counted before sharding: each process consumed batch_in_epoch of its own.
            self.sampler.resume(self.progress.epoch, self.progress.batch_in_epoch * processes)
            self.loader.set_epoch(self.progress.epoch)
            for batch in self.loader:
                if self.progress.batch_in_epoch >= self.batches_per_epoch:
                    break  # accelerate's padding of the last round
                global_batch = self.progress.batch_in_epoch * processes + rank
                self.progress.batch_in_epoch += 1
                loss = self._training_loss(batch, self._noise_keys(batch, global_batch))
                self.scaler.scale(loss / accumulation).backward()
                pending.append(loss.detach())
                self.progress.micro_step += 1
                if self.progress.micro_step % accumulation:
                    continue
                loss_value, grad_norm = self._reduce_and_step(torch.stack(pending).mean())
                pending.clear()
                self.progress.step += 1
                self.boundary = dataclasses.replace(self.progress)
                if "first_step" not in self.timings:
                    self.timings["first_step"] = time.time() - window_start
                window_steps += 1
                self.losses.append(loss_value)
                elapsed = time.time() - window_start
                its = window_steps / elapsed if elapsed > 0 else 0.0
                remaining = (self.total_steps - self.progress.step) / its if its else None
                lr = self.lr_scheduler.get_last_lr()[0]
                self.events.emit("step", step=self.progress.step, total=self.total_steps, loss=loss_value, lr=lr,
                                 epoch=self.progress.epoch, grad_norm=grad_norm, its=round(its, 4),
                                 eta_seconds=round(remaining, 1) if remaining is not None else None)
                self._log_scalars(loss_value, grad_norm)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                self._periodic()
                if self.progress.step >= self.total_steps or self._stop_agreed():
                    finished = True
                    break
            else:
                self._end_of_epoch()
        bar.close()

    def _noise_keys(self, batch: dict[str, Any], global_batch: int) -> list[tuple]:
        seed = self.config.train.seed
        if self.config.train.fixed_noise:  # debug: the same draw whenever a sample comes back
            seen: dict[int, int] = {}
            keys = []
            for index in batch["indices"]:
                seen[index] = seen.get(index, -1) + 1
                keys.append(("fixed", seed, int(index), seen[index]))
            return keys
        return [("train", seed, self.progress.epoch, global_batch, position)
                for position in range(len(batch["indices"]))]

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must leave the loop at the same step)."""
        requested = self.stop.requested()
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1.0 if requested else 0.0], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not requested:
                self.stop.request("another process was asked to stop")
            requested = bool(flag.item())
        return requested

    def _end_of_epoch(self) -> None:
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        if self.progress.micro_step % self.config.train.gradient_accumulation == 0:
            self.boundary = dataclasses.replace(self.progress)
        every = self.config.output.save_every_n_epochs
        if every and self.progress.epoch % every == 0 and self.progress.step < self.total_steps:
            self._save(final=False)

    def _periodic(self) -> None:
        config, step = self.config, self.progress.step
        last = step >= self.total_steps
        if config.train.validation_every_n_steps and step % config.train.validation_every_n_steps == 0 and not last:
            self._validate()
        if config.sample.every_n_steps and step % config.sample.every_n_steps == 0 and not last:
            self._sample()
        if config.output.save_every_n_steps and step % config.output.save_every_n_steps == 0 and not last:
            self._save(final=False)
        if step % MEMORY_EVERY == 0 or step == 1:
            self.events.emit("memory", step=step, peak_mb=round(peak_memory_mb(self.accelerator.device), 1))

    def _log_scalars(self, loss_value: float, grad_norm: float) -> None:
        if not self.events.has_tensorboard:
            return
        step = self.progress.step
        values = {"loss": loss_value, "grad_norm": grad_norm}
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            values[f"lr/{group.get('name', 'group')}"] = lr
        if step % NORM_EVERY == 0 or step == 1 or step == self.total_steps:
            values.update(self._norms())
        self.events.scalars(step, values)

    def _reduce_and_step(self, loss: torch.Tensor) -> tuple[float, float]:
        """All-reduce gradients (adapters are not DDP-wrapped: they live in hooks), clip, step, check for NaN."""
        accelerator = self.accelerator
        params = [p for p in self.network.parameters() if p.requires_grad]
        if accelerator.num_processes > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= accelerator.num_processes
            offset = 0
            for param in params:
                count = param.numel()
                param.grad = flat[offset:offset + count].view_as(param).clone()
                offset += count
        loss_value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(loss_value):
            self._diverged(f"the loss became {loss_value}")
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16: GradScaler skips the step
            self._diverged(f"the gradient norm became {grad_norm}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = self.config.train.ema_decay
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.network.parameters()], 1 - decay)
        return loss_value, grad_norm

    def _diverged(self, what: str) -> None:
        kept = (f"the last good save is {self.last_good_save}" if self.last_good_save
                else "nothing was saved yet (set output.save_every_n_steps to keep intermediate files)")
        raise TrainingError(f"{what} at step {self.progress.step + 1}; training stopped and {kept}. Lower "
                            "train.learning_rate, keep train.max_grad_norm > 0, or use bf16/no mixed precision.")

    # ================================================================================================ loss
    def _training_loss(self, batch: dict[str, Any], noise_keys: list[tuple]) -> torch.Tensor:
        config, device = self.config, self.accelerator.device
        latents = self._latents(batch).to(device, torch.float32)
        noise, timesteps = self._noise(latents, noise_keys)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self._conditioning(batch["captions"]).to(device, self.weight_dtype)
        extra = {}
        if self.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"],
                                     device, self.weight_dtype)
            extra["added_cond_kwargs"] = {"text_embeds": conditioning.pooled, "time_ids": time_ids}
        with self.accelerator.autocast():
            prediction = self.pipe.unet(noisy.to(self.weight_dtype), timesteps, conditioning.hidden_states,
                                        **extra).sample
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
        if batch.get("masks") is not None:
            mask = F.interpolate(batch["masks"].to(device, torch.float32), size=loss.shape[-2:], mode="area")
            loss = loss * mask
        loss = loss.mean(dim=(1, 2, 3))
        if config.train.min_snr_gamma:
            loss = loss * self._min_snr_weights(timesteps)
        loss = loss * batch["loss_weights"].to(device, torch.float32)
        return loss.mean()

    def _noise(self, latents: torch.Tensor, keys: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the noise offset) and timesteps, one generator per sample seeded by its key."""
        if len(keys) != latents.shape[0]:
            raise ValueError(f"{len(keys)} noise keys for a batch of {latents.shape[0]}")
        shape, channels = latents.shape[1:], latents.shape[1]
        offset_scale = self.config.train.noise_offset
        steps = self.noise_scheduler.config.num_train_timesteps
        noises, timesteps = [], []
        for key in keys:
            generator = torch.Generator().manual_seed(stable_seed(*key))
            timesteps.append(int(torch.randint(0, steps, (1,), generator=generator)))
            sample = torch.randn(shape, generator=generator)
            if offset_scale:
                sample = sample + offset_scale * torch.randn((channels, 1, 1), generator=generator)
            noises.append(sample)
        noise = torch.stack(noises).to(latents.device)
        return noise, torch.tensor(timesteps, dtype=torch.long, device=latents.device)

    def _min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ)/SNR for epsilon targets, min(SNR, γ)/(SNR+1) for v targets (Hang et al. 2023)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        clipped = torch.clamp(snr, max=self.config.train.min_snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if batch.get("latents") is not None:
            return batch["latents"]
        return self._encode_pixels(batch["pixels"])

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, self.vae_dtype)).latent_dist.mean
        if not torch.isfinite(latents).all() and self.vae_dtype != torch.float32:
            log.warning("the VAE produced NaN in %s; encoding in fp32 from now on", self.vae_dtype)
            self.vae_dtype = torch.float32
            vae.to(torch.float32)
            latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents.float() - shift) * vae.config.scaling_factor).cpu()

    def _conditioning(self, captions: list[str]) -> Conditioning:
        clip_skip = self.config.train.clip_skip
        if self.text_cache is None:
            with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
                return encode_captions(self.pipe, captions, clip_skip, self.is_sdxl)

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
            # One caption at a time: an entry must not depend on which captions it was first batched with
            # (CPU kernels may round differently per batch size), or a resumed run would drift from the original.
            parts = [encode_captions(self.pipe, [text], clip_skip, self.is_sdxl) for text in texts]
            conditioning = Conditioning.stack(parts)
            return conditioning.hidden_states, conditioning.pooled

        hidden, pooled = self.text_cache(captions, encode)
        return Conditioning(hidden, pooled)

    # ================================================================================================ checks
    @torch.no_grad()
    def _validate(self) -> None:
        """Loss on held-out images with fixed noise and timesteps, so values are comparable across steps."""
        from .dataset import collate_batch

        if self.validation_dataset is None or not self.main:
            return
        self.network.eval()
        seed = self.config.train.seed
        losses = [float(self._training_loss(collate_batch([self.validation_dataset[i]]), [("validation", seed, i)]))
                  for i in range(len(self.validation_dataset))]
        self.network.train()
        value = sum(losses) / len(losses)
        self.events.emit("validation", step=self.progress.step, loss=value)
        self.events.scalars(self.progress.step, {"validation_loss": value})

    def _norms(self) -> dict[str, float]:
        with torch.no_grad():
            params = [p.detach() for p in self.network.parameters()]
            if not params:
                return {}
            norms = torch.stack(torch._foreach_norm(params)).float()
        return {"adapter_norm/mean": float(norms.mean()), "adapter_norm/max": float(norms.max())}

    # ================================================================================================ previews
    def _sample(self) -> None:
        if not self.main or not self.config.sample.prompts:
            self.accelerator.wait_for_everyone()
            return
        from .sampling import preview_options, render_previews, save_previews

        sample = self.config.sample
        with self._ema_weights():
            images = render_previews(self.pipe, sample.prompts, clip_skip=self.config.train.clip_skip,
                                     extra_modules=[self.network],
                                     **preview_options(sample, self.config.dataset.resolution))
        paths = save_previews(images, self.output_dir / "samples", self.progress.step, sample.prompts)
        self.events.emit("preview", step=self.progress.step, paths=[str(p) for p in paths],
                         prompts=list(sample.prompts))
        self.accelerator.wait_for_everyone()

    # ================================================================================================ saving
    def _check_outputs(self) -> None:
        if not self.config.output.overwrite:
            taken = [path for path in (self.output_file, self._state_dir(self.output_file)) if path.exists()
                     and (path == self.output_file or self.config.output.save_state)]
            if taken:
                raise ConfigError(f"{taken[0]} already exists; change output.name or output.dir, or set "
                                  "output.overwrite = true")
        if self.resume_from is not None and not (self.resume_from / STATE_FILE).is_file():
            raise ConfigError(f"resume: {self.resume_from} is not a resumable state folder (no {STATE_FILE}); pass "
                              "a *-state folder written next to a save (output.save_state)")
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.stop.stop_file.unlink(missing_ok=True)
            toml_path = self.output_dir / f"{self.config.output.name}.toml"
            if toml_path.exists() and not self.config.output.overwrite:
                toml_path = unique_path(toml_path)
            write_text_atomic(toml_path, self.config.to_toml())

    @staticmethod
    def _state_dir(adapter_file: Path) -> Path:
        return adapter_file.with_name(adapter_file.stem + "-state")

    def _metadata(self) -> dict[str, Any]:
        config, scan = self.config, self.scan
        return {
            "ss_steps": self.progress.step, "ss_epoch": self.progress.epoch, "ss_max_train_steps": self.total_steps,
            "ss_learning_rate": config.train.learning_rate, "ss_unet_lr": config.train.unet_lr or None,
            "ss_text_encoder_lr": config.train.text_encoder_lr or None, "ss_lr_scheduler": config.train.scheduler,
            "ss_lr_warmup_steps": config.train.warmup_steps, "ss_optimizer": config.train.optimizer,
            "ss_mixed_precision": config.train.mixed_precision, "ss_seed": config.train.seed,
            "ss_batch_size_per_device": config.train.batch_size,
            "ss_total_batch_size": config.train.batch_size * self.accelerator.num_processes
            * config.train.gradient_accumulation,
            "ss_gradient_accumulation_steps": config.train.gradient_accumulation,
            "ss_gradient_checkpointing": config.train.gradient_checkpointing,
            "ss_clip_skip": config.train.clip_skip, "ss_noise_offset": config.train.noise_offset,
            "ss_min_snr_gamma": config.train.min_snr_gamma or None,
            "ss_num_train_images": scan.num_train_images, "ss_num_reg_images": scan.num_reg_images,
            "ss_num_batches_per_epoch": self.batches_per_epoch, "ss_cache_latents": self.latents_cached,
            "ss_shuffle_caption": config.dataset.shuffle_caption, "ss_keep_tokens": config.dataset.keep_tokens,
            "ss_caption_dropout_rate": config.dataset.caption_dropout, "ss_flip_aug": config.dataset.flip,
            "ss_enable_bucket": config.dataset.enable_buckets, "ss_min_bucket_reso": config.dataset.min_bucket_side,
            "ss_max_bucket_reso": config.dataset.max_bucket_side, "ss_sd_model_name": Path(config.model.base).name,
            "ss_tag_frequency": scan.tag_frequency, "ss_dataset_dirs": scan.dataset_dirs,
            "ss_reg_dataset_dirs": scan.reg_dataset_dirs or None,
            "ss_bucket_info": self.dataset.bucket_info(), "ss_training_finished_at": time.time(),
            "ss_ema_decay": config.train.ema_decay or None,
            "modelspec.trigger_phrase": config.dataset.trigger_word or None,
            "modelspec.author": config.output.author or None,
            "modelspec.description": config.output.description or None,
            "modelspec.encoder_layer": config.train.clip_skip if config.train.clip_skip > 1 else None,
        }

    def _save(self, final: bool) -> Path | None:
        """Write the adapter (and resumable state), then reload the file and compare it with the live weights."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.main:
            started = time.time()
            name = self.config.output.name
            step_file = self.output_dir / f"{name}-step{self.progress.step:06d}.safetensors"
            path = self.output_file if final else unique_path(step_file)
            with self._ema_weights():
                save_network(self.network, path, title=self.config.output.title or name,
                             dtype=self.config.output.save_dtype, prediction_type=self.prediction_type,
                             extra_metadata=self._metadata(), overwrite=final and self.config.output.overwrite)
                check = self._verify_file(path)
            state = None
            if self.config.output.save_state:
                state = self._state_dir(path)
                self._save_state(state)
                self.last_state = state
            self.saves.append(path)
            self.last_good_save = path
            self.events.emit("save", step=self.progress.step, path=str(path), final=final,
                             state=str(state) if state else None, size_bytes=path.stat().st_size,
                             seconds=round(time.time() - started, 3), ema=self.ema is not None, **check)
        self.saved_step = self.progress.step  # on every process: they must agree on whether to save again
        self.accelerator.wait_for_everyone()
        return path

    def _verify_file(self, path: Path) -> dict[str, Any]:
        """Reload a written file into fresh adapters and compare merged weights with the live network."""
        tensors, _ = load_adapter_file(path)
        parts, _ = pipeline_parts(self.pipe, self.arch)
        reloaded, unmatched = AdapterNetwork.from_state_dict(parts, self.arch, tensors, source=str(path))
        worst, worst_relative = 0.0, 0.0
        missing = [name for name in self.network.adapters if name not in reloaded.adapters]
        # One module at a time: all ΔW of a real model at once would be the size of the adapted weights (GBs).
        with torch.no_grad():
            for name, adapter in self.network.adapters.items():
                if name not in reloaded.adapters:
                    continue
                delta = adapter.merged_delta().float().cpu()
                again = reloaded.adapters[name].merged_delta().float().cpu()
                difference = float((delta - again).abs().max())
                scale = float(delta.abs().max()) or 1.0
                worst = max(worst, difference)
                worst_relative = max(worst_relative, difference / scale)
        tolerance = {"fp32": 1e-5, "bf16": 2e-2}.get(self.config.output.save_dtype, 2e-3)
        ok = not missing and not unmatched and worst_relative <= tolerance
        result = {"check_modules": len(reloaded.adapters), "check_missing": len(missing),
                  "check_unmatched": len(unmatched),
                  "check_max_difference": worst, "check_max_relative_difference": worst_relative,
                  "check_tolerance": tolerance, "check_ok": ok}
        if not ok:
            log.warning("self-check of %s failed: %s", path, result)
            self.events.emit("warning", message=f"self-check of {path.name} failed: {len(missing)} module(s) "
                             f"missing, {len(unmatched)} unmatched, max relative difference {worst_relative:.2e} "
                             f"(tolerance {tolerance:.0e})")
        return result

    def _save_state(self, folder: Path) -> None:
        """Adapter weights, optimizer, scheduler, EMA, scaler, RNG and the data position of the last optimizer step."""
        from safetensors.torch import save_file

        temporary = folder.with_name(folder.name + ".tmp")
        if temporary.exists():
            import shutil

            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
                  str(temporary / STATE_WEIGHTS))
        state = {
            "progress": dataclasses.asdict(self.boundary), "losses": self.losses[:self.boundary.step],
            "optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(), "ema": [t.cpu() for t in self.ema] if self.ema is not None else None,
            "config": self.config.to_dict(), "processes": self.accelerator.num_processes,
        }
        torch.save(state, temporary / STATE_FILE)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(temporary, folder)

    def _load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        saved = state.get("config", {})
        if saved.get("network") != self.config.to_dict()["network"]:
            raise ConfigError(f"resume: {folder} was trained with another [network] section "
                              f"({saved.get('network')}); resume with the same method, options and targets")
        lengths = ("max_steps", "epochs")  # continuing to a new length is what resuming is for
        changed = [f"{section}.{key}" for section in ("dataset", "train") for key, value in
                   self.config.to_dict()[section].items()
                   if saved.get(section, {}).get(key, value) != value and key not in lengths]
        if state.get("processes", 1) != self.accelerator.num_processes:
            changed.append(f"processes ({state.get('processes')} → {self.accelerator.num_processes})")
        if changed:
            self.events.emit("warning", message=f"resuming with changed settings: {', '.join(changed)}; the run "
                             "will not match an uninterrupted one exactly")
        weights = load_file(str(folder / STATE_WEIGHTS), device=str(self.accelerator.device))
        try:
            self.network.load_state_dict(weights)
        except RuntimeError as error:
            raise ConfigError(f"resume: {folder} does not fit this network ({str(error).splitlines()[0]})") from error
        self.progress = Progress(**state["progress"])
        self.boundary = dataclasses.replace(self.progress)
        self.losses = list(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if state.get("ema") is not None and self.ema is not None:
            self.ema = [t.to(self.accelerator.device) for t in state["ema"]]
        set_rng_state(state["rng"])
        self.events.emit("resumed", step=self.progress.step, epoch=self.progress.epoch,
                         batch_in_epoch=self.progress.batch_in_epoch, path=str(folder))

    def _ema_weights(self):
        """Context: swap the EMA weights in (for saves and previews) and the live ones back afterwards."""
        trainer = self

        class Swap:
            def __enter__(self):
                if trainer.ema is not None:
                    self.live = [p.detach().clone() for p in trainer.network.parameters()]
                    with torch.no_grad():
                        for param, shadow in zip(trainer.network.parameters(), trainer.ema):
                            param.copy_(shadow)

            def __exit__(self, *exc):
                if trainer.ema is not None:
                    with torch.no_grad():
                        for param, live in zip(trainer.network.parameters(), self.live):
                            param.copy_(live)

        return Swap()

    def _finish(self) -> TrainResult:
        stopped = self.stop.requested() and self.progress.step < self.total_steps
        if stopped:
            self.events.emit("stopping", step=self.progress.step, reason=self.stop.reason)
            if self.saved_step == self.progress.step:  # e.g. save_every_n_steps saved this very step
                path = self.saves[-1] if self.saves else None
            else:
                path = self._save(final=False)
        else:
            if self.config.train.validation_every_n_steps:
                self._validate()
            if self.config.sample.prompts:
                self._sample()
            path = self._save(final=True)
        self.events.emit("done", step=self.progress.step, output=str(path) if path else None, stopped=stopped,
                         reason=self.stop.reason if stopped else "", state=str(self.last_state) if self.last_state
                         else None, peak_mb=round(peak_memory_mb(self.accelerator.device), 1),
                         seconds_to_ready=round(self.timings.get("ready", 0.0), 2),
                         seconds_to_first_step=round(self.timings.get("first_step", 0.0), 2))
        return TrainResult(path, self.progress.step, self.losses, self.saves, stopped,
                           self.stop.reason if stopped else "", self.last_state)

    # ================================================================================================ plumbing
    def _progress_bar(self, total: int | None = None, initial: int = 0, desc: str = ""):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.main, dynamic_ncols=True)

    def _install_signal_handlers(self):
        """SIGINT/SIGTERM ask for a stop with a save; a second SIGINT interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self.stop.requested() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop.request(f"signal {signal.Signals(signum).name}")
            log.warning("%s: stopping after the current step (with a save)", signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

        def restore():
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore


# ==================================================================================================== helpers
def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_vae(source: str, current: Any):
    """A replacement VAE from a diffusers folder (with or without a ``vae`` sub-folder) or a single file."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return AutoencoderKL.from_pretrained(str(folder))
    if path.is_file():
        import tempfile

        with tempfile.TemporaryDirectory() as config_dir:
            current.save_config(config_dir)
            return AutoencoderKL.from_single_file(str(path), config=config_dir)
    raise ConfigError(f"model.vae = {source!r}: no such file or folder")


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


def unique_path(path: Path) -> Path:
    """``path`` or, if taken, ``stem-1``, ``stem-2``… — outputs never overwrite a user's file silently."""
    candidate, index = path, 1
    while candidate.exists() or candidate.with_name(candidate.stem + "-state").exists():
        candidate = path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1
    return candidate


def write_text_atomic(path: Path, text: str) -> None:
    from methods.files import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["STATE_FILE", "Progress", "TrainResult", "Trainer", "TrainingError", "stable_seed", "train"]
