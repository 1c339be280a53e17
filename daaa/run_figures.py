"""RUN/figures/: the paper's figures of one run folder (Fig. 1, 3, 4, A1 and the confusion matrices).

This module gathers what a figure shows -- histories and results the run saved, and what :mod:`daaa.evaluate`
computes from its saved networks (attention maps of chosen images, confusion matrices) -- and hands arrays and a file
name to :mod:`daaa.figures`, which only draws. Called at the end of `daaa run` / `daaa demo`, and by `daaa report`
for the figures that need no data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import DaaaError
from .evaluate import attention_maps_of, confusion_matrix, load_network
from .figures import plot_attention_maps, plot_confusion, plot_sweeps, plot_training_analysis, sweeps_in
from .models import attention_taps
from .runs import read_json_or

LOG = logging.getLogger("daaa")

# Fig. 1's columns: (title, stage folders holding model.pt, the first that exists is shown)
ATTENTION_COLUMNS = (("source net\n(= target net\nbefore adaptation)", ("source",)),
                     ("adapted without\nL_AT", ("rows/ours-without-L_AT",)),
                     ("adapted target net\n(DAAA)", ("adapt", "rows/ours")))  # rows/ours: a `daaa reproduce` folder


def read_history(path: str | Path) -> list[dict]:
    """RUN/<stage>/history.jsonl as a list of per-step records ([] when missing)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_result(run_dir: str | Path, stage: str) -> dict:
    """The result in RUN/<stage>/stage.json ({} when the stage is missing, unfinished or unreadable)."""
    rec = read_json_or(Path(run_dir) / stage / "stage.json", {})
    return (rec.get("result") or {}) if isinstance(rec, dict) else {}


def _run_name(run_dir: Path) -> str:
    """RUN's name; TASK/seedK for a `daaa reproduce` run folder."""
    return f"{run_dir.parent.name}/{run_dir.name}" if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def attention_networks(run_dir: str | Path) -> dict[str, Path]:
    """The trained networks of a run folder that Fig. 1 shows, by column title (those that exist)."""
    run_dir = Path(run_dir)
    found = {}
    for title, stages in ATTENTION_COLUMNS:
        path = next((run_dir / s / "model.pt" for s in stages if (run_dir / s / "model.pt").exists()), None)
        if path is not None:
            found[title] = path
    return found


def pick_images(labels: torch.Tensor | None, count: int, n: int) -> torch.Tensor:
    """Indices of ``n`` of ``count`` images: one per class in turn (0, 1, 2, ...) when labelled, else the first n."""
    if labels is None:
        return torch.arange(min(n, count))
    pools = {int(c): (labels == c).nonzero().flatten().tolist() for c in torch.unique(labels)}
    picked, round_ = [], 0
    while len(picked) < min(n, len(labels)):
        for c in sorted(pools):
            if round_ < len(pools[c]) and len(picked) < n:
                picked.append(pools[c][round_])
        round_ += 1
    return torch.tensor(picked)


def _shown_layer(maps: list[torch.Tensor]) -> int:
    """The last aligned layer whose map has some resolution (small images: ResNet's last is 1x1)."""
    sizes = [m.shape[1] * m.shape[2] for m in maps]
    return max((i for i, hw in enumerate(sizes) if hw >= 9), default=len(sizes) - 1)


def attention_figure(run_dir: str | Path, cfg, data, path: str | Path, n: int = 8, layer: str | int | None = None,
                     device: torch.device | str = "cpu") -> Path:
    """Fig. 1 of a run folder: maps of RUN/source/model.pt and RUN/adapt/model.pt (and of the no-L_AT row when
    present) over ``n`` target-test images (one per class; target training images when there is no test set).
    ``data`` is a :class:`daaa.data.domain.DomainData` (anything with ``source``, ``target``, ``target_test``)."""
    run_dir = Path(run_dir)
    nets = attention_networks(run_dir)
    if not any("source" in k for k in nets) or not any("DAAA" in k for k in nets):
        raise DaaaError(f"{run_dir}: Fig. 1 needs source/model.pt and adapt/model.pt (finished stages)")
    domain = data.target_test if getattr(data, "target_test", None) is not None else data.target
    if domain is None:
        raise DaaaError("Fig. 1 needs target images (--target-test or --target)")
    idx = pick_images(domain.labels, len(domain.images), n)
    images = domain.images[idx]
    kind = cfg.adapt.attention if cfg.adapt.attention != "fm" else "l2"  # "fm" maps are not spatial
    maps, preds, layers = {}, {}, []
    for name, p in nets.items():
        net = load_network(cfg, data.source.num_classes, p)
        taps = attention_taps(net, cfg.adapt.attention_tap)  # where L_AT read them
        layers = [t if isinstance(t, str) else t[0] for t in taps]
        maps[name], preds[name] = attention_maps_of(net, images, taps, cfg.data, device, kind)
    if layer is None:
        layer = _shown_layer(next(iter(maps.values())))
    shown = layer if isinstance(layer, str) else layers[layer % len(layers)]
    return plot_attention_maps(images, maps, layers, path, layer=layer,
                               labels=domain.labels[idx] if domain.labels is not None else None, predictions=preds,
                               class_names=domain.classes,
                               title=f"Fig. 1: attention ({kind}) of layer {shown} on {domain.name}")


# ---------------------------------------------------------------------------------------------- one figure each

@dataclasses.dataclass(frozen=True)
class _Job:
    """What the figure makers below read: the run folder, its metrics.json, where to write, and (optionally) the
    configuration and data of the run, which Fig. 1 and a recomputed confusion matrix need."""

    run_dir: Path
    out: Path
    metrics: dict
    cfg: Any = None
    data: Any = None
    device: torch.device | str = "cpu"
    n_attention: int = 8


def _fig1(job: _Job) -> Path | None:
    if job.cfg is None or job.data is None:
        return None
    return attention_figure(job.run_dir, job.cfg, job.data, job.out / "fig1_attention.png", n=job.n_attention,
                            device=job.device)


def _fig3(job: _Job) -> Path | None:
    """The translate stage's picture of CycleGAN pairs, as it is."""
    src = job.run_dir / "translate" / "pairs.png"
    if not src.exists():
        return None
    job.out.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(src, job.out / "fig3_pairs.png"))


def _fig4(job: _Job) -> Path | None:
    run_dir = job.run_dir
    ours = "adapt" if (run_dir / "adapt" / "history.jsonl").exists() else "rows/ours"  # reproduce: rows/ours
    hists = {"ours (beta > 0)" if stage_result(run_dir, ours).get("beta", 1) else "ours":
             read_history(run_dir / ours / "history.jsonl"),
             "ours without L_AT (beta = 0)": read_history(run_dir / "rows" / "ours-without-L_AT" / "history.jsonl")}
    hists = {k: v for k, v in hists.items() if v}
    if not hists:
        return None
    src_acc = stage_result(run_dir, "source").get("target_test_accuracy",
                                                  job.metrics.get("source_only", {}).get("target_test_accuracy"))
    refs = {"source only": src_acc} if src_acc is not None else None
    return plot_training_analysis(hists, job.out / "fig4_training.png", refs,
                                  title=f"training analysis: {_run_name(run_dir)}")


def _confusion(job: _Job) -> Path | None:
    """Source only and DAAA on target-test: the run's own evaluation from metrics.json, else computed from the
    stage's model.pt when the data is at hand."""
    test = getattr(job.data, "target_test", None)
    usable = job.cfg is not None and test is not None and test.labels is not None
    classes = test.classes if usable else None
    mats: dict[str, Any] = {}
    for name, stage, key in (("source only", "source", "source_only"), ("DAAA", "adapt", "daaa")):
        saved = (job.metrics.get(key) or {}).get("target_test")
        if isinstance(saved, dict) and saved.get("confusion_matrix"):
            mats[name] = saved["confusion_matrix"]
            classes = classes or saved.get("classes")
        elif usable and (job.run_dir / stage / "model.pt").exists():
            net = load_network(job.cfg, job.data.source.num_classes, job.run_dir / stage / "model.pt")
            mats[name] = confusion_matrix(net, test, job.cfg.data, job.device)
    return plot_confusion(mats, classes, job.out / "confusion.png") if mats else None


def _figA1(job: _Job) -> Path | None:
    results = read_json_or(job.run_dir / "results.json", {})
    if not sweeps_in(results):
        return None
    return plot_sweeps(results, job.out / "figA1_sweeps.png")


MAKERS: dict[str, Callable[[_Job], Path | None]] = {
    "fig1_attention.png": _fig1, "fig3_pairs.png": _fig3, "fig4_training.png": _fig4, "confusion.png": _confusion,
    "figA1_sweeps.png": _figA1}


def make_run_figures(run_dir: str | Path, cfg=None, data=None, device: torch.device | str = "cpu",
                     n_attention: int = 8, skip_existing: bool = False,
                     out_dir: str | Path | None = None, only: Sequence[str] | None = None) -> dict[str, Path]:
    """Write what a run folder supports of RUN/figures/{fig1_attention, fig3_pairs, fig4_training, confusion,
    figA1_sweeps}.png and return them by file name. Fig. 1 and the source-only confusion need ``cfg`` and ``data``
    (a :class:`daaa.data.domain.DomainData`); the others are read from the folder. A figure that cannot be made is
    logged and skipped: figures never fail a finished run; with ``skip_existing`` a file already there is kept.
    ``out_dir`` writes elsewhere than RUN/figures; ``only`` limits to these file names. Call on rank 0 only."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    metrics = read_json_or(run_dir / "metrics.json", {})
    job = _Job(run_dir, out, metrics if isinstance(metrics, dict) else {}, cfg, data, device, n_attention)
    written: dict[str, Path] = {}
    t0 = time.perf_counter()
    for name, make in MAKERS.items():
        if (skip_existing and (out / name).exists()) or (only is not None and name not in only):
            continue
        try:
            p = make(job)
        except Exception as e:  # noqa: BLE001 -- a figure must never fail a finished run
            LOG.warning("figure %s not written: %s: %s", name, type(e).__name__, e)
            continue
        if p is not None:
            written[name] = p
    if written:
        LOG.info("figures: %s in %s (%.1f s)", ", ".join(written), out, time.perf_counter() - t0)
    return written
