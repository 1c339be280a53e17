"""How often a run's synthetic targets T_f = G_ST(x^S) have a light background and a digit darker than it.

In MNIST-M a digit inverts its photo, so on a light photo it is dark; a CycleGAN that never draws that case cannot
teach it (see BENCHMARKS.md). The stroke is where the source digit is >= 128; luminance is the channel mean.

    python3 benchmarks/tf_polarity.py RUN [RUN ...]     # runs made on the demo pair (RUN/translate/translated.pt)
    python3 benchmarks/tf_polarity.py --ground-truth    # the same measure on ground-truth T_f (oracle_pairs.py's)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from daaa import pipeline
from daaa.config import load_config
from daaa.data.mnist import blend_mnistm, packaged_backgrounds
from oracle_pairs import PAIR_SEED


def ground_truth_tf(source_images: torch.Tensor) -> torch.Tensor:
    """The ideal T_f of the demo pair (oracle_pairs.py's blend of each source digit), uint8 (N, 3, H, W)."""
    tf = blend_mnistm(source_images[:, 0].numpy(), packaged_backgrounds(), np.random.default_rng(PAIR_SEED))
    return torch.from_numpy(tf).permute(0, 3, 1, 2)


def _stroke_and_background(synthetic_target: torch.Tensor, source_images: torch.Tensor):
    """Mean luminance of each T_f on its source digit's stroke and off it."""
    lum = synthetic_target.float().mean(1)
    stroke = source_images[:, 0] >= 128
    return (lum * stroke).sum((1, 2)) / stroke.sum((1, 2)), (lum * ~stroke).sum((1, 2)) / (~stroke).sum((1, 2))


def light_background(synthetic_target: torch.Tensor, source_images: torch.Tensor) -> torch.Tensor:
    """Which T_f have a light background: mean off-stroke luminance > 128."""
    return _stroke_and_background(synthetic_target, source_images)[1] > 128


def polarity(synthetic_target: torch.Tensor, source_images: torch.Tensor) -> dict[str, float]:
    """Shares of T_f with a light background (mean off-stroke luminance > 128), with a digit darker than its
    background, and with a dark digit among the light-background ones."""
    on, off = _stroke_and_background(synthetic_target, source_images)
    light, dark = off > 128, on < off
    return {"light_background": float(light.float().mean()), "dark_digit": float(dark.float().mean()),
            "dark_digit_on_light": float((dark & light).float().sum() / light.sum().clamp(min=1))}


def _show(name: str, stats: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))


def main(args: list[str]) -> None:
    source = pipeline.load_data(load_config("digits-cpu"), "demo", None, None).source
    if args == ["--ground-truth"]:
        _show("ground truth", polarity(ground_truth_tf(source.images), source.images))
        return
    for run in args:
        tf = torch.load(f"{run}/translate/translated.pt", weights_only=True)["synthetic_target"]
        _show(run, polarity(tf, source.images))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="RUN", help="runs whose translate/translated.pt T_f is measured")
    parser.add_argument("--ground-truth", action="store_true", help="the ideal T_f (Ganin's blend) instead")
    args = parser.parse_args()
    main(["--ground-truth"] if args.ground_truth else args.runs)
