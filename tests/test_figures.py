"""Figures (Fig. 1, 3, 4, A1, confusion), `daaa report` and TensorBoard events, at the smoke budget.

One `daaa run` on the embedded demo pair (smoke preset, shrunk further) is shared by the end-to-end tests; the
plot functions are also checked on synthetic inputs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from daaa.figures import plot_attention_maps, plot_confusion, plot_sweeps, plot_training_analysis, sync_steps
from daaa.run_figures import attention_networks, make_run_figures, read_history

SMOKE = ["--preset", "smoke", "--quiet", "--set", "data.demo_source=60", "--set", "data.demo_target_train=60",
         "--set", "data.demo_target_test=30", "--set", "cyclegan.steps=2", "--set", "cyclegan.decay_start=1"]
RUN_FIGURES = ("fig1_attention.png", "fig3_pairs.png", "fig4_training.png", "confusion.png")


def assert_png(path: Path, min_side: int = 150) -> tuple[int, int]:
    assert path.exists(), f"{path} missing"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
        assert min(w, h) >= min_side and max(w, h) <= 6000, (path, im.size)
        # not a blank canvas: some spread of pixel values
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50
    return w, h


# ------------------------------------------------------------------------------------------ plots on synthetic inputs

def _history(steps: int, at0: float, slope: float, acc0: float, sync: int) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        r = {"step": s, "L_AT": at0 + slope * s + 0.01 * ((s * 7) % 5), "L_CE": 1.0 / s, "syncs": s // sync}
        if s % 10 == 0:
            r["target_test_accuracy"] = min(0.99, acc0 + 0.003 * s)
        out.append(r)
    return out


def test_plot_attention_maps_synthetic(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    blob = torch.zeros(3, 8, 8)
    blob[:, 2:5, 3:6] = 1.0
    maps = {"source net": [torch.rand(3, 256, generator=g), torch.rand(3, 64, generator=g)],
            "adapted": [torch.rand(3, 16, 16, generator=g), blob.flatten(1)]}
    labels = torch.tensor([0, 1, 2])
    preds = {"source net": torch.tensor([1, 1, 0]), "adapted": torch.tensor([0, 1, 2])}
    w, h = assert_png(plot_attention_maps(images, maps, ["conv1", "conv3"], tmp_path / "a.png", labels=labels,
                                          predictions=preds))
    assert h > w  # one row per image, one column per network + the input
    assert_png(plot_attention_maps(images[:, :1], maps, ["conv1", "conv3"], tmp_path / "b.png", layer="conv1",
                                   overlay=False))  # grayscale input, raw maps, a chosen layer
    with pytest.raises(ValueError, match="not square"):
        plot_attention_maps(images, {"x": [torch.rand(3, 12)]}, ["c"], tmp_path / "c.png")
    with pytest.raises(ValueError, match="not one of"):
        plot_attention_maps(images, maps, ["conv1", "conv3"], tmp_path / "d.png", layer="conv9")


def test_plot_training_analysis_synthetic(tmp_path: Path) -> None:
    hists = {"ours": _history(120, 0.4, -0.001, 0.6, 40), "ours without L_AT": _history(120, 0.4, 0.002, 0.55, 40)}
    assert sync_steps(hists["ours"]) == [40, 80, 120]
    assert_png(plot_training_analysis(hists, tmp_path / "f4.png", references={"source only": 0.5}))
    # no L_AT logged (e.g. no translation): still a figure
    assert_png(plot_training_analysis({"x": [{"step": 1, "target_test_accuracy": 0.2},
                                             {"step": 2, "target_test_accuracy": 0.3}]}, tmp_path / "f4b.png"))


def test_plot_sweeps_formats(tmp_path: Path) -> None:
    as_dict = {"p_t": {"0.5": 0.70, "0.9": 0.74, "0.95": 0.75}, "beta": {"0": 0.72, "1": 0.75, "10": 0.73},
               "reference": {"label": "JAN (SOTA)", "accuracy": 0.71}, "selected": {"beta": 1}}
    assert_png(plot_sweeps(as_dict, tmp_path / "s1.png"))
    as_list = {"sweeps": {"adapt.beta": [{"value": 0, "mean": 72.0, "std": 1.0}, {"value": 1, "mean": 75.0, "std": 0.5}]}}
    assert_png(plot_sweeps(as_list, tmp_path / "s2.png", reference=70.0), min_side=120)
    reproduce = {"primary_criterion": "iwcv", "reference": {"JAN": 0.69, "paper": 0.74},  # daaa reproduce figA1
                 "sweeps": {"beta": {"param": "adapt.beta", "task": "D-A", "values": [0, 0.1, 1, 10], "rows": [],
                                     "final": {"mean": [0.7, 0.71, 0.75, None], "std": [0.01, 0.0, 0.01, None]},
                                     "oracle": {"mean": [0.72, 0.73, 0.76, 0.7], "std": [0, 0, 0, 0]},
                                     "choice": {"iwcv": {"value": 1.0}}}}}
    assert_png(plot_sweeps(reproduce, tmp_path / "s4.png"))
    with pytest.raises(ValueError, match="no p_t or beta"):
        plot_sweeps({"rows": []}, tmp_path / "s3.png")


def test_plot_confusion(tmp_path: Path) -> None:
    m = torch.tensor([[5, 1, 0], [0, 6, 1], [2, 0, 4]])
    assert_png(plot_confusion(m, ["a", "b", "c"], tmp_path / "c1.png"))
    big = torch.randint(0, 9, (31, 31)) + torch.eye(31, dtype=torch.long) * 30  # Office-31 size: no annotations
    assert_png(plot_confusion({"DAAA": big.tolist()}, [f"class_{i}" for i in range(31)], tmp_path / "c2.png"))
    assert_png(plot_confusion({"source only": m, "DAAA": m.tolist()}, None, tmp_path / "c3.png"))


# ------------------------------------------------------------------------------------------- end to end, smoke budget

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    from daaa.cli import main

    run = tmp_path_factory.mktemp("figrun") / "run"
    assert main(["run", "--source", "demo", "--target", "demo", "--target-test", "demo", "--out", str(run), *SMOKE]) == 0
    return run


@pytest.mark.slow
def test_run_writes_figures(smoke_run: Path) -> None:
    for name in RUN_FIGURES:
        assert_png(smoke_run / "figures" / name)
    # cheap: the log says how long the figures took (well under the 3 s aim on an idle machine; loose when shared)
    m = re.findall(r"figures: .* \((\d+\.\d) s\)", (smoke_run / "log.txt").read_text())
    assert m and float(m[-1]) < 15
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["source_only"]["target_test"]["confusion_matrix"]  # what confusion.png reads, no recompute
    # Fig. 3 is the translate stage's pairs picture
    assert (smoke_run / "figures" / "fig3_pairs.png").read_bytes() == (smoke_run / "translate" / "pairs.png").read_bytes()


@pytest.mark.slow
def test_tensorboard_events_readable(smoke_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("source", "adapt"):
        acc = EventAccumulator(str(smoke_run / stage / "tb"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert f"{stage}/L_CE" in tags, tags
        events = acc.Scalars(f"{stage}/L_CE")
        assert [e.step for e in events] == [h["step"] for h in read_history(smoke_run / stage / "history.jsonl")]
        assert f"{stage}/target_test_accuracy" in tags
    assert "adapt/L_AT" in EventAccumulator(str(smoke_run / "adapt" / "tb")).Reload().Tags()["scalars"]


@pytest.mark.slow
def test_report_markdown_and_html(smoke_run: Path, tmp_path: Path) -> None:
    from daaa.cli import main

    metrics = json.loads((smoke_run / "metrics.json").read_text())
    accs = [f"{metrics[k]['target_test_accuracy'] * 100:.2f}%" for k in ("source_only", "daaa")]
    out = tmp_path / "rep" / "report.md"
    assert main(["report", str(smoke_run), "--out", str(out)]) == 0
    md = out.read_text()
    for text in (*accs, "smoke", "seed", "beta (L_AT)", "seconds per stage", "translate"):
        assert text in md, text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for name in RUN_FIGURES:
        assert any(link.endswith(name) for link in links), name
    for link in links:  # relative links that resolve from the report's folder
        assert not Path(link).is_absolute() and (out.parent / link).exists(), link

    html_out = tmp_path / "report.html"
    assert main(["report", str(smoke_run), str(smoke_run), "--out", str(html_out)]) == 0
    page = html_out.read_text()
    assert page.startswith("<!DOCTYPE html>") and all(a in page for a in accs)
    assert page.count("data:image/png;base64,") >= 2 * len(RUN_FIGURES)  # self-contained
    assert "overview" in page
    assert not list(smoke_run.glob("report*"))  # nothing written into the run folder


@pytest.mark.slow
def test_report_of_reproduce_results_and_demo_rows(smoke_run: Path, tmp_path: Path) -> None:
    """`daaa demo` in a copy of the run (its stages are reused, the no-L_AT and T_f rows are added): Fig. 4 gets
    both curves; a reproduce-style results.json/results.md is shown, and Fig. A1 is made from its sweeps."""
    from daaa.cli import main

    run = tmp_path / "demo"
    shutil.copytree(smoke_run, run)
    shutil.rmtree(run / "figures")
    assert main(["demo", "--out", str(run), *SMOKE]) == 0
    assert read_history(run / "rows" / "ours-without-L_AT" / "history.jsonl")
    assert "adapt: reusing the finished stage" in (run / "log.txt").read_text()
    for name in RUN_FIGURES:
        assert_png(run / "figures" / name)
    assert "adapted without" in " ".join(_attention_columns(run))

    (run / "results.json").write_text(json.dumps({"sweeps": {"p_t": {"0.5": 0.61, "0.95": 0.66},
                                                             "beta": {"0": 0.6, "1": 0.66}}, "reference": 0.64}))
    (run / "results.md").write_text("# figA1\n\n| row | accuracy | paper |\n|---|---|---|\n| beta=1 | 66.0 | 74.3 |\n")
    out = tmp_path / "r.md"
    assert main(["report", str(run), "--out", str(out)]) == 0
    md = out.read_text()
    assert "| beta=1 | 66.0 | 74.3 |" in md and "rows/ours-without-L_AT" in md
    sweep = re.findall(r"\]\(([^)]*figA1_sweeps\.png)\)", md)
    assert sweep and assert_png(out.parent / sweep[0])
    html_out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(html_out)]) == 0
    assert "<td>74.3</td>" in html_out.read_text()
    assert not (run / "figures" / "figA1_sweeps.png").exists()  # the report wrote beside itself


def _attention_columns(run: Path) -> list[str]:
    return list(attention_networks(run))


def test_make_run_figures_never_raises(tmp_path: Path) -> None:
    (tmp_path / "adapt").mkdir()
    (tmp_path / "adapt" / "history.jsonl").write_text("not json\n")
    (tmp_path / "metrics.json").write_text("{broken")
    assert make_run_figures(tmp_path) == {}  # logged and skipped
