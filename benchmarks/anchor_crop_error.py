"""How far ``adapt.anchor_crops=cached``'s maps are from the crops' own (BENCHMARKS.md, "Twelfth session").

    python3 benchmarks/anchor_crop_error.py RUN [N]     # RUN: a `daaa demo` folder (its source/model.pt)

The run's trained source network, the first N (512) S images of the embedded demo pair at the run's load size, random
crops as training draws them (seed 0): per group of aligned layers (one map size) the mean L2 distance between
normalised maps (Eq. 5's summand) of the crop's own forward and of the crop read off the uncropped image's map
(:func:`daaa.attention.crop_attention_maps`), split by whether both offsets are even, and beside it the distance
between two different images' maps (the scale of what L_AT compares).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from daaa.attention import FeatureRecorder, crop_attention_maps, grouped_attention_maps, pair_distances
from daaa.data.demo import demo_pair
from daaa.data.domain import load_tensors
from daaa.data.transforms import crop_params, prepare
from daaa.models import attention_taps
from daaa.predict import load_trained, run_config


def main(run: str, n: int = 512) -> None:
    net, _ = load_trained(run, "source")
    cfg = run_config(run)
    layers = attention_taps(net, cfg.adapt.attention_tap)
    images = load_tensors(demo_pair(cfg.data)["source"].subset(list(range(n))), cfg.data.load_size,
                          cfg.data.channels).images
    crops = crop_params(len(images), images.shape[-1], cfg.data.image_size, torch.Generator().manual_seed(0),
                        cfg.data.flip)

    def maps(x: torch.Tensor) -> list[torch.Tensor]:
        with FeatureRecorder(net, layers) as rec, torch.no_grad():
            net(x)
            return grouped_attention_maps(rec.features)

    exact = maps(prepare(images, cfg.data, train=True, crops=crops))
    uncropped = maps(prepare(images, dataclasses.replace(cfg.data, image_size=images.shape[-1])))
    even = (crops[:, 0] % 2 == 0) & (crops[:, 1] % 2 == 0)
    for group, (own, full) in enumerate(zip(exact, uncropped)):
        side = round(own.shape[-1] ** 0.5)
        read_off = crop_attention_maps(full, crops, cfg.data.image_size, side)
        d = pair_distances(own, read_off).sum(dim=1)
        others = pair_distances(own, own.roll(1, 0)).sum(dim=1)
        print(f"maps of {side} x {side}: cached vs own {d.mean():.3f} (even offsets {d[even].mean():.3f}, "
              f"others {d[~even].mean():.3f}); two images' own maps {others.mean():.3f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
