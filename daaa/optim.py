"""Optimisers and learning-rate schedules (Adam for digits; SGD with the JAN / tllib schedule for Office-31).

The learning rate is a pure function of the step counted since the last restart, so a resumed run and an
uninterrupted one follow the same schedule without saving scheduler state, and restarting it at an M_post sync
(Sec. 3.3, modification C) is one subtraction.
"""

from __future__ import annotations

import torch
import torch.nn as nn

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
