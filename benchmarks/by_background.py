"""Target-test accuracy of a demo-pair run split by the photo's brightness, before and after adaptation.

In an MNIST-M-like target a digit inverts its photo: on a light photo (median luminance > 128; 30% of the demo's
test images) the digit is dark, the case the source network fails on and a CycleGAN that drops that mode cannot
teach (BENCHMARKS.md).

    python3 benchmarks/by_background.py RUN [RUN ...]   # runs of `daaa demo` / `daaa run --source demo ...`
"""

from __future__ import annotations

import argparse

import yaml

from daaa import pipeline
from daaa.config import config_from_dict
from daaa.distributed import setup
from daaa.evaluate import predict
from daaa.stages import load_weights


def main(runs: list[str]) -> None:
    for run in runs:
        cfg = config_from_dict(yaml.safe_load(open(f"{run}/config.yaml")))
        data = pipeline.load_data(cfg, "demo", "demo", "demo")
        ctx = setup(cfg.runtime)
        test = data.target_test
        light = test.images.float().mean(1).flatten(1).median(1).values > 128
        for stage in ("source", "adapt"):
            net = pipeline.new_model(cfg, data)
            load_weights(net, f"{run}/{stage}/model.pt")
            right = predict(net, test.images, cfg.data, ctx).argmax(1) == test.labels
            print(f"{run} {stage}: light photo {right[light].float().mean():.3f} (n={int(light.sum())}), "
                  f"dark photo {right[~light].float().mean():.3f}, all {right.float().mean():.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders of `daaa demo` / `daaa run` on the demo pair")
    main(parser.parse_args().runs)
