"""Optimizers and learning-rate schedules by name, with per-part learning rates."""

from __future__ import annotations

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
