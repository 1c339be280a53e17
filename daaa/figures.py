"""The paper's figures drawn from arrays (matplotlib, Agg backend: works without a display).

Every function here takes tensors, lists or dicts of numbers and a file name, and writes a PNG: nothing loads a
network or reads a run folder. What the figures of a run show is computed by :mod:`daaa.evaluate` (attention maps,
confusion matrices) and gathered from the folder by :mod:`daaa.run_figures`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from .runs import atomic_write_bytes  # noqa: E402


def _save(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write the PNG atomically: a full disk or a kill leaves the previous figure or none, never a torn one
    (figures that exist are not redrawn)."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():  # class names in scripts the font lacks are drawn as boxes, not warned
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getbuffer())
    return Path(path)


def _show(ax, img: torch.Tensor) -> None:
    """Draw one uint8 (C, H, W) image without axes."""
    arr = img.detach().cpu().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        ax.imshow(arr[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(arr)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_pairs(real_s: torch.Tensor, fake_t: torch.Tensor, real_t: torch.Tensor, fake_s: torch.Tensor,
               path: str | Path) -> None:
    """The paper's Fig. 3: rows of (real source | synthetic target G_ST(S) | real target | synthetic source G_TS(T)).

    Inputs are uint8 (N, C, H, W); row i shows element i of each (columns 1-2 and 3-4 are the data pairs).
    """
    cols = [(real_s, "real source S"), (fake_t, "synthetic target\nG_ST(S)"),
            (real_t, "real target T"), (fake_s, "synthetic source\nG_TS(T)")]
    n = min(len(x) for x, _ in cols)
    fig, axes = plt.subplots(n, 4, figsize=(4 * 1.6, n * 1.6 + 0.6), squeeze=False)
    for j, (imgs, title) in enumerate(cols):
        axes[0, j].set_title(title, fontsize=9)
        for i in range(n):
            _show(axes[i, j], imgs[i])
    fig.tight_layout()
    _save(fig, path)


def plot_curves(history: list[dict], keys: Sequence[str], path: str | Path, title: str) -> None:
    """One panel per key (three to a row) of ``history`` entries (dicts with ``step`` and the keys) against the step."""
    keys = [k for k in keys if any(k in h for h in history)]
    ncol = min(3, max(1, len(keys)))
    nrow = max(1, -(-len(keys) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow + 0.4), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# The paper's other figures: Fig. 1 (attention maps), Fig. 4 (training analysis), Fig. A1 (sweeps), a confusion matrix.
# daaa.run_figures writes them into RUN/figures/ under these names at the end of `daaa run` / `daaa demo`.

FIGURE_FILES = {  # RUN/figures/<file>: caption (the order in which `daaa report` shows them)
    "fig1_attention.png": "Fig. 1: attention maps of the last aligned conv layer over target-test images",
    "fig3_pairs.png": "Fig. 3: CycleGAN pairs (real S | G_ST(S) | real T | G_TS(T))",
    "fig4_training.png": "Fig. 4: L_AT during training with and without the penalty; target-test accuracy",
    "confusion.png": "Confusion matrices on target-test (rows: true class, columns: prediction)",
    "figA1_sweeps.png": "Fig. A1: accuracy vs p_t and vs beta",
}


def _spatial(maps: torch.Tensor) -> torch.Tensor:
    """(N, h*w) square maps or (N, h, w) -> float (N, h, w)."""
    maps = maps.detach().float().cpu()
    if maps.dim() == 3:
        return maps
    side = int(round(maps.shape[1] ** 0.5))
    if side * side != maps.shape[1]:
        raise ValueError(f"attention maps of {maps.shape[1]} values are not square: pass them as (N, h, w)")
    return maps.view(maps.shape[0], side, side)


def _layer_index(layer_names: Sequence[str], layer: str | int | None) -> int:
    if layer is None:
        return len(layer_names) - 1
    if isinstance(layer, int):
        return layer % len(layer_names)
    if layer not in layer_names:
        raise ValueError(f"layer {layer!r} is not one of {list(layer_names)}")
    return list(layer_names).index(layer)


def _attention_cells(images: torch.Tensor, maps: list[torch.Tensor], side: int, overlay: bool) -> list[Any]:
    """The columns of Fig. 1 as (N, side, side, 3) RGB arrays in [0, 1]: the input, then each map upsampled to the
    image, scaled to [0, 1] per image and coloured (jet), over a dimmed grey copy of the input with ``overlay``."""
    import torch.nn.functional as F
    from matplotlib import colormaps

    img = images.detach().cpu().float()
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 255) / 255.0
    grey = img.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    cells = [img.permute(0, 2, 3, 1).numpy()]
    for m in maps:
        up = F.interpolate(_spatial(m)[:len(img), None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
        heat = colormaps["jet"](((up - lo) / (hi - lo).clamp_min(1e-12)).numpy())[..., :3]
        cells.append(0.5 * heat + 0.5 * 0.8 * grey if overlay else heat)
    return cells


def _mosaic(cells: list[Any], side: int, cw: int, rh: int) -> Any:
    """One white image holding ``cells[j][i]`` at column j, row i, in cells of ``cw`` x ``rh`` pixels."""
    import numpy as np

    n = len(cells[0])
    mosaic = np.ones((n * rh, len(cells) * cw, 3))
    for j, col in enumerate(cells):
        for i in range(n):
            mosaic[i * rh:i * rh + side, j * cw:j * cw + side] = col[i]
    return mosaic


def plot_attention_maps(images: torch.Tensor, maps_by_model: dict[str, Sequence[torch.Tensor]],
                        layer_names: Sequence[str], path: str | Path, layer: str | int | None = None,
                        overlay: bool = True, labels: torch.Tensor | None = None,
                        predictions: dict[str, torch.Tensor] | None = None, title: str | None = None,
                        class_names: Sequence[str] | None = None) -> Path:
    """The paper's Fig. 1: one row per (target) image; columns: the input, then each network's attention map.

    ``images`` uint8 (N, C, H, W); ``maps_by_model[name][l]`` the maps (N, h*w) (or (N, h, w)) of layer
    ``layer_names[l]``, e.g. from :func:`daaa.evaluate.attention_maps_of`. ``layer`` picks the layer shown (name or
    index; default the last, as the paper shows the last conv layer). Each map is upsampled to the image size and
    scaled to [0, 1] per image; ``overlay`` draws it (jet colours) over a dimmed grey copy of the input, otherwise
    alone. With ``labels`` and ``predictions[name]`` (N,) each map is captioned with its network's prediction
    (green when right, red when wrong); ``class_names`` names the labels.

    The grid is composed as one image (one matplotlib axes): fast even for many rows.
    """
    import textwrap

    li = _layer_index(layer_names, layer)
    names = list(maps_by_model)
    n, ncol = images.shape[0], 1 + len(names)
    side = max(int(images.shape[-1]), 96)  # small digits are enlarged for the eye
    cells = _attention_cells(images, [maps_by_model[k][li] for k in names], side, overlay)
    pad, caption = 6, (16 if predictions is not None and labels is not None else 0)
    cw, rh = side + pad, side + pad + caption
    col_titles = ["target image", *names]
    left = 34
    w_px = ncol * cw + left
    suptitle = textwrap.fill(title or f"attention maps (Eq. 4) of layer {layer_names[li]}", max(20, w_px // 6))
    top = 10 + 16 * (suptitle.count("\n") + 1) + 12 * max(t.count("\n") + 1 for t in col_titles) + 4
    h_px = n * rh + top
    fig = plt.figure(figsize=(w_px / 100, h_px / 100))
    ax = fig.add_axes([left / w_px, 0, (ncol * cw) / w_px, (n * rh) / h_px])
    ax.imshow(_mosaic(cells, side, cw, rh), interpolation="nearest")
    ax.set_axis_off()
    for j, name in enumerate(col_titles):
        ax.text(j * cw + side / 2, -3, name, ha="center", va="bottom", fontsize=7)
    for i in range(n):
        if labels is not None:
            c = int(labels[i])
            ax.text(-4, i * rh + side / 2, f"class {class_names[c] if class_names else c}"[:18], ha="right",
                    va="center", fontsize=7, rotation=90)
        for j, name in enumerate(names):
            if caption and name in predictions:
                p, t = int(predictions[name][i]), int(labels[i])
                shown = class_names[p][:12] if class_names else p
                ax.text((j + 1) * cw + side / 2, i * rh + side + 1, f"pred {shown}", ha="center", va="top", fontsize=7,
                        color="green" if p == t else "red")
    fig.suptitle(suptitle, fontsize=9, y=1 - 6 / h_px, va="top")
    return _save(fig, path)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def sync_steps(history: list[dict]) -> list[int]:
    """Steps at which M_post was synced (the ``syncs`` counter went up) in a DAAA training history."""
    out, last = [], 0
    for h in history:
        s = int(h.get("syncs", last) or 0)
        if s > last:
            out.append(int(h["step"]))
        last = s
    return out


def plot_training_analysis(histories: dict[str, list[dict]], path: str | Path,
                           references: dict[str, float] | None = None, title: str | None = None) -> Path:
    """The paper's Fig. 4. Left: L_AT over training for each history (e.g. ``"ours"`` and ``"ours-without-L_AT"``:
    L_AT is logged at beta = 0 too); right: target-test accuracy at the evaluation steps (with ``optim.ema_decay``:
    the weight average's, and dashed the trained weights' ``raw_target_test_accuracy``). The x axis is the training
    step; dotted vertical lines mark the M_post syncs (the paper's x axis counts M_post updates).
    ``references`` adds horizontal lines to the right panel (e.g. ``{"source only": 0.62}``).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_at = False
    for k, (name, hist) in enumerate(histories.items()):
        c = colors[k % len(colors)]
        pts = [(h["step"], h["L_AT"]) for h in hist if isinstance(h.get("L_AT"), (int, float))]
        if pts:
            any_at = True
            steps, vals = [p[0] for p in pts], [p[1] for p in pts]
            window = max(1, len(vals) // 40)
            if window > 1:
                left.plot(steps, vals, color=c, alpha=0.25, linewidth=0.7)
            left.plot(steps, _moving_average(vals, window), color=c, label=name)
        acc = [(h["step"], h["target_test_accuracy"] * 100) for h in hist if "target_test_accuracy" in h]
        raw = [(h["step"], h["raw_target_test_accuracy"] * 100) for h in hist if "raw_target_test_accuracy" in h]
        if acc:  # with optim.ema_decay: the weight average (shipped), and thin the last step's weights
            right.plot([a[0] for a in acc], [a[1] for a in acc], marker="o", markersize=3, color=c,
                       label=f"{name} (weight average)" if raw else name)
        if raw:
            right.plot([a[0] for a in raw], [a[1] for a in raw], color=c, alpha=0.45, linewidth=0.8, linestyle="--",
                       label=f"{name} (last step's weights)")
    for ax in (left, right):
        syncs = sync_steps(next(iter(histories.values()), []))
        for i, s in enumerate(syncs):
            ax.axvline(s, color="grey", linestyle=":", linewidth=0.8, label="M_post sync" if i == 0 else None)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for k, (name, value) in enumerate((references or {}).items()):
        right.axhline(value * 100, color="black", linestyle="--" if k == 0 else "-.", linewidth=0.9, label=name)
    left.set_title("attention discrepancy L_AT (Eq. 5)", fontsize=10)
    left.set_ylabel("L_AT per sample")
    if not any_at:
        left.text(0.5, 0.5, "no L_AT logged", ha="center", va="center", transform=left.transAxes)
    right.set_title("target-test accuracy", fontsize=10)
    right.set_ylabel("accuracy (%)")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85 if title else 0.91, wspace=0.22)
    return _save(fig, path)


SWEEP_ALIASES = {"p_t": ("p_t", "confidence_threshold", "adapt.confidence_threshold"),
                 "beta": ("beta", "adapt.beta")}


Curve = tuple[str, list[float], list[float], list[float | None]]  # label, x, accuracy, std


def _sweep_curves(spec: Any, param: str, criterion: str | None) -> tuple[list[Curve], float | None]:
    """The curves of one sweep and the value a label-free criterion chose (or None).

    Formats: `daaa reproduce`'s ``{"values": [...], "final": {"mean": [...], "std": [...]}, "oracle": {...},
    "choice": {criterion: {"value": v}}}``; ``{value: acc}``; ``{value: {"mean": acc, "std": s}}``; a list of
    dicts with the value under "value"/"x"/the parameter's name and the accuracy under
    "accuracy"/"mean"/"target_test_accuracy" (std optional). Accuracies are fractions or percentages.
    """
    def acc_of(d: Any) -> tuple[float, float | None]:
        if isinstance(d, (int, float)):
            return float(d), None
        for k in ("accuracy", "mean", "target_test_accuracy", "acc"):
            if k in d:
                return float(d[k]), (float(d["std"]) if d.get("std") is not None else None)
        raise ValueError(f"sweep point {d!r} has no accuracy")

    if isinstance(spec, dict) and "values" in spec:  # daaa reproduce's results.json
        curves = []
        for key, label in (("final", "ours (final step)"), ("oracle", "ours (best step, oracle)")):
            stat = spec.get(key)
            if not isinstance(stat, dict) or not stat.get("mean"):
                continue
            stds = stat.get("std") or [None] * len(stat["mean"])
            pts = sorted((float(v), float(m), sd) for v, m, sd in zip(spec["values"], stat["mean"], stds)
                         if m is not None)
            if pts:
                curves.append((label, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]))
        chosen = ((spec.get("choice") or {}).get(criterion) or {}).get("value") if criterion else None
        return curves, (float(chosen) if chosen is not None else None)
    pts = []
    if isinstance(spec, dict):
        for v, d in spec.items():
            pts.append((float(v), *acc_of(d)))
    else:
        for d in spec:
            keys = ("value", "x", *SWEEP_ALIASES.get(param, (param,)))
            pts.append((float(next(d[k] for k in keys if k in d)), *acc_of(d)))
    pts.sort()
    return [("ours", [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])], None


def sweeps_in(results: dict) -> dict[str, Any]:
    """The sweeps ``plot_sweeps`` understands in ``results`` (top level or under "sweeps"): {"p_t": ..., "beta": ...}.
    """
    pool = results.get("sweeps", results) if isinstance(results, dict) else {}
    found = {}
    for name, aliases in SWEEP_ALIASES.items():
        for a in aliases:
            if isinstance(pool, dict) and a in pool and isinstance(pool[a], (dict, list)) and pool[a]:
                found[name] = pool[a]
                break
    return found


def _references(ref: Any, default_label: str) -> dict[str, float]:
    if ref is None:
        return {}
    if isinstance(ref, (int, float)):
        return {default_label: float(ref)}
    if isinstance(ref, dict) and ("accuracy" in ref or "value" in ref):
        return {str(ref.get("label", default_label)): float(ref.get("accuracy", ref.get("value")))}
    if isinstance(ref, dict):  # {name: accuracy}, as `daaa reproduce` writes it
        return {str(k): float(v) for k, v in ref.items() if isinstance(v, (int, float))}
    return {}


def _symlog_if_wide(ax, xs: list[float]) -> None:
    """A symmetric-log x axis, ticked at the values, when they span 20x or more (e.g. beta in 0, 0.1, ..., 10)."""
    positive = sorted({x for x in xs if x > 0})
    if positive and positive[-1] / positive[0] >= 20:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
        ax.set_xlim(-0.3 * positive[0] if min(xs) <= 0 else positive[0] / 1.5, positive[-1] * 1.5)
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()


def plot_sweeps(results: dict, path: str | Path, reference: float | dict | None = None,
                reference_label: str = "previous SOTA") -> Path:
    """The paper's Fig. A1: target accuracy vs p_t (left) and vs beta (right).

    ``results`` holds ``"p_t"`` and/or ``"beta"`` (also ``"adapt.confidence_threshold"`` / ``"adapt.beta"``), at the
    top level or under ``"sweeps"`` -- `daaa reproduce figA1`'s results.json as it is, or simply
    ``{"p_t": {value: accuracy}, "beta": {...}}`` (see :func:`_sweep_curves`). Horizontal lines: ``reference`` or
    ``results["reference"]`` (a number, ``{"label", "accuracy"}`` or ``{name: accuracy}``). A vertical line marks
    the value chosen without target labels: ``results["selected"][name]``, or the sweep's ``choice`` by
    ``results["primary_criterion"]``.
    """
    sweeps = sweeps_in(results)
    if not sweeps:
        raise ValueError("no p_t or beta sweep in the results")
    refs = _references(results.get("reference") if reference is None else reference, reference_label)
    selected = results.get("selected", {}) if isinstance(results.get("selected"), dict) else {}
    criterion = results.get("primary_criterion")
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.6 * len(sweeps), 3.6), squeeze=False)
    labels = {"p_t": "p_t (EM filtering threshold)", "beta": "beta (strength of L_AT)"}
    styles = ["-", "--"]
    for ax, (name, spec) in zip(axes[0], sweeps.items()):
        curves, chosen = _sweep_curves(spec, name, criterion)
        if name in selected:
            chosen = float(selected[name])
        every = [a for c in curves for a in c[2]] + list(refs.values())
        scale = 100 if every and max(every) <= 1.0 else 1
        xs: list[float] = []
        for k, (label, x, acc, std) in enumerate(curves):
            xs += x
            ys, errs = [a * scale for a in acc], [(e or 0.0) * scale for e in std]
            if any(errs):
                ax.errorbar(x, ys, yerr=errs, marker="o", capsize=3, linestyle=styles[k % 2], label=label)
            else:
                ax.plot(x, ys, marker="o", linestyle=styles[k % 2], label=label)
        for k, (label, r) in enumerate(refs.items()):
            ax.axhline(r * scale, color="black", linestyle=["--", "-.", ":"][k % 3], linewidth=0.9, label=label)
        if chosen is not None:
            ax.axvline(chosen, color="green", linestyle=":",
                       label=f"selected without labels{f' ({criterion})' if criterion else ''}")
        _symlog_if_wide(ax, xs)
        if not curves:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(labels[name])
        ax.set_ylabel("target accuracy (%)")
        ax.set_title(f"accuracy vs {name}" + (f" ({spec['task']})" if isinstance(spec, dict) and
                                              isinstance(spec.get("task"), str) else ""), fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.6 / fig.get_figwidth(), right=0.98, bottom=0.15, top=0.9, wspace=0.3)
    return _save(fig, path)


def plot_confusion(confusion: Any, classes: Sequence[str] | None, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of a confusion matrix (rows: true class, columns: prediction), coloured by the row-normalised rate
    and annotated with counts when there are at most 15 classes. ``confusion`` may also be ``{name: matrix}``: one
    panel per matrix (e.g. source only vs DAAA)."""
    mats = confusion if isinstance(confusion, dict) else {title or "confusion": confusion}
    mats = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in mats.items()}
    k = next(iter(mats.values())).shape[0]
    names = list(classes) if classes else [str(i) for i in range(k)]
    side = max(3.0, min(0.3 * k + 1.2, 7.5))
    width = side * len(mats) + 0.9
    fig, axes = plt.subplots(1, len(mats), figsize=(width, side), squeeze=False)
    # fixed margins (a layout engine costs more than the drawing): room for the tick labels and the colour bar
    margin = (0.45 + 0.05 * max(len(n[:10]) for n in names)) if k > 10 else 0.55
    fig.subplots_adjust(left=margin / width, right=1 - 0.9 / width, bottom=margin / side, top=1 - 0.3 / side,
                        wspace=0.25)
    for ax, (name, m) in zip(axes[0], mats.items()):
        rate = m / m.sum(dim=1, keepdim=True).clamp_min(1)
        im = ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
        acc = float(m.diag().sum() / m.sum().clamp_min(1)) * 100
        ax.set_title(f"{name} ({acc:.1f}%)", fontsize=9)
        fs = 7 if k <= 10 else 5
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels([n[:10] for n in names], fontsize=fs, rotation=90 if k > 10 else 0)
        ax.set_yticklabels([n[:10] for n in names], fontsize=fs)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if m[i, j] > 0:
                        ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=6,
                                color="white" if rate[i, j] > 0.5 else "black")
    cax = fig.add_axes([1 - 0.75 / width, margin / side, 0.12 / width, 1 - (margin + 0.3) / side])
    fig.colorbar(im, cax=cax, label="row-normalised rate")
    return _save(fig, path)
