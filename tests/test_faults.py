"""Bad input and faults through the command line: each case ends with exit status 2, ONE line on stderr naming the
file or option, no traceback (unless --debug), and nothing half-written in the run folder; faults that stop a run
(a second writer, a full disk, Ctrl-C, SIGTERM, kill -9) lose nothing: the same command resumes to the metrics of an
uninterrupted run. docs/scale-out.md's fault table lists every case with its test.

``kill -9`` inside the adapt stage is tested in tests/test_distributed.py; inside translate and source here.
All runs use the smoke preset on the embedded demo pair or on tiny image folders: seconds each (the signal and
kill tests, marked slow, run the whole pipeline in subprocesses).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from daaa import cli
from daaa.config import DataConfig, load_config
from daaa.data import load_domain_tensors
from daaa.distributed import Context
from daaa.errors import ConfigError, DataError
from test_distributed import DEMO, DETERMINISTIC, _daaa as daaa, _finish as finish, _start as start_daaa

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
    # caught before torch's constructors raise a traceback, or nan trains on silently (nan < 0 is False)
    ("source.optim.lr=-1", "option source.optim.lr: -1.0 must be positive"),
    ("adapt.beta=nan", "option adapt.beta: expected a finite number"),
    ("adapt.beta=.inf", "option adapt.beta: expected a finite number"),
    ("source.optim.weight_decay=-1", "option source.optim.weight_decay"),
    ("cyclegan.lr=-1", "option cyclegan.lr"),
    ("data.mean=[0.5]", "option data.mean: [0.5] has 1 value(s) for data.channels = 3"),
    ("data.std=[0,0,0]", "option data.std[0]: 0.0 must be positive"),
    ("model.width=0", "option model.width"),
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
                          "--set", "source.batch_size=12"])  # (a raised source.steps extends the stage instead)
    assert str(run / "source") in line and "incompatible config" in line
    assert "source.batch_size: 16 before, 12 now" in line
    after = {k: v for k, v in _files(run).items() if k.startswith("source/")}
    assert after == before  # the finished stage is untouched
    # --overwrite discards it
    assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE,
                     "--set", "source.batch_size=12", "--overwrite"]) == 0


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
    ck = torch.load(run / "source" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state"]["model"].values())
    # nothing that claims completion
    assert not (run / "source" / "stage.json").exists() and not (run / "source" / "model.pt").exists()
    assert not (run / "metrics.json").exists()


def test_a_nan_step_changes_no_weight_although_its_backward_ran(tmp_path: Path) -> None:
    """The step queues backward before it reads the losses back (a GPU overlaps the two); the guard still comes
    before the update: weights and optimiser state stay those of the last good step."""
    from daaa import bench
    from daaa.errors import NonFiniteLossError

    cfg = load_config("smoke")
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), Context(0, 1, torch.device("cpu"), None, False),
                                 tmp_path)
    trainer.step(0)
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    moments = [v.clone() for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    losses = trainer.losses
    trainer.losses = lambda batch, step: {**losses(batch, step), "L_EM": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match="step 2: loss term L_EM is nan"):
        trainer.step(1)
    assert all(torch.equal(v, trainer.net.state_dict()[k]) for k, v in weights.items())
    after = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    assert len(after) == len(moments) and all(torch.equal(a, b) for a, b in zip(moments, after))


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
    ck = torch.load(run / "translate" / "checkpoint.pt", map_location="cpu", weights_only=True)
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
    assert torch.load(stage.checkpoint_path, weights_only=True)["step"] == 2


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


# ------------------------------------------------------------------------------------------- one writer per run folder


@pytest.mark.parametrize("command", [
    ["train-source", "--source", "demo", *SMOKE],
    ["reproduce", "table1", "--digits-data", "demo", "--preset", "smoke", "--quiet"],
])
def test_second_writer_is_refused_naming_the_holder(tmp_path: Path, capsys, command: list[str]) -> None:
    """While a command holds RUN's lock, a second command on RUN stops with one line naming host, PID and command
    line of the first, and changes nothing in the folder."""
    from daaa.runs import run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("made by the first command\n")
    with run_lock(run, "daaa run --out elsewhere"):
        before = _files(run)
        line = _fail(capsys, [*command, "--out", str(run)])
        assert _files(run) == before
    assert f"{run}: in use by PID {os.getpid()} on {socket.gethostname()}" in line
    assert "`daaa run --out elsewhere`" in line and "another --out" in line
    assert not (run / ".daaa.lock").exists()  # released by its holder


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path, monkeypatch, capsys) -> None:
    """kill -9 leaves RUN/.daaa.lock behind; the next command takes it over (flock is released by the kernel; where
    the file system has no flock, a dead PID on this host is stale) -- a live holder is still refused."""
    import daaa.runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "command": "daaa run (killed)", "since": "then"}
    args = ["train-source", "--source", "demo", "--out", str(run), *SMOKE, "--set", "source.steps=1"]
    for flock in (True, False):  # the kernel's flock, then the PID check of file systems without it
        if not flock:
            monkeypatch.setattr(daaa.runs, "_flock", lambda fd: None)
        (run / ".daaa.lock").write_text(json.dumps(stale))
        assert cli.main(args) == 0, capsys.readouterr().err
        assert not (run / ".daaa.lock").exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".daaa.lock").write_text(json.dumps({**stale, "pid": alive.pid}))
        line = _fail(capsys, args)
        assert f"in use by PID {alive.pid}" in line and str(run / ".daaa.lock") in line
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------------------ disk full


def _checkpoint_step(path: Path) -> int:
    """The step of a trainer's checkpoint or of the translate stage's (the CycleGAN's own state holds it)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["step"] if "step" in ck else ck["model"]["step"]


def _no_temporary_files(run: Path) -> None:
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".output-")]


DISK_ARGS = ["train-source", "--source", "demo", "--target-test", "demo", *SMOKE, "--set", "source.steps=12",
             "--set", "source.checkpoint_interval=2", "--set", "source.eval_interval=6"]


@pytest.fixture(scope="module")
def disk_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The metrics of an uninterrupted DISK_ARGS run."""
    run = tmp_path_factory.mktemp("disk_reference") / "run"
    assert cli.main([*DISK_ARGS, "--out", str(run)]) == 0
    return _without_seconds(json.loads((run / "metrics.json").read_text()))


def _without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def _resumes_to_reference(run: Path, reference: dict, capsys) -> None:
    """Re-running the same command resumes from the checkpoint and ends with the uninterrupted run's metrics."""
    capsys.readouterr()
    assert cli.main([*DISK_ARGS, "--out", str(run)]) == 0, capsys.readouterr().err
    assert _without_seconds(json.loads((run / "metrics.json").read_text())) == reference
    _no_temporary_files(run)


def test_disk_full_keeps_last_checkpoint_and_resumes(tmp_path: Path, capsys, monkeypatch, disk_reference) -> None:
    """The second checkpoint write fails as on a full disk (ENOSPC from fsync, after the bytes went into the
    temporary file, naming no file): one line naming the checkpoint, the first checkpoint intact, no temporary
    file, nothing that claims completion; once space is back the same command resumes to the same metrics."""
    real_fsync, big_writes = os.fsync, []

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_size > 100_000:  # a checkpoint (model.pt and the small files are below)
            big_writes.append(fd)
            if len(big_writes) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    line = _fail(capsys, [*DISK_ARGS, "--out", str(run)])
    assert line == f"daaa: error: {run / 'source' / 'checkpoint.pt'}: No space left on device"
    assert _checkpoint_step(run / "source" / "checkpoint.pt") == 2
    assert not (run / "source" / "stage.json").exists() and not (run / "metrics.json").exists()
    _no_temporary_files(run)
    monkeypatch.setattr(os, "fsync", real_fsync)
    _resumes_to_reference(run, disk_reference, capsys)
    assert "source: resuming from" in (run / "log.txt").read_text()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:100]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_small_disk(small_disk: Path, capsys, disk_reference) -> None:
    """A real full disk: the tmpfs is filled until a checkpoint and a half fit. The run ends with one line
    `RUN/...: No space left on device`; every file left is whole (each .pt loads, each .json parses); after the
    filler is deleted the same command resumes to the uninterrupted run's metrics."""
    run = small_disk / "run"
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * (free - 320 * 1024))  # the checkpoint is ~190 KiB and written beside the old one
    line = _fail(capsys, [*DISK_ARGS, "--out", str(run)])
    assert line.startswith(f"daaa: error: {run}") and line.endswith(": No space left on device"), line
    for p in run.rglob("*.pt"):
        torch.load(p, map_location="cpu", weights_only=True)
    for p in run.rglob("*.json"):
        json.loads(p.read_text())
    assert not (run / "source" / "stage.json").exists()
    _no_temporary_files(run)
    filler.unlink()
    _resumes_to_reference(run, disk_reference, capsys)


# -------------------------------------------------------------------------------------------- Ctrl-C, SIGTERM, kill -9


# long enough stages that a signal sent once a stage's first checkpoint exists lands inside the stage
PIPELINE = ["run", *DEMO, *DETERMINISTIC, "--set", "adapt.filtering=false", "--set", "cyclegan.steps=24",
            "--set", "cyclegan.decay_start=12", "--set", "cyclegan.checkpoint_interval=2", "--set", "source.steps=24",
            "--set", "source.checkpoint_interval=2", "--set", "adapt.steps=40", "--set", "adapt.checkpoint_interval=4",
            "--set", "adapt.eval_interval=10"]


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """An uninterrupted PIPELINE run, started at once in the background (it runs beside the interrupted ones);
    calling the fixture's value waits for it and gives its run folder."""
    cwd = tmp_path_factory.mktemp("pipeline_reference")
    proc = start_daaa([*PIPELINE, "--out", str(cwd / "run")], cwd)
    result: list[Path] = []

    def done() -> Path:
        if not result:
            r = finish(proc)
            assert r.returncode == 0, r.stderr[-3000:]
            result.append(cwd / "run")
        return result[0]

    yield done
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _signal_mid_stage(run: Path, stage: str, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start PIPELINE on ``run``, send ``signum`` once ``stage`` has written its first checkpoint, wait; return the
    finished process and the step of the checkpoint it left."""
    p = start_daaa([*PIPELINE, "--out", str(run)], run.parent)
    checkpoint = run / stage / "checkpoint.pt"
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():
            assert p.poll() is None, f"ended before {stage} checkpointed: {p.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, f"no {stage} checkpoint in 300 s"
            time.sleep(0.01)
        (os.killpg if signum == signal.SIGKILL else os.kill)(p.pid, signum)
        r = finish(p)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert not (run / stage / "stage.json").exists(), f"the signal landed after {stage} finished"
    return r, _checkpoint_step(checkpoint)


def _assert_same_as_reference(run: Path, ref: Path) -> None:
    m_ref, m_run = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert _without_seconds(m_run) == _without_seconds(m_ref)
    for stage in ("source", "adapt"):
        assert (run / stage / "history.jsonl").read_text() == (ref / stage / "history.jsonl").read_text()
    _no_temporary_files(run)
    assert not (run / ".daaa.lock").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_the_step_loop_checkpoints_that_step(tmp_path: Path, signum: int) -> None:
    """The loop itself, in-process: a signal during step 3 (checkpoints every 4) lets step 3 finish, checkpoints
    it and raises Interrupted naming step and stage; the handlers in place before are back afterwards."""
    from daaa.errors import Interrupted
    from daaa.runs import Stage
    from daaa.trainers.loop import TrainingLoop

    stage = Stage(tmp_path, "adapt", {})
    stage.begin()
    w = {"w": torch.zeros(2)}

    def step(i: int) -> dict:
        if i == 2:
            signal.raise_signal(signum)  # handled between bytecodes: the step goes on
        w["w"] = w["w"] + 1
        return {"loss": 1.0}

    before = signal.getsignal(signum)
    loop = TrainingLoop(stage, Context(0, 1, torch.device("cpu"), None, False), steps=10, checkpoint_interval=4,
                        eval_interval=100, progress=False)
    with pytest.raises(Interrupted) as info:
        loop.run(step, lambda: dict(w), lambda s: w.update(s))
    assert info.value.signum == signum
    assert info.value.message == "interrupted at step 3 of adapt; run the same command to resume"
    ck = torch.load(stage.checkpoint_path, weights_only=True)
    assert ck["step"] == 3 and torch.equal(ck["state"]["w"], torch.full((2,), 3.0))
    assert signal.getsignal(signum) == before


def test_ranks_agree_on_the_signal_to_stop_at() -> None:
    """Under torchrun each rank gets SIGTERM at its own moment: one all-reduce per step makes every rank stop at
    the same step, also the ones that have not seen the signal yet."""
    from daaa.trainers.loop import StopSignals

    class OtherRankGotSigterm(Context):
        def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
            return t + torch.tensor([0.0, 1.0])  # the other rank's flags: (SIGINT, SIGTERM)

    ctx = OtherRankGotSigterm(0, 2, torch.device("cpu"), None, False)
    assert StopSignals(ctx).requested() == signal.SIGTERM
    quiet = StopSignals(Context(0, 2, torch.device("cpu"), None, False))
    quiet.ctx.all_reduce_sum = lambda t: t  # type: ignore[method-assign]
    assert quiet.requested() == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum, stage", [(signal.SIGTERM, "adapt"), (signal.SIGINT, "translate")])
def test_signal_checkpoints_the_current_step_and_resumes(tmp_path: Path, pipeline_reference, signum: int,
                                                         stage: str) -> None:
    """SIGTERM (a scheduler's pre-emption) or Ctrl-C inside a stage: the loop finishes the step, writes a
    checkpoint at it, prints one line and exits 143 / 130; the same command resumes at that step and ends with
    exactly the metrics and histories of an uninterrupted run (deterministic CPU)."""
    run = tmp_path / "run"
    r, step = _signal_mid_stage(run, stage, signum)
    assert r.returncode == 128 + signum, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("daaa:")]
    assert lines == [f"daaa: interrupted at step {step} of {stage}; run the same command to resume"], r.stderr
    resumed = daaa([*PIPELINE, "--out", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = (f"adapt: resuming from {run / 'adapt' / 'checkpoint.pt'} at step {step}/40" if stage == "adapt"
                  else f"translate: resuming from step {step} of 24")
    assert resumed_at in (run / "log.txt").read_text()
    _assert_same_as_reference(run, pipeline_reference())


@pytest.mark.slow
def test_kill9_in_translate_then_in_source_resumes_to_the_same_result(tmp_path: Path, pipeline_reference) -> None:
    """kill -9 inside the translate stage, then, in the re-run, inside the source stage (kill -9 inside adapt is
    tests/test_distributed.py's): each re-run takes over the dead process's lock and resumes the killed stage from
    its checkpoint, and the last one ends with exactly the uninterrupted run's metrics."""
    run = tmp_path / "run"
    expected = []
    for stage in ("translate", "source"):  # the second start is the re-run of the first
        r, step = _signal_mid_stage(run, stage, signal.SIGKILL)
        assert r.returncode == -signal.SIGKILL and 0 < step < 24
        assert (run / ".daaa.lock").exists()  # left behind by the killed process
        expected.append(f"translate: resuming from step {step} of 24" if stage == "translate" else
                        f"source: resuming from {run / 'source' / 'checkpoint.pt'} at step {step}/24")
    resumed = daaa([*PIPELINE, "--out", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert all(line in log for line in expected), expected
    _assert_same_as_reference(run, pipeline_reference())


# ------------------------------------------------------------------------------------------------ files others can read


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_respect_the_umask(tmp_path: Path, umask: int) -> None:
    """Everything a run writes -- config.yaml, metrics.json, model.pt, checkpoints, stage records, reports --
    has the permissions of a plain open(): 0644 with the usual umask 022 (mkstemp alone would give 0600)."""
    run = tmp_path / "run"
    old = os.umask(umask)
    try:
        assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), *SMOKE]) == 0
        assert cli.main(["report", str(run), "--out", str(run / "report.html")]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    for name in ("config.yaml", "metrics.json", "report.html", "source/model.pt", "source/checkpoint.pt",
                 "source/stage.json", "source/history.jsonl"):
        assert name in modes, sorted(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ------------------------------------------------------------------------------------------------ untrusted files


class _RunsCode:
    """Unpickling this calls os.system: what a crafted model file from elsewhere could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    """A translated.pt, checkpoint.pt or model.pt whose unpickling would run a command: one line naming the file
    and the Python object it asks for; the command never runs (every torch.load is weights_only)."""
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    evil = {"step": 1, "state": _RunsCode(marker), "history": []}
    translate = ["translate", "--source", "demo", "--target", "demo", "--out", str(run), *SMOKE]
    source = ["train-source", "--source", "demo", "--out", str(run), *SMOKE]
    assert cli.main(translate) == 0 and cli.main(source) == 0
    capsys.readouterr()
    cases = [(run / "translate" / "translated.pt", translate),
             (run / "source" / "checkpoint.pt", source),
             (run / "source" / "model.pt", ["evaluate", "--run", str(run), "--stage", "source",
                                            "--target-test", "demo"])]
    (run / "source" / "stage.json").unlink()  # unfinished: a re-run loads the checkpoint
    for path, argv in cases:
        torch.save(evil, path)
        line = _fail(capsys, argv)
        assert f"{path}: refused: it would load the Python object posix.system" in line or \
            f"{path}: refused: it would load the Python object os.system" in line, line
        assert not marker.exists()


def test_report_html_escapes_strings_from_data(tmp_path: Path) -> None:
    """Class names, file and folder names and config values reach report.html as text, never as markup: the page
    holds only the renderer's own tags, and the strings show escaped."""
    evil = ("<script>alert(1)", "<img src=x onerror=alert(2)>")
    data = _labelled(tmp_path / "data", evil)
    preset = tmp_path / "<script>alert(3)" / "preset.yaml"
    preset.parent.mkdir()
    preset.write_text("base: smoke\n")
    run = tmp_path / "<b>run"
    assert cli.main(["train-source", "--source", str(data), "--target-test", str(data), "--out", str(run),
                     *SMOKE, "--preset", str(preset), "--set", "data.data_root=<script>alert(4)"]) == 0
    out = tmp_path / "report.html"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    tags = set(re.findall(r"<\s*/?\s*([A-Za-z][A-Za-z0-9]*)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "h5", "h6", "p",
                    "code", "pre", "table", "thead", "tbody", "tr", "th", "td", "figure", "img", "figcaption"}, tags
    assert "onerror" not in re.sub(r"&lt;.*?&gt;", "", page)
    assert "&lt;b&gt;run" in page and "&lt;script&gt;alert(3)" in page  # shown, escaped


# ------------------------------------------------------------------------------------------------ more bad input


def test_malformed_yaml_preset(tmp_path: Path, capsys) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("base: smoke\nsource: {steps: [1, 2\n")
    line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(tmp_path / "run"), "--preset", str(preset)])
    assert f"preset file {preset}: invalid YAML" in line
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("base: smoke\nsource:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line 4, column 1: "):
        load_config(str(preset))


def test_preset_file_without_base_warns(tmp_path: Path, caplog) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("source: {steps: 2}\n")
    with caplog.at_level("WARNING", logger="daaa"):
        cfg = load_config(str(preset))
    assert cfg.source.steps == 2 and "has no 'base:'" in caplog.text
    caplog.clear()
    preset.write_text("base: smoke\nsource: {steps: 2}\n")
    with caplog.at_level("WARNING", logger="daaa"):
        load_config(str(preset))
    assert "base" not in caplog.text


def test_no_preset_on_a_cpu_warns_that_digits_is_gpu_sized(tmp_path: Path, capsys) -> None:
    tiny = ["--quiet", "--set", "source.steps=1", "--set", "source.batch_size=4", "--set", "data.demo_source=20"]
    assert cli.main(["train-source", "--source", "demo", "--out", str(tmp_path / "a"), *tiny]) == 0
    assert "no --preset: the digits preset's budgets are GPU-sized" in (tmp_path / "a" / "log.txt").read_text()
    for run, given in (("b", ["--preset=digits"]), ("c", ["--pres", "digits"])):  # argparse's abbreviation too
        assert cli.main(["train-source", "--source", "demo", "--out", str(tmp_path / run), *given, *tiny]) == 0
        assert "no --preset" not in (tmp_path / run / "log.txt").read_text()
    assert "no --target-test: no accuracy" in capsys.readouterr().out


def test_one_class_source_is_refused(tmp_path: Path, capsys) -> None:
    src = _labelled(tmp_path / "src", classes=("only",))
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert f"--source {src}: every image has the same label" in line


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    # `daaa evaluate ... | head -1`: the reader has gone when daaa prints; no "daaa: error: BrokenPipeError"
    proc = subprocess.Popen([sys.executable, "-m", "daaa", "data", "export-demo", "--out", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert "rror" not in err, err


def test_report_out_must_be_markdown_or_html(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    line = _fail(capsys, ["report", str(run), "--out", str(tmp_path / "x.pdf")])
    assert f"--out {tmp_path / 'x.pdf'}" in line and "FILE.md or FILE.html" in line
    assert not (tmp_path / "x.pdf").exists() and not list(tmp_path.glob("x*"))


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1)])
def test_degenerate_image_sizes(tmp_path: Path, capsys, size: tuple[int, int]) -> None:
    """A 1x1 image, or 1x4000 (an extreme aspect ratio): the shorter side would be upsampled more than 8x."""
    src = _labelled(tmp_path / "src")
    bad = _image(src / "b" / "odd.png", size=size)
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert str(bad) in line and f"{size[0]}x{size[1]} pixels" in line
    _assert_nothing_half_written(tmp_path / "run")


def _cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (20, 20), (200, 10, 30, 40)).save(path)


def _png16(path: Path) -> None:
    Image.fromarray((np.arange(400, dtype=np.uint16).reshape(20, 20) * 160)).save(path)


def _animated_gif(path: Path) -> None:
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (30, 220, 120)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.mark.parametrize("name, make", [("cmyk.jpg", _cmyk_jpeg), ("gray16.png", _png16), ("anim.gif", _animated_gif)])
def test_unusual_image_formats_are_converted(tmp_path: Path, capsys, name: str, make) -> None:
    """A CMYK JPEG, a 16-bit PNG (scaled by its maximum) and an animated GIF (its first frame: documented) load
    like any RGB image."""
    src = _labelled(tmp_path / "src")
    make(src / "a" / name)
    assert cli.main(["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE]) == 0
    t = load_domain_tensors(str(src), "source", DataConfig(load_size=20, image_size=20, channels=3))
    img = t.images[t.ids.index(str(src / "a" / name))]
    if name == "anim.gif":
        assert int(img.float().mean().round()) == 30  # the first frame, not the second (220) or third (120)
    if name == "gray16.png":
        assert int(img.max()) == 255 and int(img.min()) == 0


@pytest.mark.parametrize("pixels", [1600, 2500])
def test_decompression_bomb_is_refused(tmp_path: Path, capsys, monkeypatch, pixels: int) -> None:
    """An image over PIL's pixel limit (lowered to 1000 here): PIL warns between 1x and 2x the limit and raises
    above; both become one line naming the file (not PIL's two-line warning)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    src = _labelled(tmp_path / "src")
    side = int(pixels ** 0.5)
    bomb = _image(src / "a" / "bomb.png", size=(side, side))
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert str(bomb) in line and f"{pixels} pixels" in line and "MAX_IMAGE_PIXELS" in line
    _assert_nothing_half_written(tmp_path / "run")


def test_file_names_with_spaces_and_non_ascii(tmp_path: Path) -> None:
    src = _labelled(tmp_path / "données été", ("chat noir", "日本 犬"))
    for k, p in enumerate(sorted(src.rglob("*.png"))):
        p.rename(p.with_name(f"photo n°{k} été.png"))
    run = tmp_path / "run ü"
    assert cli.main(["train-source", "--source", str(src), "--target-test", str(src), "--out", str(run), *SMOKE]) == 0
    assert json.loads((run / "metrics.json").read_text())["source_only"]["target_test_accuracy"] >= 0
    assert cli.main(["report", str(run), "--out", str(run / "r é.html")]) == 0


@pytest.mark.parametrize("loop", ["image", "folder"])
def test_symlink_loop_in_a_data_folder(tmp_path: Path, capsys, loop: str) -> None:
    """A link to itself named like an image, or a class folder's link back to the data root: one line, no hang
    (folders are read two levels deep, never followed further)."""
    src = _labelled(tmp_path / "src")
    link = src / "a" / ("loop.png" if loop == "image" else "again")
    link.symlink_to(link.name if loop == "image" else "..")
    line = _fail(capsys, ["train-source", "--source", str(src), "--out", str(tmp_path / "run"), *SMOKE])
    assert str(link) in line
    _assert_nothing_half_written(tmp_path / "run")


@pytest.mark.parametrize("model_file", ["record", "bare state dict"])
def test_class_count_mismatch_in_evaluate(tmp_path: Path, capsys, model_file: str) -> None:
    """The network of a 2-class run evaluated on 3 classes: one line that says so (not torch's cut-off 'Error(s)
    in loading state_dict for DigitCNN:'), for a model file with its class list and for a bare state dict."""
    from daaa.models import read_model_file

    two, three = _labelled(tmp_path / "two", ("a", "b")), _labelled(tmp_path / "three", ("a", "b", "c"))
    run = tmp_path / "r2"
    assert cli.main(["train-source", "--source", str(two), "--out", str(run), *SMOKE]) == 0
    if model_file == "bare state dict":  # daaa 0.1's model.pt: the class count comes from the weights
        torch.save(read_model_file(run / "source" / "model.pt")[0], run / "source" / "model.pt")
    capsys.readouterr()
    line = _fail(capsys, ["evaluate", "--run", str(run), "--stage", "source", "--target-test", str(three)])
    assert f"{run}/source" in line and str(three) in line
    assert ("only in the network" in line and "['c']" in line) or ("3 classes" in line and "has 2" in line), line


def test_class_count_mismatch_in_a_reused_stage(tmp_path: Path, capsys) -> None:
    """A finished stage whose model.pt was replaced by a 2-class network's: the line names the file and each
    shape that differs."""
    two, three = _labelled(tmp_path / "two", ("a", "b")), _labelled(tmp_path / "three", ("a", "b", "c"))
    for data, run in ((two, "r2"), (three, "r3")):
        assert cli.main(["train-source", "--source", str(data), "--out", str(tmp_path / run), *SMOKE]) == 0
    model = tmp_path / "r3" / "source" / "model.pt"
    shutil.copy(tmp_path / "r2" / "source" / "model.pt", model)
    capsys.readouterr()
    line = _fail(capsys, ["train-source", "--source", str(three), "--out", str(tmp_path / "r3"), *SMOKE])
    assert f"{model}: does not fit the configured network" in line
    assert re.search(r"is \(2(, \d+)*\) in the file, \(3(, \d+)*\) here", line), line


def test_out_is_an_existing_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    line = _fail(capsys, ["train-source", "--source", "demo", "--out", str(out), *SMOKE])
    assert str(out) in line and "is a file, not a folder" in line
    assert out.read_text() == "keep me"
