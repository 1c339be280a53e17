"""Scale-out and fault tolerance: torchrun/DDP (2 processes == 1 process with the same global batch), collective
calls matched across ranks, rank 0 the only writer, CPU bf16 autocast, and resume after ``kill -9``.

Subprocesses run with OMP_NUM_THREADS=1 (two ranks on a 2-core machine must not fight over cores) and
runtime.deterministic=true, runtime.num_threads=1.

Tolerance of the 2-process vs 1-process comparison (smoke preset, `daaa run`, 4 + 6 + 6 steps, CPU gloo): both
runs see the same global batches (rank r takes rows r::2) and DDP averages gradients scaled by world/global batch,
so they differ only by float summation order. Measured: source weights 3e-8, adapt weights 9e-6, logged losses
4e-7 relative, identical accuracies. Asserted: weights within 1e-4 (absolute), logged losses within 1e-4
(relative), accuracies within one test image (0.01). The CycleGAN stage runs on rank 0 alone, so its output is
bit-identical. Longer runs drift further (Adam amplifies rounding; 60 adapt steps: 1.5e-3), hence the short run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from daaa import cli, distributed
from daaa.config import load_config
from daaa.distributed import Context

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--source", "demo", "--target", "demo", "--target-test", "demo"]
DETERMINISTIC = ["--preset", "smoke", "--quiet", "--set", "runtime.deterministic=true",
                 "--set", "runtime.num_threads=1", "--set", "runtime.device=cpu"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "daaa"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "daaa"]


def _start(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.Popen:
    """The CLI in a new process group (so a hang can be killed with all its ranks)."""
    return subprocess.Popen(_launcher(nproc) + args, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for ``p``; a hang (e.g. unmatched collectives) is killed at ``timeout`` and fails the test."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(p.args)} did not finish in {timeout} s (deadlock?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _daaa(args: list[str], cwd: Path, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return _finish(_start(args, cwd, nproc), timeout)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-4000:]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from daaa.models import read_model_file

    return read_model_file(path)[0]  # a model file's weights (it also describes the network)


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_seconds(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


# ---------------------------------------------------------------------- collectives and writers, in one process


class RecordingContext(Context):
    """A rank of a pretend 2-process job: records every collective call instead of making it (no DDP wrapper)."""

    def __init__(self, rank: int):
        super().__init__(rank, 2, torch.device("cpu"), None, False)
        self.calls: list[tuple] = []

    def wrap(self, model):
        return model

    def all_reduce_sum(self, t):
        self.calls.append(("all_reduce", tuple(t.shape), str(t.dtype)))
        return t

    def barrier(self):
        self.calls.append(("barrier",))

    def broadcast_object(self, obj):
        self.calls.append(("broadcast",))
        return obj


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_ranks_make_the_same_collective_calls_and_only_rank0_writes(tmp_path: Path) -> None:
    """The whole pipeline (data, translate, source, adapt with EM syncs and evaluations) as rank 0 and as rank 1 of
    a 2-process job: the sequences of collective calls must be equal (else a real job deadlocks), and rank 1 must
    not create or change a single file."""
    from daaa.pipeline import run_pipeline
    from daaa.stages import StageRunner

    cfg = load_config("smoke", ["runtime.progress=false", "adapt.filtering=false", "adapt.eval_interval=2"])
    rank0, rank1 = RecordingContext(0), RecordingContext(1)
    run_pipeline(StageRunner(tmp_path / "rank0", rank0), cfg, "demo", "demo", "demo")
    # rank 1 sees what rank 0 has written when it reads it: the translation (stages are not finished yet)
    shutil.copytree(tmp_path / "rank0" / "translate", tmp_path / "rank1" / "translate")
    before = _tree(tmp_path / "rank1")
    run_pipeline(StageRunner(tmp_path / "rank1", rank1), cfg, "demo", "demo", "demo")
    assert _tree(tmp_path / "rank1") == before, "rank 1 wrote into the run folder"
    assert rank0.calls == rank1.calls
    kinds = [c[0] for c in rank0.calls]
    # rank 0 first: resolving the data; translate: its stage key (rank 0 scans the inputs), training, its plan
    # (small sets: rank 0 translates), finishing
    assert kinds.count("broadcast") == 5
    assert kinds.count("all_reduce") > 12 + 2 * 2 + 3  # a step's losses, evaluations, posterior refreshes


# ---------------------------------------------------------------------- mixed precision (CPU bf16 smoke test)


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path: Path, monkeypatch) -> None:
    from daaa.config import CycleGANConfig
    from daaa.cyclegan import CycleGAN
    from daaa.models import DigitCNN

    seen: set[torch.dtype] = set()
    head = DigitCNN.head

    def recording_head(self, f):
        out = head(self, f)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(DigitCNN, "head", recording_head)
    run = tmp_path / "run"
    assert cli.main(["train-source", "--source", "demo", "--target-test", "demo", "--out", str(run), "--preset",
                     "smoke", "--quiet", "--set", "runtime.device=cpu", "--set", "runtime.precision=bf16",
                     "--set", "runtime.channels_last=true"]) == 0
    assert torch.bfloat16 in seen  # the forward ran under autocast
    weights = _weights(run / "source" / "model.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())  # fp32 master weights
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["source_only"]["target_test_accuracy"] <= 1.0

    cg = CycleGANConfig(image_size=16, ngf=4, ndf=4, n_blocks=1, n_layers_d=1, steps=2, decay_start=1,
                        batch_size=2, pool_size=2)
    model = CycleGAN(cg, 3, seed=0, amp_dtype=torch.bfloat16, channels_last=True)
    out_dtypes: list[torch.dtype] = []
    model.G_ST.model[1].register_forward_hook(lambda m, i, o: out_dtypes.append(o.dtype))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    losses = model.training_step(x, x.flip(-1))
    assert out_dtypes and out_dtypes[0] == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert model.translate_st(x).dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog, native: bool) -> None:
    from daaa.config import RuntimeConfig

    monkeypatch.setattr(distributed, "native_bf16_cpu", lambda: native)
    with caplog.at_level(logging.WARNING, logger="daaa"):
        ctx = distributed.setup(RuntimeConfig(device="cpu", precision="bf16"))
    assert ctx.amp_dtype is torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "runtime.precision=bf16" in r.getMessage()]
    assert bool(warned) is not native
    assert not warned or "fp32 is the fast setting" in warned[0]


def test_native_bf16_reads_the_cpu_probes_and_tolerates_their_absence(monkeypatch) -> None:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert distributed.native_bf16_cpu() is False  # a torch without the private probes: no claim of bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert distributed.native_bf16_cpu() is True


# ---------------------------------------------------------------------- torchrun: 2 processes == 1 process


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    args = ["run", *DEMO, *DETERMINISTIC, "--set", "adapt.filtering=false"]  # EM on: posterior syncs matter
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = _start(args + ["--out", str(one)], tmp_path, nproc=1)  # side by side: both are single-threaded
    p2 = _start(args + ["--out", str(two)], tmp_path, nproc=2)
    _ok(_finish(p1))
    _ok(_finish(p2))
    assert "world size 2" in (two / "log.txt").read_text()
    # the translation is made by rank 0 alone: bit-identical
    t1, t2 = (torch.load(d / "translate" / "translated.pt", weights_only=True) for d in (one, two))
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    for stage in ("source", "adapt"):
        w1, w2 = _weights(one / stage / "model.pt"), _weights(two / stage / "model.pt")
        diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert diff <= 1e-4, f"{stage}: weights differ by {diff}"
        h1, h2 = _history(one / stage / "history.jsonl"), _history(two / stage / "history.jsonl")
        assert [h["step"] for h in h1] == [h["step"] for h in h2]
        for a, b in zip(h1, h2):
            for k in ("loss", "L_CE", "L_EM", "L_AT"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (stage, a["step"], k)
            assert a["em_kept"] == b["em_kept"]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for section in ("source_only", "daaa"):
        assert abs(m1[section]["target_test_accuracy"] - m2[section]["target_test_accuracy"]) <= 0.01 + 1e-9
    assert m2["daaa"]["target_test"]["num_samples"] == m1["daaa"]["target_test"]["num_samples"] == 100


# ---------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    """SIGKILL `daaa run` once the adapt stage has checkpointed; re-running the same command reuses translate and
    source, resumes adapt from its checkpoint, and ends with exactly the metrics and weights of an uninterrupted
    run (deterministic CPU mode)."""
    steps = 24
    args = ["run", *DEMO, *DETERMINISTIC, "--set", "adapt.filtering=false", "--set", f"adapt.steps={steps}",
            "--set", "adapt.checkpoint_interval=2", "--set", "adapt.eval_interval=8"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    reference = _start(args + ["--out", str(ref)], tmp_path)  # runs alongside the one that is killed

    p = subprocess.Popen(_launcher(1) + args + ["--out", str(run)], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoint = run / "adapt" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():
            assert p.poll() is None, f"finished before the adapt stage checkpointed: {p.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no adapt checkpoint in 300 s"
            time.sleep(0.01)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert not (run / "adapt" / "stage.json").exists(), "the kill landed after the stage finished"
    killed_at = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
    assert 0 < killed_at < steps
    source_record = (run / "source" / "stage.json").stat().st_mtime_ns

    _ok(_daaa(args + ["--out", str(run)], tmp_path))
    _ok(_finish(reference))
    log = (run / "log.txt").read_text()
    assert "translate: reusing the completed stage" in log and "source: reusing the finished stage" in log
    assert f"adapt: resuming from {checkpoint} at step {killed_at}/{steps}" in log
    assert (run / "source" / "stage.json").stat().st_mtime_ns == source_record
    assert json.loads((run / "adapt" / "stage.json").read_text())["result"]["resumed_from"] == killed_at

    m_ref, m_run = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert _without_seconds(m_run) == _without_seconds(m_ref)
    w_ref, w_run = _weights(ref / "adapt" / "model.pt"), _weights(run / "adapt" / "model.pt")
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert _history(run / "adapt" / "history.jsonl") == _history(ref / "adapt" / "history.jsonl")
    assert not list((run / "adapt").glob(".*.tmp"))  # no temporary file of a cut-short write left behind
