"""Model selection without target labels: IWCV, DEV and SND.

UDA papers (this one included) often report the best target accuracy over checkpoints or hyper-parameters, which
needs the target labels a real user does not have. These criteria rank candidates (checkpoints, lambdas, ...)
from unlabelled target data only. Inputs are plain tensors or numpy arrays -- features (N, D), logits or
probabilities (N, K), labels (N,) -- so callers compute them however they like::

    scores = []
    for ckpt in checkpoints:
        fs, ls = embed(ckpt, source_val)    # features and logits of the held-out labelled source split
        ft, lt = embed(ckpt, target_train)  # the same, on unlabelled target data
        scores.append({"dev": deep_embedded_validation(fs, ft, ls, ys)["risk"],
                       "snd": soft_neighborhood_density(lt, from_logits=True)})
    best = select(scores, "dev")

References:
    [IWCV] Sugiyama, Krauledat & Mueller, "Covariate Shift Adaptation by Importance Weighted Cross Validation",
           JMLR 2007 -- the protocol JAN (Long et al., ICML 2017) uses to select its hyper-parameters.
    [DEV]  You, Wang, Chen, Wang & Jordan, "Towards Accurate Model Selection in Deep Unsupervised Domain
           Adaptation", ICML 2019.
    [SND]  Saito, Kim, Teterwak, Sclaroff, Darrell & Saenko, "Tune it the Right Way: Unsupervised Validation of
           Domain Adaptation via Soft Neighborhood Density", ICCV 2021.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]

#: The direction of each criterion: IWCV and DEV estimate the target risk (lower is better), SND measures how
#: densely target predictions cluster (higher is better).
DIRECTIONS: dict[str, Literal["min", "max"]] = {"iwcv": "min", "dev": "min", "snd": "max"}

_EPS = 1e-6


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def per_sample_loss(outputs: ArrayLike, labels: ArrayLike, from_logits: bool = True) -> np.ndarray:
    """Cross-entropy -log p(y_i | x_i) per sample, from logits (default) or probabilities (N, K) -> (N,)."""
    out = torch.as_tensor(_np(outputs))
    y = torch.as_tensor(_np(labels)).long()
    logp = F.log_softmax(out, dim=1) if from_logits else out.clamp_min(1e-12).log()
    return (-logp.gather(1, y[:, None]).squeeze(1)).numpy()


def density_ratio_weights(source_features: ArrayLike, target_features: ArrayLike, C: float = 1.0,
                          max_iter: int = 1000, seed: int = 0) -> np.ndarray:
    """Importance weights w(x) = p_t(x) / p_s(x) of the source samples, by a discriminative domain classifier.

    A logistic regression (on standardised features) separates ``source_features`` (N_s, D) from
    ``target_features`` (N_t, D); by Bayes, p_t(x)/p_s(x) = p(target|x)/p(source|x) * N_s/N_t, the factor
    undoing the class prior of unequal sample sizes. This is the estimator of [DEV] Sec. 4.2 / JAN's IWCV. ``C``
    is the inverse L2 strength: a weaker one overfits in high dimension and makes a few weights explode.
    Returns (N_s,) weights with mean ~1 when the classifier is calibrated.
    """
    xs, xt = _np(source_features), _np(target_features)
    xs, xt = xs.reshape(len(xs), -1), xt.reshape(len(xt), -1)
    x = np.concatenate([xs, xt])
    d = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    # Standardising makes C mean the same for every feature scale and lets lbfgs converge.
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(x, d)
    p_t = np.clip(clf.predict_proba(xs)[:, 1], _EPS, 1.0 - _EPS)  # clip: a confident classifier gives w = inf
    return p_t / (1.0 - p_t) * (len(xs) / len(xt))


def effective_sample_size(weights: ArrayLike) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: N for uniform weights, ~1 when one weight dominates."""
    w = _np(weights)
    return float(w.sum() ** 2 / max((w ** 2).sum(), 1e-300))


def iw_risk(losses: ArrayLike, weights: ArrayLike) -> dict[str, float]:
    """[IWCV] Eq. 4: the importance-weighted mean loss (1/N) sum_i w_i l_i, unbiased for the target risk."""
    l, w = _np(losses), _np(weights)
    return {"risk": float(np.mean(w * l)), "effective_sample_size": effective_sample_size(w),
            "source_risk": float(np.mean(l)), "mean_weight": float(np.mean(w))}


def dev_risk(losses: ArrayLike, weights: ArrayLike) -> dict[str, float]:
    """[DEV] Algorithm 1: the IW risk with a control variate.

    With the weighted loss L = W * l, E_s[W] = 1 makes W a control variate: eta = -Cov(L, W) / Var(W) and
    risk = mean(L) + eta * mean(W) - eta, which keeps the estimate unbiased and minimises its variance (DEV
    Theorem 2). eta = 0 when the weights have no variance, so constant unit weights give the plain mean loss.
    """
    l, w = _np(losses), _np(weights)
    weighted = w * l
    var_w = float(np.var(w, ddof=1)) if len(w) > 1 else 0.0
    if var_w > 1e-12:
        eta = -float(np.cov(weighted, w, ddof=1)[0, 1]) / var_w
    else:
        eta = 0.0
    risk = float(np.mean(weighted) + eta * np.mean(w) - eta)
    return {"risk": risk, "eta": eta, "effective_sample_size": effective_sample_size(w),
            "source_risk": float(np.mean(l)), "mean_weight": float(np.mean(w))}


def _weights_and_losses(source_features: ArrayLike, target_features: ArrayLike, source_logits: ArrayLike,
                        source_labels: ArrayLike, from_logits: bool, weights: ArrayLike | None,
                        C: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    losses = per_sample_loss(source_logits, source_labels, from_logits)
    w = density_ratio_weights(source_features, target_features, C=C, seed=seed) if weights is None else _np(weights)
    if len(w) != len(losses):
        raise ValueError(f"{len(w)} weights for {len(losses)} source validation samples")
    return w, losses


def importance_weighted_validation(source_features: ArrayLike, target_features: ArrayLike,
                                   source_logits: ArrayLike, source_labels: ArrayLike, *,
                                   from_logits: bool = True, weights: ArrayLike | None = None,
                                   C: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """[IWCV] as in JAN's protocol: the source-validation cross-entropy, importance-weighted towards the target.

    ``source_features`` (N_s, D), ``source_logits`` (N_s, K) (probabilities with ``from_logits=False``) and
    ``source_labels`` (N_s,) of a held-out labelled source split; ``target_features`` (N_t, D) of unlabelled
    target data, from the same candidate model. ``weights`` skips the domain classifier
    (:func:`density_ratio_weights`). Returns ``risk`` (lower is better), ``effective_sample_size`` (how many
    source samples the estimate effectively rests on: a small one means an unreliable risk), ``source_risk``
    (unweighted), ``mean_weight`` and ``weights``.
    """
    w, losses = _weights_and_losses(source_features, target_features, source_logits, source_labels,
                                    from_logits, weights, C, seed)
    return {**iw_risk(losses, w), "weights": w}


def deep_embedded_validation(source_features: ArrayLike, target_features: ArrayLike,
                             source_logits: ArrayLike, source_labels: ArrayLike, *,
                             from_logits: bool = True, weights: ArrayLike | None = None,
                             C: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """[DEV]: :func:`importance_weighted_validation` with the control-variate variance reduction of
    :func:`dev_risk`. Same inputs; returns ``risk`` (lower is better), ``eta``, ``effective_sample_size``,
    ``source_risk``, ``mean_weight`` and ``weights``.
    """
    w, losses = _weights_and_losses(source_features, target_features, source_logits, source_labels,
                                    from_logits, weights, C, seed)
    return {**dev_risk(losses, w), "weights": w}


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


def select(candidates: Sequence[Mapping[str, Any]], criterion: str) -> int:
    """Index of the best candidate by ``criterion``, whose direction is :data:`DIRECTIONS`.

    ``"iwcv"`` and ``"dev"``: lower is better (estimated target risk); ``"snd"``: higher is better. Each candidate
    holds ``candidate[criterion]``, a number or a result dict of this module (its ``"risk"`` is used).
    Non-finite values (e.g. a diverged run) are skipped; ties go to the earliest candidate.
    """
    if criterion not in DIRECTIONS:
        raise ValueError(f"unknown criterion {criterion!r}; known: {sorted(DIRECTIONS)}")
    sign = 1.0 if DIRECTIONS[criterion] == "min" else -1.0
    best, best_value = -1, math.inf
    for i, cand in enumerate(candidates):
        value = cand[criterion]
        value = float(value["risk"] if isinstance(value, Mapping) else value)
        if math.isfinite(value) and sign * value < best_value:
            best, best_value = i, sign * value
    if best < 0:
        raise ValueError(f"no candidate has a finite {criterion!r} value")
    return best
