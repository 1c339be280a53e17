"""The life of a stage in a run folder, in one place: reuse, overwrite, begin, train, save, finish.

A stage (``RUN/source``, ``RUN/adapt``, ``RUN/rows/DANN``, ...) is identified by its key: the configuration sections
and input fingerprints that decide its result (:class:`daaa.runs.Stage`). :class:`StageRunner` gives every stage
the same life, as the CycleGAN reference's ``BaseModel`` gives every model the same saving and loading:

1. with ``overwrite``, the old stage folder is removed (rank 0; the others wait);
2. a folder made by another key is refused; a finished stage with the same key is reused (its ``model.pt``);
3. otherwise ``key.json`` is written, the trainer runs (resuming from the stage's checkpoint), and rank 0 writes
   ``model.pt``, the metrics, and last ``stage.json`` -- a kill before that redoes only the end of the stage.

Trainers (:mod:`daaa.trainers`) know nothing of this: they get the :class:`~daaa.runs.Stage` only as the place
where their loop keeps checkpoints.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from .distributed import Context
from .errors import DaaaError
from .runs import Stage, atomic_torch_save, load_torch_file, update_metrics

LOG = logging.getLogger("daaa")


def _without_confusion(result: dict[str, Any]) -> dict[str, Any]:
    """Stage records keep scalars and curves; the confusion matrix lives in metrics.json only."""
    return {k: v for k, v in result.items() if k != "target_test"}


class StageRunner:
    """Runs the stages of one run folder ``run_dir`` on every rank of ``ctx``; only rank 0 writes."""

    def __init__(self, run_dir: Path, ctx: Context, overwrite: bool = False):
        self.run_dir, self.ctx, self.overwrite = Path(run_dir), ctx, overwrite

    def open(self, name: str, key: dict[str, Any] | None = None) -> Stage:
        """The stage ``name`` with ``key``, its old folder removed first with ``overwrite``; refused when the folder
        holds a stage made by another key. ``key=None`` only clears (stages that check their own key)."""
        stage = Stage(self.run_dir, name, key or {})
        if self.overwrite:
            if self.ctx.is_main and stage.dir.exists():
                shutil.rmtree(stage.dir)
            self.ctx.barrier()  # the others look at the folder only once it is gone
        if key is not None:
            stage.check_compatible()
        return stage

    def finished(self, name: str, key: dict[str, Any], model: nn.Module) -> dict[str, Any] | None:
        """The result of stage ``name`` when it is finished with this key (its weights loaded into ``model``)."""
        stage = self.open(name, key)
        done = stage.done()
        if done is not None:
            load_weights(model, stage.dir / "model.pt")
        return done

    def train(self, name: str, key: dict[str, Any], model: nn.Module, fit: Callable[[Stage], dict[str, Any]],
              metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
              reuse_only: bool = False) -> dict[str, Any]:
        """Stage ``name``: reused when finished with ``key`` (``model`` then holds its weights), else trained by
        ``fit(stage) -> result`` (which trains ``model`` in place and resumes from the stage's checkpoint).
        ``metrics(result)`` is merged into RUN/metrics.json before the stage is marked finished. With
        ``reuse_only`` an unfinished stage is an error (``daaa adapt`` on a folder without a source network)."""
        done = self.finished(name, key, model)
        if done is not None:
            LOG.info("%s: reusing the finished stage in %s", name, self.run_dir / name)
            return done
        if reuse_only:
            raise DaaaError(f"{self.run_dir / name}: no finished {name} stage made by this config "
                            "(run `daaa run`, or the command that makes it, first)")
        stage = Stage(self.run_dir, name, key)
        if self.ctx.is_main:
            stage.begin()
        t0 = time.perf_counter()
        result = fit(stage)
        result["seconds"] = time.perf_counter() - t0
        if self.ctx.is_main:
            atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, stage.dir / "model.pt")
            if metrics is not None:  # before stage.json: a kill in between redoes both
                update_metrics(self.run_dir, metrics(result))
            stage.finish(_without_confusion(result))
        self.ctx.barrier()
        return result


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict saved by a stage into ``model``; one line naming the file when it does not fit."""
    state = load_torch_file(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a network of another shape: name the mismatch, not just the class
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise DaaaError(f"{path}: does not fit the configured network ({' '.join(lines[1:3])[:300]})") from None
