"""Where the CycleGAN stage's time goes (issue 18): generator half, discriminator half, translation.

Times, at a preset's shapes (``digits-cpu`` by default), on random images:

* ``step``: one whole :meth:`daaa.cyclegan.CycleGAN.training_step` (batch ``cyclegan.batch_size`` of S and of T);
* ``generator half``: Eq. 3's generator losses (four generator forwards, the two discriminators' forwards on the
  fakes), their backward and the generators' Adam step;
* ``discriminator half``: Eq. 1 on real and pooled fake images, backward, the discriminators' Adam step;
* ``translate``: G_ST then G_TS (a translation and its round trip, as the stage writes them) on a batch of
  ``cyclegan.translate_batch_size`` images, no gradients; and what translating the preset's demo pair costs;

then the stage's estimated split for ``cyclegan.steps`` steps, and the ten costliest operators of a profiled step
(``torch.profiler``)::

    python3 benchmarks/profile_cyclegan.py                      # digits-cpu
    python3 benchmarks/profile_cyclegan.py --set runtime.precision=bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daaa.config import load_config  # noqa: E402
from daaa.distributed import amp_dtype  # noqa: E402
from daaa.style_gst import build_cyclegan  # noqa: E402


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="digits-cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.preset, args.set)
    if cfg.runtime.num_threads > 0:
        torch.set_num_threads(cfg.runtime.num_threads)
    c, ch = cfg.cyclegan, cfg.data.channels
    device = torch.device("cpu")
    model = build_cyclegan(c, ch, 0, amp_dtype(cfg.runtime.precision, device), cfg.runtime.channels_last)
    g = torch.Generator().manual_seed(0)
    s, t = (torch.rand(c.batch_size, ch, c.image_size, c.image_size, generator=g) * 2 - 1 for _ in range(2))
    many = torch.rand(c.translate_batch_size, ch, c.image_size, c.image_size, generator=g) * 2 - 1
    donors = many.flip(0) if getattr(c, "style_grid", 0) else None

    def generator_half() -> dict:
        model._set_d_grad(False)
        model.opt_g.zero_grad(set_to_none=True)
        out = model._generator_losses(model._input(s), model._input(t))
        out["g_total"].backward()
        model.opt_g.step()
        model._set_d_grad(True)
        return out

    fakes = generator_half()

    def discriminator_half() -> None:
        model.opt_d.zero_grad(set_to_none=True)
        d = model._discriminator_losses(model._input(s), model._input(t), fakes["fake_t"].detach(),
                                        fakes["fake_s"].detach())
        d["d"].backward()
        model.opt_d.step()

    def translate() -> None:
        back = model.translate_st(many, donors)
        model.translate_ts(back)

    model.train()
    times = {"step": _median_seconds(lambda: model.training_step(s, t), args.repeats),
             "generator_half": _median_seconds(generator_half, args.repeats),
             "discriminator_half": _median_seconds(discriminator_half, args.repeats),
             "translate_batch": _median_seconds(translate, max(2, args.repeats // 3))}
    n_images = cfg.data.demo_source + cfg.data.demo_target_train
    # each image goes one way and back (T_f and its round trip; S_f and its round trip)
    translate_stage = times["translate_batch"] / c.translate_batch_size * n_images
    train_stage = times["step"] * c.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model.training_step(s, t)
    top = [(e.key, e.self_cpu_time_total / 3 / 1e3) for e in
           sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]]
    total_top = sum(e.self_cpu_time_total for e in prof.key_averages()) / 3 / 1e3
    print(f"preset {args.preset} {' '.join(args.set)}: batch {c.batch_size}, {c.image_size} px, ngf {c.ngf}, "
          f"ndf {c.ndf}, {c.n_blocks} blocks, style_grid {getattr(c, 'style_grid', 0)}, "
          f"precision {cfg.runtime.precision}, {torch.get_num_threads()} threads")
    print(f"  training step        {times['step'] * 1e3:8.1f} ms")
    gd = times["generator_half"] + times["discriminator_half"]
    print(f"    generator half     {times['generator_half'] * 1e3:8.1f} ms ({times['generator_half'] / gd:.0%})")
    print(f"    discriminator half {times['discriminator_half'] * 1e3:8.1f} ms ({times['discriminator_half'] / gd:.0%})")
    print(f"  translate ({c.translate_batch_size} images there and back) {times['translate_batch'] * 1e3:.1f} ms")
    stage = train_stage + translate_stage
    print(f"  stage estimate: training {train_stage:.0f} s ({train_stage / stage:.0%}) + translating the demo pair "
          f"({n_images} images) {translate_stage:.0f} s ({translate_stage / stage:.0%})")
    print("  costliest operators of a step (self CPU ms):")
    for name, ms in top:
        print(f"    {name:40s} {ms:7.1f}  ({ms / total_top:.0%})")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "overrides": args.set, "seconds": times,
                                         "stage_estimate_seconds": {"train": train_stage,
                                                                    "translate": translate_stage},
                                         "top_ops_ms": dict(top)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
