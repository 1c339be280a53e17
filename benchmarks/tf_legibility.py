"""How legible a run's synthetic targets T_f = G_ST(x^S) are: the share a judge network reads as their source label,
split by background brightness (tf_polarity.py's light_background).

The judge is the target network of a run trained with ground-truth T_f on the demo pair (see oracle_pairs.py; e.g.
`daaa run ... --synthetic-target WORK/synthetic_target --synthetic-source RUN/translate/synthetic_source`), so it
reads MNIST-M-like digits well (90.6% on the target test for the judge used in BENCHMARKS.md). A diagnostic for the
demo pair, not a method.

    python3 benchmarks/tf_legibility.py JUDGE_RUN RUN [RUN ...]   # runs made on the demo pair
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import yaml

from daaa import pipeline
from daaa.config import config_from_dict
from daaa.distributed import setup
from daaa.evaluate import predict
from daaa.stages import load_weights
from tf_polarity import ground_truth_tf, light_background


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def main(judge_run: str, runs: list[str]) -> None:
    cfg = config_from_dict(yaml.safe_load(open(f"{judge_run}/config.yaml")))
    data = pipeline.load_data(cfg, "demo", "demo", "demo")
    judge = pipeline.new_model(cfg, data)
    load_weights(judge, f"{judge_run}/adapt/model.pt")
    ctx = setup(cfg.runtime)
    source = data.source
    size = source.images.shape[-1]
    named = [("ground truth", ground_truth_tf(source.images))] + [
        (run, _resize(torch.load(f"{run}/translate/translated.pt", weights_only=True)["synthetic_target"], size))
        for run in runs]
    for name, tf in named:
        right = predict(judge, tf, cfg.data, ctx).argmax(1) == source.labels
        light = light_background(tf, source.images)
        print(f"{name}: judge reads {right.float().mean():.3f} of T_f; "
              f"light background {right[light].float().mean():.3f}, dark {right[~light].float().mean():.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("judge_run", help="a finished demo run whose adapted network reads the T_f images")
    parser.add_argument("runs", nargs="*", metavar="RUN", help="runs whose translate/translated.pt T_f is judged")
    args = parser.parse_args()
    main(args.judge_run, args.runs)
