"""Label-free model selection: criteria that rank candidates (checkpoints, hyper-parameters) without target labels.

Papers in unsupervised domain adaptation (this one included) often report the best target-test accuracy over
checkpoints (the "target oracle"), which needs target labels a user does not have. The criteria here use a held-out,
labelled *source-validation* split and *unlabelled* target data only. Every criterion returns a **score where higher
is better** (the risks are negated), as pytorch-adapt's ``validators`` do, so one picker (:func:`pick`, the max)
serves them all:

* :class:`IWCV` ``"iwcv"`` -- minus the importance-weighted source-validation cross-entropy [IWCV] (JAN's protocol);
* :class:`DEV` ``"dev"`` -- minus the same risk with DEV's control variate [DEV];
* :class:`SND` ``"snd"`` -- the soft neighbourhood density of the target predictions [SND];
* :class:`SourceValAccuracy` ``"source_val"`` -- plain source-validation accuracy (the naive criterion).

Criteria take one :class:`CandidateOutputs` -- plain arrays or tensors, so callers compute them however they like::

    scores = []
    for net in candidates:
        fs, ls = embed(net, source_val.images, data_cfg, ctx)   # features and logits, held-out labelled source
        ft, lt = embed(net, target.images, data_cfg, ctx)       # the same, unlabelled target
        out = CandidateOutputs(fs, ls, source_val.labels, ft, lt)
        scores.append({name: cls()(out) for name, cls in CRITERIA.items()})
    best = pick(scores, "dev")

The array functions (:func:`per_sample_loss`, :func:`density_ratio_weights`, :func:`iw_risk`, :func:`dev_risk`,
:func:`soft_neighborhood_density`, :func:`effective_sample_size`) are usable on their own.

Inside training a :class:`SelectionProbe` records, at each evaluation, ``sel_<criterion>`` (the score, higher is
better) and ``sel_iw_ess`` (the effective sample size of the importance weights: a small one means an unreliable
IWCV/DEV score); :func:`summarize_selection` then picks, per criterion, the evaluated snapshot with the highest
score and reports the target-test accuracy it had -- what a user who selected by that criterion would get.

References:
    [IWCV] Sugiyama, Krauledat & Mueller, "Covariate Shift Adaptation by Importance Weighted Cross Validation",
           JMLR 2007 -- the protocol JAN (Long et al., ICML 2017) uses to select its hyper-parameters.
    [DEV]  You, Wang, Long & Jordan, "Towards Accurate Model Selection in Deep Unsupervised Domain Adaptation",
           ICML 2019.
    [SND]  Saito, Kim, Teterwak, Sclaroff, Darrell & Saenko, "Tune it the Right Way: Unsupervised Validation of
           Domain Adaptation via Soft Neighborhood Density", ICCV 2021.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DataConfig, SelectionConfig
from .data.domain import Images, ImageTensors
from .data.streaming import scan, take
from .data.transforms import prepare
from .distributed import Context, unwrap

LOG = logging.getLogger("daaa")

__all__ = ["ArrayLike", "CRITERIA", "CandidateOutputs", "Criterion", "DEV", "IWCV", "SND", "SPLIT_SEED",
           "SelectionProbe", "SourceValAccuracy", "density_ratio_weights", "dev_risk", "effective_sample_size",
           "embed", "iw_risk", "mean_std", "per_sample_loss", "pick", "soft_neighborhood_density",
           "split_source_validation", "summarize_selection"]

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

#: the seed of the source-validation split and of the image subsets: fixed, so every run seed sees the same split
SPLIT_SEED = 0
_EPS = 1e-6


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _rows(x: ArrayLike) -> np.ndarray:
    a = _np(x)
    return a.reshape(len(a), -1)


# ------------------------------------------------------------------------------------------ array functions


def per_sample_loss(outputs: ArrayLike, labels: ArrayLike, from_logits: bool = True) -> np.ndarray:
    """Cross-entropy -log p(y_i | x_i) per sample, from logits (default) or probabilities (N, K) -> (N,)."""
    out = torch.as_tensor(_np(outputs))
    y = torch.as_tensor(_np(labels)).long()
    logp = F.log_softmax(out, dim=1) if from_logits else out.clamp_min(1e-12).log()
    return (-logp.gather(1, y[:, None]).squeeze(1)).numpy()


def density_ratio_weights(source_features: ArrayLike, target_features: ArrayLike, query: ArrayLike | None = None,
                          *, C: float = 1.0, seed: int = SPLIT_SEED, max_iter: int = 300) -> np.ndarray:
    """Importance weights w(x) = p_t(x) / p_s(x) of the ``query`` samples (default: the source samples).

    A logistic-regression domain classifier (standardised inputs, inverse L2 strength ``C``) separates
    ``source_features`` (N_s, D) from ``target_features`` (N_t, D); by Bayes, w = p(t|x) / p(s|x) * N_s / N_t, the
    factor undoing the class prior of unequal sample sizes -- the estimator of [DEV] Sec. 4.2 and of [IWCV] as JAN
    uses it. As in DEV's code, pass the source *training* features to fit and the held-out validation features as
    ``query``, so a classifier that overfits its own samples does not decide the weights of the ones scored.
    Probabilities are clipped to [1e-6, 1 - 1e-6]. Returns (N_q,) weights, mean ~1 when calibrated.
    """
    # imported here: scikit-learn costs seconds that commands without a selection probe need not pay
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, xt = _rows(source_features), _rows(target_features)
    xq = xs if query is None else _rows(query)
    x = np.concatenate([xs, xt])
    d = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    # standardising makes C mean the same for every feature scale and lets lbfgs converge
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():  # separable domains never converge in the strict sense; the weights are fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, d)
    p_t = np.clip(clf.predict_proba(xq)[:, 1], _EPS, 1.0 - _EPS)  # clip: a confident classifier gives w = inf
    return p_t / (1.0 - p_t) * (len(xs) / len(xt))


def effective_sample_size(weights: ArrayLike) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: N for uniform weights, ~1 when one weight dominates."""
    w = _np(weights)
    return float(w.sum() ** 2 / max((w ** 2).sum(), 1e-300))


def iw_risk(losses: ArrayLike, weights: ArrayLike) -> dict[str, float]:
    """[IWCV] Eq. 4: the importance-weighted mean loss (1/N) sum_i w_i l_i, unbiased for the target risk.
    Returns ``risk`` (lower is better), ``effective_sample_size``, ``source_risk`` (unweighted), ``mean_weight``."""
    l, w = _np(losses), _np(weights)
    return {"risk": float(np.mean(w * l)), "effective_sample_size": effective_sample_size(w),
            "source_risk": float(np.mean(l)), "mean_weight": float(np.mean(w))}


def dev_risk(losses: ArrayLike, weights: ArrayLike) -> dict[str, float]:
    """[DEV] Algorithm 1: the IW risk with a control variate (lower is better); also ``eta`` and :func:`iw_risk`'s
    diagnostics.

    With the weighted loss L = W * l, E_s[W] = 1 makes W a control variate: eta = -Cov(L, W) / Var(W) and
    risk = mean(L) + eta * mean(W) - eta, which keeps the estimate unbiased and minimises its variance (DEV
    Theorem 2). eta = 0 when the weights have no variance, so constant unit weights give the plain mean loss.
    """
    l, w = _np(losses), _np(weights)
    weighted = w * l
    var_w = float(np.var(w, ddof=1)) if len(w) > 1 else 0.0
    eta = -float(np.cov(weighted, w, ddof=1)[0, 1]) / var_w if var_w > 1e-12 else 0.0
    risk = float(np.mean(weighted) + eta * np.mean(w) - eta)
    return {**iw_risk(l, w), "risk": risk, "eta": eta}


def soft_neighborhood_density(target_probs: ArrayLike, temperature: float = 0.05, from_logits: bool = False) -> float:
    """[SND] Eq. 1-3: the mean entropy of each target sample's soft neighbourhood -- higher is better.

    Target softmax outputs (N, K) (``from_logits=True`` applies the softmax) are L2-normalised; their cosine
    similarities to the other N-1 samples (self excluded), divided by ``temperature`` and soft-maxed, give each
    sample a distribution over neighbours, whose entropy is averaged. Predictions that form tight, confident
    clusters have many equally close neighbours (high entropy); scattered ones have few (low entropy).
    Caveat of the criterion itself: outputs collapsed onto a single vector give the maximum, log(N - 1), so
    report SND next to a sanity check such as the number of predicted classes.
    """
    p = torch.as_tensor(_np(target_probs))
    n = p.shape[0]
    if n < 2:
        raise ValueError("SND needs at least 2 target samples")
    if from_logits:
        p = p.softmax(dim=1)
    f = F.normalize(p, dim=1)
    sim = (f @ f.T) / temperature
    off_diag = ~torch.eye(n, dtype=torch.bool)
    logits = sim[off_diag].view(n, n - 1)  # dropping self keeps each row's entropy free of the trivial match
    logq = F.log_softmax(logits, dim=1)
    return float(-(logq.exp() * logq).sum(dim=1).mean())


# ------------------------------------------------------------------------------------------------ criteria


@dataclass(frozen=True)
class CandidateOutputs:
    """What one candidate network produces on the selection data; a criterion reads the fields it needs.

    ``val_*``: the held-out labelled source split -- features (N_v, D), logits (N_v, K), labels (N_v,);
    ``target_*``: unlabelled target data -- features (N_t, D), logits (N_t, K); ``train_features`` (N_s, D): source
    *training* samples the domain classifier is fitted on (None: fitted on ``val_features``); ``weights`` (N_v,):
    importance weights of the validation samples, when already computed (skips the domain classifier).
    """

    val_features: ArrayLike | None = None
    val_logits: ArrayLike | None = None
    val_labels: ArrayLike | None = None
    target_features: ArrayLike | None = None
    target_logits: ArrayLike | None = None
    train_features: ArrayLike | None = None
    weights: ArrayLike | None = None


class Criterion(ABC):
    """A label-free selection criterion: ``criterion(outputs) -> score``, **higher is better**."""

    name: ClassVar[str]
    #: the data it reads: "source_val" (labelled held-out source) and/or "target" (unlabelled target)
    needs: ClassVar[frozenset[str]]
    #: whether it uses importance weights (a domain classifier on the features)
    weighted: ClassVar[bool] = False

    @abstractmethod
    def __call__(self, out: CandidateOutputs) -> float:
        ...


@dataclass
class _WeightedRisk(Criterion):
    """Shared part of IWCV and DEV: per-sample source-validation losses and their importance weights."""

    C: float = 1.0  # inverse L2 strength of the domain classifier (unused when ``out.weights`` is given)
    seed: int = SPLIT_SEED

    needs: ClassVar[frozenset[str]] = frozenset({"source_val", "target"})
    weighted: ClassVar[bool] = True

    def losses_and_weights(self, out: CandidateOutputs) -> tuple[np.ndarray, np.ndarray]:
        losses = per_sample_loss(out.val_logits, out.val_labels)
        w = out.weights
        if w is None:
            fit_on = out.val_features if out.train_features is None else out.train_features
            w = density_ratio_weights(fit_on, out.target_features, out.val_features, C=self.C, seed=self.seed)
        w = _np(w)
        if len(w) != len(losses):
            raise ValueError(f"{len(w)} weights for {len(losses)} source validation samples")
        return losses, w


@dataclass
class IWCV(_WeightedRisk):
    """[IWCV] (JAN's protocol): minus the source-validation cross-entropy importance-weighted towards the target.

    The weights are self-normalised (w / mean w, i.e. sum w l / sum w), which trades a small bias for a much
    smaller variance when the domain classifier is miscalibrated (``self_normalize=False``: :func:`iw_risk` as is).
    """

    self_normalize: bool = True
    name: ClassVar[str] = "iwcv"

    def __call__(self, out: CandidateOutputs) -> float:
        losses, w = self.losses_and_weights(out)
        if self.self_normalize:
            w = w / max(float(w.mean()), 1e-300)
        return -iw_risk(losses, w)["risk"]


@dataclass
class DEV(_WeightedRisk):
    """[DEV] Deep Embedded Validation: minus the importance-weighted risk with a control variate (:func:`dev_risk`)."""

    name: ClassVar[str] = "dev"

    def __call__(self, out: CandidateOutputs) -> float:
        return -dev_risk(*self.losses_and_weights(out))["risk"]


@dataclass
class SND(Criterion):
    """[SND] soft neighbourhood density of the target predictions (:func:`soft_neighborhood_density`)."""

    temperature: float = 0.05
    name: ClassVar[str] = "snd"
    needs: ClassVar[frozenset[str]] = frozenset({"target"})

    def __call__(self, out: CandidateOutputs) -> float:
        return soft_neighborhood_density(out.target_logits, self.temperature, from_logits=True)


@dataclass
class SourceValAccuracy(Criterion):
    """Accuracy on the held-out source split: the naive criterion, blind to the domain shift (a baseline in
    [IWCV], [DEV] and [SND])."""

    name: ClassVar[str] = "source_val"
    needs: ClassVar[frozenset[str]] = frozenset({"source_val"})

    def __call__(self, out: CandidateOutputs) -> float:
        pred = _np(out.val_logits).argmax(axis=1)
        return float(np.mean(pred == _np(out.val_labels)))


#: every criterion by name (the names of ``selection.criteria`` and of the ``sel_<name>`` history keys)
CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (IWCV, DEV, SND, SourceValAccuracy)}


def pick(candidates: Sequence[Mapping[str, Any]], criterion: str, key: str | None = None) -> int | None:
    """Index of the candidate with the highest ``candidates[i][key or criterion]`` (every criterion's score is
    higher-is-better); non-finite or missing values are skipped (e.g. a diverged run), ties go to the earliest;
    None when no candidate has a value. ``criterion`` must be a name of :data:`CRITERIA`."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; known: {sorted(CRITERIA)}")
    key = key or criterion
    best, best_value = None, -math.inf
    for i, cand in enumerate(candidates):
        v = cand.get(key)
        if v is None or not math.isfinite(float(v)):
            continue
        if float(v) > best_value:
            best, best_value = i, float(v)
    return best


# ------------------------------------------------------------------------------------------ inside training


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
        return ImageTensors(name, take(source.images, idx), source.labels[idx], [source.ids[i] for i in idx.tolist()],
                            source.classes)

    return part(tr, source.name), part(va, f"{source.name}:val")


@torch.no_grad()
def embed(net: nn.Module, images: Images, data_cfg: DataConfig, ctx: Context,
          batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``net.features(x)`` (N, D) and logits ``net.head(f)`` (N, K) of uint8 images (a tensor, or a
    streamed set decoded batch by batch by its DataLoader workers), eval mode, on CPU."""
    net = unwrap(net)
    was_training = net.training
    net.eval()
    feats, logits = [], []
    try:
        for _, batch in scan(images, batch_size):
            x = prepare(batch, data_cfg, train=False, device=ctx.device, channels_last=ctx.channels_last)
            with ctx.autocast():
                f = net.features(x)
                out = net.head(f)
            feats.append(f.float().flatten(1).cpu())
            logits.append(out.float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(feats), torch.cat(logits)


class SelectionProbe:
    """The label-free criteria of one network state: ``probe(net) -> {"sel_<criterion>": score, "sel_iw_ess": n}``.

    Every ``sel_<criterion>`` is the :data:`CRITERIA` score, **higher is better** (``sel_iwcv`` and ``sel_dev`` are
    minus the estimated target risks); ``sel_iw_ess`` is the effective sample size of the importance weights, a
    diagnostic (higher = a more reliable IWCV/DEV score). ``source_val`` is the labelled held-out source split;
    ``target`` the unlabelled target-train images and ``source`` the source training images, of which fixed random
    subsets of at most ``cfg.max_target_samples`` are used: the domain classifier is fitted on the source-train
    subset against the target subset and weighs the validation samples (see :func:`density_ratio_weights`). No
    target label enters any criterion. Runs identically on every DDP rank (no sharding).
    """

    def __init__(self, source_val: ImageTensors | None, target: ImageTensors | None, data_cfg: DataConfig,
                 ctx: Context, cfg: SelectionConfig, source: ImageTensors | None = None, seed: int = SPLIT_SEED):
        self.source_val, self.data_cfg, self.ctx, self.cfg, self.seed = source_val, data_cfg, ctx, cfg, seed
        self.target_images = self._subset(target, 1)
        self.source_images = self._subset(source, 2)
        available = {n for n, d in (("source_val", source_val), ("target", self.target_images)) if d is not None}
        self.criteria = [c for c in cfg.criteria if CRITERIA[c].needs <= available]
        # C only matters when a criterion fits its own weights; the probe fits them once, for IWCV and DEV together
        self._criteria = {c: CRITERIA[c]() for c in self.criteria}

    def _subset(self, domain: ImageTensors | None, stream: int) -> Images | None:
        if domain is None or len(domain) < 2:
            return None
        n, k = len(domain), self.cfg.max_target_samples
        if n <= k:
            return domain.images
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return take(domain.images, torch.randperm(n, generator=g)[:k].sort().values)  # streamed sets stay streamed

    @property
    def active(self) -> bool:
        return bool(self.criteria)

    def outputs(self, net: nn.Module) -> CandidateOutputs:
        """The embeddings the active criteria need, with the importance weights when a criterion uses them (None
        when the features are not finite: a diverged network gets no weighted score)."""
        needs = set().union(*(CRITERIA[c].needs for c in self.criteria))
        out = CandidateOutputs()
        if "source_val" in needs:
            fs, ls = embed(net, self.source_val.images, self.data_cfg, self.ctx)
            out = replace(out, val_features=fs, val_logits=ls, val_labels=self.source_val.labels)
        if "target" in needs:
            ft, lt = embed(net, self.target_images, self.data_cfg, self.ctx)
            out = replace(out, target_features=ft, target_logits=lt)
        if not any(CRITERIA[c].weighted for c in self.criteria):
            return out
        if self.source_images is not None:
            out = replace(out, train_features=embed(net, self.source_images, self.data_cfg, self.ctx)[0])
        fit_on = out.val_features if out.train_features is None else out.train_features
        if not all(bool(torch.isfinite(f).all()) for f in (fit_on, out.target_features, out.val_features)):
            LOG.warning("selection: non-finite features, no importance weights at this evaluation")
            return out
        w = density_ratio_weights(fit_on, out.target_features, out.val_features, C=self.cfg.domain_classifier_c,
                                  seed=self.seed)
        return replace(out, weights=w)

    def __call__(self, net: nn.Module) -> dict[str, float]:
        if not self.criteria:
            return {}
        out = self.outputs(net)
        scores: dict[str, float] = {}
        if out.weights is not None:
            scores["sel_iw_ess"] = effective_sample_size(out.weights)
        for name, criterion in self._criteria.items():
            if criterion.weighted and out.weights is None:
                continue  # no estimate at this evaluation (never selected)
            scores[f"sel_{name}"] = float(criterion(out))
        return scores


def summarize_selection(history: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    """The evaluated steps of a training history as ``criteria_curve`` (one dict per evaluation: step,
    target_test_accuracy, and each criterion's score under its own name) and, per criterion, the snapshot with the
    highest score: ``selection[c] = {"step", "accuracy", "value"}`` (accuracy = that snapshot's target-test accuracy,
    or None when there is no labelled target-test set; value = its score, higher is better)."""
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
    """Mean and sample standard deviation (0 for one value) of the finite non-None values; None when there is none."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}
