"""Bad input and faults through the command line: each case ends with exit status 2, ONE line on stderr naming the
file or option, no traceback (unless --debug), and nothing half-written in the run folder.

The resume-after-``kill -9`` test is in tests/test_distributed.py (it shares a reference run with the DDP test).
All runs use the smoke preset on the embedded demo pair or on tiny image folders: seconds each.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daaa import cli
from daaa.config import DataConfig
from daaa.data import load_domain_tensors
from daaa.errors import DataError

SMOKE = ["--preset", "smoke", "--quiet", "--set", "runtime.num_threads=1"]


def _fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI, expect a failure, return its one error line (after checking there is exactly one)."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("daaa: error")]
    assert len(errors) == 1, err
    return errors[0]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_half_written(run: Path) -> None:
    """A failed command leaves at most the run folder's config.yaml and log.txt (which records it)."""
    if run.exists():
        assert set(_files(run)) <= {"config.yaml", "log.txt"}, _files(run)


def _image(path: Path, size: tuple[int, int] = (20, 20), mode: str = "RGB", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _labelled(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3, **kw) -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            _image(root / c / f"{i}.png", seed=10 * k + i, **kw)
    return root


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_path(tmp_path: Path, capsys) -> None:
    line = _fail(capsys, ["train-source", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *SMOKE])
    assert "--source" in line and str(tmp_path / "nope") in line
    _assert_nothing_half_written(tmp_path / "run")


def test_empty_domain(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    line = _fail(capsys, ["run", "--source", str(_labelled(tmp_path / "src")), "--target", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "run"), *SMOKE])
    assert str(tmp_path / "empty") in line and "empty" in line
    _assert_nothing_half_written(tmp_path / "run")


def test_corrupt_image(tmp_path: Path, capsys) -> None:
    src = _labelled(tmp_path / "src")
    bad = src / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert str(bad) in line and "cannot read image" in line
    _assert_nothing_half_written(tmp_path / "run")


def test_class_names_differ(tmp_path: Path, capsys) -> None:
    src = _labelled(tmp_path / "src", ("cat", "dog"))
    test = _labelled(tmp_path / "test", ("cat", "cow"))
    line = _fail(capsys, ["train-source", "--source", str(src), "--target-test", str(test),
                          "--out", str(tmp_path / "run"), *SMOKE])
    assert "class lists differ" in line and "dog" in line and "cow" in line
    _assert_nothing_half_written(tmp_path / "run")


def test_tiny_image_refused(tmp_path: Path, capsys) -> None:
    """Images are resized to data.load_size, but not upsampled more than 8x: a 2x2 image for 32 px is refused."""
    src = _labelled(tmp_path / "src")
    tiny = _image(src / "a" / "tiny.png", size=(2, 2))
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert str(tiny) in line and "2x2" in line and "data.load_size" in line
    _assert_nothing_half_written(tmp_path / "run")


def test_other_sizes_and_channels_are_converted(tmp_path: Path) -> None:
    """The documented behaviour: any mode becomes data.channels, any size >= load_size / 8 becomes load_size."""
    root = tmp_path / "src"
    _image(root / "a" / "rgb_wide.png", size=(60, 9))
    _image(root / "a" / "gray.png", size=(4, 4), mode="L")  # 4 px * 8 >= 32: allowed
    _image(root / "b" / "big.png", size=(300, 200))
    t = load_domain_tensors(str(root), "source", DataConfig(load_size=32, image_size=32, channels=1))
    assert t.images.shape == (3, 1, 32, 32) and t.images.dtype == torch.uint8
    t = load_domain_tensors(str(root), "source", DataConfig(load_size=32, image_size=32, channels=3))
    assert t.images.shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="4x4"):
        load_domain_tensors(str(root), "source", DataConfig(load_size=64, image_size=64))


@pytest.mark.parametrize("override, needle", [
    ("adapt.bogus=1", "unknown option adapt.bogus"),
    ("runtime.precision=fp8", "option runtime.precision"),
    ("adapt.beta=-1", "option adapt.beta"),
    ("source.steps=many", "option source.steps"),
    ("cyclegan.style_grid=99", "option cyclegan.style_grid"),
])
def test_invalid_config(tmp_path: Path, capsys, override: str, needle: str) -> None:
    line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(tmp_path / "run"), *SMOKE,
                          "--set", override])
    assert needle in line
    assert not (tmp_path / "run").exists()  # the config is checked before the run folder is made


def test_fp16_needs_cuda(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(tmp_path / "run"), *SMOKE,
                          "--set", "runtime.precision=fp16"])
    assert "runtime.precision" in line and "CUDA" in line


def test_unwritable_output(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(blocker / "run"), *SMOKE])
    assert str(blocker / "run") in line and "not writable" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output(tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(ro / "run"), *SMOKE])
    finally:
        ro.chmod(0o700)
    assert str(ro / "run") in line


def test_write_failure_mid_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """A disk that fills up (or a folder whose permissions change) during training: one line naming the path."""
    import daaa.runs

    def full(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(daaa.runs, "atomic_torch_save", full)
    run = tmp_path / "run"
    line = _fail(capsys, ["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE])
    assert str(run / "source" / "checkpoint.pt") in line and "No space left" in line
    assert not (run / "metrics.json").exists() and not (run / "source" / "stage.json").exists()


def test_incompatible_run_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE]) == 0
    before = {k: v for k, v in _files(run).items() if k.startswith("source/")}
    capsys.readouterr()
    line = _fail(capsys, ["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE,
                          "--set", "source.steps=7"])
    assert str(run / "source") in line and "incompatible config" in line and "source.steps: 6 before, 7 now" in line
    after = {k: v for k, v in _files(run).items() if k.startswith("source/")}
    assert after == before  # the finished stage is untouched
    # --overwrite discards it
    assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE,
                     "--set", "source.steps=7", "--overwrite"]) == 0


def test_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    """Outside damage to a checkpoint (our writes are atomic): one line naming it and how to restart the stage."""
    run = tmp_path / "run"
    args = ["train-source", "--source", "demo", "--out", str(run), *SMOKE]
    assert cli.main(args) == 0
    ck = run / "source" / "checkpoint.pt"
    (run / "source" / "stage.json").unlink()  # unfinished: a re-run resumes from the checkpoint
    ck.write_bytes(b"garbage")
    capsys.readouterr()
    line = _fail(capsys, args)
    assert str(ck) in line and "cannot be read" in line


def test_debug_shows_traceback(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        cli.main(["train-source", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), *SMOKE,
                  "--debug"])


# ------------------------------------------------------------------------------------------------ NaN guard


def test_nan_loss_stops_with_step_and_term(tmp_path: Path, capsys) -> None:
    """lr = 1e30: the first update throws the weights to ~1e30, the next loss is NaN. The run stops before that
    update, names step and term, and the checkpoint of step 1 stays loadable."""
    run = tmp_path / "run"
    line = _fail(capsys, ["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE,
                          "--set", "source.optim.lr=1e30", "--set", "source.checkpoint_interval=1"])
    assert "step 2" in line and "loss term L_CE" in line and "nan" in line.lower()
    assert str(run / "source" / "checkpoint.pt") in line
    ck = torch.load(run / "source" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state"]["model"].values())
    # nothing that claims completion
    assert not (run / "source" / "stage.json").exists() and not (run / "source" / "model.pt").exists()
    assert not (run / "metrics.json").exists()


def test_nan_in_cyclegan_stops_with_step_and_term(tmp_path: Path, capsys, monkeypatch) -> None:
    """A discriminator output that turns NaN in step 2 (lr=1e30 does it too, but NaN arithmetic in the convs is
    slow on CPU)."""
    from daaa.cyclegan import GANLoss

    calls = {"n": 0}
    forward = GANLoss.forward

    def poisoned(self, pred, target_is_real):
        calls["n"] += 1  # six calls per training step
        loss = forward(self, pred, target_is_real)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(GANLoss, "forward", poisoned)
    run = tmp_path / "run"
    line = _fail(capsys, ["translate", "--source", "demo", "--target", "demo", "--out", str(run), *SMOKE,
                          "--set", "cyclegan.checkpoint_interval=1"])
    assert "cyclegan step 2: loss term g_st is nan" in line
    ck = torch.load(run / "translate" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ck["model"]["step"] == 1
    # no translated data set, no completion record
    for name in ("stage.json", "translated.pt", "synthetic_target", "synthetic_source", "manifest.json"):
        assert not (run / "translate" / name).exists(), name


def test_nonfinite_weights_are_not_checkpointed(tmp_path: Path) -> None:
    """A finite loss whose update breaks the weights: the checkpoint is refused, the previous one stays."""
    from daaa.distributed import Context
    from daaa.errors import NonFiniteLossError
    from daaa.runs import Stage
    from daaa.trainers.loop import TrainingLoop

    stage = Stage(tmp_path, "s", {})
    stage.begin()
    ctx = Context(0, 1, torch.device("cpu"), None, False)
    w = {"w": torch.ones(3)}

    def step(i: int) -> dict:
        if i == 3:
            w["w"] = torch.tensor([1.0, float("inf"), 1.0])
        return {"loss": 1.0}

    loop = TrainingLoop(stage, ctx, steps=6, checkpoint_interval=2, eval_interval=100, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"step 4: w became non-finite"):
        loop.run(step, lambda: dict(w), lambda s: None)
    assert torch.load(stage.checkpoint_path, weights_only=False)["step"] == 2


def test_adapt_runs_only_the_adapt_stage(tmp_path: Path, capsys) -> None:
    """`daaa adapt` trains the adapt stage only: without a translation and a source network in --out it stops with
    one line naming what is missing; after `translate` and `train-source` it adapts and leaves those stages as they
    were (not retrained)."""
    run = tmp_path / "run"
    domains = ["--source", "demo", "--target", "demo", "--target-test", "demo", "--out", str(run)]
    line = _fail(capsys, ["adapt", *domains, *SMOKE])
    assert str(run / "translate") in line and "daaa translate" in line
    assert cli.main(["translate", *domains, *SMOKE]) == 0
    capsys.readouterr()
    line = _fail(capsys, ["adapt", *domains, *SMOKE])
    assert str(run / "source") in line and "no finished source stage" in line
    assert not (run / "adapt").exists()
    assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE]) == 0
    before = {k: v for k, v in _files(run).items() if k.startswith(("source/", "translate/"))}
    assert cli.main(["adapt", *domains, *SMOKE]) == 0
    assert (run / "adapt" / "stage.json").is_file() and (run / "adapt" / "model.pt").is_file()
    assert {k: v for k, v in _files(run).items() if k.startswith(("source/", "translate/"))} == before
