"""Baseline domain-adaptation losses: DANN (gradient reversal), DAN (multi-kernel MMD) and JAN (joint MMD).

These are the feature-level alignment methods the paper compares against (Sec. 2, Tables 1-2: RevGrad, JAN) and
the distribution distances it tries as alternative attention discrepancy measures (Sec. 3.2, Table 4). Each is a
plain function or ``nn.Module``, usable in any training loop::

    grl_disc = DomainAdversarialLoss(DomainDiscriminator(features_dim))
    loss = ce(head(f_s), y_s) + grl_disc(f_s, f_t, coeff=dann_coefficient(step / total_steps))

    loss = ce(head(f_s), y_s) + lam * mmd(f_s, f_t)                                           # DAN
    loss = ce(logits_s, y_s) + lam * jmmd([f_s, logits_s.softmax(1)], [f_t, logits_t.softmax(1)])  # JAN
    theta = JointAdversarialLayers([f_s.shape[1], num_classes])                                    # JAN-A
    loss = ce(logits_s, y_s) + lam * jmmd(theta([f_s, p_s]), theta([f_t, p_t]))

References:
    [DANN] Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015;
           Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016.
    [DAN]  Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML 2015.
    [JAN]  Long et al., "Deep Transfer Learning with Joint Adaptation Networks", ICML 2017.
    [MMD]  Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: sigma^2_u = mult_u * (mean pairwise squared distance): 2^k for k = -2..2, the 5 kernels of DAN's released code.
DEFAULT_KERNEL_MULTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------- DANN / RevGrad


class GradientReverse(torch.autograd.Function):
    """Gradient reversal layer R_lambda of [DANN] (Eq. 12-13 of Ganin & Lempitsky 2015).

    Forward: R(x) = x.  Backward: dR/dx = -lambda * I, so the feature extractor ascends the domain loss that the
    discriminator descends -- the min-max game of Eq. 10 in one backward pass.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
        ctx.coeff = float(coeff)
        return x.view_as(x)  # a view, not x itself, so autograd records this node

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad_output, None


class GradientReverseLayer(nn.Module):
    """Module wrapper of :class:`GradientReverse`; set ``coeff`` each step for the DANN schedule."""

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        self.coeff = float(coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradientReverse.apply(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def dann_coefficient(progress: float, alpha: float = 10.0) -> float:
    """DANN's warm-up of the reversal coefficient: lambda_p = 2 / (1 + exp(-alpha * p)) - 1, p in [0, 1].

    Sec. 5.2.2 of Ganin et al. (JMLR 2016), alpha = 10. Starts at 0 so the noisy early discriminator does not
    corrupt the features, and approaches 1 as training progresses.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0


class DomainDiscriminator(nn.Sequential):
    """Domain classifier G_d of [DANN]: in_features -> hidden -> hidden -> 1 logit (source = 1, target = 0).

    Two ReLU hidden layers with dropout 0.5, the 1024-unit discriminator Ganin et al. use for Office and JAN /
    tllib reuse. Returns a logit rather than a sigmoid so the loss can use ``binary_cross_entropy_with_logits``,
    which stays finite once the discriminator becomes confident.
    """

    def __init__(self, in_features: int, hidden: int = 1024, dropout: float = 0.5):
        super().__init__(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )


class DomainAdversarialLoss(nn.Module):
    """DANN domain loss L_d (Eq. 9-10 of Ganin & Lempitsky 2015) through a gradient reversal layer.

    ``forward(f_s, f_t, coeff)`` concatenates both domains' features, reverses their gradient scaled by
    ``coeff`` and returns the binary cross-entropy of the discriminator, averaged per domain (so unequal batch
    sizes weigh the domains equally). Minimising it trains the discriminator; the reversed gradient trains the
    feature extractor to confuse it. After each call ``domain_accuracy`` holds the discriminator's accuracy on
    the batch (0.5 means the domains are indistinguishable).
    """

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator
        self.domain_accuracy: float = float("nan")

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
        f = GradientReverse.apply(torch.cat([f_s, f_t], dim=0), coeff)
        logits = self.discriminator(f).reshape(-1).float()
        n_s = f_s.shape[0]
        labels = torch.cat([logits.new_ones(n_s), logits.new_zeros(f_t.shape[0])])
        per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        loss = 0.5 * (per_sample[:n_s].mean() + per_sample[n_s:].mean())
        with torch.no_grad():
            self.domain_accuracy = ((logits > 0).float() == labels).float().mean().item()
        return loss


# --------------------------------------------------------------------------------------------- DAN / JAN


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 at least: squared distances of half-precision activations overflow or lose the small ones.
    return torch.promote_types(x.dtype, torch.float32)


def _full_precision(x: torch.Tensor) -> torch.autocast:
    # Under autocast the matmul in _sq_dists would run in bf16/fp16, whose rounding swamps small distances.
    return torch.autocast(device_type=x.device.type, enabled=False)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(dtype)  # (N, ...) -> (N, D): conv maps or 1-D samples alike


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The expansion |a|^2 + |b|^2 - 2ab avoids the (N, M, D) difference tensor that wide attention maps would need;
    # it can round slightly below 0, hence the clamp.
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def _log_multi_kernel(sq_dists: torch.Tensor, base: torch.Tensor, mults: Sequence[float],
                      scale: float = 1.0) -> torch.Tensor:
    """log of (1/U) sum_u exp(-d / (mult_u * scale * base)), by logsumexp: JMMD adds these over layers (a product of
    kernels in the log domain), which neither underflows nor loses the gradient of the small kernel values."""
    # The bandwidth is detached (as in DAN's and tllib's code): otherwise the features could shrink the MMD by
    # inflating their spread instead of aligning the domains.
    base = base.detach().clamp_min(1e-12) * scale
    return torch.logsumexp(torch.stack([-sq_dists / (m * base) for m in mults]), dim=0) - math.log(len(mults))


def _multi_kernel(sq_dists: torch.Tensor, base: torch.Tensor, mults: Sequence[float]) -> torch.Tensor:
    return _log_multi_kernel(sq_dists, base, mults).exp()


def gaussian_kernel_matrix(x: torch.Tensor, y: torch.Tensor,
                           kernel_mults: Sequence[float] = DEFAULT_KERNEL_MULTS,
                           bandwidth: float | torch.Tensor | None = None) -> torch.Tensor:
    """Multi-kernel Gaussian Gram matrix K_ij = (1/U) sum_u exp(-||x_i - y_j||^2 / (mult_u * bandwidth)).

    ``x`` (N, D) and ``y`` (M, D) -> (N, M). The equal-weight convex combination of U Gaussian kernels is the
    characteristic kernel family of [DAN] (Eq. 3), with beta_u = 1/U. ``bandwidth=None`` uses the mean squared
    distance between distinct rows of the pooled sample {x, y}, DAN's heuristic; it is detached from the graph.
    """
    dtype = _work_dtype(x)
    with _full_precision(x):
        x, y = _rows(x, dtype), _rows(y, dtype)
        if bandwidth is None:
            z = torch.cat([x, y])
            n = z.shape[0]
            base = _sq_dists(z, z).sum() / max(n * (n - 1), 1)
        else:
            base = torch.as_tensor(bandwidth, dtype=dtype, device=x.device)
        return _multi_kernel(_sq_dists(x, y), base, kernel_mults)


def _layer_mults(kernel_mults: Sequence[float] | Sequence[Sequence[float]], n_layers: int) -> list[list[float]]:
    if len(kernel_mults) > 0 and isinstance(kernel_mults[0], (list, tuple)):
        if len(kernel_mults) != n_layers:
            raise ValueError(f"{len(kernel_mults)} kernel_mults lists for {n_layers} layers")
        return [list(map(float, m)) for m in kernel_mults]  # type: ignore[arg-type]
    return [list(map(float, kernel_mults))] * n_layers  # type: ignore[arg-type]


def _quadratic_mmd(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], mults: list[list[float]],
                   scale: float) -> torch.Tensor:
    n, m = xs[0].shape[0], ys[0].shape[0]
    log_joint: torch.Tensor | None = None
    for x, y, layer_mults in zip(xs, ys, mults):
        dtype = _work_dtype(x)
        z = torch.cat([_rows(x, dtype), _rows(y, dtype)])
        d = _sq_dists(z, z)
        log_k = _log_multi_kernel(d, d.sum() / ((n + m) * (n + m - 1)), layer_mults, scale)
        log_joint = log_k if log_joint is None else log_joint + log_k  # JAN: the product over layers
    assert log_joint is not None
    joint = log_joint.exp()
    # MMD^2 = ||mean phi(x) - mean phi(y)||^2 = w^T K w with w = (1/n, ..., -1/m, ...): the V-statistic,
    # a quadratic form of a PSD matrix, so >= 0 up to rounding (clamped). Works for n != m.
    w = torch.cat([joint.new_full((n,), 1.0 / n), joint.new_full((m,), -1.0 / m)])
    return (w @ joint @ w).clamp_min(0.0)


def _linear_mmd(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], mults: list[list[float]],
                scale: float) -> torch.Tensor:
    n = xs[0].shape[0]
    if ys[0].shape[0] != n:
        raise ValueError(f"the linear-time MMD needs equal batch sizes, got {n} and {ys[0].shape[0]}")
    h = n // 2
    terms: list[torch.Tensor] | None = None
    for x, y, layer_mults in zip(xs, ys, mults):
        dtype = _work_dtype(x)
        x, y = _rows(x, dtype), _rows(y, dtype)
        x1, x2, y1, y2 = x[0:2 * h:2], x[1:2 * h:2], y[0:2 * h:2], y[1:2 * h:2]
        d = torch.stack([(x1 - x2).pow(2).sum(1), (y1 - y2).pow(2).sum(1),
                         (x1 - y2).pow(2).sum(1), (x2 - y1).pow(2).sum(1)])
        log_k = _log_multi_kernel(d, d.mean(), layer_mults, scale)  # bandwidth from the O(n) distances used
        terms = list(log_k) if terms is None else [t + kl for t, kl in zip(terms, log_k)]
    assert terms is not None
    k_xx, k_yy, k_xy, k_yx = (t.exp() for t in terms)
    return (k_xx + k_yy - k_xy - k_yx).mean()


def _check(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], linear: bool) -> None:
    if len(xs) == 0 or len(xs) != len(ys):
        raise ValueError(f"need the same non-zero number of layers for both domains, got {len(xs)} and {len(ys)}")
    n, m = xs[0].shape[0], ys[0].shape[0]
    for x, y in zip(xs, ys):
        if x.shape[0] != n or y.shape[0] != m:
            raise ValueError("every layer must have the same number of rows per domain")
        if x.shape[1:].numel() != y.shape[1:].numel():
            raise ValueError(f"feature sizes differ across domains: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(n, m) < (2 if linear else 1):
        raise ValueError(f"too few samples for an MMD estimate: {n} and {m}")


def jmmd(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
         kernel_mults: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_KERNEL_MULTS,
         linear: bool = False, normalize_layers: bool = False) -> torch.Tensor:
    """Squared joint MMD of [JAN] (Eq. 10 / 11): MMD with the product kernel k(z, z') = prod_l k_l(z^l, z'^l).

    ``xs`` and ``ys`` list, per layer l, the source (N, D_l) and target (M, D_l) activations of the same samples
    (JAN uses the bottleneck features and the softmax outputs; the paper's Table 4 uses attention maps of the
    aligned conv layers). Row i of every layer belongs to the same sample. ``kernel_mults`` is shared by all
    layers, or one sequence per layer; each layer's bandwidth comes from its own mean pairwise squared distance.

    ``linear=False`` (default): the biased V-statistic over all pairs, O((N+M)^2), always >= 0 and exactly 0 for
    identical samples; N != M allowed. ``linear=True``: the linear-time unbiased estimator of [MMD] Lemma 14 as
    used by [DAN] Eq. 6 / [JAN] Eq. 11 on quad-tuples (x_2i, x_2i+1, y_2i, y_2i+1); needs N == M, and being
    unbiased it can be negative. Differentiable w.r.t. all inputs. The product is taken in the log domain (a sum of
    per-layer log-kernels, each a logsumexp over its bandwidths).

    ``normalize_layers=False`` (default) is JAN's kernel: every layer at its own mean-distance bandwidth. It is
    meant for JAN's few layers; over many wide layers the product concentrates: each layer's kernel between two
    different samples is ~e^-1, so the product of L of them is ~e^-L and the kernel matrix is numerically the
    identity -- over the 52 aligned layers of ResNet-50, JMMD^2 = 1/N + 1/M whatever the distributions, with a
    gradient of ~1e-11 (tests/test_baselines.py). ``normalize_layers=True`` multiplies every layer's bandwidths by
    the number of layers L: for one bandwidth per layer the joint kernel is then exp(-(1/L) sum_l d_l / sigma_l^2),
    a Gaussian kernel on the layers' distances each normalised by its own bandwidth and averaged over the layers,
    so it keeps the scale of a one-layer kernel for any L. One layer: the same value either way; two layers: the
    bandwidths are doubled, so the value differs from JAN's (a valid JMMD with another kernel, not a correction of
    it). Table 4's attention JMMD over every aligned layer (:class:`daaa.attention.AttentionAlignmentLoss`) uses
    ``True``; the JAN baseline (two layers) uses JAN's ``False``.
    """
    _check(xs, ys, linear)
    mults = _layer_mults(kernel_mults, len(xs))
    scale = float(len(xs)) if normalize_layers else 1.0
    with _full_precision(xs[0]):
        return _linear_mmd(xs, ys, mults, scale) if linear else _quadratic_mmd(xs, ys, mults, scale)


def mmd(x: torch.Tensor, y: torch.Tensor, kernel_mults: Sequence[float] = DEFAULT_KERNEL_MULTS,
        linear: bool = False) -> torch.Tensor:
    """Squared multi-kernel MMD of [DAN] (Eq. 2-3): || E_s phi(x) - E_t phi(y) ||^2_H with the kernels of
    :func:`gaussian_kernel_matrix`, between rows of ``x`` (N, D) and ``y`` (M, D) (extra dims are flattened).

    The bandwidths are sigma^2_u = mult_u * mean_{i != j} ||z_i - z_j||^2 over the pooled sample z = {x, y}.
    Default is the biased V-statistic (>= 0, 0 for identical inputs); ``linear=True`` is DAN's linear-time
    unbiased estimate (Eq. 6), see :func:`jmmd`. Works on any (N, D) tensors, e.g. batches of attention maps.
    """
    return jmmd([x], [y], [list(kernel_mults)], linear)


class JointAdversarialLayers(nn.Module):
    """The adversary of JAN-A ([JAN] Sec. 4.3, "adversarial training"; tllib's ``Theta``): one linear layer theta_l
    per JMMD layer, initialised to the identity, applied to both domains' activations before :func:`jmmd`, so that
    the features minimise and theta maximises the JMMD: min_f max_theta JMMD(theta(f_s), theta(f_t)).

    ``forward(xs) -> [theta_l(x_l)]`` with a gradient reversal on each side of theta_l: the features see both
    reversals (no net change) and descend the JMMD; theta's parameters see only the outer one and ascend it.
    """

    def __init__(self, dims: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for d in dims)
        for layer in self.layers:
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != len(self.layers):
            raise ValueError(f"{len(xs)} layers for {len(self.layers)} adversarial layers")
        return [GradientReverse.apply(layer(GradientReverse.apply(x.flatten(1), 1.0)), 1.0)
                for layer, x in zip(self.layers, xs)]


class MultiKernelMMD(nn.Module):
    """Module form of :func:`mmd` (DAN's MK-MMD loss): ``forward(x, y) -> scalar``."""

    def __init__(self, kernel_mults: Sequence[float] = DEFAULT_KERNEL_MULTS, linear: bool = False):
        super().__init__()
        self.kernel_mults = tuple(float(m) for m in kernel_mults)
        self.linear = linear

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mmd(x, y, self.kernel_mults, self.linear)

    def extra_repr(self) -> str:
        return f"kernel_mults={self.kernel_mults}, linear={self.linear}"


class JointMMD(nn.Module):
    """Module form of :func:`jmmd` (JAN's JMMD loss): ``forward(xs, ys) -> scalar`` for per-layer lists."""

    def __init__(self, kernel_mults: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_KERNEL_MULTS,
                 linear: bool = False):
        super().__init__()
        self.kernel_mults = kernel_mults
        self.linear = linear

    def forward(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
        return jmmd(xs, ys, self.kernel_mults, self.linear)

    def extra_repr(self) -> str:
        return f"kernel_mults={self.kernel_mults}, linear={self.linear}"
