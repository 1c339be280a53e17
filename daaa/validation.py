"""Label-free model selection inside training: criteria at every evaluation, and the snapshot each one picks.

Papers in unsupervised domain adaptation often report the best target-test accuracy over checkpoints (the "target
oracle"), which needs the target labels a user does not have. Here every trainer (DAAA, source-only, baselines)
can carry a :class:`SelectionProbe`: at each evaluation interval it embeds a held-out, labelled *source-validation*
split and a fixed subset of the *unlabelled target-train* images with the current network and records

* ``sel_iwcv`` -- importance-weighted cross-validation risk ([IWCV], the protocol JAN, Long et al. 2017, follows):
  the source-validation cross-entropy weighted by w(x) = p_t(x) / p_s(x), self-normalised (sum w l / sum w,
  :func:`daaa.selection.iw_risk` on w / mean w); lower is better;
* ``sel_dev`` -- DEV (You et al. 2019): the same weights unnormalised, with DEV's control variate
  (:func:`daaa.selection.dev_risk`); lower is better;
* ``sel_snd`` -- soft neighbourhood density of the target predictions (:func:`daaa.selection.soft_neighborhood_density`);
  higher is better;
* ``sel_source_val`` -- plain source-validation accuracy (higher is better; the naive criterion).

The weights come from a logistic-regression domain classifier on the network's features, fitted -- as in DEV's
code -- on a fixed subset of the source *training* images against the target subset and applied to the held-out
validation images, so a classifier that separates its own training samples perfectly does not decide the weights
of the samples they are used on. ``sel_iw_ess`` records the weights' effective sample size (a small one means an
unreliable estimate). No target label enters any criterion.

After training, :func:`summarize_selection` picks, per criterion, the evaluated snapshot with the best value and
reports the target-test accuracy that snapshot had -- the accuracy a user who selected by that criterion would get.
Because every evaluated step is a candidate and its accuracy is logged, no snapshot files are needed.

The source-validation split comes from :func:`split_source_validation` (``data.source_val_fraction``; stratified,
deterministic, independent of the run seed).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import DataConfig, SelectionConfig
from .data.domain import ImageTensors
from .data.transforms import prepare
from .distributed import Context, unwrap

LOG = logging.getLogger("daaa")

ArrayLike = np.ndarray | torch.Tensor

#: lower ("min") or higher ("max") is better
DIRECTIONS: dict[str, str] = {"iwcv": "min", "dev": "min", "snd": "max", "source_val": "max"}
#: the seed of the source-validation split and of the target subset: fixed, so every run seed sees the same split
SPLIT_SEED = 0


def split_source_validation(source: ImageTensors, fraction: float,
                            seed: int = SPLIT_SEED) -> tuple[ImageTensors, ImageTensors | None]:
    """(train, validation) parts of a labelled domain: ``round(fraction * n_c)`` images of each class c (at least one
    when the class has two or more images, never all of them) go to validation, drawn by a fixed seed.
    ``fraction == 0`` returns ``(source, None)``. Both parts keep the original image order."""
    if fraction <= 0:
        return source, None
    if source.labels is None:
        raise ValueError(f"domain {source.name}: a validation split needs labels")
    g = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for c in torch.unique(source.labels).tolist():
        idx = torch.nonzero(source.labels == c).flatten()
        n = len(idx)
        if n < 2:
            continue
        k = min(max(1, int(round(fraction * n))), n - 1)
        val += idx[torch.randperm(n, generator=g)[:k]].tolist()
    if not val:
        return source, None
    is_val = torch.zeros(len(source), dtype=torch.bool)
    is_val[torch.tensor(val)] = True
    tr, va = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()

    def part(idx: torch.Tensor, name: str) -> ImageTensors:
        return ImageTensors(name, source.images[idx], source.labels[idx], [source.ids[i] for i in idx.tolist()],
                            source.classes)

    return part(tr, source.name), part(va, f"{source.name}:val")


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, data_cfg: DataConfig, ctx: Context,
          batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``net.features(x)`` (N, D) and logits ``net.head(f)`` (N, K) of uint8 images, eval mode, on CPU."""
    net = unwrap(net)
    was_training = net.training
    net.eval()
    feats, logits = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = prepare(images[i:i + batch_size], data_cfg, train=False, device=ctx.device,
                        channels_last=ctx.channels_last)
            with ctx.autocast():
                f = net.features(x)
                out = net.head(f)
            feats.append(f.float().flatten(1).cpu())
            logits.append(out.float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def domain_weights(train_source: ArrayLike, target: ArrayLike, val_source: ArrayLike, C: float = 1.0,
                   seed: int = SPLIT_SEED, max_iter: int = 300) -> np.ndarray:
    """Importance weights w(x) = p_t(x) / p_s(x) of the source-validation samples ``val_source`` (N_v, D): a
    logistic regression (standardised inputs, inverse L2 strength ``C``) separates ``train_source`` (N_s, D) from
    ``target`` (N_t, D) and gives p(target | x) for the validation samples; by Bayes w = p(t|x) / p(s|x) * N_s / N_t.
    Probabilities are clipped to [1e-6, 1 - 1e-6]."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    import warnings

    def rows(a: ArrayLike) -> np.ndarray:
        a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
        return a.reshape(len(a), -1)

    xs, xt, xv = rows(train_source), rows(target), rows(val_source)
    x = np.concatenate([xs, xt])
    d = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # separable domains never converge in the strict sense; the weights are fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, d)
    p_t = np.clip(clf.predict_proba(xv)[:, 1], 1e-6, 1.0 - 1e-6)
    return p_t / (1.0 - p_t) * (len(xs) / len(xt))



class SelectionProbe:
    """Computes the label-free criteria of one network state: ``probe(net) -> {"sel_<criterion>": value, ...}``.

    ``source_val`` is the labelled held-out source split; ``target`` the unlabelled target-train images and
    ``source`` the source training images, of which fixed random subsets of at most ``cfg.max_target_samples`` are
    used. Runs identically on every DDP rank (no sharding).
    """

    def __init__(self, source_val: ImageTensors | None, target: ImageTensors | None, data_cfg: DataConfig,
                 ctx: Context, cfg: SelectionConfig, source: ImageTensors | None = None, seed: int = SPLIT_SEED):
        self.source_val, self.data_cfg, self.ctx, self.cfg, self.seed = source_val, data_cfg, ctx, cfg, seed
        self.target_images = self._subset(target, 1)
        self.source_images = self._subset(source, 2)
        wanted = set(cfg.criteria)
        needs_val = {"iwcv", "dev", "source_val"} & wanted
        needs_target = {"iwcv", "dev", "snd"} & wanted
        self.criteria = [c for c in cfg.criteria
                         if not (c in needs_val and source_val is None)
                         and not (c in needs_target and self.target_images is None)
                         and not (c in ("iwcv", "dev") and self.source_images is None)]

    def _subset(self, domain: ImageTensors | None, stream: int) -> torch.Tensor | None:
        if domain is None or len(domain) < 2:
            return None
        n, k = len(domain), self.cfg.max_target_samples
        if n <= k:
            return domain.images
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return domain.images[torch.randperm(n, generator=g)[:k].sort().values]

    @property
    def active(self) -> bool:
        return bool(self.criteria)

    def __call__(self, net: nn.Module) -> dict[str, float]:
        # imported here: daaa.selection imports scikit-learn, seconds that commands without a probe need not pay
        from .selection import dev_risk, iw_risk, per_sample_loss, soft_neighborhood_density

        out: dict[str, float] = {}
        wanted = set(self.criteria)
        if not wanted:
            return out
        fs = ls = lt = ft = None
        if wanted & {"iwcv", "dev", "source_val"}:
            fs, ls = embed(net, self.source_val.images, self.data_cfg, self.ctx)
        if wanted & {"iwcv", "dev", "snd"}:
            ft, lt = embed(net, self.target_images, self.data_cfg, self.ctx)
        if "source_val" in wanted:
            out["sel_source_val"] = float((ls.argmax(1) == self.source_val.labels).float().mean())
        if wanted & {"iwcv", "dev"}:
            f_train, _ = embed(net, self.source_images, self.data_cfg, self.ctx)
            losses = per_sample_loss(ls, self.source_val.labels)
            w = None
            if all(bool(torch.isfinite(f).all()) for f in (f_train, ft, fs)):
                w = domain_weights(f_train, ft, fs, C=self.cfg.domain_classifier_c, seed=self.seed)
            else:  # a diverged network: no estimate at this evaluation (never selected)
                LOG.warning("selection: non-finite features, no importance weights at this evaluation")
            if w is not None:
                if "iwcv" in wanted:
                    r = iw_risk(losses, w / max(float(w.mean()), 1e-300))  # self-normalised
                    out["sel_iwcv"] = r["risk"]
                    out["sel_iw_ess"] = r["effective_sample_size"]
                if "dev" in wanted:
                    out["sel_dev"] = dev_risk(losses, w)["risk"]
        if "snd" in wanted:
            out["sel_snd"] = soft_neighborhood_density(lt, from_logits=True)
        return out


def pick(candidates: Sequence[dict[str, Any]], criterion: str, key: str | None = None) -> int | None:
    """Index of the best candidate by ``candidates[i][key or criterion]`` in the direction of ``criterion``;
    non-finite or missing values are skipped, ties go to the earliest; None when no candidate has a value."""
    key = key or criterion
    sign = 1.0 if DIRECTIONS[criterion] == "min" else -1.0
    best, best_value = None, math.inf
    for i, c in enumerate(candidates):
        v = c.get(key)
        if v is None or not math.isfinite(float(v)):
            continue
        if sign * float(v) < best_value:
            best, best_value = i, sign * float(v)
    return best


def summarize_selection(history: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    """The evaluated steps of a training history as ``criteria_curve`` (one dict per evaluation: step,
    target_test_accuracy, and each criterion's value under its own name) and, per criterion, the snapshot it picks:
    ``selection[c] = {"step", "accuracy", "value"}`` (accuracy = that snapshot's target-test accuracy, or None
    when there is no labelled target-test set)."""
    curve = []
    for r in history:
        values = {c: r[f"sel_{c}"] for c in criteria if f"sel_{c}" in r}
        if values:
            curve.append({"step": r["step"], "target_test_accuracy": r.get("target_test_accuracy"), **values})
    selection: dict[str, Any] = {}
    for c in criteria:
        i = pick(curve, c)
        if i is not None:
            selection[c] = {"step": curve[i]["step"], "accuracy": curve[i]["target_test_accuracy"],
                            "value": curve[i][c]}
    return {"selection": selection, "criteria_curve": curve}


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value) of the non-None values; None when there is none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
