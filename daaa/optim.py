"""Optimisers, learning-rate schedules (Adam for digits; SGD with the JAN / tllib schedule for Office-31) and the
optional moving average of the weights.

The learning rate is a pure function of the step counted since the last restart, so a resumed run and an
uninterrupted one follow the same schedule without saving scheduler state, and restarting it at an M_post sync
(Sec. 3.3, modification C) is one subtraction.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": model.backbone_parameters(), "base_lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": model.head_parameters(), "base_lr": cfg.lr},
    ]
    for g in groups:
        g["lr"] = g["base_lr"]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(cfg: OptimConfig, steps_since_restart: int) -> float:
    """``constant``: 1; ``inv``: (1 + gamma * t) ** -decay, the schedule of JAN and tllib."""
    if cfg.schedule == "constant":
        return 1.0
    return (1.0 + cfg.lr_gamma * steps_since_restart) ** (-cfg.lr_decay)


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_since_restart: int) -> float:
    factor = lr_factor(cfg, steps_since_restart)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[-1]["lr"]


def weight_average(net: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``net``'s weights and buffers, theta_ema <- decay theta_ema + (1 - decay)
    theta after every update (``optim.ema_decay``; None at 0). Not part of the paper: a small budget's last step
    lands anywhere in the swing of the last few hundred steps (1-3 points of target accuracy between evaluations
    200 steps apart on the digit pairs), and the average is what such a run should ship. The trainers evaluate and
    save the average; training, M_post and the attention maps keep using the trained weights.

    ``update_parameters(net)`` after each optimiser step (the first call copies the weights); ``.module`` is the
    averaged network. torch's :class:`~torch.optim.swa_utils.AveragedModel`, so its state dict is the usual one."""
    if decay <= 0:
        return None
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
