"""The training engine: scan data → load → prepare → loop → save, under Accelerate.

``train(config, on_event=...)`` is the public entry point used by the CLI and the web UI. Everything the run
decides (paths, counts, memory, losses, previews, saves, errors) is emitted as events (:mod:`trainer.events`).

:class:`Trainer` reads top to bottom: :meth:`Trainer._prepare_data` scans the images, :meth:`Trainer._load`
returns the frozen :class:`Models`, :meth:`Trainer._prepare` returns the :class:`RunState` (adapters, optimizer,
schedule, EMA, data order, caches, progress), :meth:`Trainer._loop` trains it and :meth:`Trainer._finish` saves.
What the model predicts and how the loss is weighed is the objective's (:mod:`trainer.objective`); what a save
writes, and where it goes when the disk refuses, is :mod:`trainer.saving`'s; what the run measures about
forgetting (the prior loss ratio, ``checkpoints.json``, the best pick) is :class:`trainer.prior.ForgettingWatch`'s;
the compiled step is :mod:`trainer.compiling`'s. A stop (signal, ``STOP`` file, ``stop.request()``) is honoured
in every phase: while scanning, loading or caching the run ends unsaved.

Library parts: Accelerate owns devices, processes and mixed precision (``accelerator.autocast``, ``backward``,
``clip_grad_norm_`` and the prepared optimizer's fp16 gradient scaling), diffusers the learning-rate schedules
(:func:`trainer.optim.build_scheduler`) and the EMA (``diffusers.training_utils.EMAModel``; its first update copies
the weights, afterwards the decay is ``train.ema_decay``).

Determinism (what makes resuming exact and a multi-process run equal to a single-process one with the same
global batch): batch order comes from the bucket sampler (seeded by (seed, epoch)); the noise and timestep of
each sample from a generator keyed by (seed, epoch, global batch index, position in the batch) — see
:func:`trainer.objective.noise_keys`. Resumable state is taken at optimizer-step boundaries: adapter weights,
optimizer, scheduler, EMA, gradient scaler, RNG states and the data position of that boundary.

Processes: adapters live in forward hooks, so they are not DDP-wrapped; gradients are all-reduced by hand before
each optimizer step, stop requests are agreed on by all processes, and only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from methods.arch import UNET_PREFIX, denoiser_prefixes, part_prefix
from methods.base import ConfigError
from methods.blocks import lr_weights, module_configurator, unet_block_groups
from methods.embeddings import METADATA_WORD, TriggerEmbeddings, embeddings_for_adapter
from methods.files import load_adapter_file
from methods.network import AdapterNetwork, pipeline_parts
from methods.registry import get_method

from . import events as ev
from .backbone import Models, load_models, load_vae
from .checkpoint import (
    STATE_FILE,
    SaveFailure,
    check_output_folder,
    keep_finished_run,
    load_resume_state,
    read_resume_state,
    run_metadata,
    state_dir,
    unique_path,
    write_text_atomic,
)
from .compiling import StepCompiler, batch_shape, eager_calls
from .config import TrainerConfig
from .events import EventCallback, EventLog, StopRequested, StopSignal, TrainingError, log
from .objective import noise_keys, stable_seed
from .preservation import OutputPreservation
from .prior import ForgettingWatch
from .saving import Saver, ema_weights, prepare_output_folder

NORM_EVERY = 10  # adapter-norm scalars for TensorBoard every N steps (a pass over every adapter parameter)
MEMORY_EVERY = 50  # "memory" events every N steps (and at step 1)


@dataclasses.dataclass
class TrainResult:
    output_file: Path | None
    steps: int
    losses: list[float]
    saves: list[Path]
    stopped_early: bool = False
    reason: str = ""
    state_dir: Path | None = None  # resumable state of the last save (output.save_state)
    prior_stop: bool = False  # stopped by train.prior_stop_ratio (the run's own rule, not a stop request)
    best_checkpoint: Path | None = None  # checkpoints.json's pick


@dataclasses.dataclass
class Progress:
    """Where the run is; saved in resumable state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch this process consumed (for exact resume)
    micro_step: int = 0  # batches consumed in all (forward/backward passes)


@dataclasses.dataclass
class TrainingData:
    dataset: Any  # trainer.dataset.ImageDataset
    validation: Any | None  # held-out images (dataset.validation_split), or None
    scan: Any  # trainer.dataset.DatasetScan: what was found and skipped
    prior: Any | None = None  # the prior set of train.prior_every_n_steps (trainer.prior.prior_dataset)
    preservation: OutputPreservation | None = None  # train.output_preservation_weight's term of the loss


@dataclasses.dataclass
class RunState:
    """Everything :meth:`Trainer._prepare` builds for the loop; what changes while training is in here."""

    network: AdapterNetwork
    optimizer: Any  # accelerate's AcceleratedOptimizer around trainer.optim.build_optimizer's
    lr_scheduler: Any
    ema: Any | None  # diffusers.training_utils.EMAModel of the adapter weights
    sampler: Any  # trainer.dataset.BucketBatchSampler
    loader: Any  # the accelerate-prepared DataLoader
    batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    train_text_encoder: bool
    latents_cached: bool
    text_cache: Any | None  # trainer.cache.TextEmbeddingCache while the text encoders are frozen
    progress: Progress = dataclasses.field(default_factory=Progress)
    boundary: Progress = dataclasses.field(default_factory=Progress)  # at the last optimizer step (what state saves)
    losses: list[float] = dataclasses.field(default_factory=list)
    started_at: float = 0.0  # when training began (a resumed run keeps its first start)
    half_precision: Any | None = None  # trainer.optim.HalfPrecisionWeights under train.full_fp16/full_bf16
    norm_caps: tuple[int, float, float] | None = None  # the last step's network.cap_norms (scale_weight_norms)
    compiler: Any | None = None  # trainer.compiling.StepCompiler under train.compile


def train(config: TrainerConfig, on_event: EventCallback | None = None, stop: StopSignal | None = None,
          resume: str | Path | None = None,
          on_save_error: Callable[[SaveFailure], str | Path | None] | None = None) -> TrainResult:
    """Train an adapter as configured; ``stop.request()`` from another thread ends it with a save.

    ``on_save_error(failure)`` is asked when the file system refuses the final save (full, read-only): it returns
    the path to try next — the same one to retry once space is freed, or another — or None for the default
    rescue folders (:func:`trainer.checkpoint.rescue_paths`). Meanwhile the trained weights stay in memory.
    """
    return Trainer(config, on_event=on_event, stop=stop, resume=resume, on_save_error=on_save_error).run()


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


class Trainer:
    def __init__(self, config: TrainerConfig, on_event: EventCallback | None = None,
                 stop: StopSignal | None = None, resume: str | Path | None = None,
                 on_save_error: Callable[[SaveFailure], str | Path | None] | None = None):
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
        self.extending = False  # resuming the finished run of this very folder (see check_output_folder)
        self.saver = Saver(config, self.output_file, self.events, self.accelerator, on_save_error)
        self.timings: dict[str, float] = {}
        self.forgetting = ForgettingWatch(config, self.events, self.accelerator, self.stop, resuming=resume is not None)
        # Filled by run(), in this order; kept afterwards for callers that inspect a finished run.
        self.data: TrainingData | None = None
        self.models: Models | None = None
        self.state: RunState | None = None

    # ================================================================================================ run
    def run(self) -> TrainResult:
        started = time.time()
        restore_signals = install_signal_handlers(self.stop)
        try:
            self.extending = check_output_folder(self.output_file, self.config.output.overwrite,
                                                 self.config.output.save_state, self.resume_from)
            removed = prepare_output_folder(self.config, self.stop.stop_file) if self.main else []
            output = self.config.output
            if output.wandb_project:
                self.events.add_wandb(output.wandb_project, output.wandb_run_name or output.name,
                                      self.config.to_dict(), self.output_dir)
            self.events.emit(ev.Start(config=self.config.to_dict(), processes=self.accelerator.num_processes,
                                      resume=str(self.resume_from) if self.resume_from else None))
            if removed:
                self.events.emit(ev.RunWarning(message=f"removed {len(removed)} temporary file(s) an interrupted save "
                                               f"left behind: {', '.join(p.name for p in removed[:5])}"))
            self.data = self._prepare_data()  # first: a dataset problem is reported before minutes of model loading
            self._check_stop("before loading the model")
            self.models = self._load()
            self._check_stop("after loading the model")
            self.state = state = self._prepare(self.data, self.models)
            self._check_stop("before the first step")
            self.timings["ready"] = time.time() - started
            self.events.emit(ready_event(self.config, self.accelerator, self.data, state, self.timings["ready"]))
            state.started_at = state.started_at or time.time()
            self.saver.metadata = run_metadata(self.config, self.data, self.models, state,
                                               self.accelerator.num_processes, session_id=secrets.randbelow(2**32))
            self.forgetting.start(state.network, lambda batch, keys: self._training_loss(state, batch, keys),
                                  lambda: eager_calls(state.compiler), state.progress.step)
            self._loop(state)
            return self._finish(state)
        except StopRequested as stopped:
            return self._stopped_before_training(str(stopped))
        except Exception as error:
            self.events.emit(ev.RunError(message=str(error), kind=type(error).__name__,
                                         last_good_save=str(self.saver.record.last_good)
                                         if self.saver.record.last_good else None))
            raise
        finally:
            restore_signals()
            self.events.close()

    # ================================================================================================ data
    def _prepare_data(self) -> TrainingData:
        from .dataset import load_datasets

        config, accelerator = self.config, self.accelerator
        try:
            dataset, validation, scan = load_datasets(config.dataset, seed=config.train.seed,
                                                      should_stop=self.stop.requested)
        except ValueError as error:  # missing folder, no usable image: the message names the key
            raise ConfigError(str(error)) from error
        for path, reason in scan.skipped:
            self.events.emit(ev.SkippedImage(path=str(path), reason=reason))
        train = config.train
        needed = train.batch_size * accelerator.num_processes * train.gradient_accumulation
        samples = len(dataset)
        if samples < needed:
            raise ConfigError(
                f"the dataset gives {samples} sample(s) per epoch ({scan.num_train_images} image(s) × repeats"
                f"{f', {len(scan.reg_items)} regularisation image(s)' if scan.reg_items else ''}) but "
                f"one optimizer step needs train.batch_size {train.batch_size} × {accelerator.num_processes} "
                f"process(es) × train.gradient_accumulation {train.gradient_accumulation} = {needed}; add images "
                "or repeats (the N_ prefix of a folder name), or lower batch_size or gradient_accumulation")
        return TrainingData(dataset, validation, scan, preservation=OutputPreservation.for_run(config, scan.items))

    # ================================================================================================ load
    def _load(self) -> Models:
        self.events.emit(ev.Phase(phase="loading", detail=self.config.model.base))
        models = load_models(self.config, self.accelerator.device)
        self.events.emit(ev.Model(arch=models.arch, prediction_type=models.prediction_type,
                                  source=models.source_kind, base=self.config.model.base, variant=models.variant))
        if self.config.train.zero_terminal_snr and models.prediction_type != "v_prediction":
            self.events.emit(ev.RunWarning(message="train.zero_terminal_snr with an epsilon-prediction model: at the "
                                           "last timestep the input is pure noise and the target is that noise; "
                                           "zero terminal SNR is meant for v-prediction (sd-scripts warns too)"))
        return models

    # ================================================================================================ prepare
    def _prepare(self, data: TrainingData, models: Models) -> RunState:
        from diffusers.training_utils import EMAModel

        from .cache import TextEmbeddingCache, cache_latents
        from .dataset import BucketBatchSampler, make_dataloader
        from .optim import HalfPrecisionWeights, build_optimizer, build_scheduler

        config, accelerator = self.config, self.accelerator
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed % 2**32)

        # Before the adapters are attached: the prior images are the base model's own.
        data.prior = (self.forgetting.prior_set(models, data.scan.reg_items) if config.train.prior_every_n_steps
                      else None)
        network = self._build_network(models, data)
        # The text encoders run with gradients for their adapters, and for the trigger vectors before them.
        train_text_encoder = network.embeddings is not None or any(
            part_prefix(name) not in denoiser_prefixes() for name in network.adapters)
        if config.train.gradient_checkpointing:
            models.denoiser.enable_gradient_checkpointing()
            models.denoiser.train()  # diffusers only checkpoints in training mode (the denoiser has no dropout)
            if train_text_encoder:
                for encoder in models.text_encoders():
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    encoder.train()
        latents_cached = cache_latents(config, (data.dataset, data.validation, data.prior), models, accelerator,
                                       self.events.emit, self.stop.requested)
        text_cache = None
        if config.dataset.cache_text_encoder_outputs and not train_text_encoder:
            text_cache = TextEmbeddingCache(encoder_id=models.text_cache_id(config.model.base),
                                            clip_skip=config.train.clip_skip)
        elif config.dataset.cache_text_encoder_outputs and models.family:
            trained = "the trigger vectors are" if network.embeddings is not None else "text-encoder adapters are"
            self.events.emit(ev.RunWarning(message=f"text-encoder outputs are not cached: {trained} trained, so CLIP "
                                           "(and T5) run every step; set train.train_text_encoder = false and "
                                           "train.embedding_lr = 0 to cache them"))

        # Optimizer, data order and schedule. Only the optimizer is prepared: an accelerate-prepared scheduler
        # steps once per process, and the adapters live in hooks, not in a DDP-wrapped model.
        half_precision = None
        if config.train.full_fp16 or config.train.full_bf16:
            half_precision = HalfPrecisionWeights(list(network.parameters()), models.weight_dtype,
                                                  config.train.half_precision_update, config.train.seed)
        block_weights = lr_weights(config.network, models.arch) if config.network.down_lr_weight or \
            config.network.mid_lr_weight or config.network.up_lr_weight else None
        optimizer = build_optimizer(config.train, parameter_groups(network, config.train, block_weights))
        sampler = BucketBatchSampler(data.dataset, config.train.batch_size, seed=config.train.seed)
        loader = accelerator.prepare(make_dataloader(data.dataset, sampler, config.dataset.num_workers))
        # Whole rounds only: accelerate would pad the last round by repeating an epoch's first batches.
        batches_per_epoch = len(sampler) // accelerator.num_processes
        steps_per_epoch = max(1, batches_per_epoch // config.train.gradient_accumulation)
        total_steps = config.train.epochs * steps_per_epoch if config.train.epochs > 0 else config.train.max_steps
        lr_scheduler = build_scheduler(optimizer, config.train, total_steps)
        optimizer = accelerator.prepare(optimizer)
        ema = None
        if config.train.ema_decay:
            decay = config.train.ema_decay
            ema = EMAModel(network.parameters(), decay=decay, min_decay=decay, foreach=True)
        state = RunState(network, optimizer, lr_scheduler, ema, sampler, loader, batches_per_epoch, steps_per_epoch,
                         total_steps, train_text_encoder, latents_cached, text_cache, half_precision=half_precision,
                         compiler=self._compiler(data, models, train_text_encoder and text_cache is None))
        if self.resume_from:
            saved = read_resume_state(self.resume_from)
            changed = load_resume_state(self.resume_from, saved, state, accelerator.scaler, config,
                                        accelerator.num_processes, accelerator.device)
            state.started_at = float(saved.get("started_at") or 0.0)
            if changed:
                self.events.emit(ev.RunWarning(message=f"resuming with changed settings: {', '.join(changed)}; the "
                                               "run will not match an uninterrupted one exactly"))
            kept = self._extend_finished_run(state) if self.extending else None
            self.events.emit(ev.Resumed(step=state.progress.step, epoch=state.progress.epoch,
                                        batch_in_epoch=state.progress.batch_in_epoch, path=str(self.resume_from),
                                        kept=str(kept) if kept else None))
        return state

    def _compiler(self, data: TrainingData, models: Models, compile_encoders: bool) -> StepCompiler | None:
        compiled = {"denoiser": models.denoiser}
        if compile_encoders:
            compiled.update({f"text_encoder_{index}": encoder for index, encoder in enumerate(models.text_encoders())})
        return StepCompiler.for_run(self.config.train, self.accelerator.device,
                                    len(data.dataset.bucket_info()["buckets"]), compiled, self.events.emit)

    def _extend_finished_run(self, state: RunState) -> Path | None:
        """Resuming this folder's finished run: keep its final file under its step name, train on to a new one."""
        step = state.progress.step
        if step >= state.total_steps:
            raise ConfigError(f"resume: {self.resume_from} is already at step {step} of {state.total_steps}, so there "
                              "is nothing to train; raise train.max_steps (or train.epochs) to extend the run")
        self.accelerator.wait_for_everyone()  # every process has read the state before it moves
        kept = keep_finished_run(self.output_file, step) if self.main else None
        if kept is not None:
            self.forgetting.checkpoints.renamed(self.output_file, kept)
        self.resume_from = state_dir(kept) if kept is not None else self.resume_from
        return kept

    def _build_network(self, models: Models, data: TrainingData) -> AdapterNetwork:
        config = self.config
        parts, _ = pipeline_parts(models.pipe, models.arch)
        if config.network.dim_from_weights:
            network = network_from_weights(Path(config.network.init_from), parts, models.arch, config)
        else:
            configure = module_configurator(config.network, models.arch, config.method_config())
            network = AdapterNetwork.create(parts, models.arch, config.network.method, config.network.options,
                                            config.target_config(), module_config=configure)
        if not len(network):
            raise ConfigError(f"network.preset = {config.network.preset!r} with include/exclude "
                              f"{config.network.include}/{config.network.exclude} (and the per-block options) "
                              "selects no layer of this model")
        if config.network.init_from and not config.network.dim_from_weights:
            fresh = init_from_file(network, Path(config.network.init_from), models)
            if fresh:
                self.events.emit(ev.RunWarning(message=f"network.init_from: {len(fresh)} module(s) of this network "
                                               f"are not in the file and start fresh (first: {fresh[0]})"))
        network.embeddings = trigger_vectors(config, data, models)
        network.to(self.accelerator.device)
        network.attach()
        network.train()
        return network

    # ================================================================================================ loop
    def _loop(self, state: RunState) -> None:
        config, accelerator = self.config, self.accelerator
        processes, rank = accelerator.num_processes, accelerator.process_index
        accumulation = config.train.gradient_accumulation
        progress = state.progress
        from tqdm.auto import tqdm

        bar = tqdm(total=state.total_steps, initial=progress.step, desc="training", disable=not self.main,
                   dynamic_ncols=True)
        window_start, window_steps = time.time(), 0
        pending: list[torch.Tensor] = []  # micro-batch losses of the current optimizer step
        state.boundary = dataclasses.replace(progress)
        finished = progress.step >= state.total_steps or self._stop_agreed()
        while not finished:
            if progress.batch_in_epoch >= state.batches_per_epoch:
                self._end_of_epoch(state)
                continue
            # Batches are counted before sharding: each process consumed batch_in_epoch of its own.
            state.sampler.resume(progress.epoch, progress.batch_in_epoch * processes)
            state.loader.set_epoch(progress.epoch)
            for batch in state.loader:
                if progress.batch_in_epoch >= state.batches_per_epoch:
                    break  # accelerate's padding of the last round
                global_batch = progress.batch_in_epoch * processes + rank
                progress.batch_in_epoch += 1
                keys = noise_keys(config.train, batch["indices"], progress.epoch, global_batch)
                loss = self._forward_backward(state, batch, keys, accumulation)
                pending.append(loss.detach())
                progress.micro_step += 1
                if progress.micro_step % accumulation:
                    continue
                loss_value, grad_norm = self._optimizer_step(state, torch.stack(pending).mean())
                pending.clear()
                progress.step += 1
                state.boundary = dataclasses.replace(progress)
                self.timings.setdefault("first_step", time.time() - window_start)
                window_steps += 1
                state.losses.append(loss_value)
                elapsed = time.time() - window_start
                its = window_steps / elapsed if elapsed > 0 else 0.0
                remaining = (state.total_steps - progress.step) / its if its else None
                lr = state.lr_scheduler.get_last_lr()[0]
                self.events.emit(ev.Step(step=progress.step, total=state.total_steps, loss=loss_value, lr=lr,
                                         epoch=progress.epoch, grad_norm=grad_norm, its=round(its, 4),
                                         eta_seconds=round(remaining, 1) if remaining is not None else None))
                if self.events.has_tensorboard:
                    self.events.scalars(progress.step, step_scalars(state, loss_value, grad_norm))
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                **({"keys_scaled": state.norm_caps[0]} if state.norm_caps else {}))
                bar.update(1)
                self._periodic(state)
                if progress.step >= state.total_steps or self._stop_agreed():
                    finished = True
                    break
            else:
                self._end_of_epoch(state)
        bar.close()

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

    def _end_of_epoch(self, state: RunState) -> None:
        progress = state.progress
        progress.epoch += 1
        progress.batch_in_epoch = 0
        if progress.micro_step % self.config.train.gradient_accumulation == 0:
            state.boundary = dataclasses.replace(progress)
        every = self.config.output.save_every_n_epochs
        if every and progress.epoch % every == 0 and progress.step < state.total_steps:
            self._save(state, final=False, why="epoch")

    def _periodic(self, state: RunState) -> None:
        config, step = self.config, state.progress.step
        last = step >= state.total_steps
        if config.train.validation_every_n_steps and step % config.train.validation_every_n_steps == 0 and not last:
            self._validate(state)
        if config.train.prior_every_n_steps and step % config.train.prior_every_n_steps == 0 and not last:
            self.forgetting.check(step)
        if config.sample.every_n_steps and step % config.sample.every_n_steps == 0 and not last:
            self._sample(state)
        if config.output.save_every_n_steps and step % config.output.save_every_n_steps == 0 and not last:
            self._save(state, final=False, why="step")
        if step % MEMORY_EVERY == 0 or step == 1:
            self.events.emit(ev.Memory(step=step, peak_mb=round(peak_memory_mb(self.accelerator.device), 1)))

    def _optimizer_step(self, state: RunState, loss: torch.Tensor) -> tuple[float, float]:
        """All-reduce gradients (adapters are not DDP-wrapped: they live in hooks), clip, step, check for NaN."""
        accelerator = self.accelerator
        params = [p for p in state.network.parameters() if p.requires_grad]
        if accelerator.num_processes > 1:
            average_gradients(params, accelerator.num_processes)
        loss_value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(loss_value):
            self._diverged(state, f"the loss became {loss_value}")
        if state.half_precision is not None:  # full_fp16/bf16: fp32 values and gradients for clipping and the step
            state.half_precision.before_step()
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))  # unscales fp16 gradients first
        if not math.isfinite(grad_norm) and accelerator.scaler is None:  # fp16: the scaler skips the step
            self._diverged(state, f"the gradient norm became {grad_norm}")
        state.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            state.lr_scheduler.step()
        if self.config.network.scale_weight_norms:
            state.norm_caps = state.network.cap_norms(self.config.network.scale_weight_norms)
        if state.half_precision is not None:
            state.half_precision.after_step(state.progress.step)
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.step(state.network.parameters())
        return loss_value, grad_norm

    def _diverged(self, state: RunState, what: str) -> None:
        kept = (f"the last good save is {self.saver.record.last_good}" if self.saver.record.last_good
                else "nothing was saved yet (set output.save_every_n_steps to keep intermediate files)")
        raise TrainingError(f"{what} at step {state.progress.step + 1}; training stopped and {kept}. Lower "
                            "train.learning_rate, keep train.max_grad_norm > 0, or use bf16/no mixed precision.")

    # ================================================================================================ loss
    def _forward_backward(self, state: RunState, batch: dict[str, Any], keys: list[tuple],
                          accumulation: int) -> torch.Tensor:
        """One micro-batch's loss and its gradients; compiled under train.compile, with the fall-back to eager."""
        def loss() -> torch.Tensor:
            return self._training_loss(state, batch, keys, preserve=True)

        def backward(value: torch.Tensor) -> None:
            self.accelerator.backward(value / accumulation)

        if state.compiler is None:
            value = loss()
            backward(value)
            return value
        return state.compiler.forward_backward(batch_shape(batch), loss, backward, self.events.emit,
                                               state.progress.step + 1,
                                               lambda: state.optimizer.zero_grad(set_to_none=True))

    def _training_loss(self, state: RunState, batch: dict[str, Any], keys: list[tuple],
                       preserve: bool = False) -> torch.Tensor:
        """The batch's loss; with ``preserve`` (training steps, not the measures) plus the output-preservation term."""
        models = self.models
        noised = models.objective.noised(models.latents(batch), keys)

        def predict(captions: list[str]) -> torch.Tensor:
            conditioning = models.conditioning(captions, self.config.train.clip_skip, state.text_cache,
                                               state.train_text_encoder)
            return models.predict(noised, conditioning, batch, self.accelerator.autocast)

        loss = models.objective.loss(predict(batch["captions"]), noised, batch.get("masks"), batch["loss_weights"])
        if preserve and self.data.preservation is not None:
            held = self.data.preservation.loss(state.network, batch["captions"], batch["loss_weights"], predict)
            if held is not None:
                loss = loss + held
        return loss

    # ================================================================================================ checks
    @torch.no_grad()
    def _validate(self, state: RunState) -> None:
        """Loss on held-out images with fixed noise and timesteps, so values are comparable across steps."""
        from .dataset import collate_batch

        validation = self.data.validation
        if validation is None or not self.main:
            return
        state.network.eval()
        seed = self.config.train.seed
        with eager_calls(state.compiler):
            losses = [float(self._training_loss(state, collate_batch([validation[i]]), [("validation", seed, i)]))
                      for i in range(len(validation))]
        state.network.train()
        value = sum(losses) / len(losses)
        self.forgetting.checkpoints.measured(state.progress.step, validation_loss=value)
        self.events.emit(ev.Validation(step=state.progress.step, loss=value))
        self.events.scalars(state.progress.step, {"validation_loss": value})

    def _sample(self, state: RunState) -> None:
        if not self.main or not self.config.sample.prompts:
            self.accelerator.wait_for_everyone()
            return
        from .sampling import RenderStopped, on_denoising_step, preview_options, render_previews, save_previews

        sample = self.config.sample
        counter = ev.PhaseProgress(self.events.emit, "previews", len(sample.prompts) * sample.steps, "denoising steps",
                                   detail=f"step {state.progress.step}", should_stop=self.stop.requested,
                                   stopped=RenderStopped)
        try:
            with ema_weights(state), on_denoising_step(counter.advance), eager_calls(state.compiler):
                images = render_previews(self.models.pipe, sample.prompts, clip_skip=self.config.train.clip_skip,
                                         extra_modules=[state.network], **self.models.preview_options(),
                                         **preview_options(sample, self.config.dataset.resolution))
        except RenderStopped:  # the loop sees the stop next and ends the run with a save
            self.events.emit(ev.RunWarning(message=f"previews of step {state.progress.step} skipped: stop requested"))
            self.accelerator.wait_for_everyone()
            return
        paths = save_previews(images, self.output_dir / "samples", state.progress.step, sample.prompts)
        self.events.emit(ev.Preview(step=state.progress.step, paths=[str(p) for p in paths],
                                    prompts=list(sample.prompts)))
        self.accelerator.wait_for_everyone()

    # ================================================================================================ saving
    def _save(self, state: RunState, final: bool, last: bool = False, why: str = "") -> Path | None:
        """``why`` ("step"/"epoch") marks a periodic save, which output.save_last_n_steps/epochs may delete later."""
        self.accelerator.wait_for_everyone()
        if self.main:
            self.events.emit(ev.Phase(phase="saving", detail=f"step {state.progress.step}"))
            self.saver.metadata = self.forgetting.before_save(state.progress.step, lambda: self._validate(state),
                                                              self.saver.metadata)
        path = self.saver.save(state, self.models, final, last, why) if self.main else None
        if path is not None:
            self.forgetting.checkpoints.saved(state.progress.step, path)
        self.saver.record.step = state.progress.step  # on every process: they must agree on whether to save again
        self.accelerator.wait_for_everyone()
        return path

    def _check_stop(self, when: str) -> None:
        if self.stop.requested():
            raise StopRequested(f"stopped {when}")

    def _stopped_before_training(self, where: str) -> TrainResult:
        """A stop while scanning, loading or caching: nothing was trained since the start (or the resumed state),
        so nothing is saved; the events say where it stopped."""
        step = self.state.progress.step if self.state is not None else 0
        reason = self.stop.reason or "stop requested"
        self.events.emit(ev.Stopping(step=step, reason=f"{reason}; {where}, before any training step", saving=False))
        self.events.emit(ev.Done(step=step, output=None, stopped=True, reason=reason,
                                 peak_mb=round(peak_memory_mb(self.accelerator.device), 1)))
        return TrainResult(None, step, [], [], True, reason, None)

    def _finish(self, state: RunState) -> TrainResult:
        step = state.progress.step
        stopped = self.stop.requested() and step < state.total_steps
        if stopped:
            self.events.emit(ev.Stopping(step=step, reason=self.stop.reason))
            if self.saver.record.step == step:  # e.g. save_every_n_steps saved this very step
                path = self.saver.record.files[-1] if self.saver.record.files else None
            else:
                path = self._save(state, final=False, last=True)
        else:
            if self.config.train.validation_every_n_steps:
                self._validate(state)
            self.forgetting.check(step)
            if self.config.sample.prompts:
                self._sample(state)
            path = self._save(state, final=True)
        best = self.forgetting.report_best()
        last_state = self.saver.record.last_state
        self.events.emit(ev.Done(step=step, output=str(path) if path else None, stopped=stopped,
                                 reason=self.stop.reason if stopped else "",
                                 state=str(last_state) if last_state else None,
                                 peak_mb=round(peak_memory_mb(self.accelerator.device), 1),
                                 seconds_to_ready=round(self.timings.get("ready", 0.0), 2),
                                 seconds_to_first_step=round(self.timings.get("first_step", 0.0), 2),
                                 best_checkpoint=best))
        return TrainResult(path, step, state.losses, self.saver.record.files, stopped,
                           self.stop.reason if stopped else "", last_state,
                           prior_stop=stopped and self.forgetting.stopped_run,
                           best_checkpoint=Path(best) if best else None)


# ==================================================================================================== helpers
def ready_event(config: TrainerConfig, accelerator: Any, data: TrainingData, state: RunState,
                seconds: float) -> ev.Ready:
    """The event that says what the run will train and how (sent once, before the first step)."""
    return ev.Ready(
        seconds=round(seconds, 2), method=state.network.method, modules=state.network.counts(),
        trainable_parameters=state.network.trainable_parameter_count(),
        parameter_groups=[{"name": g["name"], "lr": g["lr"], "tensors": len(g["params"])}
                          for g in state.optimizer.param_groups],
        train_text_encoder=state.train_text_encoder, images=data.scan.num_train_images,
        samples_per_epoch=len(data.dataset), batches_per_epoch=state.batches_per_epoch,
        steps_per_epoch=state.steps_per_epoch, total_steps=state.total_steps,
        global_batch_size=config.train.batch_size * accelerator.num_processes * config.train.gradient_accumulation,
        latents_cached=state.latents_cached, text_embeddings_cached=state.text_cache is not None,
        buckets=data.dataset.bucket_info()["buckets"], skipped_images=len(data.scan.skipped),
        device=str(accelerator.device), processes=accelerator.num_processes, start_step=state.progress.step,
        preserved_words=data.preservation.words if data.preservation else [],
        trigger_vectors=state.network.embeddings.word if state.network.embeddings is not None else "")


def step_scalars(state: RunState, loss_value: float, grad_norm: float) -> dict[str, float]:
    """TensorBoard's values of one optimizer step (adapter norms every NORM_EVERY steps)."""
    step = state.progress.step
    values = {"loss": loss_value, "grad_norm": grad_norm}
    for group, lr in zip(state.optimizer.param_groups, state.lr_scheduler.get_last_lr()):
        values[f"lr/{group.get('name', 'group')}"] = lr
    if step % NORM_EVERY == 0 or step == 1 or step == state.total_steps:
        values.update(adapter_norms(state.network))
    if state.norm_caps is not None:  # sd-scripts' names for its max-norm report
        values.update(zip(("max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"),
                          state.norm_caps))
    return values


def average_gradients(params: list[torch.nn.Parameter], processes: int) -> None:
    """The mean of every process's gradients, in one all-reduce (missing gradients count as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= processes
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = flat[offset:offset + count].view_as(param).clone()
        offset += count


def parameter_groups(network: AdapterNetwork, train: Any,
                     block_weights: list[float] | None = None) -> list[dict[str, Any]]:
    """One optimizer group per model part, each with its learning rate (train.unet_lr — also the SD3/Flux
    transformer's —, text_encoder_lr, …; T5 takes text_encoder_lr); with kohya's per-block factors
    (``block_weights``, :func:`methods.blocks.lr_weights`) one UNet group per block, named ``lora_unet_block<N>``,
    at the UNet rate × the block's factor."""
    rates = {"lora_unet": train.unet_lr or train.learning_rate,
             "lycoris": train.unet_lr or train.learning_rate,
             "lora_te": train.text_encoder_lr or train.learning_rate,
             "lora_te1": train.text_encoder_lr or train.learning_rate,
             "lora_te2": train.text_encoder_2_lr or train.text_encoder_lr or train.learning_rate,
             "lora_te3": train.text_encoder_lr or train.learning_rate}
    groups = []
    for prefix, params in network.parameter_groups().items():
        if not params:
            continue
        if prefix != UNET_PREFIX or block_weights is None:
            groups.append({"params": params, "lr": rates[prefix], "name": prefix})
            continue
        for index, block_params in unet_block_groups(network.adapters, network.arch).items():
            inside = index >= 0
            groups.append({"params": block_params, "lr": rates[prefix] * (block_weights[index] if inside else 1.0),
                           "name": f"{prefix}_block{index}" if inside else prefix})
    if network.embeddings is not None:  # last: the first group's rate is the one logged; no decay, as in TI
        groups.append({"params": list(network.embeddings.parameters()), "lr": train.embedding_lr,
                       "weight_decay": 0.0, "name": "embeddings"})
    return groups


def trigger_vectors(config: TrainerConfig, data: TrainingData, models: Models) -> TriggerEmbeddings | None:
    """The trigger word's vectors of pivotal tuning (None when train.embedding_lr is 0): train.embedding_word, else
    the run's one trigger word; they start from network.init_from's embedding file when it has one for the word."""
    from .prior import trigger_words

    train = config.train
    if train.embedding_lr <= 0:
        return None
    words = [train.embedding_word.strip()] if train.embedding_word.strip() else trigger_words(
        config.dataset, [item for item in data.scan.items if not item.is_reg])
    if len(words) != 1:
        found = f"found {', '.join(words)}" if words else "none was found (no dataset.trigger_word, no folder word " \
            "such as 10_zq used in the captions, no captions)"
        raise ConfigError(f"train.embedding_lr trains the vectors of one trigger word and {found}: set "
                          "train.embedding_word (or dataset.trigger_word), or train.embedding_lr = 0")
    if config.network.init_from:  # read (and checked) by _build_network already: its header is enough here
        with safe_open(config.network.init_from, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get(METADATA_WORD) == words[0]:
            return embeddings_for_adapter(models.pipe, models.arch, config.network.init_from, metadata)
    return TriggerEmbeddings.for_word(models.pipe, models.arch, words[0])


def init_from_file(network: AdapterNetwork, path: Path, models: Models) -> list[str]:
    """Start the adapters from an existing file (``network.init_from``, sd-scripts' ``network_weights``): every
    module of the file must fit one of this network's, with the same shapes and scale (else a ConfigError that
    points to ``network.dim_from_weights``); modules of the network that the file lacks start fresh, as in
    sd-scripts. Returns those."""
    where = f"network.init_from = {str(path)!r}"
    loaded, unmatched = _read_adapter_file(path, models.arch, pipeline_parts(models.pipe, models.arch)[0])
    foreign = unmatched + [name for name in loaded.adapters if name not in network.adapters]
    if foreign:
        raise ConfigError(f"{where} has {len(foreign)} module(s) this network does not train (first: {foreign[0]}); "
                          "use the same targets and base model, or set network.dim_from_weights = true to train "
                          "exactly the file's modules")
    fresh = [name for name in network.adapters if name not in loaded.adapters]
    with torch.no_grad():
        for name, source in loaded.adapters.items():
            adapter = network.adapters[name]
            own = adapter.state_dict()
            try:
                adapter.load_state_dict({k: v.to(own[k]) for k, v in source.state_dict().items()})
            except (RuntimeError, KeyError) as error:
                raise ConfigError(f"{where}: module {name} does not fit ({str(error).splitlines()[0]}); another "
                                  "method, rank or layout — set network.dim_from_weights = true to take them from "
                                  "the file") from error
            expected = source.merged_delta().float()
            got = adapter.merged_delta().float().to(expected.device)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max() or 1.0)):
                # e.g. another alpha, or an SD3/Flux diffusers-layout LoRA (alpha/rank folded into its factors)
                raise ConfigError(f"{where}: module {name} loads with another scale (alpha/rank) than the file's; "
                                  "set network.alpha as in the file (a diffusers-layout SD3/Flux LoRA holds alpha = "
                                  "rank), or network.dim_from_weights = true")
    return fresh


def network_from_weights(path: Path, parts: list, arch: str, config: TrainerConfig) -> AdapterNetwork:
    """sd-scripts' ``dim_from_weights``: the network is the file's — its modules, method, ranks, alphas and
    weights; the [network] dropouts apply to it. The method must be the configured one."""
    loaded, unmatched = _read_adapter_file(path, arch, parts)
    where = f"network.init_from = {str(path)!r}"
    if unmatched:
        raise ConfigError(f"{where}: {len(unmatched)} module(s) match no layer of this model (first: "
                          f"{unmatched[0]}); is it an adapter for another base model?")
    user = config.method_config()
    if loaded.method != get_method(config.network.method).method:
        raise ConfigError(f"{where} is a {loaded.method} file and network.method is {config.network.method!r}; "
                          "set network.method to the file's method to continue it")
    dropouts = {f.name: getattr(user, f.name) for f in dataclasses.fields(user) if f.name.endswith("dropout")}
    for adapter in loaded:
        adapter.config = dataclasses.replace(adapter.config, **{k: v for k, v in dropouts.items()
                                                                 if hasattr(adapter.config, k)})
        for param in adapter.parameters():
            param.requires_grad_(True)
    loaded.config = next(iter(loaded)).config if len(loaded) else user  # what ss_network_dim/alpha/args report
    return loaded


def _read_adapter_file(path: Path, arch: str, parts: list) -> tuple[AdapterNetwork, list[str]]:
    try:
        tensors, _ = load_adapter_file(path)
        return AdapterNetwork.from_state_dict(parts, arch, tensors, source=str(path))
    except (ValueError, OSError) as error:  # AdapterFileError is a ValueError
        raise ConfigError(f"network.init_from = {str(path)!r}: {error}") from error


def adapter_norms(network: AdapterNetwork) -> dict[str, float]:
    with torch.no_grad():
        params = [p.detach() for p in network.parameters()]
        if not params:
            return {}
        norms = torch.stack(torch._foreach_norm(params)).float()
    return {"adapter_norm/mean": float(norms.mean()), "adapter_norm/max": float(norms.max())}


def install_signal_handlers(stop: StopSignal):
    """SIGINT/SIGTERM ask for a stop with a save; a second SIGINT interrupts at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, frame):
        if stop.requested() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(f"signal {signal.Signals(signum).name}")
        log.warning("%s: stopping after the current step (with a save)", signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


__all__ = ["STATE_FILE", "Models", "Progress", "RunState", "TrainResult", "Trainer", "TrainingData", "TrainingError",
           "load_vae", "stable_seed", "train", "unique_path", "write_text_atomic"]
