"""Optimizers and learning-rate schedules by name, with per-part learning rates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from methods.base import ConfigError

from .config import TrainSection

# Our names → diffusers' (every schedule has a warmup; diffusers' "constant" has none).
SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine",
                   "cosine_with_restarts": "cosine_with_restarts"}


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                exp_avg = state["exp_avg"]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(param.grad, alpha=1 - beta1).sign_()
                param.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(param.grad, alpha=1 - beta2)
        return loss


def _require(module: str, package: str, optimizer: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        message = f"train.optimizer = {optimizer!r} needs the {package} package: pip install {package}"
        raise ConfigError(message) from None


def build_optimizer(train: TrainSection, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``groups``: [{"params": [...], "lr": x, "name": "unet"}, ...]."""
    name = train.optimizer.lower()
    args = dict(train.optimizer_args)
    decay = train.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=decay, **args)
    if name == "adamw8bit":
        bnb = _require("bitsandbytes", "bitsandbytes", name)
        return bnb.optim.AdamW8bit(groups, lr=train.learning_rate, weight_decay=decay, **args)
    if name == "prodigy":
        prodigy = _require("prodigyopt", "prodigyopt", name)
        return prodigy.Prodigy(groups, lr=train.learning_rate, weight_decay=decay, **args)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        args.setdefault("scale_parameter", False)
        args.setdefault("relative_step", False)
        args.setdefault("warmup_init", False)
        return Adafactor(groups, lr=train.learning_rate, weight_decay=decay, **args)
    if name == "lion":
        return Lion(groups, lr=train.learning_rate, weight_decay=decay, **args)
    if name == "sgd":
        args.setdefault("momentum", 0.9)
        return torch.optim.SGD(groups, lr=train.learning_rate, weight_decay=decay, **args)
    raise ConfigError(f"train.optimizer = {train.optimizer!r} is not supported")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int) -> LambdaLR:
    """diffusers' learning-rate schedule of ``train.scheduler``, with our warmup.

    Our warmup ramps (step + 1)/(warmup + 1), so the first step never has a zero learning rate (diffusers' ramp
    step/warmup starts at 0), and ``constant`` warms up too. That is diffusers' schedule for ``warmup + 1`` and
    ``total + 1`` steps read one step ahead — what the scheduler is built as (``last_epoch=0`` starts it at step
    1). After the warmup the values are diffusers' own: linear (total − step)/(total − warmup), half a cosine,
    ``scheduler_cycles`` hard restarts, or (1 − progress)^power.
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    warmup = max(0, train.warmup_steps) + 1
    total = max(total_steps, warmup) + 1  # a run that is all warmup: diffusers' polynomial divides by total − warmup
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    if train.scheduler == "polynomial":
        # get_scheduler fixes lr_end at 1e-7, an absolute floor that would stop the decay short of 0 (and refuse
        # learning rates at or below it); lr_end=0 is the decay to zero this option always meant.
        return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, lr_end=0.0,
                                                         power=train.scheduler_power, last_epoch=0)
    if train.scheduler not in SCHEDULER_NAMES:
        raise ConfigError(f"train.scheduler = {train.scheduler!r} is not supported")
    return get_scheduler(SCHEDULER_NAMES[train.scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total, num_cycles=max(1, train.scheduler_cycles), last_epoch=0)


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``values`` (fp32) rounded to ``dtype`` up or down at random, in proportion to the distance to each neighbour,
    so the rounding is unbiased: E[round(x)] = x. Updates smaller than half a step of ``dtype`` (common for a small
    learning rate on bf16 weights, whose step is 2⁻⁸ of the value) then still move the weights on average, where
    round-to-nearest would drop every one of them."""
    nearest = values.to(dtype)
    back = nearest.float()
    toward = torch.where(back > values, torch.full_like(back, -math.inf), torch.full_like(back, math.inf))
    other = torch.nextafter(nearest, toward.to(dtype))
    span = other.float() - back
    chance = torch.where(span != 0, (values - back) / span, torch.zeros_like(span)).clamp(0, 1)
    draws = torch.rand(values.shape, generator=generator, device=generator.device).to(values.device)
    return torch.where(draws < chance, other, nearest)


class HalfPrecisionWeights:
    """sd-scripts' ``full_fp16``/``full_bf16``: the adapter weights (and so their gradients) live in half precision;
    each optimizer step works on fp32 values and fp32 gradients, which also keeps the optimizer state fp32 and lets
    the fp16 gradient scaler unscale (it refuses fp16 gradients). How the step's result returns to half precision is
    ``train.half_precision_update``:

    - ``stochastic_rounding`` (default): rounded at random, unbiased (:func:`stochastic_round`); the draws are keyed by
      (seed, step, parameter), so every process and a resumed run round alike;
    - ``fp32_master``: an fp32 master copy of each weight is kept and stepped; the half weights are its rounding
      (classic mixed-precision training; costs the fp32 copy, saved in resumable state);
    - ``plain``: rounded to nearest, as sd-scripts does (small updates on bf16 weights are lost).
    """

    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype, mode: str, seed: int):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"full_fp16/full_bf16 need mixed precision fp16/bf16, not {dtype}")
        self.params, self.dtype, self.mode, self.seed = params, dtype, mode, seed
        self.masters = [p.detach().float().clone() for p in params] if mode == "fp32_master" else None
        for param in params:
            param.data = param.data.to(dtype)

    def before_step(self) -> None:
        """Hand the optimizer fp32 values (the masters, or the half weights upcast) and fp32 gradients."""
        for index, param in enumerate(self.params):
            param.data = self.masters[index] if self.masters is not None else param.data.float()
            if param.grad is not None:
                param.grad = param.grad.float()

    def after_step(self, step: int) -> None:
        """Back to half precision after the step (and any max-norm scaling) of optimizer step ``step``."""
        from .objective import stable_seed

        for index, param in enumerate(self.params):
            values = param.data
            if self.mode == "stochastic_rounding":
                generator = torch.Generator(device=values.device).manual_seed(stable_seed("round", self.seed, step,
                                                                                          index))
                param.data = stochastic_round(values, self.dtype, generator)
            else:
                param.data = values.to(self.dtype)  # a master stays the fp32 tensor the optimizer stepped
            if param.grad is not None:
                param.grad = None

    @contextlib.contextmanager
    def fp32_values(self):
        """The parameters as fp32 for a moment (loading the optimizer state, which torch casts to their dtype, so it
        stays fp32), then exactly the half values they had."""
        held = [param.data for param in self.params]
        for index, param in enumerate(self.params):
            param.data = self.masters[index] if self.masters is not None else param.data.float()
        try:
            yield
        finally:
            for param, data in zip(self.params, held):
                param.data = data

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.cpu() for m in self.masters] if self.masters is not None else None}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if self.masters is not None and state.get("masters") is not None:
            self.masters = [m.to(device) for m in state["masters"]]
