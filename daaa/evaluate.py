"""Evaluation: top-1 accuracy, per-class accuracy and the confusion matrix (sharded over DDP ranks, then summed)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import DataConfig
from .data.domain import ImageTensors
from .data.transforms import prepare
from .distributed import Context


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, data_cfg: DataConfig, ctx: Context,
            batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) of uint8 ``images`` on this process (no sharding), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = prepare(images[i:i + batch_size], data_cfg, train=False, device=ctx.device, channels_last=ctx.channels_last)
        with ctx.autocast():
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, data_cfg: DataConfig, ctx: Context,
             batch_size: int = 512) -> dict[str, Any]:
    if data.labels is None:
        raise ValueError(f"domain {data.name} has no labels to evaluate against")
    num_classes = len(data.classes) if data.classes else int(data.labels.max()) + 1
    shard = torch.arange(ctx.rank, len(data), ctx.world_size)
    logits = predict(model, data.images[shard], data_cfg, ctx, batch_size)
    pred = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((data.labels[shard], pred), torch.ones_like(pred), accumulate=True)
    confusion = ctx.all_reduce_sum(confusion).cpu()
    return metrics_from_confusion(confusion, data.classes)


def metrics_from_confusion(confusion: torch.Tensor, classes: list[str] | None) -> dict[str, Any]:
    """Rows are true classes, columns predictions."""
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    support = confusion.sum(dim=1)
    names = classes or [str(i) for i in range(confusion.shape[0])]
    per_class = {n: (float(confusion[i, i]) / int(support[i]) if support[i] else None) for i, n in enumerate(names)}
    return {
        "accuracy": correct / total if total else 0.0,
        "num_samples": total,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": names,
    }


def format_report(metrics: dict[str, Any], title: str = "") -> str:
    """Text form of :func:`evaluate`'s result: accuracy, per-class accuracy, confusion matrix."""
    names = metrics["classes"]
    lines = [f"{title}top-1 accuracy: {metrics['accuracy'] * 100:.2f}% ({metrics['num_samples']} images)", "",
             "per-class accuracy:"]
    for n in names:
        v = metrics["per_class_accuracy"][n]
        lines.append(f"  {n:>20s}  {'-' if v is None else f'{v * 100:6.2f}%'}")
    width = max(5, max(len(str(v)) for row in metrics["confusion_matrix"] for v in row) + 1)
    short = [n[:width - 1] for n in names]
    lines += ["", "confusion matrix (rows: true, columns: predicted):",
              " " * 21 + "".join(f"{s:>{width}}" for s in short)]
    for n, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"  {n[:18]:>18s} " + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
