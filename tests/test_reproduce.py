"""`daaa reproduce`, the baseline trainers (DANN / DAN / JAN) and label-free model selection inside training."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daaa import pipeline
from daaa.cli import main
from daaa.config import load_config
from daaa.data.domain import DomainData, ImageTensors
from daaa.models import build_model
from daaa.distributed import Context
from daaa.report import format_csv, format_markdown
from daaa.reproduce import (EXPERIMENTS, PAPER, TASKS, _seed_record, build_results, parse_tasks, select_rows,
                            stage_name, sweep_rows, task_data)
from daaa.selection import (CRITERIA, SelectionProbe, dev_risk, effective_sample_size, iw_risk, per_sample_loss,
                            split_source_validation, summarize_selection)

CPU = Context(0, 1, torch.device("cpu"), None, False)


def _tensors(n: int, classes: int = 3, size: int = 16, shift: int = 0, seed: int = 0, labels: bool = True) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 120, (n, 3, size, size), generator=g, dtype=torch.uint8) + shift
    for c in range(classes):
        x[y == c, c % 3] += 100  # a class-dependent colour, so training can learn something
    return ImageTensors(f"t{seed}", x, y if labels else None, [f"img{i}" for i in range(n)], [str(c) for c in range(classes)])


def _in_unit(v) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


# ------------------------------------------------------------------------------------------- source split


def test_source_validation_split_is_stratified_deterministic_and_disjoint() -> None:
    src = _tensors(40, classes=4)
    tr, va = split_source_validation(src, 0.1)
    tr2, va2 = split_source_validation(src, 0.1)
    assert va.ids == va2.ids and tr.ids == tr2.ids
    assert len(tr) + len(va) == 40 and not set(tr.ids) & set(va.ids)
    assert sorted(va.labels.tolist()) == [0, 1, 2, 3]  # one of the ten images of each class
    assert va.name.endswith(":val") and tr.classes == src.classes
    assert split_source_validation(src, 0.0) == (src, None)
    tiny = _tensors(3, classes=3)  # one image per class: nothing can be held out
    assert split_source_validation(tiny, 0.5)[1] is None


# ---------------------------------------------------------------------------------------------- selection


def test_probe_is_deterministic_and_selection_picks_the_highest_score() -> None:
    cfg = load_config("smoke", ["model.width=4", "data.image_size=16", "data.load_size=16"])
    src, tgt = _tensors(30, seed=1), _tensors(30, seed=2, shift=40, labels=False)
    train, val = split_source_validation(src, 0.2)
    net = build_model(cfg.model, 3, 3, 16)
    probe = SelectionProbe(val, tgt, cfg.data, CPU, cfg.selection, train)
    a, b = probe(net), probe(net)
    assert a == b
    assert set(a) >= {"sel_iwcv", "sel_dev", "sel_snd", "sel_source_val"}
    assert all(math.isfinite(v) for v in a.values())
    # the recorded values are scores, higher is better: minus the estimated risks
    out = probe.outputs(net)
    losses, w = per_sample_loss(out.val_logits, out.val_labels), out.weights
    assert a["sel_iwcv"] == pytest.approx(-iw_risk(losses, w / w.mean())["risk"]) and a["sel_iwcv"] < 0
    assert a["sel_dev"] == pytest.approx(-dev_risk(losses, w)["risk"])
    assert a["sel_iw_ess"] == pytest.approx(effective_sample_size(w))
    assert a == {"sel_iw_ess": a["sel_iw_ess"], **{f"sel_{c}": CRITERIA[c]()(out) for c in probe.criteria}}
    # without a target only the source-validation accuracy remains
    assert SelectionProbe(val, None, cfg.data, CPU, cfg.selection, train).criteria == ["source_val"]

    history = [{"step": 1, "loss": 2.0},
               {"step": 2, "target_test_accuracy": 0.5, "sel_iwcv": -1.0, "sel_snd": 3.0, "sel_source_val": 0.9},
               {"step": 4, "target_test_accuracy": 0.7, "sel_iwcv": -0.5, "sel_snd": 2.0, "sel_source_val": 0.9},
               {"step": 6, "target_test_accuracy": 0.6, "sel_iwcv": float("nan"), "sel_snd": 1.0, "sel_source_val": 0.8}]
    s = summarize_selection(history, ["iwcv", "snd", "source_val", "dev"])
    assert s["selection"]["iwcv"] == {"step": 4, "accuracy": 0.7, "value": -0.5}  # the highest score, NaN skipped
    assert s["selection"]["snd"]["step"] == 2
    assert s["selection"]["source_val"]["step"] == 2  # tie: the earliest
    assert "dev" not in s["selection"]
    assert [c["step"] for c in s["criteria_curve"]] == [2, 4, 6]


# ---------------------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("method", ["dann", "dan", "jan", "jan-a"])
def test_baseline_trainers_train_and_change_the_weights(tmp_path: Path, method: str) -> None:
    from daaa.pipeline import train_baseline
    from daaa.stages import StageRunner

    cfg = load_config("smoke", ["model.width=4", "data.image_size=16", "data.load_size=16", "adapt.steps=3",
                                "adapt.batch_size=8", "adapt.eval_interval=2", "runtime.progress=false",
                                "data.source_val_fraction=0.2"])
    src, val = split_source_validation(_tensors(30, seed=1), 0.2)
    data = DomainData(src, _tensors(20, seed=2, shift=40, labels=False), target_test=_tensors(12, seed=3, shift=40),
                      source_val=val)
    source_net = pipeline.new_model(cfg, data)
    before = {k: v.clone() for k, v in source_net.state_dict().items()}
    model, res = train_baseline(StageRunner(tmp_path, CPU), cfg, data, source_net, method)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # started from the source net and moved
    assert all(torch.isfinite(v).all() for v in after.values())
    assert _in_unit(res["target_test_accuracy"]) and _in_unit(res["oracle_best_accuracy"])
    assert [s for s, _ in res["accuracy_curve"]] == [2, 3]
    assert set(res["selection"]) == {"iwcv", "dev", "snd", "source_val"}
    hist = [json.loads(line) for line in (tmp_path / "rows" / method.upper() / "history.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["L_transfer"]) for h in hist)
    if method == "dann":
        assert hist[0]["grl_coeff"] == 0.0 < hist[-1]["grl_coeff"] < 1.0  # the warm-up of the reversal
        assert "domain_accuracy" in hist[0]
    if method == "jan-a":  # theta ascended the JMMD: it moved away from its identity start
        state = torch.load(tmp_path / "rows" / "JAN-A" / "checkpoint.pt", weights_only=True)["state"]["model"]
        theta = state["adversary.layers.0.weight"]
        assert not torch.equal(theta, torch.eye(theta.shape[0]))
    # a finished stage is reused as it is
    _, again = train_baseline(StageRunner(tmp_path, CPU), cfg, data, source_net, method)
    assert again["target_test_accuracy"] == res["target_test_accuracy"] and "resumed_from" in again


# ----------------------------------------------------------------------------------------- tasks and rows


def test_tasks_rows_and_digit_data_choice(tmp_path: Path) -> None:
    assert parse_tasks("a-w, D->A,W→A,mnist") == ["A-W", "D-A", "W-A", "M-MM"]
    with pytest.raises(Exception, match="unknown task"):
        parse_tasks("A-X")
    assert [r.key for r in select_rows(EXPERIMENTS["table1"], ["S", "DAN", "ours"])] == ["S", "DAN", "ours"]
    with pytest.raises(Exception, match="unknown row"):
        select_rows(EXPERIMENTS["table2"], ["nope"])
    for name, exp in EXPERIMENTS.items():
        for row in exp.rows:
            assert set(row.paper) <= set(exp.tasks), (name, row.key)
    assert EXPERIMENTS["table2"].rows[0].paper == {"A-W": 68.4, "D-W": 96.7, "W-D": 99.3, "A-D": 68.9, "D-A": 62.5,
                                                   "W-A": 60.7}
    cfg = load_config("digits", [f"data.data_root={tmp_path}"])
    assert task_data(TASKS["M-MM"], cfg)["source"] == "demo"  # nothing under the data root: the demo pair
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{n}.gz").write_bytes(b"")
    for s in ("train", "test"):
        (tmp_path / "mnist_m" / f"mnist_m_{s}").mkdir(parents=True)
        (tmp_path / "mnist_m" / f"mnist_m_{s}_labels.txt").write_text("")
    assert task_data(TASKS["M-MM"], cfg)["target_test"] == "mnistm:test"
    assert task_data(TASKS["M-MM"], cfg, "demo")["source"] == "demo"
    office = task_data(TASKS["D-A"], cfg)
    assert (office["source"], office["target"], office["target_test"]) == ("office31:dslr",) + ("office31:amazon",) * 2
    # rows identical to "ours" share its stage
    rows, sweeps = sweep_rows(cfg, ["D-A"], [0.5, 0.95], [0.0, 1.0])
    assert [stage_name(r, cfg) for r in rows] == ["rows/p_t=0.5", "rows/ours", "rows/beta=0", "rows/ours"]
    assert sweeps["beta"]["rows"] == ["beta=0", "beta=1"]


# Lines of the paper's tables as its text prints them (tabs written as \t): (experiment, row key, line, index of the
# row's first number in the line -- Table 1 prints two tables side by side)
PAPER_LINES = [
    ("table1", "DANN", r"RevGrad [7]\tS+T\t81.5\tCNN\tS\t45.6", 0),
    ("table1", "S", r"RevGrad [7]\tS+T\t81.5\tCNN\tS\t45.6", 1),
    ("table1", "ours", r"Ours (w $\mathcal{L}^{AT}$ )\tS+T <sub>f</sub> +T+S <sub>f</sub>\t<b>95.6</b>\t"
                       r"Ours (w $\mathcal{L}^{AT}$ )\tS+T <sub>f</sub> +T+S <sub>f</sub>\t<b>95.6</b>", 1),
    ("table2", "JAN", r"JAN [17]\tS+T\t85.4 $\pm$ 0.3\t97.4 $\pm$ 0.2\t99.8 $\pm$ 0.2\t84.7 $\pm$ 0.3\t"
                      r"68.6 $\pm$ 0.3\t70.0 $\pm$ 0.4\t84.3", 0),
    ("table2", "ours", r"Ours (w $\mathcal{L}^{AT}$ )\tS+T <sub>f</sub> +T+S <sub>f</sub>\t86.8 $\pm$ 0.2\t"
                       r"<b>99.3</b> $\pm$ 0.1\t<b>100</b> $\pm$ 0.0\t<b>88.8</b> $\pm$ 0.4\t<b>74.3</b> $\pm$ 0.2\t"
                       r"<b>73.9</b> $\pm$ 0.2\t<b>87.2</b>", 0),
    ("table3", "EM-A+L_AT", r"EM-A + $\mathcal{L}^{AT}$\tS+T <sub>f</sub> +T+S <sub>f</sub>\t80.4 $\pm$ 0.2\t"
                            r"79.1 $\pm$ 0.2\t66.4 $\pm$ 0.2\t58.4 $\pm$ 0.2\t71.1", 0),
    ("table3", "EM-B", r"EM-B\tS+T <sub>f</sub> +T+S <sub>f</sub>\t<i>very low</i>\t<i>very low</i>\t"
                       r"<i>very low</i>\t<i>very low</i>\t<i>very low</i>", 0),
    ("table4", "disc-mmd", r"MMD\t84.7\t84.1\t66.2\t64.5\t74.9", 0),
    ("tableA1", "att-fm", r"FM\t86.0\t87.6\t73.2\t72.9\t79.9", 0),
]


def _paper_cells(line: str) -> list[tuple[float | str, float | None]]:
    """The (mean, std) cells of a printed table line; labels and train-data cells are skipped."""
    out = []
    for cell in line.split(r"\t"):
        cell = re.sub(r"</?[bi]>", "", cell).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(?: \$\\pm\$ (\d+\.\d+))?", cell)
        if cell == "very low":
            out.append((cell, None))
        elif m:
            out.append((float(m.group(1)), float(m.group(2)) if m.group(2) else None))
    return out


@pytest.mark.parametrize("experiment,key,line,first", PAPER_LINES)
def test_paper_numbers_are_the_papers(experiment: str, key: str, line: str, first: int) -> None:
    spec = PAPER[experiment]["rows"][key]
    stds = spec.get("std") or [None] * len(spec["mean"])
    assert list(zip(spec["mean"], stds)) == _paper_cells(line)[first:first + len(spec["mean"])]
    row = next(r for r in EXPERIMENTS[experiment].rows if r.key == key)  # what `daaa reproduce` prints beside ours
    assert [row.paper[t] for t in EXPERIMENTS[experiment].tasks] == spec["mean"]


def _fake_result(acc: float, curve: list[tuple[int, float, float]]) -> dict:
    """A stage result as the trainers return it: curve of (step, accuracy, v) with v the IWCV risk and the SND score
    (the IWCV score is -v: the lowest risk ranks first, the highest SND does)."""
    crit = [{"step": s, "target_test_accuracy": a, "iwcv": -v, "snd": v} for s, a, v in curve]
    best = max(curve, key=lambda c: c[1])
    return {"target_test_accuracy": acc, "oracle_best_accuracy": best[1], "oracle_best_step": best[0],
            "accuracy_curve": [[s, a] for s, a, _ in curve], "criteria_curve": crit, "seconds": 1.5,
            "selection": summarize_selection([{"step": s, "target_test_accuracy": a, "sel_iwcv": -v, "sel_snd": v}
                                              for s, a, v in curve], ["iwcv", "snd"])["selection"]}


def test_results_tables_averages_and_sweep_choice(tmp_path: Path) -> None:
    cfg = load_config("office31", ["selection.criteria=[iwcv, snd]"])
    exp = EXPERIMENTS["table4"]
    rows, tasks, seeds = exp.rows[2:], ["A-W", "D-A"], [0, 1]
    state = {"records": {r.key: {t: [] for t in tasks} for r in rows}, "data": {}, "compute": {t: 3.0 for t in tasks}}
    for r in rows:
        for t in tasks:
            for s in seeds:
                res = _fake_result(0.5 + 0.1 * s, [(1, 0.4, 2.0), (2, 0.8, 1.0), (3, 0.5 + 0.1 * s, 3.0)])
                state["records"][r.key][t].append(_seed_record(res, s, tmp_path, f"rows/{r.key}"))
    res = build_results(exp, rows, tasks, seeds, state, cfg, {}, ["a=b"], 12.0, "now", tmp_path, tmp_path, True)
    jmmd = res["rows"][0]
    assert jmmd["key"] == "disc-jmmd" and jmmd["paper"]["A-W"] == pytest.approx(0.859)
    assert jmmd["paper"]["average"] == pytest.approx((0.859 + 0.701) / 2)
    cell = jmmd["results"]["A-W"]
    assert cell["final"]["values"] == [0.5, 0.6] and cell["final"]["mean"] == pytest.approx(0.55)
    assert cell["oracle"]["mean"] == pytest.approx(0.8) and cell["selected"]["iwcv"]["steps"] == [2, 2]
    assert cell["selected"]["snd"]["steps"] == [3, 3]
    assert jmmd["results"]["average"]["final"]["values"] == pytest.approx([0.5, 0.6])
    assert res["seconds"] == {"wall": 12.0, "compute": 6.0, "per_task": {"A-W": 3.0, "D-A": 3.0}}
    md = format_markdown(res)
    assert "| method | train data | A→W ours | A→W paper | D→A ours | D→A paper | average ours | average paper |" in md
    assert "| JMMD | S+T_f+T+S_f | 80.0 ± 0.0 | 85.9 |" in md  # selected by IWCV: the step-2 snapshot
    table = list(csv.DictReader(format_csv(res).splitlines()))
    assert len(table) == len(rows) * 3 * 4  # rows x (2 tasks + average) x (final, oracle, 2 criteria)
    assert {r["paper"] for r in table if r["row"] == "disc-jmmd" and r["task"] == "A-W"} == {"0.859"}
    assert "moving average" not in md  # office31 ships the last step's weights
    averaged = build_results(exp, rows, tasks, seeds, state, load_config("digits-cpu"), {}, [], 1.0, "now", tmp_path,
                             tmp_path, True)
    assert "the adapt-budget rows ship the moving average of their weights (`adapt.optim.ema_decay` = 0.995)" \
        in format_markdown(averaged)

    # figA1: the criterion picks the beta whose final model it ranks best
    rows, sweeps = sweep_rows(cfg, ["D-A"], [], [0.0, 1.0, 3.0])
    state = {"records": {r.key: {"D-A": []} for r in rows}, "data": {}, "compute": {"D-A": 0.0}}
    for r, final_iwcv, acc in zip(rows, [2.0, 0.7, 1.0], [0.6, 0.75, 0.7]):
        for s in seeds:
            state["records"][r.key]["D-A"].append(
                _seed_record(_fake_result(acc, [(1, 0.3, 5.0), (2, acc, final_iwcv)]), s, tmp_path, "x"))
    res = build_results(EXPERIMENTS["figA1"], rows, ["D-A"], seeds, state, cfg, sweeps, [], 1.0, "now", tmp_path,
                        tmp_path, True)
    choice = res["sweeps"]["beta"]["choice"]["iwcv"]
    assert choice["value"] == 1.0 and choice["accuracy"]["mean"] == pytest.approx(0.75)
    assert res["sweeps"]["beta"]["final"]["mean"] == pytest.approx([0.6, 0.75, 0.7])
    assert res["reference"]["previous SOTA (JAN-A, D→A)"] == pytest.approx(0.692)
    assert "picks beta = 1" in format_markdown(res)


def test_cli_refuses_bad_options(tmp_path: Path, capsys) -> None:
    assert main(["reproduce", "table1", "--out", str(tmp_path / "o"), "--tasks", "X-Y"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["reproduce", "table2", "--out", str(tmp_path / "o"), "--rows", "S,bogus"]) == 2
    assert "unknown row 'bogus'" in capsys.readouterr().err
    assert main(["reproduce", "table2", "--out", str(tmp_path / "o"), "--beta-grid", "1,3",
                 "--set", "adapt.beta=2"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["reproduce", "figA1", "--out", str(tmp_path / "o"), "--beta-grid", "1,3"]) == 2
    assert "figA1 sweeps beta itself" in capsys.readouterr().err
    # Office-31 evaluates on its whole target domain: no labelled target images are left to train the upper bound on
    assert main(["reproduce", "table2", "--out", str(tmp_path / "o"), "--tasks", "A-W", "--rows", "T-sup"]) == 2
    assert "training images are its test images" in capsys.readouterr().err


def test_beta_grid_by_default_where_the_paper_validated_beta() -> None:
    """Supp. Sec. 1: Office-31's beta was chosen "through validation" -- table2/3/4/A1 search 0.3,1,3 unless told
    otherwise; table1 keeps adapt.beta; --set adapt.beta=X fixes beta; --beta-grid chooses the grid."""
    from argparse import Namespace

    from daaa.cli import _beta_grid

    def grid(experiment: str, beta_grid: str | None = None, overrides: tuple[str, ...] = ()) -> list[float] | None:
        return _beta_grid(Namespace(beta_grid=beta_grid, overrides=list(overrides)),
                          EXPERIMENTS[experiment].beta_by_validation)

    assert [grid(e) for e in ("table2", "table3", "table4", "tableA1")] == [[0.3, 1.0, 3.0]] * 4
    assert grid("table1") is None and grid("figA1") is None
    assert grid("table2", overrides=("adapt.beta=0.5",)) is None
    assert grid("table1", "0.1,1") == [0.1, 1.0]


def test_labelled_target_keeps_the_withheld_labels_and_refuses_test_images(tmp_path: Path) -> None:
    """The upper-bound row trains on the target *training* images with their labels; it may never train on an image
    of the target test set."""
    from daaa.data.domain import ImageTensors as Tensors
    from daaa.reproduce import labelled_target

    cfg = load_config("smoke")
    data = pipeline.load_data(cfg, "demo", "demo", "demo")
    assert data.target.labels is None  # every other row sees no target label
    labelled = labelled_target(cfg, "demo", data)
    assert torch.equal(labelled.images, data.target.images) and labelled.labels is not None
    assert labelled.classes == data.source.classes and len(set(labelled.labels.tolist())) == 10
    from dataclasses import replace

    from daaa.data.streaming import LazyImages
    small = replace(cfg, data=replace(cfg.data, cache_bytes=1))  # past the budget it is streamed, as the others are
    streamed = labelled_target(small, "demo", data)
    assert isinstance(streamed.images, LazyImages) and torch.equal(streamed.labels, labelled.labels)
    assert torch.equal(streamed.images[torch.arange(5)], labelled.images[:5])
    test = data.target_test
    data.target_test = Tensors(test.name, test.images[:1], test.labels[:1], [data.target.ids[3]], test.classes)
    with pytest.raises(Exception, match="shares images with --target-test"):
        labelled_target(cfg, "demo", data)


# --------------------------------------------------------------------------------------------- end to end


def _check_results(out: Path, experiment: str, tasks: list[str], row_keys: list[str]) -> dict:
    for name in ("results.md", "results.csv", "results.json"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "daaa.reproduce/1" and res["experiment"] == experiment and res["complete"]
    assert [r["key"] for r in res["rows"]] == row_keys
    for row in res["rows"]:
        for t in tasks:
            cell = row["results"][t]
            assert _in_unit(cell["final"]["mean"]) and _in_unit(cell["oracle"]["mean"]), row["key"]
            assert _in_unit(cell["selected"][res["primary_criterion"]]["mean"]), row["key"]
            assert len(cell["seeds"]) == len(res["seeds"])
        assert set(row["paper"]) >= set(tasks)
    assert res["seconds"]["wall"] > 0 and res["seconds"]["compute"] > 0
    md = (out / "results.md").read_text()
    assert "paper" in md and "selected by IWCV" in md and "Time:" in md
    return res


@pytest.mark.slow
def test_reproduce_table1_smoke_on_the_demo_pair(tmp_path: Path) -> None:
    out = tmp_path / "t1"
    argv = ["reproduce", "table1", "--preset", "smoke", "--seeds", "1", "--out", str(out), "--quiet",
            "--set", f"data.data_root={tmp_path / 'nothing'}"]  # no MNIST there: the demo pair
    assert main(argv) == 0
    res = _check_results(out, "table1", ["M-MM"],
                         ["S", "Tf", "S+Tf", "S+Tf+L_AT", "ours-without-L_AT", "ours", "DANN", "JAN", "T-sup"])
    assert res["data"]["M-MM"]["source"] == "demo" and "embedded demo pair" in res["data"]["M-MM"]["description"]
    assert res["data"]["M-MM"]["n_source_val"] > 0
    paper = {r["key"]: r["paper"]["M-MM"] for r in res["rows"]}
    assert paper["ours"] == pytest.approx(0.956) and paper["S"] == pytest.approx(0.456)
    assert paper["DANN"] == pytest.approx(0.815) and paper["JAN"] is None
    md = (out / "results.md").read_text()
    assert "| Ours (w L_AT) | S+T_f+T+S_f |" in md and "95.6" in md and "embedded demo pair" in md
    # re-running reuses every finished row: same numbers, no stage rewritten
    records = sorted((out / "M-MM" / "seed0").glob("**/stage.json"))
    assert len(records) == 1 + 1 + 8  # translate, source, 8 rows
    mtimes = [p.stat().st_mtime_ns for p in records]
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [p.stat().st_mtime_ns for p in records] == mtimes
    assert [r["results"] for r in again["rows"]] == [r["results"] for r in res["rows"]]


@pytest.mark.slow
def test_reproduce_chooses_beta_over_the_grid_and_runs_the_upper_bound(tmp_path: Path) -> None:
    """`daaa reproduce --beta-grid` on the smoke preset: each L_AT row is trained at every beta of the grid, the beta
    whose final network IWCV ranks best is the row's, and results.json / results.md record the choice and every
    candidate; rows without L_AT are not searched. The target-supervised row trains on the labelled target-train."""
    out = tmp_path / "grid"
    argv = ["reproduce", "table1", "--preset", "smoke", "--rows", "S,S+Tf,ours,T-sup", "--beta-grid", "0.5,2",
            "--out", str(out), "--quiet", "--set", f"data.data_root={tmp_path / 'nothing'}"]
    assert main(argv) == 0
    res = _check_results(out, "table1", ["M-MM"], ["S", "S+Tf", "ours", "T-sup"])
    assert res["beta"] == {"grid": [0.5, 2.0], "configured": 1.0, "criterion": "iwcv"}
    rows = {r["key"]: r for r in res["rows"]}
    assert rows["ours"]["beta_validated"] and not rows["S+Tf"]["beta_validated"]
    rec = rows["ours"]["results"]["M-MM"]["seeds"][0]
    tried = rec["beta_grid"]
    assert [t["beta"] for t in tried] == [0.5, 2.0] and [t["stage"] for t in tried] == ["rows/beta=0.5", "rows/beta=2"]
    assert all(math.isfinite(t["iwcv"]) for t in tried)
    best = max(tried, key=lambda t: t["iwcv"])
    assert rec["beta"] == best["beta"] and rec["stage"] == best["stage"] and rec["final"] == best["final"]
    assert rec["beta_chosen_by"] == "iwcv"
    for t in tried:
        assert (out / "M-MM" / "seed0" / t["stage"] / "stage.json").is_file()
    assert rows["S+Tf"]["results"]["M-MM"]["seeds"][0]["beta_grid"] is None
    # the budgets are stated: S and the upper bound from the initial weights, the others from the source network
    assert rows["S"]["budget"]["init"] == rows["T-sup"]["budget"]["init"] == "initial weights"
    assert rows["ours"]["budget"] == {"init": "source network", "steps": 6, "batch_size": 20}
    assert rows["T-sup"]["train_data"] == "T (labelled)"
    md = (out / "results.md").read_text()
    assert "β chosen by IWCV" in md and "## Budgets" in md
    assert f"| Ours (w L_AT) | S+T_f+T+S_f | MNIST→MNIST-M | {best['beta']:g} |" in md


def _office_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for dom, shift in (("amazon", 0), ("webcam", 60)):
        for c, cls in enumerate(("bike", "mug", "ruler")):
            for k in range(4):
                arr = rng.integers(0, 80, size=(36, 36, 3), dtype=np.uint8) + shift
                arr[:, :, c] += 100
                p = root / "office31" / dom / "images" / cls / f"frame_{k:04d}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)


@pytest.mark.slow
def test_reproduce_table2_on_a_tiny_office31_tree(tmp_path: Path) -> None:
    _office_tree(tmp_path / "data")
    out = tmp_path / "t2"
    sets = [f"data.data_root={tmp_path / 'data'}", "model.pretrained=none", "data.image_size=32", "data.load_size=32",
            "cyclegan.image_size=32", "cyclegan.ngf=4", "cyclegan.ndf=4", "cyclegan.n_blocks=1", "cyclegan.n_layers_d=1",
            "cyclegan.steps=1", "cyclegan.decay_start=0", "cyclegan.batch_size=2", "source.steps=1",
            "source.batch_size=6", "source.eval_interval=1", "adapt.steps=2", "adapt.batch_size=6",
            "adapt.eval_interval=2", "adapt.sync_interval=1"]
    # every kind of row on ResNet-50: the source network, both kinds of baseline, DAAA with and without S / S_f
    # (the other Table 2 rows differ from these only in adapt.train_data / adapt.beta, run on digits above)
    rows = ["S", "DANN", "JAN", "Tf+T+L_AT", "ours"]
    # one beta: the validation path without its cost (the grid itself is tested on the smoke preset)
    argv = (["reproduce", "table2", "--tasks", "A-W", "--rows", ",".join(rows), "--out", str(out), "--quiet",
             "--beta-grid", "1"] + [a for s in sets for a in ("--set", s)])
    assert main(argv) == 0
    res = _check_results(out, "table2", ["A-W"], rows)
    d = res["data"]["A-W"]
    assert (d["source"], d["target"], d["target_test"]) == ("office31:amazon", "office31:webcam", "office31:webcam")
    assert (d["n_source"], d["n_source_val"], d["n_target"], d["n_target_test"]) == (9, 3, 12, 12)
    paper = {r["key"]: r["paper"]["A-W"] for r in res["rows"]}
    assert paper["S"] == pytest.approx(0.684) and paper["JAN"] == pytest.approx(0.854)
    assert paper["ours"] == pytest.approx(0.868)
    assert res["config"]["model"] == "resnet50" and res["beta"]["grid"] == [1.0]
    assert {r["key"]: r["beta_validated"] for r in res["rows"]} == {"S": False, "DANN": False, "JAN": False,
                                                                    "Tf+T+L_AT": True, "ours": True}
