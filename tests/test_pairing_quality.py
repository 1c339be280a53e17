"""The label-free pairing-quality report (daaa/pairing_quality.py) and the stage order of the semantic option.

The figures are checked on made-up 16-px images whose class is a bright band (class k: rows 4k..4k+3), read by a
fixed classifier, and fake generators: the identity (every figure 1.0) and a shift of the band by one class (a label
permutation: every agreement 0). The pipeline tests use the smoke preset on the embedded demo pair (seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from daaa import cli
from daaa import pairing_quality as pq
from daaa.config import Config
from daaa.data.domain import DomainData, ImageTensors
from daaa.evaluate import predict
from daaa.report import write_report

K, SIZE = 4, 16
SMOKE = ["--preset", "smoke", "--quiet", "--set", "runtime.num_threads=1"]
DEMO = ["--source", "demo", "--target", "demo", "--target-test", "demo"]


def render(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """uint8 (N, 1, 16, 16): a bright band at rows 4k..4k+3 for class k, on faint noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (len(labels), 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        x[i, :, 4 * k:4 * k + 4] = 220
    return x


def shift(images: torch.Tensor) -> torch.Tensor:
    """A fake generator that permutes the labels: the band of class k moves to class k+1 (mod K)."""
    return torch.roll(images, 4, dims=-2)


class BandClassifier(nn.Module):
    """A fixed classifier of normalised images: logit k = 10 x the mean of band k (confident on clean bands)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([10 * x[:, :, 4 * k:4 * k + 4].mean((1, 2, 3)) for k in range(K)], 1)


def tiny_cfg(fit_steps: int = 60) -> Config:
    cfg = Config()
    cfg.data.image_size = cfg.data.load_size = SIZE
    cfg.data.channels = 1
    cfg.model.width = 4
    cfg.cyclegan.quality.fit_steps = fit_steps
    cfg.cyclegan.quality.fit_batch_size = 16
    return cfg


def reader(net: nn.Module, cfg: Config):
    ctx = pq.local_context("cpu")
    return lambda images: predict(net, images, cfg.data, ctx)


LABELS = torch.arange(40) % K
IMAGES = render(LABELS)


@pytest.mark.parametrize("g_st, g_ts, expected", [(lambda x: x, lambda x: x, 1.0), (shift, lambda x: x, 0.0)])
def test_source_round_trip_identity_and_permutation(g_st, g_ts, expected):
    f = reader(BandClassifier(), tiny_cfg())
    figures = pq.source_figures(f, IMAGES, LABELS, g_ts(g_st(IMAGES)))
    assert figures == {"source_round_trip_agreement": expected, "source_round_trip_accuracy": expected}


def labels_of(f, images: torch.Tensor) -> torch.Tensor:
    """f's labels of S_f, as ``measure`` computes them once for both figures that read them."""
    return f(images).argmax(1)


def test_target_figures_identity_permutation_and_confidence():
    cfg = tiny_cfg()
    f = reader(BandClassifier(), cfg)
    same = pq.target_figures(f, IMAGES, labels_of(f, IMAGES), IMAGES, confidence=0.9)
    assert same == {"target_confident_share": 1.0, "target_sf_agreement": 1.0, "target_round_trip_agreement": 1.0}
    # G_TS relabels every image; G_ST keeps the label: S_f and the round trip both disagree
    permuted = pq.target_figures(f, IMAGES, labels_of(f, shift(IMAGES)), shift(IMAGES), confidence=0.9)
    assert permuted["target_sf_agreement"] == 0.0 and permuted["target_round_trip_agreement"] == 0.0
    # half the target images show two bands: f is not confident there, and only the others count
    ambiguous = IMAGES.clone()
    ambiguous[::2] = torch.maximum(ambiguous[::2], shift(ambiguous[::2]))
    mixed = pq.target_figures(f, ambiguous, labels_of(f, ambiguous), None, confidence=0.9)
    assert mixed["target_confident_share"] == 0.5 and mixed["target_sf_agreement"] == 1.0
    assert mixed["target_round_trip_agreement"] is None  # no round trip given
    assert pq.target_figures(f, ambiguous[::2], labels_of(f, ambiguous[::2]), None, 0.9)["target_sf_agreement"] is None


def test_tf_legibility_identity_content_free_and_consistent_relabelling():
    cfg = tiny_cfg()
    labels = torch.arange(80) % K
    tf = render(labels, seed=1)
    assert pq.tf_legibility(tf, labels, cfg, "cpu") >= 0.9
    # G_ST draws a random class whatever the source digit: nothing of the label is left
    random_class = render(torch.randint(K, (80,), generator=torch.Generator().manual_seed(2)), seed=1)
    assert pq.tf_legibility(random_class, labels, cfg, "cpu") <= 0.45
    # a consistent relabelling stays legible: the round trips, not this figure, see it (module docstring)
    assert pq.tf_legibility(shift(tf), labels, cfg, "cpu") >= 0.9
    assert pq.tf_legibility(tf, labels, tiny_cfg(fit_steps=0), "cpu") is None
    before = torch.random.get_rng_state()
    pq.tf_legibility(tf[:10], labels[:10], tiny_cfg(fit_steps=2), "cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's global RNG is not touched


def test_route_agreement_identity_and_permutation():
    """The G_ST route (a network fitted on T_f) and the G_TS route (f on S_f) agree on every target image when both
    translations keep the content, and on none when G_TS relabels (or when G_ST did: the fit learnt shifted bands)."""
    cfg = tiny_cfg()
    labels = torch.arange(80) % K
    target = render(labels, seed=3)
    f = reader(BandClassifier(), cfg)
    keeps, _ = pq.fit_tf_reader(render(labels, seed=1), labels, cfg, "cpu")
    assert pq.route_agreement(keeps, target, labels_of(f, target)) >= 0.95
    assert pq.route_agreement(keeps, target, labels_of(f, shift(target))) <= 0.05
    relabels, _ = pq.fit_tf_reader(shift(render(labels, seed=1)), labels, cfg, "cpu")
    assert pq.route_agreement(relabels, target, labels_of(f, target)) <= 0.05
    assert pq.fit_tf_reader(target, labels, tiny_cfg(fit_steps=0), "cpu") is None


def test_warning_is_one_line_naming_the_low_figures():
    cfg = tiny_cfg()
    good = dict.fromkeys(pq.DESCRIPTIONS, 1.0)
    assert pq.warning_of(good, cfg) is None
    assert pq.warning_of(dict.fromkeys(pq.DESCRIPTIONS), cfg) is None  # nothing measured: nothing to say
    bad = {**good, "source_round_trip_agreement": 0.05, "tf_legibility": 0.3, "target_route_agreement": 0.59}
    line = pq.warning_of(bad, cfg)
    assert "\n" not in line and "source_round_trip_agreement 5.0% < 80%" in line and "tf_legibility 30.0%" in line
    assert "target_route_agreement 59.0% < 60%" in line
    assert "target_sf_agreement" not in line


def test_model_range_classifier_reads_like_evaluation_and_is_frozen():
    cfg = tiny_cfg()
    cfg.data.load_size, cfg.data.image_size = 20, SIZE  # evaluation centre-crops 16 of 20
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, K))
    images = torch.randint(0, 256, (5, 1, 20, 20), dtype=torch.uint8)
    f = pq.model_range_classifier(net, cfg.data)
    x = (images.float() / 127.5 - 1).requires_grad_(True)
    assert torch.allclose(f(x), predict(net, images, cfg.data, pq.local_context("cpu")), atol=1e-5)
    # a CycleGAN image of another side is resized to the stored size first
    assert f(torch.nn.functional.interpolate(x.detach(), size=(16, 16))).shape == (5, K)
    f(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())  # a copy, frozen: the source network is untouched


def _data(tf: torch.Tensor, sf: torch.Tensor) -> DomainData:
    src = ImageTensors("S", IMAGES, LABELS, [f"s{i}" for i in range(len(IMAGES))], [str(k) for k in range(K)])
    tgt = ImageTensors("T", IMAGES, None, [f"t{i}" for i in range(len(IMAGES))], None)
    return DomainData(src, tgt, synthetic_target=tf, synthetic_source=sf)


def test_measure_into_writes_reuses_and_reports(tmp_path, monkeypatch):
    cfg = tiny_cfg(fit_steps=5)
    data = _data(IMAGES, IMAGES)
    first = pq.measure_into(tmp_path, cfg, data, (IMAGES, IMAGES), None, "cpu")
    assert first["figures"]["tf_legibility"] is not None and first["figures"]["source_round_trip_agreement"] is None
    assert "no finished source network" in first["notes"][0]
    assert json.loads((tmp_path / "quality.json").read_text()) == first

    def boom(*a, **k):
        raise AssertionError("refitted although the T_f fit was the same")

    monkeypatch.setattr(pq, "fit_tf_reader", boom)
    assert pq.measure_into(tmp_path, cfg, data, (IMAGES, IMAGES), None, "cpu") == first  # same key: reused
    (tmp_path / "quality.json").write_text(json.dumps({**first, "key": {**first["key"], "pairs": "other"}}))
    lent = pq.measure_into(tmp_path, cfg, data, (IMAGES, IMAGES), None, "cpu")  # other pairs, same T_f fit
    assert lent["figures"]["tf_legibility"] == first["figures"]["tf_legibility"]
    monkeypatch.undo()
    full = pq.measure_into(tmp_path, cfg, data, (shift(IMAGES), IMAGES), BandClassifier(), "cpu")
    figures = full["figures"]
    assert figures["tf_legibility"] == first["figures"]["tf_legibility"]  # fitted again (for the routes): same
    assert figures["source_round_trip_agreement"] == 0.0 and figures["target_round_trip_agreement"] == 1.0
    assert figures["target_route_agreement"] is not None
    assert full["notes"] == [] and "source_round_trip_agreement 0.0%" in full["warning"]
    run = tmp_path / "run"
    (run / "translate").mkdir(parents=True)
    (run / "translate" / "quality.json").write_text(json.dumps(full))
    blocks = pq.report_blocks(run)
    table = next(b for b in blocks if b[0] == "table")
    assert [r[0] for r in table[2]] == list(pq.DESCRIPTIONS) and table[2][0][2] == "0.0%"
    assert any(b[0] == "p" and b[1].startswith("Warning:") for b in blocks)
    assert pq.report_blocks(tmp_path / "nothing") == []


@pytest.mark.slow
def test_translate_then_run_fill_in_the_report(tmp_path):
    """`daaa translate` writes quality.json without the source-net figures (and says so); `daaa run` measures them
    after the source stage; `daaa report` shows the table."""
    run = tmp_path / "run"
    assert cli.main(["translate", *DEMO, "--out", str(run), *SMOKE]) == 0
    q = json.loads((run / "translate" / "quality.json").read_text())
    assert q["figures"]["tf_legibility"] is not None and q["figures"]["source_round_trip_agreement"] is None
    assert q["notes"] and not (run / "source").exists()  # no source network trained by `translate`
    assert cli.main(["run", *DEMO, "--out", str(run), *SMOKE]) == 0
    q = json.loads((run / "translate" / "quality.json").read_text())
    assert q["figures"]["source_round_trip_agreement"] is not None and q["notes"] == []
    assert q["key"]["source_network"] == pq.weights_fingerprint(_source_net(run))
    text = write_report([run], tmp_path / "report.md").read_text()
    assert "pairing quality (label-free)" in text and "source_round_trip_agreement" in text


def _source_net(run: Path) -> nn.Module:
    from daaa.config import config_from_dict
    from daaa.evaluate import load_network
    import yaml

    cfg = config_from_dict({k: v for k, v in yaml.safe_load((run / "config.yaml").read_text()).items()
                            if k != "preset"})
    return load_network(cfg, 10, run / "source" / "model.pt")


@pytest.mark.slow
def test_semantic_option_trains_the_source_first_and_resumes(tmp_path, monkeypatch):
    """With cyclegan.lambda_semantic > 0 the source network exists before the CycleGAN trains, is part of the
    translate stage's key, and an interrupted CycleGAN resumes with the reused source network."""
    from daaa import translate as tr_mod
    from daaa.cyclegan import CycleGAN

    run = tmp_path / "run"
    args = ["run", *DEMO, "--out", str(run), *SMOKE, "--set", "cyclegan.lambda_semantic=1"]
    real_run, real_step = tr_mod.run_translation, CycleGAN.training_step
    seen = []

    def check_order(*a, guide=None, **k):
        seen.append(((run / "source" / "stage.json").is_file(), guide is not None))
        return real_run(*a, guide=guide, **k)

    def crash_at_3(self, *a):
        if self.step == 3:  # the checkpoint of step 2 is on disk (smoke: every 2 steps)
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(tr_mod, "run_translation", check_order)
    monkeypatch.setattr(CycleGAN, "training_step", crash_at_3)
    assert cli.main(args) == 130
    assert seen == [(True, True)] and not (run / "translate" / "stage.json").exists()
    steps = []
    monkeypatch.setattr(CycleGAN, "training_step", lambda self, *a: (steps.append(self.step), real_step(self, *a))[1])
    assert cli.main(args) == 0
    assert steps == [2, 3]  # resumed from step 2: the reused source network gives the same translate key
    key = json.loads((run / "translate" / "stage.json").read_text())["key"]
    assert key["cyclegan"]["lambda_semantic"] == 1.0
    assert key["source_network"] == pq.weights_fingerprint(_source_net(run))
    hist = [json.loads(line) for line in (run / "translate" / "history.jsonl").read_text().splitlines()]
    assert all("semantic" in h for h in hist)
    notes = json.loads((run / "translate" / "quality.json").read_text())["notes"]
    assert any("no independent evidence" in n for n in notes)  # the option optimises the figures' own judge
    steps.clear()
    assert cli.main(args) == 0 and steps == []  # everything reused


def test_translate_stage_key_without_the_option_is_unchanged():
    from daaa.translate import stage_key

    cfg = tiny_cfg()
    src = ImageTensors("S", IMAGES, LABELS, [str(i) for i in range(len(IMAGES))], None)
    key = stage_key(cfg, src, src)
    assert "lambda_semantic" not in key["cyclegan"] and "quality" not in key["cyclegan"]
    assert "source_network" not in key  # run folders made before the option stay valid
    cfg.cyclegan.lambda_semantic = 0.5
    a, b = stage_key(cfg, src, src, BandClassifier()), stage_key(cfg, src, src, nn.Linear(2, 2))
    assert a["cyclegan"]["lambda_semantic"] == 0.5 and a["source_network"] != b["source_network"]


def test_typeset_pair_writes_labelled_folders_daaa_reads(tmp_path):
    """benchmarks/typeset_pair.py at a tiny size: labelled source/target/target_test folders with the same ten
    classes, typeset targets in colour, fonts from matplotlib's own folder (no training here)."""
    import subprocess
    import sys

    from daaa.data import resolve_domain
    from daaa.data.domain import check_same_classes, load_tensors
    from daaa.data.mnist import DIGIT_CLASSES

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "pair"
    subprocess.run([sys.executable, str(root / "benchmarks" / "typeset_pair.py"), str(out), "--n-source", "60",
                    "--n-target", "20", "--n-test", "10"], check=True, cwd=root, capture_output=True)
    cfg = Config().data
    domains = {role: resolve_domain(str(out / role), "source" if role == "source" else "target_test", cfg)
               for role in ("source", "target", "target_test")}
    for role, n in (("source", 60), ("target", 20), ("target_test", 10)):
        assert len(domains[role]) == n and domains[role].classes == DIGIT_CLASSES
    for role in ("target", "target_test"):  # balanced classes, each image in its digit's folder
        assert sorted(domains[role].labels) == sorted(list(range(10)) * (len(domains[role]) // 10))
    check_same_classes(domains["source"], domains["target_test"])
    target = load_tensors(domains["target"], 32, 3)
    assert target.images.shape == (20, 3, 32, 32)
    assert target.images.float().std(1).mean() > 10  # coloured, not grey
    assert len({bytes(img.numpy()) for img in target.images}) == 20
    fonts = (out / "fonts.txt").read_text().split()
    assert len(fonts) >= 10 and all(f.endswith(".ttf") for f in fonts) and "cmsy10.ttf" not in fonts
    assert (out / "preview.png").is_file()


@pytest.mark.parametrize("override, needle", [("cyclegan.lambda_semantic=-1", "cyclegan.lambda_semantic"),
                                              ("cyclegan.quality.confidence=1.5", "cyclegan.quality.confidence"),
                                              ("cyclegan.quality.held_out_fraction=1", "held_out_fraction"),
                                              ("cyclegan.quality.fit_steps=-3", "cyclegan.quality.fit_steps"),
                                              ("cyclegan.quality.min_route_agreement=2", "min_route_agreement")])
def test_bad_options_are_one_line_errors(override, needle):
    from daaa.config import load_config
    from daaa.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", [override])
    assert load_config("digits-cpu").cyclegan.lambda_semantic == 0.0  # off in the presets: the paper's CycleGAN
