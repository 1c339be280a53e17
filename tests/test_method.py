"""Unit tests of the method's pieces: attention maps (Eq. 4), L_AT (Eq. 5), EM (Eq. 8-11), mixed batches."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from daaa import AttentionAlignmentLoss, FeatureRecorder, attention_map
from daaa.attention import (_EnergyTap, _NormalisedEnergy, _NormalisedMaps, crop_attention_maps,
                            grouped_attention_maps)
from daaa.batches import MixedBatchSampler, stream_counts
from daaa.em import PosteriorNetwork, confidence_mask, em_loss
from daaa.models import DigitCNN
from daaa.optim import lr_factor
from daaa.config import OptimConfig
from daaa.errors import ConfigError


def _hand_map(f: torch.Tensor, kind: str) -> torch.Tensor:
    n, c, h, w = f.shape
    out = torch.zeros(n, h * w if kind != "fm" else c * h * w)
    for i in range(n):
        if kind == "fm":
            v = f[i].reshape(-1).clone()
        else:
            v = torch.zeros(h * w)
            for y in range(h):
                for x in range(w):
                    vals = [float(f[i, ch, y, x]) for ch in range(c)]
                    if kind == "l2":
                        v[y * w + x] = sum(a * a for a in vals)
                    elif kind == "l1":
                        v[y * w + x] = sum(abs(a) for a in vals)
                    else:
                        v[y * w + x] = max(abs(a) for a in vals)
        out[i] = v / v.norm()
    return out


@pytest.mark.parametrize("kind", ["l2", "l1", "linf", "fm"])
def test_attention_map_matches_hand_computation(kind):
    f = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    got = attention_map(f, kind)
    assert got.shape == (2, 20 if kind != "fm" else 60)
    torch.testing.assert_close(got, _hand_map(f, kind), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_attention_map_eq4_is_sum_of_squares():
    f = torch.zeros(1, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # 9 + 16 = 25
    f[0, :, 0, 1] = torch.tensor([0.0, 0.0])
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 0.0]]))


def test_grouped_maps_equal_the_layers_maps_and_their_loss():
    """Layers stacked by map size (one autograd node per size, issue 18) give each layer's Eq. 4 map, the same L_AT
    (every discrepancy), the same gradients, and source_rows picks anchors as indexing would."""
    g = torch.Generator().manual_seed(5)
    shapes = [(8, 6, 6), (16, 3, 3), (4, 6, 6), (8, 3, 3), (2, 5, 5)]
    src = [torch.randn(6, *s, generator=g) for s in shapes]
    tgt = [torch.randn(6, *s, generator=g) for s in shapes]
    groups = grouped_attention_maps(src)
    assert [tuple(m.shape) for m in groups] == [(6, 2, 36), (6, 2, 9), (6, 1, 25)]  # sizes in first-seen order
    torch.testing.assert_close(groups[0][:, 1], attention_map(src[2]))
    torch.testing.assert_close(groups[1][:, 0], attention_map(src[1]))
    rows = torch.tensor([5, 0, 0, 3, 1, 2])
    for discrepancy in ("l2", "l1", "mmd", "jmmd"):
        loss = AttentionAlignmentLoss(discrepancy=discrepancy)
        a = [t.clone().requires_grad_() for t in tgt]
        b = [t.clone().requires_grad_() for t in tgt]
        by_layer = loss.from_maps([m[rows] for m in loss.maps(src)], loss.maps(a))
        by_group = loss.from_maps(loss.grouped_maps(src), loss.grouped_maps(b), source_rows=rows)
        torch.testing.assert_close(by_group, by_layer)
        by_layer.backward()
        by_group.backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(y.grad, x.grad)
        torch.testing.assert_close(loss(src, tgt), loss(loss.grouped_maps(src), tgt, source_are_maps=True))
    with pytest.raises(ValueError, match="source_rows"):
        AttentionAlignmentLoss().from_maps(groups, groups, source_rows=rows[:2])
    double = [torch.randn(2, c, 3, 3, generator=g, dtype=torch.double, requires_grad=True) for c in (3, 5)]
    assert torch.autograd.gradcheck(_NormalisedEnergy.apply, tuple(double))  # one node, two layers
    low = src[0].bfloat16()  # bf16 features: summed in float32 without a float32 copy, as attention_map always did
    torch.testing.assert_close(attention_map(low), attention_map(low.float()), rtol=0, atol=0)



def test_energy_taps_give_the_recorded_features_maps_and_gradients():
    """FeatureRecorder(energy=True) -- Eq. 4 taken as each output passes, its backward one addcmul into the network's
    gradient (issue 18) -- gives the maps of the recorded features (to the bit in the forward) and the same parameter
    gradients, whether L_AT, the network's output or both are differentiated, for a plain tap and a (name, fn) tap,
    and a layer whose output feeds the next one and another that ends the network."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                        nn.AvgPool2d(2), nn.Conv2d(6, 5, 1))
    taps = ["0", ("2", torch.tanh), "4"]
    x = torch.randn(5, 3, 8, 8)
    anchors = [F.normalize(torch.rand(5, 1, n), dim=2) for n in (64, 64, 16)]
    align = AttentionAlignmentLoss()

    def grads(energy: bool, with_at: bool, with_out: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        net.zero_grad()
        with FeatureRecorder(net, taps, energy=energy) as rec:
            out = net(x)
            maps = align.grouped_maps(rec.energies if energy else rec.features, energies=energy)
        loss = (align.from_maps([torch.cat(anchors[:2], 1), anchors[2]], maps) if with_at else 0) + \
            ((out * out).sum() if with_out else 0)
        loss.backward()
        return [m.detach() for m in maps], [q.grad.clone() for q in net.parameters()]

    for with_at, with_out in ((True, True), (True, False), (False, True)):
        maps, want = grads(False, with_at, with_out)
        tapped, got = grads(True, with_at, with_out)
        assert all(torch.equal(a, b) for a, b in zip(maps, tapped))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # what each recorder holds is read under its own name (energies taken for features would be mapped as A^2), and
    # L_AT of energies with energies=True is L_AT of the features
    with FeatureRecorder(net, taps) as plain, FeatureRecorder(net, taps, energy=True) as tapped, torch.no_grad():
        net(x)
        features, energies = plain.features, tapped.energies
        net(x.flip(3))
        other_features, other_energies = plain.features, tapped.energies
        with pytest.raises(RuntimeError, match="energies"):
            tapped.features
        with pytest.raises(RuntimeError, match="energy=True"):
            plain.energies
    want = align(features, other_features)
    assert want > 0.1
    torch.testing.assert_close(align(energies, other_energies, energies=True), want)
    torch.testing.assert_close(align(align.grouped_maps(features), other_energies, source_are_maps=True,
                                     energies=True), want)
    with pytest.raises(ValueError, match="per-layer"):
        align(align.maps(features), other_energies, source_are_maps=True, energies=True)
    f = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_EnergyTap.apply, (f,))
    energies = [torch.rand(2, 1, 3, 3, dtype=torch.double, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(_NormalisedMaps.apply, tuple(energies))
    with pytest.raises(ValueError, match="energies"):
        grouped_attention_maps([torch.rand(2, 3, 3)], "l1", energies=True)


def test_energy_taps_refuse_a_network_that_changes_the_output_in_place():
    """The tapped output passes on as a view: a network that rectifies it in place is refused by autograd (the
    trainer then records the features: tests/test_bench.py), as is not the plain recorder."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
    x = torch.randn(2, 3, 6, 6)
    with FeatureRecorder(net, ["0"]) as rec:
        net(x)
        assert rec.features[0].min() >= 0  # what the plain recorder holds: the rectified output, not the conv's
    with FeatureRecorder(net, ["0"], energy=True), pytest.raises(RuntimeError, match="inplace"):
        net(x)

def test_cropped_maps_of_uncropped_images_are_the_crops_maps_where_the_net_commutes_with_cropping():
    """adapt.anchor_crops=cached: crop_attention_maps on the maps of uncropped images gives the maps of the crops
    (flipped or not) exactly for a network that commutes with cropping -- pointwise convolutions, and a stride-2 pool
    at even offsets -- so the offsets, the scale per layer and the mirroring are right."""
    from daaa.data.transforms import random_crop_flip

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 1), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(5, 6, 1))
    images = torch.randn(6, 3, 12, 12)
    crops = torch.tensor([[0, 0, 0], [2, 4, 1], [4, 2, 0], [2, 2, 1], [0, 4, 0], [4, 0, 1]])
    with FeatureRecorder(net, ["0", "3"]) as rec, torch.no_grad():
        net(images)
        uncropped = grouped_attention_maps(rec.features)
        net(random_crop_flip(images, 8, crops))
        exact = grouped_attention_maps(rec.features)
    assert [tuple(m.shape) for m in uncropped] == [(6, 1, 144), (6, 1, 36)]
    for full, want, side in zip(uncropped, exact, (8, 4)):
        torch.testing.assert_close(crop_attention_maps(full, crops, 8, side), want)
    # an offset that is not a multiple of the layer's stride: read between its pixels (bilinear, exact on a plane)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    plane = (1 + xs + 10 * ys).reshape(1, 1, 36)
    got = crop_attention_maps(plane, torch.tensor([[1, 3, 0]]), 8, 4)
    ys, xs = torch.meshgrid(torch.arange(4.0) + 0.5, torch.arange(4.0) + 1.5, indexing="ij")
    torch.testing.assert_close(got, F.normalize((1 + xs + 10 * ys).reshape(1, 1, 16), dim=2))
    with pytest.raises(ValueError, match="square"):
        crop_attention_maps(torch.ones(2, 1, 10), crops[:2], 8, 2)


def test_attention_map_gradient_equals_autograd_of_eq4_and_normalisation():
    """The one-node backward of the L2 map (daaa.attention._NormalisedEnergy) against autograd's graph of
    normalize(sum_c F_c^2), on random features, channels_last ones and an all-zero map (F.normalize's eps)."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_NormalisedEnergy.apply, (f,))  # in float64 (attention_map computes in float32)
    for feats in (torch.randn(4, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last),
                  torch.cat([torch.zeros(1, 8, 6, 6), torch.randn(1, 8, 6, 6, generator=g)])):
        weights = torch.randn(len(feats), 36, generator=g)
        fused, naive = feats.clone().requires_grad_(), feats.clone().requires_grad_()
        (attention_map(fused) * weights).sum().backward()
        (F.normalize((naive * naive).sum(1).flatten(1), dim=1) * weights).sum().backward()
        torch.testing.assert_close(fused.grad, naive.grad, rtol=1e-5, atol=1e-6)
        assert fused.grad.is_contiguous(memory_format=torch.channels_last) == feats.is_contiguous(
            memory_format=torch.channels_last)


def test_digit_cnn_pools_before_relu_exactly_as_after():
    """DigitCNN runs ReLU(maxpool(conv)) -- a quarter of the ReLU's work -- which equals maxpool(ReLU(conv)) in
    values and gradients."""
    net, _ = _nets()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    h = x
    for conv in (net.conv1, net.conv2, net.conv3):
        h = F.max_pool2d(F.relu(conv(h)), 2)
    reference = net.head(h.flatten(1))
    ref_grads = torch.autograd.grad(reference.square().sum(), list(net.parameters()))
    out = net(x)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    assert torch.equal(out, reference)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def _nets(seed: int = 0) -> tuple[DigitCNN, DigitCNN]:
    torch.manual_seed(seed)
    a = DigitCNN(10, 3, 8, 32)
    return a, copy.deepcopy(a)


def test_alignment_zero_for_identical_networks_and_inputs_positive_otherwise():
    source, target = _nets()
    x = torch.randn(6, 3, 32, 32)
    loss = AttentionAlignmentLoss()
    with FeatureRecorder(source, source.aligned_layers) as rs, FeatureRecorder(target, target.aligned_layers) as rt:
        with torch.no_grad():
            source(x)
        target(x)
        assert loss(rs.features, rt.features).detach().item() == pytest.approx(0.0, abs=1e-4)
        target(x.flip(-1))  # a different input through the target net
        assert loss(rs.features, rt.features).detach().item() > 0.1
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with FeatureRecorder(source, source.aligned_layers) as rs, FeatureRecorder(target, target.aligned_layers) as rt:
        source(x)
        target(x)
        assert loss(rs.features, rt.features).detach().item() > 0.01


def test_alignment_gradient_reaches_only_the_target_network():
    source, target = _nets()
    source.requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, 3, 32, 32)
    with FeatureRecorder(source, source.aligned_layers) as rs, FeatureRecorder(target, target.aligned_layers) as rt:
        source(x)
        target(x)
        AttentionAlignmentLoss()(rs.features, rt.features).backward()
    assert all(p.grad is None for p in source.parameters())
    grads = [target.conv1.weight.grad, target.conv2.weight.grad, target.conv3.weight.grad]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert target.conv4.weight.grad is None  # the classifier does not take part in attention


def test_alignment_is_sum_of_per_pair_l2_distances():
    a = [torch.randn(5, 2, 3, 3)]
    b = [torch.randn(5, 2, 3, 3)]
    expected = sum((attention_map(a[0])[i] - attention_map(b[0])[i]).norm() for i in range(5))
    assert float(AttentionAlignmentLoss()(a, b)) == pytest.approx(float(expected), rel=1e-5)
    assert float(AttentionAlignmentLoss(reduction="mean")(a, b)) == pytest.approx(float(expected) / 5, rel=1e-5)


@pytest.mark.parametrize("measure", ["l1", "mmd", "jmmd"])
def test_other_discrepancies_zero_on_equal_and_positive_on_different(measure):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(8, 2, 4, 4, generator=g), torch.randn(8, 3, 2, 2, generator=g)]
    b = [torch.randn(8, 2, 4, 4, generator=g) * 3 + 1, torch.randn(8, 3, 2, 2, generator=g) ** 2]
    loss = AttentionAlignmentLoss(discrepancy=measure)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(a, b)) > 1e-3


def test_em_loss_is_soft_cross_entropy_eq11():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    post = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    logp = torch.log_softmax(logits, 1)
    expected = -(post * logp).sum()
    assert float(em_loss(logits, post)) == pytest.approx(float(expected))
    keep = torch.tensor([True, False])
    assert float(em_loss(logits, post, keep)) == pytest.approx(float(-(post[0] * logp[0]).sum()))


def test_confidence_filter_threshold_and_p_t_one_keeps_none():
    post = torch.tensor([[0.96, 0.04], [0.6, 0.4], [1.0, 0.0]])
    assert confidence_mask(post, 0.95).tolist() == [True, False, True]
    assert confidence_mask(post, 1.0).tolist() == [False, False, False]
    assert confidence_mask(post, 0.0).all()


def test_posterior_network_syncs_every_n_steps_and_stays_frozen():
    _, target = _nets()
    post = PosteriorNetwork(target, sync_interval=3)
    assert [s for s in range(10) if post.due(s)] == [3, 6, 9]
    x = torch.randn(2, 3, 32, 32)
    before = post(x)
    with torch.no_grad():
        target.conv4.bias[0] += 5.0
    assert torch.allclose(post(x), before)  # an update of the target does not reach M_post until the sync
    assert post.threshold(0.95, 1.0) == 1.0
    post.sync(target, 3)
    assert not torch.allclose(post(x), before)
    assert post.threshold(0.95, 1.0) == 0.95 and post.last_sync_step == 3
    assert all(not p.requires_grad for p in post.parameters())


def test_lr_schedule_restarts():
    cfg = OptimConfig(schedule="inv", lr_gamma=0.001, lr_decay=0.75)
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 1000) == pytest.approx(2 ** -0.75)
    assert lr_factor(OptimConfig(schedule="constant"), 500) == 1.0


@pytest.mark.parametrize("restart", [True, False])
def test_modification_c_restarts_the_decaying_schedule_at_each_sync(tmp_path, restart):
    """Modification C (Sec. 3.3): with a decaying schedule the learning rate a DAAA step uses falls between syncs
    and jumps back to the base rate at every M_post sync; EM-C (no restart) keeps decaying through the syncs."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    cfg = load_config("smoke", ["adapt.optim.schedule=inv", "adapt.optim.lr_gamma=0.5", "adapt.sync_interval=3",
                                f"adapt.restart_schedule={str(restart).lower()}"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), Context(0, 1, torch.device("cpu"), None, False),
                                 tmp_path)
    lrs = [trainer.step(step)["lr"] for step in range(8)]
    base, factor = cfg.adapt.optim.lr, lambda t: (1 + 0.5 * t) ** -0.75
    since = [s % 3 for s in range(8)] if restart else list(range(8))
    assert lrs == pytest.approx([base * factor(t) for t in since])
    assert trainer.posterior_net.syncs == 2  # synced at steps 3 and 6
    if restart:
        assert lrs[3] == lrs[6] == pytest.approx(base) and lrs[2] < base
    else:
        assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_batch_proportions_and_pairing():
    counts = stream_counts(100, [0.35, 0.15, 0.35, 0.15], "S+Tf+T+Sf")
    assert counts == {"S": 35, "Tf": 15, "T": 35, "Sf": 15}
    assert stream_counts(64, [0.35, 0.15, 0.35, 0.15], "S+Tf") == {"S": 45, "Tf": 19, "T": 0, "Sf": 0}
    assert sum(stream_counts(7, [0.35, 0.15, 0.35, 0.15], "S+Tf+T+Sf").values()) == 7
    sampler = MixedBatchSampler(50, 40, 20, [0.35, 0.15, 0.35, 0.15], "S+Tf+T+Sf", seed=3)
    b = sampler.batch(5)
    assert b.counts == {"S": 7, "Tf": 3, "T": 7, "Sf": 3}
    assert torch.equal(b.tf_idx, b.source_idx[:3])  # T_f rows are translations of the batch's own S rows
    assert torch.equal(b.sf_idx, b.target_idx[:3])
    rows, src, sf = b.anchor_rows()
    # Eq. 5: S rows, T_f rows (anchored on their x^S), S_f rows, and every T row (anchored on its G_TS(x^T))
    assert rows.tolist() == list(range(0, 10)) + list(range(17, 20)) + list(range(10, 17))
    assert torch.equal(src, torch.cat([b.source_idx, b.tf_idx]))
    assert torch.equal(sf, torch.cat([b.sf_idx, b.target_idx]))
    rows, _, sf = b.anchor_rows("paired")  # the earlier reading: only the T rows whose S_f is a batch row
    assert rows.tolist() == list(range(0, 10)) + list(range(17, 20)) + list(range(10, 13))
    assert torch.equal(sf, torch.cat([b.sf_idx, b.target_idx[:3]]))
    # deterministic per step, and sampling without replacement within an epoch
    assert torch.equal(sampler.batch(5).source_idx, b.source_idx)
    seen = torch.cat([sampler.batch(s).source_idx for s in range(7)])  # 49 of 50 items
    assert len(set(seen.tolist())) == 49


@pytest.mark.parametrize("train_data", ["S+Tf+T+Sf", "Tf+T", "S+T"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_real_target_row_has_its_term4_anchor(train_data, world_size):
    """Eq. 5's fourth sum runs over every real target image: each T row of every (shard of a) batch is aligned with
    its own translation S_f[target_idx], also where the batch has no S_f rows (the Tf+T rows of Table 2)."""
    for rank in range(world_size):
        sampler = MixedBatchSampler(50, 40, 64, [0.35, 0.15, 0.35, 0.15], train_data, seed=2, rank=rank,
                                    world_size=world_size)
        for step in range(3):
            b = sampler.batch(step)
            rows, src, sf = b.anchor_rows()
            t = b.slices()["T"]
            assert t.stop > t.start
            anchor_of = {int(r): k for k, r in enumerate(rows)}
            assert set(range(t.start, t.stop)) <= set(anchor_of)  # every T row takes part
            for n, row in enumerate(range(t.start, t.stop)):  # ... against G_TS of its own image
                assert int(sf[anchor_of[row] - len(src)]) == int(b.target_idx[n])
            assert len(rows) == len(set(rows.tolist())) == len(src) + len(sf)


def test_sharded_batches_cover_the_global_batch_and_keep_pairs():
    kw = dict(n_source=50, n_target=40, batch_size=20, proportions=[0.35, 0.15, 0.35, 0.15], train_data="S+Tf+T+Sf", seed=1)
    full = MixedBatchSampler(**kw).batch(2)
    shards = [MixedBatchSampler(**kw, rank=r, world_size=2).batch(2) for r in range(2)]
    assert sorted(torch.cat([s.source_idx for s in shards]).tolist()) == sorted(full.source_idx.tolist())
    for s in shards:
        assert s.paired_target_rows() == len(s.sf_idx)
        assert s.paired_source_rows() == len(s.tf_idx)
        assert torch.equal(s.tf_idx, s.source_idx[: len(s.tf_idx)])


def test_unpaired_rows_keep_their_own_crop():
    from daaa.batches import MixedBatch

    b = MixedBatch(torch.tensor([3, 4]), torch.tensor([5]), torch.tensor([1, 2]), torch.tensor([1]))
    assert (b.paired_source_rows(), b.paired_target_rows()) == (0, 1)
    assert b.crop_partners().tolist() == [0, 1, 2, 3, 4, 3]  # Tf row 2 keeps its crop; Sf row 5 takes T row 3's


def test_unique_rows_is_torch_unique_along_rows():
    from daaa.trainers.adapt import unique_rows

    g = torch.Generator().manual_seed(0)
    for bounds in ([2, 40, 5, 5, 2], [2, 3000, 33, 33, 2], [1, 1, 1], [2 ** 40, 2 ** 30, 4]):  # the last overflows
        rows = torch.stack([torch.randint(0, b, (50,), generator=g) for b in bounds], 1)
        rows = torch.cat([rows, rows[:20]])  # repeated anchors: one row each, the inverse points to it
        expected = torch.unique(rows, dim=0, return_inverse=True)
        got = unique_rows(rows)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), bounds
    empty = unique_rows(torch.zeros(0, 5, dtype=torch.long))
    assert empty[0].shape == (0, 5) and empty[1].shape == (0,)


def test_resnet50_forward_backward_tiny_input_and_aligned_layers():
    from daaa.models import ResNet50

    torch.manual_seed(0)
    net = ResNet50(num_classes=5, pretrained="none")
    # every conv except the stem's conv1: 16 bottlenecks x 3 + 4 projection shortcuts
    assert len(net.aligned_layers) == 52 and "backbone.conv1" not in net.aligned_layers
    x = torch.randn(2, 3, 32, 32)
    with FeatureRecorder(net, net.aligned_layers) as rec:
        logits = net(x)
        assert logits.shape == (2, 5) and len(rec.features) == 52
        logits.sum().backward()
    assert net.fc.weight.grad is not None and net.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_resnet50_missing_weights_file_is_a_clear_error(tmp_path):
    from daaa.errors import DaaaError
    from daaa.models import ResNet50

    with pytest.raises(DaaaError, match="model.pretrained"):
        ResNet50(num_classes=3, pretrained=str(tmp_path / "nope.pth"))


class _TinyConvNet(nn.Module):
    """conv - (batch norm) - ReLU - global pool - linear: the smallest network whose training forward differs from
    its eval forward when it has batch norm, as ResNet-50's does."""

    def __init__(self, batch_norm: bool, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6) if batch_norm else nn.Identity()
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3)))

    def backbone_parameters(self) -> list[nn.Parameter]:  # the optimiser's parameter groups (daaa.optim)
        return [*self.conv.parameters(), *self.norm.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


@pytest.mark.parametrize("batch_norm", [True, False])
def test_em_a_posterior_is_a_separate_eval_forward_with_a_gradient_on_t_rows(tmp_path, batch_norm):
    """EM-A (Table 3): the posterior is the current network's, from a no-grad eval-mode forward. With batch norm its
    L_EM has a gradient on the T rows (the training forward normalises by batch statistics); without batch norm (or
    dropout, or crops) the posterior equals the training softmax and the T rows' gradient vanishes -- the ablation
    then reduces to L_EM on S_f (README, "Deviations from the paper")."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context
    from daaa.runs import Stage
    from daaa.trainers.adapt import DAAATrainer

    cfg = load_config("smoke", ["adapt.async_posterior=false", "adapt.initial_confidence_threshold=0",
                                "adapt.train_data=S+T"])  # only T rows in L_EM: its gradient is theirs
    torch.manual_seed(0)
    net = _TinyConvNet(batch_norm)
    trainer = DAAATrainer(cfg.adapt, cfg.data, bench.synthetic_data(cfg), Context(0, 1, torch.device("cpu"), None,
                          False), Stage(tmp_path, "emA", {}), net, None, progress=False)
    batch = trainer.sampler.batch(0)
    assert len(batch.target_idx) > 0 and len(batch.sf_idx) == 0
    terms = trainer.losses(batch, 0)
    assert net.training and float(terms["em_kept"]) == len(batch.target_idx)
    terms["L_EM"].backward()
    grad = max(float(p.grad.abs().max()) for p in net.parameters() if p.grad is not None)
    if batch_norm:
        assert grad > 1e-3
    else:
        assert grad < 1e-5
    with torch.no_grad():  # the posterior is the eval-mode prediction of the current weights
        net.eval()
        x = trainer.data.target.images[batch.target_idx].float() / 127.5 - 1.0
        torch.testing.assert_close(trainer.posterior(batch), torch.softmax(net(x), 1), rtol=1e-4, atol=1e-5)


def test_the_attention_tap_setting_changes_what_L_AT_reads(tmp_path):
    """adapt.attention_tap: each reading trains (finite L_AT > 0), and they read different features."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    seen = {}
    for tap in ("conv", "activation", "block"):
        cfg = load_config("smoke", [f"adapt.attention_tap={tap}"])
        trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), Context(0, 1, torch.device("cpu"), None, False),
                                     tmp_path, tap)
        seen[tap] = trainer.step(0)["L_AT"]
        assert math.isfinite(seen[tap]) and seen[tap] > 0, tap
    assert seen["conv"] != seen["activation"]
    assert seen["block"] == seen["activation"]  # the digit CNN has no residual blocks: read after its ReLUs


def test_a_beta_0_row_logs_L_AT_every_nth_step_and_trains_alike(tmp_path):
    """adapt.attention_log_interval: at beta = 0 the frozen source net runs on every N-th step only (and the last),
    and the trained weights do not depend on N (L_AT only is logged there)."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    ctx = Context(0, 1, torch.device("cpu"), None, False)
    logged, weights = {}, {}
    for every in (1, 3):
        cfg = load_config("smoke", ["adapt.beta=0", f"adapt.attention_log_interval={every}", "adapt.steps=7"])
        trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), ctx, tmp_path, f"every{every}")
        trainer.spec = dataclasses.replace(trainer.spec, steps=7)  # the bench sets a never-reached end
        logged[every] = [trainer.step(i)["L_AT"] for i in range(7)]
        weights[every] = [p.detach().clone() for p in trainer.net.parameters()]
    assert all(v is not None and v > 0 for v in logged[1])
    assert [v is not None for v in logged[3]] == [False, False, True, False, False, True, True]
    assert [logged[3][i] for i in (2, 5, 6)] == [logged[1][i] for i in (2, 5, 6)]
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[3]))
    with pytest.raises(ConfigError, match="adapt.attention_log_interval"):
        load_config("smoke", ["adapt.attention_log_interval=0"])


def test_weight_average_is_an_exponential_moving_average_of_the_updates():
    from daaa.optim import weight_average

    net = nn.Linear(3, 2)
    assert weight_average(net, 0.0) is None
    average = weight_average(net, 0.75)
    seen = []
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            net.weight.fill_(value)
        average.update_parameters(net)
        seen.append(float(average.module.weight[0, 0].detach()))
    assert seen == pytest.approx([1.0, 0.75 * 1 + 0.25 * 2, 0.75 * 1.25 + 0.25 * 4])  # the first update copies


def test_a_weight_averaged_run_evaluates_and_ships_the_average_and_resumes_alike(tmp_path):
    """optim.ema_decay > 0: the evaluations read the average (the trained weights' accuracy beside it), the
    finished network holds the average, the checkpoint keeps both, and a run extended from its checkpoint ends on
    the same average as one run straight through; at 0 the stage keys of earlier run folders do not change."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context
    from daaa.pipeline import source_key
    from daaa.runs import Stage
    from daaa.trainers.adapt import DAAATrainer

    ctx = Context(0, 1, torch.device("cpu"), None, False)
    cfg = load_config("smoke", ["adapt.optim.ema_decay=0.8"])
    data = bench.synthetic_data(cfg)

    def fit(name: str, steps: int):
        spec = dataclasses.replace(cfg.adapt, steps=steps)
        torch.manual_seed(0)
        source = DigitCNN(width=8)
        net = copy.deepcopy(source)
        trainer = DAAATrainer(spec, cfg.data, data, ctx, Stage(tmp_path, name, {}), net, source, progress=False)
        return trainer, trainer.fit()

    straight, result = fit("straight", 6)
    evaluations = [r for r in straight.stage.load_checkpoint()["history"] if "target_test_accuracy" in r]
    assert [r["step"] for r in evaluations] == [3, 6]
    assert all("raw_target_test_accuracy" in r for r in evaluations)
    state = straight.stage.load_checkpoint()["state"]
    shipped = straight.net.state_dict()
    assert all(torch.equal(shipped[k], v) for k, v in straight.average.module.state_dict().items())
    assert not torch.equal(shipped["conv1.weight"], state["model"]["conv1.weight"])  # the trained weights differ
    assert result["target_test_accuracy"] == evaluations[-1]["target_test_accuracy"]

    fit("extended", 3)
    extended, _ = fit("extended", 6)  # resumes from the 3-step checkpoint: weights and average
    assert all(torch.equal(shipped[k], v) for k, v in extended.net.state_dict().items())

    assert "ema_decay" not in json_of(source_key(load_config("smoke"), data, None))
    assert "ema_decay" in json_of(source_key(load_config("smoke", ["source.optim.ema_decay=0.5"]), data, None))
    with pytest.raises(ConfigError, match="adapt.optim.ema_decay"):
        load_config("smoke", ["adapt.optim.ema_decay=1"])


def json_of(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------ the pieces in someone else's loop: misuse is an error
def test_posterior_network_carries_no_hooks_and_stays_in_eval_mode() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    net(torch.randn(2, 3, 8, 8))
    x_rows, x_other = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 8, 8)
    with FeatureRecorder(net, ["0"]) as rec:
        posterior_net = PosteriorNetwork(net, 3)
        net(x_rows)
        posterior_net(x_other)  # M_post's forward must not overwrite the target net's recorded features
        assert rec.features[0].shape[0] == 4
    parent = nn.Module()
    parent.posterior_net = posterior_net
    parent.train()
    assert not posterior_net.training and not posterior_net.net[1].training
    with pytest.raises(ValueError, match="sync_interval"):
        PosteriorNetwork(net, 0)


def test_recorder_reads_only_the_last_forward() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    rec = FeatureRecorder(net, ["1"])
    with pytest.raises(RuntimeError, match=r"\['1'\] produced no output"):
        rec.features
    net(torch.randn(2, 3, 8, 8))
    assert rec.features[0].shape[0] == 2
    rec.remove()


def test_misuse_of_the_losses_is_an_error_not_a_number() -> None:
    align = AttentionAlignmentLoss()
    s = [torch.randn(4, 3, 6, 6), torch.randn(4, 5, 3, 3)]
    with pytest.raises(ValueError, match="2 source and 1 target layers"):
        align(s, s[:1])
    with pytest.raises(ValueError, match="layer 0"):
        align(s, [torch.randn(1, 3, 6, 6), s[1]])
    with pytest.raises(ValueError, match="weights"):
        align(s, s, weights=torch.ones(4, 1))
    with pytest.raises(ValueError, match="discrepancy='L2'"):
        AttentionAlignmentLoss(discrepancy="L2")
    with pytest.raises(ValueError, match="spatial"):
        attention_map(torch.randn(4, 10))
    logits, posterior = torch.randn(5, 3), F.softmax(torch.randn(5, 3), 1)
    for bad in (dict(posterior=posterior[:1]), dict(posterior=posterior.argmax(1, keepdim=True).expand(5, 3)),
                dict(keep=posterior.max(1).values), dict(reduction="none")):
        with pytest.raises(ValueError):
            em_loss(**{"logits": logits, "posterior": posterior, **bad})
    assert em_loss(logits[:0], posterior[:0], reduction="mean") == 0  # as L_AT's mean over no pairs, not nan
    for threshold in (95.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="p_t"):
            confidence_mask(posterior, threshold)
    with pytest.raises(ValueError):
        stream_counts(16, [0.5, -0.2, 0.5, 0.2], "S+Tf+T+Sf")
    with pytest.raises(ValueError):
        stream_counts(16, [0.35, 0.15, 0.35, 0.15], "S+X")
    with pytest.raises(ValueError, match="rank"):
        MixedBatchSampler(10, 10, 8, [0.35, 0.15, 0.35, 0.15], "S+Tf+T+Sf", 0, rank=3, world_size=2)


@pytest.mark.parametrize("capture_fails", [False, True])
def test_cuda_graph_plumbing_with_an_eager_stand_in(tmp_path, monkeypatch, caplog, capture_fails):
    """runtime.cuda_graphs' plumbing, on CPU with an eager stand-in for the captured graph (tests/test_cuda.py runs
    the real one): captured once, for as many rows as the batch has pairs, with the values of the eager path; a
    capture that fails is not retried -- one warning, then the eager forward."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context
    from daaa.trainers import adapt

    captures: list[int] = []

    class StandIn:
        def __init__(self, fn, example, rows):
            captures.append(rows)
            if capture_fails:
                raise RuntimeError("operation not permitted when stream is capturing")
            self.fn, self.rows = fn, rows

        def __call__(self, x):
            return [m.clone() for m in self.fn(x)]

    monkeypatch.setattr(adapt, "GraphedForward", StandIn)
    cfg = load_config("smoke", ["data.augment=true", "adapt.cache_source_attention=false"])
    data = bench.synthetic_data(cfg)
    cpu = torch.device("cpu")
    eager = bench.daaa_trainer(cfg, data, Context(0, 1, cpu, None, False), tmp_path / "a")
    graphed = bench.daaa_trainer(cfg, data, Context(0, 1, cpu, None, False, cuda_graphs=True), tmp_path / "b")
    with caplog.at_level("WARNING", logger="daaa"):
        for step in range(3):
            batch = eager.sampler.batch(step)
            a, b = eager.losses(batch, step)["L_AT"], graphed.losses(batch, step)["L_AT"]
            assert torch.equal(a, b)
    pairs = len(eager.sampler.batch(0).anchor_rows(cfg.adapt.target_anchors)[0])
    assert captures == [pairs] and eager._graphed is None
    warned = [r for r in caplog.records if "cannot be captured" in r.getMessage()]
    assert len(warned) == capture_fails and (graphed._graphed is False) == capture_fails


@pytest.mark.parametrize("posterior_from", ["trained", "average"])
def test_m_post_copies_the_trained_weights_or_their_average(tmp_path, posterior_from):
    """adapt.posterior_from: at a sync M_post copies theta_t (the paper) or the moving average of the weights."""
    from daaa import bench
    from daaa.config import load_config
    from daaa.distributed import Context

    cfg = load_config("smoke", ["adapt.sync_interval=3", "adapt.optim.ema_decay=0.9",
                                f"adapt.posterior_from={posterior_from}"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), Context(0, 1, torch.device("cpu"), None, False),
                                 tmp_path)
    for step in range(4):  # synced at step 3, before that step's update
        trainer.step(step)
        if step == 2:
            average, trained = trainer.average.module.state_dict(), trainer.net.state_dict()
            expected, other = copy.deepcopy((average, trained) if posterior_from == "average" else (trained, average))
    synced = trainer.posterior_net.net.state_dict()
    assert all(torch.equal(synced[k], v) for k, v in expected.items())
    assert not all(torch.equal(synced[k], v) for k, v in other.items())


def test_m_post_from_the_average_needs_an_average():
    from daaa.config import load_config

    with pytest.raises(ConfigError, match="adapt.posterior_from"):
        load_config("smoke", ["adapt.posterior_from=average"])
