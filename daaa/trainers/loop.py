"""The step loop every trainer shares: progress, history, TensorBoard, periodic evaluation, atomic checkpoints,
resume after a crash, the NaN guard, and Ctrl-C / SIGTERM (a checkpoint at the current step, then exit 130 / 143).
It holds no math: the trainer's ``step_fn`` does one optimisation step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from typing import Any, Callable

import torch

from ..distributed import Context
from ..errors import Interrupted, NonFiniteLossError
from ..runs import Stage, atomic_write_text

LOG = logging.getLogger("daaa")


def guard_finite(step: int, terms: dict[str, torch.Tensor], stage: Stage | None = None) -> None:
    """Stop before a NaN or infinite loss term reaches the weights; the last good checkpoint stays."""
    for name, value in terms.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            where = f"; last good checkpoint: {stage.checkpoint_path}" if stage and stage.checkpoint_path.exists() else ""
            raise NonFiniteLossError(f"step {step + 1}: loss term {name} is {v}{where}")


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """The dotted name of the first floating-point tensor in ``state`` (nested dicts/lists) holding a NaN or an
    infinity, or None. Run before a checkpoint is written, so a checkpoint never stores broken weights."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return prefix.rstrip(".") or "value"
        return None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        found = first_nonfinite(v, f"{prefix}{k}.")
        if found is not None:
            return found
    return None


def guard_finite_state(step: int, state: dict, stage: Stage | None = None) -> None:
    """Stop when an update made weights or optimiser state non-finite although the loss was finite."""
    bad = first_nonfinite(state)
    if bad is not None:
        where = f"; last good checkpoint: {stage.checkpoint_path}" if stage and stage.checkpoint_path.exists() else ""
        raise NonFiniteLossError(f"step {step}: {bad} became non-finite after the update (not checkpointed){where}")


class StopSignals:
    """While active (``with``), SIGINT and SIGTERM only note that a stop was asked for; the step loop reads it
    with :meth:`requested` between steps, writes a checkpoint at that step and raises :class:`Interrupted`. So a
    Ctrl-C or a cluster's pre-emption loses no step, never lands inside a half-done update, and a re-run resumes
    exactly where it stopped. Outside the main thread (no signal handlers there) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ctx: Context | None = None):
        self.ctx, self.received = ctx, 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if exc_type is None and self.received:  # arrived after the last check: act on it as if it came now
            signal.raise_signal(self.received)

    def requested(self) -> int:
        """The signal to stop on (0: go on), the same on every rank: under torchrun each rank gets the signal at
        its own moment, so the ranks agree by one all-reduce per step (SIGTERM wins over SIGINT)."""
        if self.ctx is None or not self.ctx.distributed:
            return self.received
        got = torch.tensor([float(self.received == s) for s in self.SIGNALS])
        got = self.ctx.all_reduce_sum(got).cpu()
        return next((int(s) for s, n in zip(reversed(self.SIGNALS), reversed(got.tolist())) if n > 0), 0)

    def stop(self, signum: int, step: int, stage: Stage) -> Interrupted:
        """The exception that ends the command once the checkpoint of ``step`` is written."""
        self.received = 0
        return Interrupted(f"interrupted at step {step} of {stage.name}; run the same command to resume", signum)


class TrainingLoop:
    """Runs ``step_fn(step) -> {name: value}`` for ``steps`` steps with checkpoints every ``checkpoint_interval``.

    ``get_state()`` / ``set_state(state)`` give and take the trainer's whole state (models, optimiser, EM state),
    which is saved with the step and the history; a loop whose stage folder holds a checkpoint resumes from it.
    ``eval_fn(step)`` returns metrics merged into the history every ``eval_interval`` steps and at the end.
    """

    def __init__(self, stage: Stage, ctx: Context, steps: int, checkpoint_interval: int, eval_interval: int,
                 progress: bool = True, desc: str = "train"):
        self.stage, self.ctx, self.steps = stage, ctx, steps
        self.checkpoint_interval, self.eval_interval = max(1, checkpoint_interval), max(1, eval_interval)
        self.progress, self.desc = progress, desc
        self.history: list[dict[str, Any]] = []
        self.resumed_from = 0

    def run(self, step_fn: Callable[[int], dict[str, Any]], get_state: Callable[[], dict],
            set_state: Callable[[dict], None], eval_fn: Callable[[int], dict[str, Any]] | None = None) -> list[dict]:
        start = 0
        ckpt = self.stage.load_checkpoint(map_location=self.ctx.device)
        if ckpt is not None:
            set_state(ckpt["state"])
            start, self.history = ckpt["step"], ckpt["history"]
            self.resumed_from = start
            LOG.info("%s: resuming from %s at step %d/%d", self.desc, self.stage.checkpoint_path, start, self.steps)
        if self.ctx.is_main:  # temporary files of a checkpoint write cut short by a crash or kill -9
            for stale in self.stage.dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        writer = self._tensorboard(start)
        bar = None
        if self.progress and self.ctx.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.steps, initial=start, desc=self.desc, dynamic_ncols=True, mininterval=1.0)
        t0 = time.perf_counter()
        try:
            with StopSignals(self.ctx) as stop:
                self._steps(start, step_fn, get_state, eval_fn, writer, bar, stop)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        LOG.info("%s: %d steps in %.1f s", self.desc, self.steps - start, time.perf_counter() - t0)
        return self.history

    def _steps(self, start: int, step_fn: Callable[[int], dict[str, Any]], get_state: Callable[[], dict],
               eval_fn: Callable[[int], dict[str, Any]] | None, writer: Any, bar: Any, stop: StopSignals) -> None:
        for step in range(start, self.steps):
            record = {"step": step + 1, **{k: _to_float(v) for k, v in step_fn(step).items()}}
            done = step + 1
            if eval_fn is not None and (done % self.eval_interval == 0 or done == self.steps):
                record.update(eval_fn(done))
            self.history.append(record)
            if writer is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(f"{self.desc}/{k}", v, done)
            if bar is not None:
                bar.update(1)
                if done % 10 == 0 or done == self.steps:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                     if k != "step" and isinstance(v, float)}, refresh=False)
            checkpoint = done % self.checkpoint_interval == 0 or done == self.steps
            signum = stop.requested()
            if checkpoint or signum:
                state = get_state()
                guard_finite_state(done, state, self.stage)  # on every rank: DDP keeps the weights equal
                self.save(done, state)
            if signum:
                raise stop.stop(signum, done, self.stage)

    def save(self, step: int, state: dict) -> None:
        if not self.ctx.is_main:
            return
        self.stage.save_checkpoint({"step": step, "state": state, "history": self.history})
        atomic_write_text(self.stage.dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def _tensorboard(self, start: int):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is a dependency, but a broken install must not stop training
            LOG.warning("tensorboard unavailable: no event files for %s", self.desc)
            return None
        # purge_step drops events past the checkpoint, so a resumed run does not leave a duplicated tail
        return SummaryWriter(str(self.stage.dir / "tb"), purge_step=start or None)


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v.detach())
    return v
