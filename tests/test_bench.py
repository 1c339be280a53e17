"""`daaa bench` and the optimised DAAA step against the naive one (same losses, same gradients)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from daaa import bench
from daaa.cli import main
from daaa.config import load_config
from daaa.distributed import Context
from naive_step import naive_daaa_losses, naive_daaa_step

CPU = Context(0, 1, torch.device("cpu"), None, False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_paired_rows_share_crops_so_the_source_net_takes_each_anchor_once(tmp_path):
    """With crops, a T_f row is cropped like its S row and an S_f row like its T row: the frozen source net then
    runs on one anchor per S and per T row (not one per pair of Eq. 5's four terms)."""
    cfg = load_config("smoke", ["data.augment=true", "data.load_size=36", "adapt.batch_size=20"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "crops")
    batch = trainer.sampler.batch(3)
    partners = batch.crop_partners()
    sl, n = batch.slices(), batch.counts
    assert partners[sl["Tf"]].tolist() == list(range(sl["S"].start, sl["S"].start + n["Tf"]))
    assert partners[sl["Sf"]].tolist() == list(range(sl["T"].start, sl["T"].start + n["Sf"]))
    rows = []
    hook = trainer.source_net.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    trainer.step(3)
    hook.remove()
    assert rows == [n["S"] + n["T"]] and sum(n.values()) > rows[0]


def test_cached_anchor_crops_run_no_frozen_forward_and_pair_the_right_anchors(tmp_path):
    """adapt.anchor_crops=cached: the frozen source net's maps of the uncropped anchors are computed once and each
    step crops them (no forward of it in a step). Where a crop is the whole image, unflipped (load size = image
    size), that is Eq. 5 exactly: the same L_AT as the per-step forward, step by step -- so every pair gets its own
    anchor (S image, or S_f image indexed by its target image) from the cache."""
    losses = {}
    for mode in ("forward", "cached"):
        cfg = load_config("smoke", ["data.augment=true", "data.flip=false", "data.load_size=32", "adapt.batch_size=20",
                                    f"adapt.anchor_crops={mode}"])
        trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, mode)
        calls = []
        hook = trainer.source_net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        losses[mode] = [trainer.step(step)["L_AT"] for step in range(3)]
        hook.remove()
        assert (trainer.anchor_sides is not None) == (mode == "cached") and bool(calls) == (mode == "forward")
    assert losses["cached"] == pytest.approx(losses["forward"], rel=1e-5) and min(losses["cached"]) > 0
    # with 40-px images: the crops' maps are read off 40-px maps, at every aligned layer (the digit CNN's head takes
    # 32 px only: the uncropped images' forward stops after its last aligned layer)
    cfg = load_config("smoke", ["data.augment=true", "data.load_size=40", "adapt.anchor_crops=cached"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "cached40")
    assert [m.shape[-1] for m in trainer.source_maps] == [40 * 40, 20 * 20, 10 * 10]
    assert trainer.anchor_sides == [32, 16, 8] and trainer.step(0)["L_AT"] > 0
    with pytest.raises(RuntimeError):
        trainer.source_net(torch.zeros(1, 3, 40, 40))


def test_cached_anchor_crops_fall_back_to_the_forward_for_a_net_of_one_input_size(tmp_path, caplog):
    cfg = load_config("smoke", ["data.augment=true", "data.load_size=36", "adapt.anchor_crops=cached"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "fixed-size")
    forward = trainer.source_net.forward

    def one_size(x):  # as a ViT with fixed position embeddings
        assert x.shape[-1] == cfg.data.image_size, f"Input width ({x.shape[-1]}) doesn't match model"
        return forward(x)

    trainer.source_net.forward = one_size
    trainer.anchor_sides = None
    with caplog.at_level("WARNING", logger="daaa"):
        assert trainer._source_map_cache() is None
    assert "anchor_crops=cached" in caplog.text and "36-px" in caplog.text
    trainer.source_maps = None
    assert trainer.step(0)["L_AT"] > 0  # the anchors' crops through the net, as with anchor_crops=forward



def test_a_network_that_changes_an_aligned_output_in_place_trains_on_recorded_features(tmp_path, caplog):
    """L_AT's energy taps (Eq. 4 taken as the outputs pass, issue 18) are used for l2 maps; a network that rectifies
    an aligned conv's output in place cannot take them, and the trainer's check finds it before a training step
    would fail: it then records the features, and trains."""
    cfg = load_config("smoke")
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "taps")
    assert trainer.energy_taps
    assert not bench.daaa_trainer(load_config("smoke", ["adapt.attention=l1"]), bench.synthetic_data(cfg), CPU,
                                  tmp_path, "l1").energy_taps

    class RectifyInPlace(torch.nn.Module):  # ReLU(maxpool(.)) of the digit CNN as maxpool(relu_(.))
        def forward(self, x):
            return torch.nn.functional.max_pool2d(x.relu_(), 2)

    trainer.net.pool = RectifyInPlace()
    with pytest.raises(RuntimeError, match="inplace"):
        trainer.step(0)
    with caplog.at_level("INFO", logger="daaa"):
        assert not trainer._energy_taps_work()
    assert "in place" in caplog.text
    trainer.energy_taps = False
    assert trainer.step(0)["L_AT"] > 0


@pytest.mark.parametrize("tap", ["conv", "activation"])
def test_energy_taps_train_a_batch_norm_network_as_recorded_features_do(tmp_path, tap):
    """On a ResNet (batch norm after each aligned conv, channels_last, cropped anchors through the frozen net): a
    step with L_AT's energy taps gives the loss terms and gradients of the same step with recorded features, for
    conv outputs (passed on by the tap) and for act(BN(conv)) taps (a (name, fn) tap: energy only)."""
    cfg = load_config("smoke", ["model.arch=resnet18", "model.pretrained=none", "data.augment=true",
                                "data.load_size=36", "runtime.channels_last=true", f"adapt.attention_tap={tap}"])
    data = bench.synthetic_data(cfg)
    results = []
    for taps in (True, False):
        trainer = bench.daaa_trainer(cfg, data, CPU, tmp_path, f"resnet-{taps}")
        assert trainer.energy_taps
        trainer.energy_taps = taps
        terms = trainer.losses(trainer.sampler.batch(0), 0)
        (terms["L_CE"] + terms["L_EM"] + terms["L_AT"]).backward()
        results.append((terms, [p.grad for p in trainer.net.parameters()]))
    (tapped, tapped_grads), (recorded, recorded_grads) = results
    assert recorded["L_AT"] > 0
    for k in ("L_CE", "L_EM", "L_AT"):
        torch.testing.assert_close(tapped[k], recorded[k])
    for a, b in zip(tapped_grads, recorded_grads):
        assert _rel(a, b) < 1e-5

def test_anchors_that_are_batch_rows_are_not_prepared_again(tmp_path, monkeypatch):
    """The S rows and the S_f rows are their own anchors (same image, same crop): the frozen source net takes them
    from the prepared batch; only the T rows whose S_f is not a row are decoded, cropped and normalised again."""
    import daaa.trainers.adapt as adapt

    cfg = load_config("smoke", ["data.augment=true", "data.load_size=36", "adapt.batch_size=20"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "reuse")
    prepared, real = [], adapt.prepare

    def counting(images, *args, **kwargs):
        prepared.append(len(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(adapt, "prepare", counting)
    trainer.step(3)
    n = trainer.sampler.batch(3).counts
    assert prepared == [sum(n.values()), n["T"] - n["Sf"]]  # the batch, then the anchors that are no row of it


def test_the_target_net_is_recorded_only_during_the_training_forward(tmp_path):
    """The aligned layers' features are recorded by the training forward of a step that computes L_AT only: no hook
    stays on the target network between steps (an evaluation forward records nothing, keeps nothing alive)."""
    cfg = load_config("smoke", ["data.augment=true", "data.load_size=36"])
    trainer = bench.daaa_trainer(cfg, bench.synthetic_data(cfg), CPU, tmp_path, "scoped")
    hooked = []
    step_rows = sum(trainer.sampler.batch(0).counts.values())
    forward = trainer.net.forward

    def counting(x):
        hooked.append((x.shape[0], sum(len(m._forward_hooks) for m in trainer.net.modules())))
        return forward(x)

    trainer.net.forward = counting
    out = trainer.step(0)
    trainer.net.eval()
    with torch.no_grad():
        trainer.net(torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size))
    assert out["L_AT"] > 0
    assert hooked[-2:] == [(step_rows, len(trainer.layers)), (2, 0)]
    assert sum(len(m._forward_hooks) for m in trainer.net.modules()) == 0


@pytest.mark.parametrize("overrides", [
    [],  # the digits settings: cached source maps, async M_post
    ["adapt.beta=0", "adapt.attention_log_interval=1"],  # L_AT is still computed and logged, but has no gradient
    ["data.augment=true", "data.load_size=36"],  # anchors cropped like their rows: the source net runs every step
    ["adapt.async_posterior=false", "adapt.attention=l1"],  # EM-A, Table A1's l1 maps
    ["adapt.restart_schedule=false"],  # EM-C: the decaying schedule runs on through the sync
    ["adapt.train_data=Tf+T"],  # Table 2's Tf+T row: term 4 of Eq. 5 on every T row although S_f is not trained on
    ["adapt.target_anchors=paired", "data.augment=true", "data.load_size=36"],  # the earlier reading of term 4
], ids=["paper", "beta0", "augment", "emA-l1", "emC", "TfT", "paired"])
def test_optimised_step_equals_naive_step(tmp_path, overrides):
    """Eq. 12 from one batched forward with caches == four forwards per network recomputing everything: the logged
    loss terms, the gradients and the updated weights agree to 1e-5 (relative), in a state where EM is active (after
    an M_post sync, p_t < 1 keeps samples) and L_AT is on."""
    # a schedule that decays fast, so the learning rates compared differ between steps and with a restart
    cfg = load_config("smoke", ["adapt.confidence_threshold=0.105", "runtime.channels_last=true",
                                "adapt.optim.schedule=inv", "adapt.optim.lr_gamma=0.5", *overrides])
    data = bench.synthetic_data(cfg)
    fast = bench.daaa_trainer(cfg, data, CPU, tmp_path, "fast")
    sync = cfg.adapt.sync_interval
    for step in range(sync):  # move the target net away from the frozen source net before comparing
        fast.step(step)
    naive = bench.daaa_trainer(cfg, data, CPU, tmp_path, "naive")
    naive.load_state(copy.deepcopy(fast.state()))  # a copy: Adam's moments must not be shared
    lrs = []
    for step in (sync, sync + 1):  # the sync step itself, then a step on cached posteriors
        got = fast.step(step)
        want = naive_daaa_step(naive, step)
        lrs.append(want["lr"])
        assert got["syncs"] == want["syncs"] >= 1
        assert 0 < want["em_kept"] == got["em_kept"]
        assert want["L_EM"] > 0 and want["L_AT"] > 0
        for k in ("loss", "L_CE", "L_EM", "L_AT", "em_kept_fraction", "lr"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
        for (name, p), q in zip(fast.net.named_parameters(), naive.net.parameters()):
            assert _rel(p.grad, q.grad) < 1e-5, name
            assert _rel(p.detach(), q.detach()) < 1e-5, name
    assert lrs[1] < lrs[0]  # the schedule decays between the two steps compared


def test_naive_losses_change_nothing(tmp_path):
    cfg = load_config("smoke")
    data = bench.synthetic_data(cfg)
    tr = bench.daaa_trainer(cfg, data, CPU, tmp_path)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    terms = naive_daaa_losses(tr, 0)
    assert set(terms) == {"loss", "L_CE", "L_EM", "L_AT", "kept"}
    assert all(torch.equal(v, tr.net.state_dict()[k]) for k, v in before.items())


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "smoke", "--device", "cpu", "--steps", "1", "--repeats", "1", "--warmup", "1",
                 "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "daaa_over_source_only" in printed
    r = json.loads(out.read_text())
    for k in bench.STAGES:
        assert r["images_per_second"][k] > 0 and math.isfinite(r["images_per_second"][k]), k
        assert r["peak_memory_mib"][k] >= 0, k
    assert r["ratios"]["daaa_over_source_only"] > 0
    for k in ("cpu_model", "cpu_cores", "torch_version", "device"):
        assert r["machine"][k], k
    assert r["machine"]["device"] == "cpu" and r["date"] and r["preset"] == "smoke"
    assert isinstance(r["machine"]["cpu_bf16"], bool)
    assert ("bf16 in hardware" in printed) is r["machine"]["cpu_bf16"]
