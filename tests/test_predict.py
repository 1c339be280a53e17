"""Using a finished run (issue 16), through the command line: train-source + run with torchvision and timm
backbones, `daaa predict`, `daaa export`, the class-name check of `daaa evaluate`, the selected snapshot, old
bare model files, and extending a finished run.

Every run is the smoke preset on tiny image folders made here (3 classes of 32 px colour noise), with even fewer
steps: seconds for the digit CNN, tens of seconds for a torchvision network on 2 shared cores.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import daaa
from daaa import cli
from daaa.config import DataConfig
from daaa.data import load_domain_tensors

pytestmark = pytest.mark.slow

CLASSES = ["cat", "dog", "owl"]
TINY = ["--preset", "smoke", "--quiet", "--set", "runtime.num_threads=1", "--set", "data.load_size=32",
        "--set", "cyclegan.steps=2", "--set", "cyclegan.decay_start=1", "--set", "cyclegan.quality.fit_steps=0"]


def _steps(n: int) -> list[str]:
    out = []
    for section in ("source", "adapt"):
        for k, v in (("steps", n), ("eval_interval", n), ("checkpoint_interval", n), ("batch_size", 8)):
            out += ["--set", f"{section}.{k}={v}"]
    return out


def _images(root: Path, classes: list[str] | None, n: int, shift: int, seed: int) -> Path:
    """``n`` images per class (colour noise around a class colour, ``shift`` brighter), or ``n`` flat ones."""
    rng = np.random.default_rng(seed)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for k, name in enumerate(classes or [""]):
        folder = root / name if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(rng.normal(colours[k % 3], 30, (32, 32, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{k}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"src": _images(root / "src", CLASSES, 6, 0, 0), "tgt": _images(root / "tgt", CLASSES, 6, 40, 1),
            "test": _images(root / "test", CLASSES, 4, 40, 2), "new": _images(root / "new", None, 5, 40, 3),
            "other": _images(root / "other", ["cat", "dog", "yak"], 2, 40, 4)}


def _domains(data: dict[str, Path]) -> list[str]:
    return ["--source", str(data["src"]), "--target", str(data["tgt"]), "--target-test", str(data["test"])]


def _ok(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _fail(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("daaa: error")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A finished digit-CNN run with label-free selection on (a held-out third of S)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    argv = ["run", *_domains(data), "--out", str(out), *TINY, *_steps(4), "--set", "data.source_val_fraction=0.34"]
    assert cli.main(argv) == 0
    return out


# ------------------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "timm/test_resnet"])
def test_train_source_then_run_with_a_backbone_by_name(arch, data, tmp_path, capsys):
    if arch.startswith("timm/"):
        pytest.importorskip("timm")
    out = tmp_path / "run"
    common = [*TINY, *_steps(2), "--set", f"model.arch={arch}"]
    _ok(capsys, ["train-source", "--source", str(data["src"]), "--target-test", str(data["test"]), "--out", str(out),
                 *common])
    _ok(capsys, ["run", *_domains(data), "--out", str(out), *common])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["daaa"]["target_test_accuracy"] <= 1
    assert "source: reusing the finished stage" in (out / "log.txt").read_text()  # run reused train-source's
    assert "aligned layer(s) for L_AT" in (out / "log.txt").read_text()
    info = torch.load(out / "adapt" / "model.pt", weights_only=True)["info"]
    assert info["arch"] == arch and info["classes"] == CLASSES and info["num_classes"] == 3


# ------------------------------------------------------------------------------------------ the model file
def test_model_file_and_checkpoint_describe_the_network(run):
    for name in ("model.pt", "checkpoint.pt"):
        raw = torch.load(run / "adapt" / name, weights_only=True)  # plain types only
        info = raw["info"] if name == "model.pt" else raw["state"]["model_info"]
        assert info["arch"] == "digit_cnn" and info["classes"] == CLASSES
        assert (info["image_size"], info["load_size"], info["channels"]) == (32, 32, 3)
        assert info["mean"] == [0.5, 0.5, 0.5] and info["daaa_version"] == daaa.__version__


def test_evaluate_refuses_a_test_set_of_other_classes(run, data, capsys):
    line = _fail(capsys, ["evaluate", "--run", str(run), "--target-test", str(data["other"])])
    assert "class lists differ: only in the network of" in line and "['owl']" in line and "['yak']" in line
    assert "top-1 accuracy" in _ok(capsys, ["evaluate", "--run", str(run), "--target-test", str(data["test"])])


def test_an_old_bare_model_file_still_loads_with_the_run_config(run, data, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    torch.save(torch.load(run / "adapt" / "model.pt", weights_only=True)["state_dict"], old / "adapt" / "model.pt")
    same = [ln for ln in _ok(capsys, ["evaluate", "--run", str(run), "--target-test", str(data["test"])]).splitlines()
            if "top-1" in ln]
    assert [ln.replace(str(run), str(old)) for ln in same][0] in _ok(
        capsys, ["evaluate", "--run", str(old), "--target-test", str(data["test"])])
    rows = daaa.predict(old, data["new"], progress=False)
    assert {r["class"] for r in rows} <= set(CLASSES)  # names from the translation's manifest


# ------------------------------------------------------------------------------------------ predict
def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_one_row_per_image_with_class_names(run, data, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    _ok(capsys, ["predict", "--run", str(run), "--images", str(data["new"]), "--top-k", "2", "--out", str(out),
                 "--batch-size", "2"])
    rows = _csv(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in data["new"].iterdir())
    assert list(rows[0]) == ["path", "class", "probability", "class_2", "probability_2"]
    for r in rows:
        assert r["class"] in CLASSES and r["class_2"] in CLASSES and r["class"] != r["class_2"]
        assert 1 >= float(r["probability"]) >= float(r["probability_2"]) >= 0
    # an image list ("path [label]" lines, paths relative to the list) and a single file
    listing = data["test"].parent / "test_list.txt"
    files = sorted(data["test"].rglob("*.png"))
    listing.write_text("".join(f"{p.relative_to(listing.parent)} {CLASSES.index(p.parent.name)}\n" for p in files))
    by_list = daaa.predict(run, listing, progress=False)
    assert len(by_list) == len(files) and [r["path"] for r in by_list] == [str(p) for p in files]
    one = daaa.predict(run, files[0], progress=False)
    assert one[0]["class"] == by_list[0]["class"] and one[0]["probability"] == pytest.approx(by_list[0]["probability"])
    # the predictions are those `daaa evaluate` scores
    truth = [CLASSES.index(p.parent.name) for p in files]
    acc = np.mean([CLASSES.index(r["class"]) == t for r, t in zip(by_list, truth)])
    report = _ok(capsys, ["evaluate", "--run", str(run), "--target-test", str(data["test"])])
    assert f"top-1 accuracy: {acc * 100:.2f}%" in report


def test_predict_bad_input_is_one_line(run, tmp_path, capsys):
    assert "--images" in _fail(capsys, ["predict", "--run", str(run), "--images", str(tmp_path / "nope"),
                                        "--out", str(tmp_path / "p.csv")])
    line = _fail(capsys, ["predict", "--run", str(run), "--stage", "rows/x", "--images", str(tmp_path),
                          "--out", str(tmp_path / "p.csv")])
    assert "is the rows/x stage finished? This run has: --stage adapt, --stage source" in line
    line = _fail(capsys, ["predict", "--run", str(run), "--images", str(tmp_path), "--top-k", "0",
                          "--out", str(tmp_path / "p.csv")])
    assert line.endswith("--top-k 0: must be at least 1")


def test_predict_names_the_model_file_it_used(run, data, tmp_path, capsys):
    out = _ok(capsys, ["predict", "--run", str(run), "--images", str(data["new"]), "--stage", "selected",
                       "--out", str(tmp_path / "p.csv")])
    assert f"of {run / 'adapt' / 'model-selected.pt'} written to" in out


# ------------------------------------------------------------------------------------------ export
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # torch >= 2.10 deprecates TorchScript
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trips_with_its_preprocessing(fmt, run, data, tmp_path, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
    out = tmp_path / f"model.{fmt}"
    _ok(capsys, ["export", "--run", str(run), "--format", fmt, "--out", str(out)])
    images = load_domain_tensors(str(data["test"]), "target_test", DataConfig(load_size=32)).images  # uint8
    if fmt == "torchscript":
        extra = {"daaa_model.json": ""}
        module = torch.jit.load(str(out), _extra_files=extra)
        probs = module(images)
        assert json.loads(extra["daaa_model.json"])["classes"] == CLASSES
    else:
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        probs = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    rows = daaa.predict(run, data["test"], progress=False)
    expected = torch.tensor([r["probability"] for r in rows])
    assert probs.shape == (len(images), 3)
    assert torch.allclose(probs.max(dim=1).values, expected, atol=1e-4)  # daaa predict's numbers, outside daaa
    assert [CLASSES[int(k)] for k in probs.argmax(dim=1)] == [r["class"] for r in rows]


def test_export_bad_input_is_one_line(run, tmp_path, capsys, monkeypatch):
    line = _fail(capsys, ["export", "--run", str(run), "--stage", "source2", "--format", "torchscript",
                          "--out", str(tmp_path / "m.pt")])
    assert "source2/model.pt does not exist" in line and not (tmp_path / "m.pt").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    line = _fail(capsys, ["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "needs the onnx and onnxruntime packages (pip install 'daaa[onnx]')" in line
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------------------ selected snapshot
def test_the_selected_snapshot_is_kept_and_used(run, data):
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = metrics["selected"]["adapt"]
    result = json.loads((run / "adapt" / "stage.json").read_text())["result"]
    assert chosen["criterion"] == "iwcv" and chosen["step"] == result["selection"]["iwcv"]["step"]
    snapshot = torch.load(run / "adapt" / "model-selected.pt", weights_only=True)
    assert snapshot["selected"]["step"] == chosen["step"] and snapshot["info"]["classes"] == CLASSES
    assert torch.load(run / "adapt" / "checkpoint.pt", weights_only=True)["state"]["selected"] == {
        k: chosen[k] for k in ("criterion", "step", "value")}
    rows = daaa.predict(run, data["new"], stage="selected", progress=False)
    assert len(rows) == 5


# ------------------------------------------------------------------------------------------ extending a run
def test_extending_a_finished_run_continues_from_its_checkpoint(run, data, tmp_path, capsys):
    ext = tmp_path / "ext"
    shutil.copytree(run, ext)
    base = ["run", *_domains(data), "--out", str(ext), *TINY, *_steps(4), "--set", "data.source_val_fraction=0.34"]
    source_record = (ext / "source" / "stage.json").read_text()
    _ok(capsys, [*base, "--set", "adapt.steps=7"])  # 3 more steps (the smoke budget is 4)
    log = (ext / "log.txt").read_text()
    assert "adapt: extending the finished stage from 4 to 7 steps (adapt.steps)" in log
    assert "resuming from" in log and "at step 4/7" in log
    history = [json.loads(ln) for ln in (ext / "adapt" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 8))
    assert json.loads((ext / "adapt" / "stage.json").read_text())["key"]["adapt"]["steps"] == 7
    assert (ext / "source" / "stage.json").read_text() == source_record  # reused, not redone
    assert "would shorten it" in _fail(capsys, [*base, "--set", "adapt.steps=5"])
    assert "incompatible config (adapt.beta" in _fail(capsys, [*base, "--set", "adapt.steps=7",
                                                               "--set", "adapt.beta=0.5"])
    # the translation too; the adapt stage made from the shorter one is then refused, saying why
    _ok(capsys, ["translate", *base[1:], "--set", "cyclegan.steps=3"])
    assert "translate: resuming from step 2 of 3" in (ext / "log.txt").read_text()
    line = _fail(capsys, [*base, "--set", "adapt.steps=7", "--set", "cyclegan.steps=3"])
    assert "an earlier stage of this run was extended" in line
