"""Figures written into run folders (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
