"""Seconds of the translate stage's CycleGAN training loop (``daaa.translate._train``) on the embedded demo pair.

For comparing two checkouts side by side (issue 15: did streaming slow the in-memory path?), e.g.::

    for i in 1 2; do for tree in /tmp/before /tmp/after; do
        PYTHONPATH=$tree python3 benchmarks/cyclegan_loop.py 80; done; done

Prints the checkout's ``daaa`` folder, the steps and the seconds (no checkpoint, no translation).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

import daaa.translate as translate
from daaa import pipeline
from daaa.config import load_config
from daaa.runs import Stage
from daaa.style_gst import build_cyclegan


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    cfg = load_config("digits-cpu", [f"cyclegan.steps={steps}", "cyclegan.checkpoint_interval=1000000",
                                     "runtime.progress=false"])
    data = pipeline.load_data(cfg, "demo", "demo", "demo")
    model = build_cyclegan(cfg.cyclegan, cfg.data.channels, cfg.runtime.seed, None, cfg.runtime.channels_last)
    stage = Stage(Path(tempfile.mkdtemp()), "translate", {})
    stage.begin()
    t0 = time.perf_counter()
    translate._train(stage, cfg, model, data.source, data.target, torch.device("cpu"), False)
    print(f"{Path(translate.__file__).parent} {steps} steps {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
