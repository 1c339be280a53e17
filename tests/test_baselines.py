"""Baseline DA losses (DANN, DAN's MK-MMD, JAN's JMMD) and label-free model selection (IWCV, DEV, SND)."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daaa.baseline_losses import (DomainAdversarialLoss, DomainDiscriminator, GradientReverse, GradientReverseLayer,
                            JointAdversarialLayers, JointMMD, MultiKernelMMD, dann_coefficient,
                            gaussian_kernel_matrix, jmmd, mmd)
from daaa.selection import (CRITERIA, DEV, IWCV, SND, CandidateOutputs, Criterion, SourceValAccuracy,
                            density_ratio_weights, dev_risk, effective_sample_size, iw_risk, per_sample_loss, pick,
                            soft_neighborhood_density)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _sgd_step(params: Iterable[torch.Tensor], lr: float) -> None:
    # Plain SGD by hand: constructing a torch.optim optimizer costs seconds of lazy imports on first use.
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad


# ------------------------------------------------------------------------------------------------ DANN


def test_gradient_reversal_is_identity_forward_and_flips_scaled_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    y = GradientReverseLayer(coeff=0.5)(x)
    assert torch.equal(y, x)
    (y * g).sum().backward()
    assert torch.allclose(x.grad, -0.5 * g)

    x.grad = None
    (GradientReverse.apply(x, 2.0) * g).sum().backward()
    assert torch.allclose(x.grad, -2.0 * g)


def test_dann_coefficient_schedule() -> None:
    assert dann_coefficient(0.0) == 0.0
    assert dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    values = [dann_coefficient(p / 10) for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert 0.99 < values[-1] < 1.0


def test_discriminator_learns_and_reversed_gradient_pulls_domains_together() -> None:
    f_s = torch.randn(64, 2) * 0.5 + torch.tensor([1.5, 0.0])
    f_t = torch.randn(64, 2) * 0.5 - torch.tensor([1.5, 0.0])
    disc = DomainDiscriminator(2, hidden=32)
    adv = DomainAdversarialLoss(disc)

    first = adv(f_s, f_t).item()
    for _ in range(30):
        disc.zero_grad()
        adv(f_s, f_t).backward()
        _sgd_step(disc.parameters(), lr=0.2)
    disc.eval()
    trained = adv(f_s, f_t).item()
    assert trained < 0.5 * first
    assert adv.domain_accuracy > 0.95

    # Now the features are the parameters: descending the loss through the reversal ascends the domain loss.
    fs, ft = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
    gap0 = (fs.mean(0) - ft.mean(0)).norm().item()
    for _ in range(20):  # a large step: the loss is a mean over 128 samples, so per-sample gradients are small
        fs.grad = ft.grad = None
        adv(fs, ft, coeff=1.0).backward()
        _sgd_step([fs, ft], lr=20.0)
    gap1 = (fs.mean(0) - ft.mean(0)).norm().item()
    assert gap1 < 0.8 * gap0
    assert adv(fs.detach(), ft.detach()).item() > trained


# ------------------------------------------------------------------------------------------------ MMD / JMMD


def test_mmd_small_for_same_distribution_and_large_for_shift() -> None:
    x, y = torch.randn(400, 5), torch.randn(400, 5)
    same = mmd(x, y).item()
    shifted = mmd(x, y + 1.0).item()
    assert 0.0 <= same < 0.01
    assert shifted > 0.1 and shifted > 10 * same
    assert mmd(x, y + 1.0, linear=True).item() > 0.1


def test_mmd_zero_for_identical_inputs_and_nonnegative() -> None:
    x = torch.randn(32, 7, dtype=torch.float64)
    assert mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-10)
    assert jmmd([x, x[:, :3]], [x.clone(), x[:, :3].clone()]).item() == pytest.approx(0.0, abs=1e-10)
    assert abs(mmd(x, x.clone(), linear=True).item()) < 1e-10
    constant = torch.ones(8, 4)  # zero bandwidth must not divide by zero
    assert mmd(constant, constant).item() == 0.0
    for _ in range(5):
        assert mmd(torch.randn(6, 3), torch.randn(9, 3)).item() >= 0.0  # unequal sizes, V-statistic


def test_jmmd_of_one_layer_equals_mmd_and_modules_match() -> None:
    x, y = torch.randn(20, 4), torch.randn(30, 4) + 0.3
    assert torch.allclose(jmmd([x], [y]), mmd(x, y))
    assert torch.allclose(jmmd([x], [y[:20]], linear=True), mmd(x, y[:20], linear=True))
    assert torch.allclose(jmmd([x], [y], kernel_mults=[[1.0, 2.0]]), mmd(x, y, kernel_mults=(1.0, 2.0)))
    assert torch.allclose(MultiKernelMMD()(x, y), mmd(x, y))
    assert torch.allclose(JointMMD()([x, x], [y, y]), jmmd([x, x], [y, y]))
    # the estimator is w^T K w over the pooled sample's kernel matrix
    z = torch.cat([x, y])
    k = gaussian_kernel_matrix(z, z, bandwidth=(torch.cdist(z, z) ** 2).sum() / (50 * 49))
    expected = k[:20, :20].mean() + k[20:, 20:].mean() - 2 * k[:20, 20:].mean()
    assert torch.allclose(mmd(x, y), expected, atol=1e-5)


def test_jmmd_sees_a_joint_shift_that_marginal_mmds_miss() -> None:
    # Same marginals per layer, but the target pairs features with the wrong "label" layer.
    labels = torch.arange(200) % 2
    feats = torch.randn(200, 2) + 3.0 * labels[:, None].float()
    probs = F.one_hot(labels, 2).float()
    swapped = F.one_hot(1 - labels, 2).float()
    marginal = (mmd(feats, feats[torch.randperm(200)]) + mmd(probs, swapped[torch.randperm(200)])).item()
    joint = jmmd([feats, probs], [feats, swapped]).item()
    assert marginal < 0.02
    assert joint > 0.1


def _product_kernel_mmd(xs: list[torch.Tensor], ys: list[torch.Tensor], bandwidth_scale: float = 1.0) -> torch.Tensor:
    """JMMD^2 the plain way (JAN Eq. 10): the product of per-layer multi-kernel Gram matrices, each at its layer's
    mean pairwise squared distance (times ``bandwidth_scale``), as w^T K w."""
    n, m = xs[0].shape[0], ys[0].shape[0]
    joint = torch.ones(n + m, n + m, dtype=torch.float64)
    for x, y in zip(xs, ys):
        z = torch.cat([x, y]).double()
        base = (torch.cdist(z, z) ** 2).sum() / ((n + m) * (n + m - 1))
        joint = joint * gaussian_kernel_matrix(z, z, bandwidth=base * bandwidth_scale)
    w = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    return w @ joint @ w


def test_jmmd_log_domain_product_is_jans_product_kernel_on_few_layers() -> None:
    x = [torch.randn(12, 6), torch.softmax(torch.randn(12, 4), 1)]
    y = [torch.randn(15, 6) + 0.5, torch.softmax(torch.randn(15, 4) * 2, 1)]
    # the default is JAN's kernel: the same value as the product of kernel matrices (the form before the log domain)
    assert float(jmmd(x, y)) == pytest.approx(float(_product_kernel_mmd(x, y)), rel=1e-4)
    # normalize_layers: one layer is unchanged; L layers use L times each layer's bandwidths
    assert float(jmmd(x[:1], y[:1], normalize_layers=True)) == pytest.approx(float(jmmd(x[:1], y[:1])), rel=1e-6)
    assert float(jmmd(x, y, normalize_layers=True)) == pytest.approx(float(_product_kernel_mmd(x, y, 2.0)), rel=1e-4)


def _attention_maps(n: int, shift: float, g: torch.Generator) -> list[torch.Tensor]:
    """n normalised attention-map-like rows for each of the 52 aligned layers of ResNet-50 (56^2 ... 7^2 cells)."""
    sizes = [3136] * 10 + [784] * 12 + [196] * 18 + [49] * 12
    return [F.normalize(torch.rand(n, d, generator=g) ** 2 + shift, dim=1) for d in sizes]


def test_jmmd_over_52_layers_separates_shifted_attention_maps() -> None:
    """Table 4's JMMD over every aligned ResNet-50 layer: JAN's product of 52 kernels is numerically the identity
    (JMMD^2 = 2/n for any inputs, no gradient); with the bandwidths scaled by the number of layers it is a distance:
    larger between shifted than between same-distribution samples, with a finite, non-negligible gradient."""
    g = torch.Generator().manual_seed(0)
    n = 16
    src, same = _attention_maps(n, 0.0, g), _attention_maps(n, 0.0, g)
    shifted = [t.requires_grad_() for t in _attention_maps(n, 0.3, g)]
    jan = jmmd(src, shifted).detach()
    assert float(jan) == pytest.approx(2 / n, rel=1e-4)
    assert float(jmmd(src, same)) == pytest.approx(2 / n, rel=1e-4)
    fixed = jmmd(src, shifted, normalize_layers=True)
    baseline = float(jmmd(src, same, normalize_layers=True))
    assert 0 < baseline and float(fixed.detach()) > 1.5 * baseline
    fixed.backward()
    grad = torch.cat([t.grad.flatten() for t in shifted])
    assert torch.isfinite(grad).all() and float(grad.norm()) > 1e-3


def test_jan_a_adversary_ascends_the_jmmd_while_the_features_descend_it() -> None:
    """JAN-A: theta starts as the identity (the JMMD of JAN), its parameters climb the JMMD, the features' gradient
    is JAN's own."""
    f_s, p_s = torch.randn(24, 5), torch.softmax(torch.randn(24, 3), 1)
    f_t, p_t = (torch.randn(24, 5) + 0.7).requires_grad_(), torch.softmax(torch.randn(24, 3) * 2, 1)
    theta = JointAdversarialLayers([5, 3])
    loss = jmmd(theta([f_s, p_s]), theta([f_t, p_t]))
    plain = jmmd([f_s, p_s], [f_t, p_t])
    assert torch.allclose(loss, plain)
    loss.backward()
    g_adv = f_t.grad.clone()
    f_t.grad = None
    plain.backward()
    assert torch.allclose(g_adv, f_t.grad, atol=1e-6)  # the features descend the JMMD as in JAN
    for _ in range(10):  # descending theta's (reversed) gradient ascends the JMMD
        _sgd_step(theta.parameters(), lr=0.5)
        theta.zero_grad()
        jmmd(theta([f_s, p_s]), theta([f_t.detach(), p_t])).backward()
    assert float(jmmd(theta([f_s, p_s]), theta([f_t, p_t])).detach()) > float(plain.detach()) * 1.05
    with pytest.raises(ValueError):
        theta([f_s])


def test_mmd_gradients_flow_on_attention_like_maps() -> None:
    src = F.normalize(torch.rand(16, 49), dim=1)
    tgt = F.normalize(torch.rand(16, 49) ** 3, dim=1).requires_grad_()
    before = mmd(src, tgt).item()
    for _ in range(5):
        tgt.grad = None
        loss = mmd(src, tgt) + jmmd([src, src[:, :8]], [tgt, tgt[:, :8]])
        loss.backward()
        assert torch.isfinite(tgt.grad).all() and tgt.grad.abs().sum() > 0
        _sgd_step([tgt], lr=0.5)
    assert mmd(src, tgt).item() < before
    with pytest.raises(ValueError):
        mmd(src, tgt[:10], linear=True)


def test_mmd_ignores_autocast() -> None:
    x, y = torch.randn(32, 300), torch.randn(32, 300) + 0.1
    exact = jmmd([x, x[:, :5]], [y, y[:, :5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(jmmd([x, x[:, :5]], [y, y[:, :5]]), exact)
        assert mmd(x.bfloat16(), y.bfloat16()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ selection


def test_iwcv_weights_near_one_without_shift_and_large_in_target_dense_region() -> None:
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(400, 2))
    w = density_ratio_weights(xs, rng.normal(size=(400, 2)))
    assert abs(w.mean() - 1.0) < 0.05
    assert np.abs(w - 1.0).mean() < 0.2

    w = density_ratio_weights(xs, rng.normal(size=(300, 2)) + np.array([1.5, 0.0]))
    assert w[xs[:, 0] > 1].mean() > 2.0 > 0.5 > w[xs[:, 0] < -1].mean()
    assert np.corrcoef(np.argsort(np.argsort(w)), np.argsort(np.argsort(xs[:, 0])))[0, 1] > 0.9
    assert effective_sample_size(w) < 0.5 * len(w)


def test_iwcv_prefers_the_model_that_is_good_where_the_target_is() -> None:
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(400, 2))
    xt = rng.normal(size=(400, 2)) + np.array([1.5, 0.0])
    near_target = xs[:, 0] > 0.5
    labels = np.zeros(400, dtype=np.int64)

    def logits(loss: np.ndarray) -> np.ndarray:  # two-class log-probabilities whose cross-entropy is `loss`
        p = np.exp(-loss)
        return np.log(np.stack([p, 1 - p], axis=1))

    w = density_ratio_weights(xs, xt)
    cands = []
    for out in (logits(np.where(near_target, 1.0, 0.1)), logits(np.where(near_target, 0.1, 1.0))):
        o = CandidateOutputs(val_features=xs, val_logits=out, val_labels=labels, target_features=xt)
        losses = per_sample_loss(out, labels)
        assert IWCV(self_normalize=False)(o) == pytest.approx(-np.mean(w * losses))  # score = -[IWCV] Eq. 4
        assert IWCV()(o) == pytest.approx(-np.sum(w * losses) / np.sum(w))  # self-normalised by default
        assert DEV()(o) == pytest.approx(-dev_risk(losses, w)["risk"])
        cands.append({"iwcv": IWCV()(o), "dev": DEV()(o), "source": -float(losses.mean())})
    assert cands[0]["source"] > cands[1]["source"]  # plain source validation prefers the wrong one
    assert pick(cands, "iwcv") == 1
    assert pick(cands, "dev") == 1


def _held_out_source(rng: np.random.Generator, n: int = 300, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % k
    return rng.normal(size=(n, 4)) + 3.0 * np.eye(k, 4)[labels], labels


def test_every_criterion_scores_the_better_candidate_higher_and_pick_takes_it() -> None:
    rng = np.random.default_rng(2)
    xv, yv = _held_out_source(rng)
    xtr, _ = _held_out_source(rng)
    xt, yt = _held_out_source(rng)
    xt = xt + 0.5  # a mild shift: the weights are not all one
    right = 4.0 * np.eye(3)[yv]  # confident and right on the held-out source
    wrong = 4.0 * np.eye(3)[(yv + 1) % 3]  # confident and wrong
    clustered = 8.0 * np.eye(3)[yt]  # target predictions in three tight clusters
    scattered = rng.normal(scale=2.0, size=(len(yt), 3))  # no cluster structure
    good = CandidateOutputs(xv, right, yv, xt, clustered, xtr)
    bad = CandidateOutputs(xv, wrong, yv, xt, scattered, xtr)
    assert set(CRITERIA) == {"iwcv", "dev", "snd", "source_val"}
    for name, cls in CRITERIA.items():
        assert issubclass(cls, Criterion) and cls.name == name
        criterion = cls()
        scores = [{name: criterion(bad)}, {name: criterion(good)}, {name: float("nan")}]
        assert scores[1][name] > scores[0][name], name  # higher is better for every criterion
        assert pick(scores, name) == 1, name
    assert SourceValAccuracy()(good) == 1.0 and SourceValAccuracy()(bad) == 0.0
    assert IWCV()(bad) < IWCV()(good) < 0  # minus a cross-entropy
    assert SND()(good) == pytest.approx(math.log(len(yt) // 3 - 1), abs=1e-3)  # three tight clusters
    assert SND()(good) > SND()(bad) + 0.2
    # precomputed weights skip the domain classifier: unit weights give minus the plain mean loss
    unit = CandidateOutputs(xv, wrong, yv, weights=np.ones(len(yv)))
    assert IWCV()(unit) == pytest.approx(DEV()(unit)) == pytest.approx(-per_sample_loss(wrong, yv).mean())


def test_dev_with_constant_weights_is_the_mean_loss() -> None:
    losses = np.array([0.3, 1.2, 0.05, 2.0, 0.7])
    out = dev_risk(losses, np.ones(5))
    assert out["risk"] == pytest.approx(losses.mean())
    assert out["eta"] == 0.0
    assert out["effective_sample_size"] == pytest.approx(5.0)

    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    full = DEV()(CandidateOutputs(torch.randn(5, 4), logits, labels, torch.randn(7, 4), weights=np.ones(5)))
    assert full == pytest.approx(-F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert iw_risk(losses, np.ones(5))["risk"] == pytest.approx(losses.mean())

    # With varying weights the control variate still leaves the estimate exact when W*l is linear in W.
    w = np.array([0.5, 1.5, 1.0, 0.2, 1.8])
    assert dev_risk(np.full(5, 0.4), w)["risk"] == pytest.approx(0.4)


def test_snd_higher_for_clustered_than_scattered_predictions() -> None:
    rng = np.random.default_rng(0)
    n, k = 100, 10
    clustered = np.full((n, k), 0.01)
    clustered[np.arange(n), np.arange(n) % k] = 1.0
    clustered += rng.uniform(0, 0.02, size=(n, k))
    clustered /= clustered.sum(1, keepdims=True)
    scattered = rng.dirichlet(np.full(k, 0.3), size=n)  # fairly confident, but no cluster structure
    snd_clustered = soft_neighborhood_density(clustered)
    assert snd_clustered > soft_neighborhood_density(scattered) + 0.3
    assert soft_neighborhood_density(torch.as_tensor(np.log(clustered)), from_logits=True) == pytest.approx(
        snd_clustered)
    # The criterion's known blind spot: identical (e.g. uniform) outputs are "one dense cluster" -> log(N - 1).
    assert soft_neighborhood_density(np.full((n, k), 1.0 / k)) == pytest.approx(math.log(n - 1))


def test_pick_takes_the_highest_finite_score() -> None:
    cands = [{"iwcv": -0.9, "dev": -0.5, "snd": 1.0},
             {"iwcv": -0.2, "dev": float("nan"), "snd": 3.0},
             {"iwcv": -0.4, "dev": -0.3, "snd": 3.0, "other": 7.0}]
    assert pick(cands, "iwcv") == 1
    assert pick(cands, "dev") == 2  # NaN skipped
    assert pick(cands, "snd") == 1  # tie: the earliest
    assert pick(cands, "snd", key="other") == 2  # missing values skipped
    assert pick(cands[:2], "source_val") is None
    with pytest.raises(ValueError):
        pick(cands, "accuracy")


def test_importing_the_selection_module_does_not_import_sklearn() -> None:
    import subprocess
    import sys

    code = "import sys, daaa.selection; assert 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
