"""Optimizers and learning-rate schedules by name, with per-part learning rates."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from methods.base import ConfigError

from .config import TrainSection


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


def lr_lambda(train: TrainSection, total_steps: int):
    """Multiplier of the base learning rate at a step: warmup, then the chosen decay."""
    warmup = max(0, train.warmup_steps)
    schedule = train.scheduler
    cycles = max(1, train.scheduler_cycles)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        if schedule == "polynomial":
            return max(0.0, (1.0 - progress)) ** train.scheduler_power
        raise ConfigError(f"train.scheduler = {schedule!r} is not supported")

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(train, total_steps))
