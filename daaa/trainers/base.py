"""What every trainer shares: evaluation at each interval, the label-free selection probe, and ``fit()``.

A trainer defines one optimisation step (``step``) and its whole state (``state`` / ``load_state``); the loop
(:class:`daaa.trainers.loop.TrainingLoop`) runs it with checkpoints and resume. Trainers know nothing of run folders:
the stage folder, the finished model file and the metrics are :mod:`daaa.stages`' business.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from ..config import DataConfig
from ..data.domain import DomainData
from ..distributed import Context
from ..evaluate import evaluate
from ..models import SELECTED_FILE, save_model_file
from ..optim import weight_average
from ..runs import Stage
from ..selection import summarize_selection
from .loop import TrainingLoop

LOG = logging.getLogger("daaa")


class Trainer:
    """Base of :class:`~daaa.trainers.adapt.DAAATrainer` and :class:`~daaa.trainers.baselines.BaselineTrainer`.

    Subclasses set ``net`` (the classifier evaluated), ``data``, ``data_cfg``, ``ctx``, ``stage`` (where the loop
    keeps checkpoints), ``spec`` (``steps``, ``eval_interval``, ``checkpoint_interval``), ``probe`` (a
    :class:`daaa.selection.SelectionProbe` or None), ``progress`` and ``desc``.

    With ``optim.ema_decay > 0`` (:func:`daaa.optim.weight_average`) the moving average of the weights is what is
    evaluated, selected and, at the end of :meth:`fit`, left in ``net`` (so the stage saves it); the trained weights'
    accuracy is logged beside it as ``raw_target_test_accuracy``, and both are in every checkpoint.

    With a probe, the snapshot the primary criterion (``selection.primary``) scores highest so far is kept as the
    stage's ``model-selected.pt``; ``selected`` (its criterion, step and score) is part of every checkpoint, so a
    resumed or extended run goes on comparing against it.
    """

    net: nn.Module
    data: DomainData
    data_cfg: DataConfig
    ctx: Context
    stage: Stage
    spec: Any
    probe: Any = None
    progress: bool = True
    desc: str = "train"
    selected: dict[str, Any] | None = None
    average: AveragedModel | None = None

    def init_average(self) -> None:
        """Start the moving average of ``net``'s weights when ``spec.optim.ema_decay`` asks for one (call once ``net``
        is on its device and in its memory format)."""
        self.average = weight_average(self.net, self.spec.optim.ema_decay)
        if self.average is not None:
            LOG.info("%s: evaluates and ships the moving average of its weights (optim.ema_decay = %g)", self.desc,
                     self.spec.optim.ema_decay)

    def update_average(self) -> None:
        """After each optimiser step."""
        if self.average is not None:
            self.average.update_parameters(self.net)

    @property
    def evaluated_net(self) -> nn.Module:
        """The network that is evaluated and shipped: the weight average, or the trained network."""
        return self.average.module if self.average is not None else self.net

    def step(self, step: int) -> dict[str, Any]:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def load_state(self, state: dict) -> None:
        raise NotImplementedError

    def before_fit(self) -> None:
        """Set-up that depends on the starting weights (e.g. M_post's first posteriors)."""

    @property
    def has_target_labels(self) -> bool:
        return self.data.target_test is not None and self.data.target_test.labels is not None

    def evaluate(self, step: int) -> dict[str, Any]:
        """Target-test accuracy (when labelled) and the label-free selection criteria of the current network."""
        out: dict[str, Any] = {}
        net = self.evaluated_net
        if self.has_target_labels:
            out["target_test_accuracy"] = evaluate(net, self.data.target_test, self.data_cfg, self.ctx)["accuracy"]
            if net is not self.net:
                out["raw_target_test_accuracy"] = evaluate(self.net, self.data.target_test, self.data_cfg,
                                                           self.ctx)["accuracy"]
        if self.probe is not None:
            out.update(self.probe(net))
            self._keep_selected(step, out)
        return out

    def _keep_selected(self, step: int, scores: dict[str, Any]) -> None:
        """Save the network as the stage's selected snapshot when the primary criterion's score beats every earlier
        one: the snapshot :func:`daaa.selection.pick` chooses (the highest finite score, the earliest of ties)."""
        criterion = self.probe.cfg.primary
        value = scores.get(f"sel_{criterion}")
        if value is None or not math.isfinite(value):
            return
        if self.selected is not None and value <= self.selected["value"]:
            return
        self.selected = {"criterion": criterion, "step": step, "value": float(value)}
        if self.ctx.is_main:
            save_model_file(self.stage.dir / SELECTED_FILE, self.evaluated_net, selected=self.selected)

    def _full_state(self) -> dict:
        """The trainer's state with the selection so far and the model's description (plain types)."""
        average = {"average": self.average.state_dict()} if self.average is not None else {}
        return {**self.state(), **average, "selected": self.selected,
                "model_info": getattr(self.net, "model_info", None)}

    def _load_full_state(self, state: dict) -> None:
        self.selected = state.get("selected")
        self.load_state(state)
        if self.average is not None and "average" in state:  # else it starts again from the resumed weights
            self.average.load_state_dict(state["average"])

    def fit(self) -> dict[str, Any]:
        """Train for ``spec.steps`` steps (resuming from the stage's checkpoint) and return the stage result:
        final and oracle-best target-test accuracy, the accuracy curve, and each criterion's selected snapshot."""
        self.before_fit()
        loop = TrainingLoop(self.stage, self.ctx, self.spec.steps, self.spec.checkpoint_interval,
                            self.spec.eval_interval, self.progress, self.desc)
        history = loop.run(self.step, self._full_state, self._load_full_state, self.evaluate)
        if self.average is not None:  # the stage ships the average (the last checkpoint keeps both)
            self.net.load_state_dict(self.average.module.state_dict())
        result: dict[str, Any] = {"steps": self.spec.steps, "resumed_from": loop.resumed_from}
        if self.has_target_labels:
            final = evaluate(self.net, self.data.target_test, self.data_cfg, self.ctx)
            curve = [(r["step"], r["target_test_accuracy"]) for r in history if "target_test_accuracy" in r]
            best_step, best = max(curve, key=lambda c: c[1])
            result.update({"target_test_accuracy": final["accuracy"], "target_test": final,
                           "target_test_mean_class_accuracy": final["mean_class_accuracy"],  # VisDA's figure
                           "oracle_best_accuracy": best, "oracle_best_step": best_step, "accuracy_curve": curve})
        if self.probe is not None:
            result.update(summarize_selection(history, self.probe.criteria))
        if self.selected is not None:
            accuracy = result.get("selection", {}).get(self.selected["criterion"], {}).get("accuracy")
            result["selected_snapshot"] = {**self.selected, "accuracy": accuracy, "file": SELECTED_FILE}
        return result
