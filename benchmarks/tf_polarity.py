"""How often a run's synthetic targets T_f = G_ST(x^S) have a light background and a digit darker than it.

In MNIST-M a digit inverts its photo, so on a light photo it is dark; a CycleGAN that never draws that case cannot
teach it (see BENCHMARKS.md). The stroke is where the source digit is >= 128; luminance is the channel mean.

    python3 benchmarks/tf_polarity.py RUN [RUN ...]     # runs made on the demo pair (RUN/translate/translated.pt)
    python3 benchmarks/tf_polarity.py --ground-truth    # the same measure on ground-truth T_f (oracle_pairs.py's)
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from daaa import pipeline
from daaa.config import load_config
from daaa.data.mnist import blend_mnistm, packaged_backgrounds
from oracle_pairs import PAIR_SEED


def polarity(synthetic_target: torch.Tensor, source_images: torch.Tensor) -> dict[str, float]:
    """Shares of T_f with a light background (mean off-stroke luminance > 128), with a digit darker than its
    background, and with a dark digit among the light-background ones."""
    lum = synthetic_target.float().mean(1)
    stroke = source_images[:, 0] >= 128
    on = (lum * stroke).sum((1, 2)) / stroke.sum((1, 2))
    off = (lum * ~stroke).sum((1, 2)) / (~stroke).sum((1, 2))
    light, dark = off > 128, on < off
    return {"light_background": float(light.float().mean()), "dark_digit": float(dark.float().mean()),
            "dark_digit_on_light": float((dark & light).float().sum() / light.sum().clamp(min=1))}


def _show(name: str, stats: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))


def main(args: list[str]) -> None:
    source = pipeline.load_data(load_config("digits-cpu"), "demo", None, None).source
    if args == ["--ground-truth"]:
        tf = blend_mnistm(source.images[:, 0].numpy(), packaged_backgrounds(), np.random.default_rng(PAIR_SEED))
        _show("ground truth", polarity(torch.from_numpy(tf).permute(0, 3, 1, 2), source.images))
        return
    for run in args:
        tf = torch.load(f"{run}/translate/translated.pt", weights_only=True)["synthetic_target"]
        _show(run, polarity(tf, source.images))


if __name__ == "__main__":
    main(sys.argv[1:])
