"""Evaluation: top-1, mean per-class and per-class accuracy and the confusion matrix (sharded over DDP ranks, then
summed); and what the figures of a run folder show of its saved networks (:func:`load_network`,
:func:`confusion_matrix`, :func:`attention_maps_of`): :mod:`daaa.figures` only draws."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .config import Config, DataConfig
from .data.domain import Images, ImageTensors
from .data.streaming import scan, take
from .data.transforms import prepare
from .distributed import Context


@torch.no_grad()
def predict(model: nn.Module, images: Images, data_cfg: DataConfig, ctx: Context,
            batch_size: int = 512) -> torch.Tensor:
    """Logits (N, K) of uint8 ``images`` on this process (no sharding), in eval mode; a streamed set is decoded
    batch by batch by its DataLoader workers."""
    was_training = model.training
    model.eval()
    out = []
    for _, batch in scan(images, batch_size):
        x = prepare(batch, data_cfg, train=False, device=ctx.device, channels_last=ctx.channels_last)
        with ctx.autocast():
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _confusion(model: nn.Module, data: ImageTensors, data_cfg: DataConfig, ctx: Context,
               batch_size: int) -> torch.Tensor:
    """(K, K) counts, rows true classes, columns predictions: each rank predicts its shard, then the sum."""
    if data.labels is None:
        raise ValueError(f"domain {data.name} has no labels to evaluate against")
    k = data.num_classes
    shard = torch.arange(ctx.rank, len(data), ctx.world_size)
    pred = predict(model, take(data.images, shard), data_cfg, ctx, batch_size).argmax(dim=1)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((data.labels[shard], pred), torch.ones_like(pred), accumulate=True)
    return ctx.all_reduce_sum(confusion).cpu()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, data_cfg: DataConfig, ctx: Context,
             batch_size: int = 512) -> dict[str, Any]:
    return metrics_from_confusion(_confusion(model, data, data_cfg, ctx, batch_size), data.classes)


@torch.no_grad()
def confusion_matrix(net: nn.Module, domain: ImageTensors, data_cfg: DataConfig, device: torch.device | str,
                     batch_size: int = 512) -> torch.Tensor:
    """The confusion matrix of ``net`` over all of a labelled ``domain``, in this process only (no DDP)."""
    device = torch.device(device)
    return _confusion(net.to(device), domain, data_cfg, Context(0, 1, device, None, False), batch_size)


def load_network(cfg: Config, num_classes: int, path: str | Path) -> nn.Module:
    """The network of a run's ``model.pt``, in eval mode on the CPU: as the file describes it, or as ``cfg`` and
    ``num_classes`` do for a bare state dict (daaa 0.1's). Built without storage, it takes the file's tensors: no
    ImageNet weights fetched, no initialisation (:func:`daaa.models.network_from_info`)."""
    from .models import load_model_file, model_info

    return load_model_file(path, model_info(cfg, None, num_classes))[0]


@torch.no_grad()
def attention_maps_of(net: nn.Module, images: torch.Tensor, layers: Sequence[Any], data_cfg: DataConfig,
                      device: torch.device | str, kind: str = "l2") -> tuple[list[torch.Tensor], torch.Tensor]:
    """The attention maps (Eq. 4, or ``kind``) of ``layers`` (names or :data:`daaa.attention.Tap` pairs) of ``net``
    over uint8 ``images``, each (N, h, w) on the CPU, and the predicted classes (N,)."""
    from .attention import FeatureRecorder, attention_map

    net = net.to(device).eval()
    with FeatureRecorder(net, list(layers)) as rec:
        pred = net(prepare(images, data_cfg, device=torch.device(device))).argmax(1).cpu()
        # (N, h, w): a flat map of a non-square layer would be ambiguous
        maps = [attention_map(f, kind).cpu().view(f.shape[0], *f.shape[-2:]) for f in rec.features]
    return maps, pred


def metrics_from_confusion(confusion: torch.Tensor, classes: list[str] | None) -> dict[str, Any]:
    """Rows are true classes, columns predictions.

    ``mean_class_accuracy`` is the mean of the per-class accuracies over the classes that have test images (the
    figure VisDA-2017 results are quoted in): unlike top-1 it weighs a rare class as much as a frequent one.
    """
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    support = confusion.sum(dim=1)
    names = classes or [str(i) for i in range(confusion.shape[0])]
    per_class = {n: (float(confusion[i, i]) / int(support[i]) if support[i] else None) for i, n in enumerate(names)}
    present = [v for v in per_class.values() if v is not None]
    return {
        "accuracy": correct / total if total else 0.0,
        "mean_class_accuracy": sum(present) / len(present) if present else 0.0,
        "num_samples": total,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
        "classes": names,
    }


def format_report(metrics: dict[str, Any], title: str = "") -> str:
    """Text form of :func:`evaluate`'s result: accuracy, mean per-class accuracy, per-class accuracy, confusion
    matrix."""
    names = metrics["classes"]
    present = sum(v is not None for v in metrics["per_class_accuracy"].values())
    lines = [f"{title}top-1 accuracy: {metrics['accuracy'] * 100:.2f}% ({metrics['num_samples']} images)",
             f"mean per-class accuracy: {metrics['mean_class_accuracy'] * 100:.2f}% (over the {present} classes "
             "with test images)", "", "per-class accuracy:"]
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
