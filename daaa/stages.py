"""The life of a stage in a run folder, in one place: reuse, overwrite, begin, train, save, finish.

A stage (``RUN/source``, ``RUN/adapt``, ``RUN/rows/DANN``, ...) is identified by its key: the configuration sections
and input fingerprints that decide its result (:class:`daaa.runs.Stage`). :class:`StageRunner` gives every stage
the same life, as the CycleGAN reference's ``BaseModel`` gives every model the same saving and loading:

1. with ``overwrite``, the old stage folder is removed (rank 0; the others wait);
2. a folder made by another key is refused; a finished stage with the same key is reused (its ``model.pt``);
   with ``steps_key`` the step count is compared apart: a finished stage asked for more steps is extended;
3. otherwise ``key.json`` is written, the trainer runs (resuming from the stage's checkpoint), and rank 0 writes
   ``model.pt`` (a self-describing model file, :func:`daaa.models.save_model_file`), the metrics, and last
   ``stage.json`` -- a kill before that redoes only the end of the stage.

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
from .models import load_state, read_model_file, save_model_file
from .runs import Stage, update_metrics

LOG = logging.getLogger("daaa")


def _without_confusion(result: dict[str, Any]) -> dict[str, Any]:
    """Stage records keep scalars and curves; the confusion matrix lives in metrics.json only."""
    return {k: v for k, v in result.items() if k != "target_test"}


class StageRunner:
    """Runs the stages of one run folder ``run_dir`` on every rank of ``ctx``; only rank 0 writes."""

    def __init__(self, run_dir: Path, ctx: Context, overwrite: bool = False):
        self.run_dir, self.ctx, self.overwrite = Path(run_dir), ctx, overwrite

    def open(self, name: str, key: dict[str, Any] | None = None, steps_key: str | None = None) -> Stage:
        """The stage ``name`` with ``key``, its old folder removed first with ``overwrite``; refused when the folder
        holds a stage made by another key. ``key=None`` only clears (stages that check their own key).
        ``steps_key`` names the step count in ``key`` (:class:`~daaa.runs.Stage`)."""
        stage = Stage(self.run_dir, name, key or {}, steps_key)
        if self.overwrite:
            if self.ctx.is_main and stage.dir.exists():
                shutil.rmtree(stage.dir)
            self.ctx.barrier()  # the others look at the folder only once it is gone
        if key is not None:
            stage.check_compatible()
        return stage

    def finished(self, name: str, key: dict[str, Any], model: nn.Module,
                 steps_key: str | None = None) -> dict[str, Any] | None:
        """The result of stage ``name`` when it is finished with this key (its weights loaded into ``model``)."""
        stage = self.open(name, key, steps_key)
        done = stage.done()
        if done is not None:
            load_weights(model, stage.dir / "model.pt")
        elif stage.finished_steps() is not None:
            LOG.info("%s: extending the finished stage from %d to %d steps (%s), from its last checkpoint", name,
                     stage.finished_steps(), stage.split_steps(stage.key)[1], steps_key)
        return done

    def train(self, name: str, key: dict[str, Any], model: nn.Module, fit: Callable[[Stage], dict[str, Any]],
              metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
              reuse_only: bool = False, steps_key: str | None = None) -> dict[str, Any]:
        """Stage ``name``: reused when finished with ``key`` (``model`` then holds its weights), else trained by
        ``fit(stage) -> result`` (which trains ``model`` in place and resumes from the stage's checkpoint).
        ``metrics(result)`` is merged into RUN/metrics.json before the stage is marked finished, with the snapshot
        label-free selection kept (``selected.<name>``). With ``reuse_only`` an unfinished stage is an error
        (``daaa adapt`` on a folder without a source network). ``steps_key`` (e.g. ``"adapt.steps"``) lets a
        finished stage asked for more steps be extended from its checkpoint."""
        done = self.finished(name, key, model, steps_key)
        if done is not None:
            LOG.info("%s: reusing the finished stage in %s", name, self.run_dir / name)
            return done
        if reuse_only:
            raise DaaaError(f"{self.run_dir / name}: no finished {name} stage made by this config "
                            "(run `daaa run`, or the command that makes it, first)")
        stage = Stage(self.run_dir, name, key, steps_key)
        if self.ctx.is_main:
            stage.begin()
        t0 = time.perf_counter()
        result = fit(stage)
        result["seconds"] = time.perf_counter() - t0
        if self.ctx.is_main:
            save_model_file(stage.dir / "model.pt", model)
            if metrics is not None:  # before stage.json: a kill in between redoes both
                update_metrics(self.run_dir, metrics(result))
            if result.get("selected_snapshot"):
                update_metrics(self.run_dir, {"selected": {name: result["selected_snapshot"]}})
            stage.finish(_without_confusion(result))
        self.ctx.barrier()
        return result


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the weights of a stage's model file (or a bare state dict, daaa 0.1's) into ``model``; one line naming
    the file and every mismatch when they do not fit (:func:`daaa.models.load_state`)."""
    load_state(model, read_model_file(path)[0], path)
