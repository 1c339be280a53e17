"""The DAAA step of an older checkout against this one, interleaved in one process (before/after numbers).

Exact command (repository root), e.g. against the commit before the step was optimised:

    git worktree add /tmp/daaa-before c65227f          # any older commit
    python3 benchmarks/step_before_after.py --before /tmp/daaa-before --threads 2 --repeats 9 --steps 4

The older package is copied to a temporary folder under the name ``daaa_before`` (its imports are relative), so both
versions live in one process. Every round times ``--steps`` steps of: the source-only step (this checkout, the
source spec on the same batch size), the old DAAA step, the new DAAA step, and the naive DAAA step
(``tests/naive_step.py``: Eq. 12 re-derived with one forward per stream and per network), on the same synthetic data of the preset's shape, each after an M_post sync
(EM active). Printed: median ms per step and the median over rounds of each step's time / the source-only step's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from daaa import bench, distributed
from daaa.config import load_config
from daaa.runs import Stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from naive_step import naive_daaa_step  # noqa: E402  (the reference step lives with the tests)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="an older checkout (its daaa/ folder is used)")
    ap.add_argument("--preset", default="digits-cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="daaa-ab-"))
    shutil.copytree(Path(args.before) / "daaa", tmp / "daaa_before")
    sys.path.insert(0, str(tmp))
    old = importlib.import_module("daaa_before.trainers.adapt")

    cfg = load_config(args.preset)
    ctx = distributed.setup(cfg.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = bench.synthetic_data(cfg)
    src = bench.daaa_trainer(cfg, data, ctx, tmp, "source", True)
    new = bench.daaa_trainer(cfg, data, ctx, tmp)
    spec = dataclasses.replace(cfg.adapt, steps=bench.NEVER, eval_interval=bench.NEVER, checkpoint_interval=bench.NEVER)
    net = bench._bench_model(cfg, data)
    d = data
    old_data = importlib.import_module("daaa_before.data.domain")
    data_cls = getattr(old_data, "DomainData", None) or old.DomainData  # before 2026-11-29 it lived in adapt.py
    before = old.DAAATrainer(spec, cfg.data, data_cls(d.source, d.target, d.synthetic_target, d.synthetic_source,
                                                      d.target_test),
                             ctx, Stage(tmp, "before", {}), net, copy.deepcopy(net), cfg.runtime.seed, False)
    s0 = cfg.adapt.sync_interval
    fns = {"source_only": (src.step, 0), "daaa_before": (before.step, s0), "daaa_after": (new.step, s0)}
    if not args.no_naive:
        naive = bench.daaa_trainer(cfg, data, ctx, tmp, "naive")
        fns["daaa_naive"] = (lambda s: naive_daaa_step(naive, s), s0)
    counter = {n: v[1] for n, v in fns.items()}

    def run(name: str, m: int) -> float:
        fn = fns[name][0]
        t = time.perf_counter()
        for _ in range(m):
            fn(counter[name])
            counter[name] += 1
        return (time.perf_counter() - t) / m

    for n in fns:
        run(n, 3)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.repeats):
        for n in fns:
            times[n].append(run(n, args.steps))
    print(f"preset {args.preset}, batch {cfg.adapt.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds x {args.steps} steps")
    for n in fns:
        ratio = statistics.median(a / b for a, b in zip(times[n], times["source_only"]))
        print(f"{n:12s} {statistics.median(times[n]) * 1000:8.1f} ms/step   cost per image / source-only {ratio:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
