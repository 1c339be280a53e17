"""CycleGAN networks, training step and the translate stage (Sec. 3.1), at toy sizes (16 px, ngf=8)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from daaa.config import Config, CycleGANConfig
from daaa.cyclegan import CycleGAN, GANLoss, ImagePool, PatchDiscriminator, ResnetGenerator, check_image_size
from daaa.style_gst import StyleCycleGAN, StyleResnetGenerator, build_cyclegan, style_field
from daaa.data.domain import ImageTensors
from daaa.errors import ConfigError, DaaaError, DataError
from daaa.translate import load_translation, load_translation_folders, run_translation

CPU = torch.device("cpu")


def tiny_cg(**kw) -> CycleGANConfig:
    base = dict(image_size=16, ngf=8, ndf=8, n_blocks=1, n_downsampling=2, n_layers_d=2, steps=6, decay_start=3,
                batch_size=4, translate_batch_size=5, checkpoint_interval=2, log_interval=2, pool_size=3)
    base.update(kw)
    return CycleGANConfig(**base)


def tiny_cfg(**kw) -> Config:
    cfg = Config()
    cfg.cyclegan = tiny_cg(**kw)
    cfg.data.channels = 1
    cfg.runtime.seed = 3
    return cfg


def domains(size: int = 14) -> tuple[ImageTensors, ImageTensors]:
    """S: bright squares on black (labelled by position); T: the inverted style, unlabelled. Stored at 14 px so the
    stage's resize to 16 px and back is exercised."""
    g = torch.Generator().manual_seed(0)
    s = torch.zeros(12, 1, size, size, dtype=torch.uint8)
    labels = torch.arange(12) % 3
    for i in range(12):
        o = int(labels[i]) * 4
        s[i, :, o:o + 5, 2:9] = 200 + int(torch.randint(55, (), generator=g))
    t = 255 - torch.roll(s[:10], 3, dims=3)
    src = ImageTensors("S", s, labels, [f"/data/S/c{int(labels[i])}/img{i:02d}.png" for i in range(12)],
                       ["a", "b", "c"])
    tgt = ImageTensors("T", t, None, [f"/data/T/x{j:02d}.jpg" for j in range(10)], ["a", "b", "c"])
    return src, tgt


@pytest.fixture(autouse=True, scope="module")  # module scope: also covers the shared `done_run`
def _deterministic():
    # exact resume equality needs deterministic kernels (one thread comes from conftest.py)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(prev)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """One completed translate stage shared by the output / cache / compatibility tests."""
    run_dir = tmp_path_factory.mktemp("run")
    src, tgt = domains()
    tr = run_translation(run_dir, tiny_cfg(), src, tgt, CPU, progress=False)
    return run_dir, src, tgt, tr


def test_networks_shapes_and_range():
    for ch in (1, 3):
        x = torch.rand(2, ch, 16, 16) * 2 - 1
        g = ResnetGenerator(ch, ch, ngf=8, n_blocks=1, n_downsampling=2)
        y = g(x * 50)  # even extreme inputs stay in tanh's range
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
        d = PatchDiscriminator(ch, ndf=8, n_layers=2)
        assert d(x).shape == (2, 1, 2, 2)
    with pytest.raises(ConfigError):
        check_image_size(16, 2, 3)  # PatchGAN maps would vanish
    with pytest.raises(ConfigError):
        check_image_size(18, 2, 2)  # not a multiple of 4
    assert GANLoss("lsgan")(torch.ones(2, 1, 2, 2), True).item() == 0.0
    assert GANLoss("log")(torch.zeros(2, 1, 2, 2), False).item() == pytest.approx(np.log(2))  # Eq. 1 at D = 1/2
    pool = ImagePool(2, seed=0)
    out = pool.query(torch.arange(4.0).view(4, 1))
    assert out.shape == (4, 1) and len(pool.images) == 2


def test_training_lowers_cycle_loss():
    torch.manual_seed(0)
    model = CycleGAN(tiny_cg(lr=1e-3, steps=100, decay_start=100), channels=1, seed=0)
    src, tgt = domains(16)
    xs = src.images[:4].float() / 127.5 - 1
    xt = tgt.images[:4].float() / 127.5 - 1
    first = model.training_step(xs, xt)
    for _ in range(20):
        last = model.training_step(xs, xt)
    assert set(first) >= {"g_st", "g_ts", "cycle", "identity", "d_t", "d_s", "lr"}
    assert last["cycle"] < 0.7 * first["cycle"]
    assert model.translate_st(xs).shape == xs.shape
    with pytest.raises(ValueError, match="divisible by"):  # 18 px would come back as 20 px: no longer a pair
        model.translate_ts(torch.nn.functional.interpolate(xt, size=(18, 18)))


def test_style_field_keeps_layout_drops_content():
    x = torch.zeros(1, 3, 16, 16)
    x[:, 0, :, 8:] = 1.0  # red right half
    x[:, 1, ::2, ::2] = 1.0  # a 1-pixel green grid: content finer than the blocks
    f = style_field(x, 2)
    assert f.shape == (1, 3, 2, 2)
    assert torch.equal(f[0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # the colour layout survives
    assert torch.allclose(f[0, 1], torch.full((2, 2), 0.25))  # the grid averages out to its mean


def test_build_cyclegan_picks_the_class():
    paper = build_cyclegan(tiny_cg(), channels=1)
    assert type(paper) is CycleGAN and type(paper.G_ST) is ResnetGenerator
    assert paper.translation_donors(5, 3, 0) is None  # the paper's T_f[i] = G_ST(S[i]) needs no target image
    style = build_cyclegan(tiny_cg(style_grid=2), channels=3)
    assert isinstance(style, StyleCycleGAN) and isinstance(style.G_ST, StyleResnetGenerator)
    assert type(style.G_TS) is ResnetGenerator  # G_TS, D_T, D_S stay the paper's


@pytest.mark.parametrize("grid", [0, 2])
def test_state_dict_is_networks_only_and_training_state_resumes(grid):
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    a = build_cyclegan(tiny_cg(style_grid=grid), channels=1, seed=0)
    a.training_step(x, x.flip(-1))
    assert {k.split(".")[0] for k in a.state_dict()} == {"G_ST", "G_TS", "D_T", "D_S"}
    b = build_cyclegan(tiny_cg(style_grid=grid), channels=1, seed=1)
    b.load_state_dict(a.state_dict())  # a plain module state dict, as for any nn.Module
    assert torch.equal(b.translate_st(x, x), a.translate_st(x, x)) and b.step == 0
    state = a.training_state()
    assert set(state) >= {"nets", "opt_g", "opt_d", "sched_g", "sched_d", "pool_t", "pool_s", "step", "scaler"}
    c = build_cyclegan(tiny_cg(style_grid=grid), channels=1, seed=2)
    c.load_training_state(copy.deepcopy(state))  # as from a checkpoint file: no tensors shared with `a`
    assert c.step == 1 and c.opt_g.param_groups[0]["lr"] == a.opt_g.param_groups[0]["lr"]
    assert c.training_step(x, x.flip(-1)) == a.training_step(x, x.flip(-1))


def test_style_conditioned_generator():
    model = build_cyclegan(tiny_cg(style_grid=2), channels=3, seed=0)
    assert "G_ST.style_embed.0.weight" in model.state_dict() and not hasattr(model.G_TS, "style_embed")
    xs = torch.rand(4, 3, 16, 16) * 2 - 1
    dark, light = -torch.ones_like(xs), torch.ones_like(xs)
    losses = model.training_step(xs, torch.rand(4, 3, 16, 16) * 2 - 1)
    assert all(np.isfinite(v) for v in losses.values())
    # the layout is an input: a different target image changes the translation of the same source image
    assert not torch.allclose(model.translate_st(xs, dark), model.translate_st(xs, light))
    with pytest.raises(ValueError, match="donors"):
        model.translate_st(xs)
    with pytest.raises(ConfigError, match="cyclegan.style_grid"):
        build_cyclegan(tiny_cg(style_grid=-1), channels=3)


def test_style_conditioned_stage_records_layout_donors(tmp_path):
    src, tgt = domains()
    tr = run_translation(tmp_path, tiny_cfg(style_grid=2), src, tgt, CPU, progress=False)
    man = json.loads((tmp_path / "translate" / "manifest.json").read_text())
    donors = [e["style_target_id"] for e in man["synthetic_target"]]
    assert len(donors) == len(src) and set(donors) <= set(tgt.ids) and len(set(donors)) > 1
    assert tr.synthetic_target.shape == src.images.shape


def test_outputs_and_manifest(done_run):
    run_dir, src, tgt, tr = done_run
    stage = run_dir / "translate"
    assert tr.synthetic_target.shape == src.images.shape and tr.synthetic_target.dtype == torch.uint8
    assert tr.synthetic_source.shape == tgt.images.shape and tr.stage_dir == stage
    man = json.loads((stage / "manifest.json").read_text())
    assert len(man["synthetic_target"]) == len(src) and len(man["synthetic_source"]) == len(tgt)
    for i, e in enumerate(man["synthetic_target"]):
        assert e["real_index"] == i and e["real_id"] == src.ids[i]
        assert e["label"] == int(src.labels[i]) and e["class"] == src.classes[e["label"]]
        png = torch.from_numpy(np.array(Image.open(stage / e["file"])))
        assert torch.equal(png, tr.synthetic_target[i, 0])  # the PNG holds exactly the returned tensor
    for j, e in enumerate(man["synthetic_source"]):
        assert e["real_id"] == tgt.ids[j] and (stage / e["file"]).is_file() and "label" not in e
    assert "style_target_id" not in man["synthetic_target"][0]  # the paper's G_ST takes no layout
    hist = [json.loads(line) for line in (stage / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [2, 4, 6]
    for f in ("pairs.png", "losses.png", "checkpoint.pt", "stage.json"):
        assert (stage / f).is_file()
    assert not list(stage.glob(".output-*"))
    loaded = load_translation(stage)
    assert torch.equal(loaded.synthetic_target, tr.synthetic_target)


def test_cache_reuse_does_not_train(done_run, monkeypatch):
    run_dir, src, tgt, tr = done_run
    ckpt = run_dir / "translate" / "checkpoint.pt"
    mtime = ckpt.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("trained although the stage was complete")

    monkeypatch.setattr(CycleGAN, "training_step", boom)
    monkeypatch.setattr(CycleGAN, "__init__", boom)
    cfg = tiny_cfg(log_interval=3, translate_batch_size=7)  # bookkeeping options do not invalidate the stage
    again = run_translation(run_dir, cfg, src, tgt, CPU, progress=False)
    assert torch.equal(again.synthetic_target, tr.synthetic_target)
    assert torch.equal(again.synthetic_source, tr.synthetic_source)
    assert ckpt.stat().st_mtime_ns == mtime


def test_other_config_or_inputs_refused(done_run):
    run_dir, src, tgt, _ = done_run
    with pytest.raises(DaaaError, match="incompatible config.*lambda_cycle"):
        run_translation(run_dir, tiny_cfg(lambda_cycle=5.0), src, tgt, CPU, progress=False)
    changed = ImageTensors(src.name, src.images.clone(), src.labels, src.ids, src.classes)
    changed.images[0, 0, 0, 0] += 1
    with pytest.raises(DaaaError, match="incompatible config.*inputs.source"):
        run_translation(run_dir, tiny_cfg(), changed, tgt, CPU, progress=False)


def test_resume_after_interruption_matches_uninterrupted(done_run, tmp_path, monkeypatch):
    _, src, tgt, reference = done_run
    real_step = CycleGAN.training_step
    calls = []

    def crash_at_5(self, *a):
        calls.append(self.step)
        if len(calls) == 5:  # step 4 of 6: the checkpoint of step 4 is on disk
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(CycleGAN, "training_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        run_translation(tmp_path, tiny_cfg(), src, tgt, CPU, progress=False)
    assert not (tmp_path / "translate" / "stage.json").exists()

    calls.clear()
    monkeypatch.setattr(CycleGAN, "training_step", lambda self, *a: (calls.append(self.step), real_step(self, *a))[1])
    resumed = run_translation(tmp_path, tiny_cfg(), src, tgt, CPU, progress=False)
    assert calls == [4, 5]  # resumed from the step-4 checkpoint, not from 0
    assert torch.equal(resumed.synthetic_target, reference.synthetic_target)
    assert torch.equal(resumed.synthetic_source, reference.synthetic_source)
    ref_hist = (done_run[0] / "translate" / "history.jsonl").read_text()
    assert (tmp_path / "translate" / "history.jsonl").read_text() == ref_hist


def _write_pngs(folder: Path, names: list[str], images: torch.Tensor) -> None:
    for name, img in zip(names, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / name)


def test_user_folders(done_run, tmp_path):
    run_dir, src, tgt, tr = done_run
    # our own output folders, matched through translate/manifest.json
    stage = run_dir / "translate"
    mine = load_translation_folders(stage / "synthetic_target", stage / "synthetic_source", src, tgt, 14, 1)
    assert torch.equal(mine.synthetic_target, tr.synthetic_target) and mine.stage_dir is None
    # foreign folders matched by file stem, in another order and format
    tf, sf = tmp_path / "tf", tmp_path / "sf"
    fake_t, fake_s = 255 - src.images, 255 - tgt.images
    order = list(range(len(src)))[::-1]
    _write_pngs(tf, [f"img{i:02d}.png" for i in order], fake_t[order])
    _write_pngs(sf, [f"x{j:02d}.png" for j in range(len(tgt))], fake_s)
    got = load_translation_folders(tf, sf, src, tgt, 14, 1)
    assert torch.equal(got.synthetic_target, fake_t) and torch.equal(got.synthetic_source, fake_s)
    (tf / "img03.png").unlink()
    (tf / "stray.png").write_bytes((sf / "x00.png").read_bytes())
    with pytest.raises(DataError) as e:
        load_translation_folders(tf, sf, src, tgt, 14, 1)
    msg = str(e.value)
    assert "\n" not in msg and "1 S images have no translated file" in msg and "img03.png" in msg
    assert "stray.png" in msg and "12 files for 12 S images" in msg
    # stems repeated across class folders: matched by class folder + stem
    dup = ImageTensors("D", src.images[:4], src.labels[:4], [f"/d/{c}/0.png" for c in "abcd"], src.classes)
    _write_pngs(tmp_path / "dup", [f"{c}/0.png" for c in "dcba"], fake_t[:4].flip(0))
    got = load_translation_folders(tmp_path / "dup", sf, dup, tgt, 14, 1)
    assert torch.equal(got.synthetic_target, fake_t[:4])


class _Brightness(nn.Module):
    """A fixed 3-class classifier of CycleGAN images: dark / mid / light by the mean (a stand-in source network)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return self.scale * torch.stack([-m, -m.abs(), m], 1)


@pytest.mark.parametrize("grid", [0, 2])
def test_semantic_term_is_in_the_generator_loss_and_reaches_g_st(grid):
    """CyCADA's L_sem (cyclegan.lambda_semantic): part of g_total with its weight, its gradient reaches G_ST (and
    G_TS) through the frozen classifier, whose own weights get none; the paper's CycleGAN has no such term."""
    xs, xt = torch.rand(4, 1, 16, 16) * 2 - 1, torch.rand(4, 1, 16, 16) * 2 - 1
    paper = build_cyclegan(tiny_cg(style_grid=grid), channels=1, seed=0)
    semantic = build_cyclegan(tiny_cg(style_grid=grid, lambda_semantic=2.0), channels=1, seed=0)
    guide = _Brightness()
    semantic.set_semantic_guide(guide)
    assert "semantic" not in paper._generator_losses(xs, xt)
    g0, g = paper._generator_losses(xs, xt), semantic._generator_losses(xs, xt)
    assert g["semantic"] > 0
    assert torch.allclose(g["g_total"], g0["g_total"] + 2.0 * g["semantic"])
    g["semantic"].backward()
    assert sum(p.grad.abs().sum() for p in semantic.G_ST.parameters() if p.grad is not None) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in semantic.G_TS.parameters())
    assert guide.scale.grad is not None  # (this test hands the raw module: the pipeline hands a frozen copy)
    assert {k.split(".")[0] for k in semantic.state_dict()} == {"G_ST", "G_TS", "D_T", "D_S"}  # guide not saved
    assert "semantic" in semantic.training_step(xs, xt) and "semantic" not in paper.training_step(xs, xt)


def test_semantic_term_without_the_source_network_is_one_line(tmp_path):
    model = build_cyclegan(tiny_cg(lambda_semantic=1.0), channels=1)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with pytest.raises(ConfigError, match="cyclegan.lambda_semantic"):
        model.training_step(x, x)
    src, tgt = domains()
    with pytest.raises(ConfigError, match="source network before the CycleGAN"):
        run_translation(tmp_path, tiny_cfg(lambda_semantic=1.0), src, tgt, CPU, progress=False)
    assert not (tmp_path / "translate").exists()


def test_semantic_stage_keys_the_source_network_and_writes_round_trips(tmp_path):
    from daaa.models import build_model

    src, tgt = domains()
    cfg = tiny_cfg(lambda_semantic=1.0, steps=2, decay_start=1)
    cfg.data.load_size = cfg.data.image_size = 16
    cfg.model.width = 4
    net = build_model(cfg.model, 3, 1, 16)
    tr = run_translation(tmp_path, cfg, src, tgt, CPU, progress=False, guide=net)
    assert tr.round_trip_source.shape == src.images.shape and tr.round_trip_target.shape == tgt.images.shape
    assert torch.equal(load_translation(tmp_path / "translate").round_trip_source, tr.round_trip_source)
    other = build_model(cfg.model, 3, 1, 16)
    with pytest.raises(DaaaError, match="incompatible config.*source_network"):
        run_translation(tmp_path, cfg, src, tgt, CPU, progress=False, guide=other)
